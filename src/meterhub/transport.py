"""The small interface between a message transport and the application.

meterhub's own MQTT server (``meterhub.mqtt.server``) implements it; a scale-out transport behind an
external broker can implement the same. The protocol services in ``meterhub.core`` only see these
types, never a socket or a broker.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

# CONNACK return codes (MQTT 3.1.1 table 3.1), as CLARIFICATIONS.md assigns them.
CONNACK_ACCEPTED = 0x00
CONNACK_BAD_PROTOCOL = 0x01
CONNACK_ID_REJECTED = 0x02
CONNACK_UNAVAILABLE = 0x03
CONNACK_BAD_CREDENTIALS = 0x04
CONNACK_NOT_AUTHORIZED = 0x05


@dataclass(slots=True)
class Principal:
    """Who a connection is, and what it may touch.

    A client may publish to topics under ``publish_prefix`` and subscribe to filters under
    ``subscribe_prefix`` or exactly equal to one of ``subscribe_exact``.
    """

    client_id: str
    username: str | None
    kind: str  # "gateway", "openhub", ...
    publish_prefix: str | None = None
    subscribe_prefix: str | None = None
    subscribe_exact: frozenset[str] = frozenset()
    expires_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def publishes(self) -> bool:
        """Whether this client may publish anything at all (gateways do; open hub links do not)."""
        return self.publish_prefix is not None

    def may_publish(self, topic: str) -> bool:
        return self.publish_prefix is not None and topic.startswith(self.publish_prefix)

    def may_subscribe(self, topic_filter: str) -> bool:
        if topic_filter in self.subscribe_exact:
            return True
        return self.subscribe_prefix is not None and topic_filter.startswith(self.subscribe_prefix)


@dataclass(slots=True)
class AuthResult:
    code: int
    principal: Principal | None = None
    reason: str = ""


class Authenticator(Protocol):
    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult: ...


class ApplicationHandler(Protocol):
    """What the transport calls. ``message`` may return an awaitable: a QoS 1/2 message is only
    acknowledged to the client once it completes (so an acknowledged report is a stored report)."""

    def client_connected(self, principal: Principal, peer: str) -> None: ...

    def client_disconnected(self, principal: Principal, reason: str) -> None: ...

    def message(self, principal: Principal, topic: str, payload: bytes) -> Awaitable[Any] | None: ...


class Southbound(Protocol):
    """What the application calls to reach clients."""

    def publish(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Deliver (or queue, for a persistent session) a message; False if the client has no
        session subscribed to ``topic``."""
        ...

    def is_connected(self, client_id: str) -> bool: ...

    def disconnect(self, client_id: str, reason: str = "") -> bool: ...
