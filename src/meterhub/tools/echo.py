"""A trivial application handler for transport tests and benchmarks.

Every message a client publishes on ``T`` is published back to that client on ``T/echo`` with QoS 1
(if the client subscribed to it). Whether the acknowledgement waits for anything is chosen with
``ack_delay`` (seconds, 0 = acknowledge at once), to exercise the deferred-ack path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from meterhub.transport import Principal, Southbound


class EchoHandler:
    def __init__(
        self, southbound: Southbound | None = None, *, ack_delay: float = 0.0, keep: int = 1000
    ) -> None:
        self.southbound = southbound
        self.ack_delay = ack_delay
        self.received: deque[tuple[str, str, bytes]] = deque(maxlen=keep)
        self.events: deque[tuple[str, str, str]] = deque(maxlen=keep)

    def client_connected(self, principal: Principal, peer: str) -> None:
        self.events.append(("connected", principal.client_id, peer))

    def client_disconnected(self, principal: Principal, reason: str) -> None:
        self.events.append(("disconnected", principal.client_id, reason))

    def message(self, principal: Principal, topic: str, payload: bytes) -> Any:
        self.received.append((principal.client_id, topic, payload))
        if self.southbound is not None:
            self.southbound.publish(principal.client_id, topic + "/echo", payload, 1)
        if self.ack_delay:
            return asyncio.ensure_future(asyncio.sleep(self.ack_delay))
        return None
