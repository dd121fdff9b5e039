"""Gateway authentication: the document's md5(clientId + username) rule, vendors and allowlists.

CONNACK codes (CLARIFICATIONS.md): unknown username or wrong password -> 0x04; a disabled vendor,
a disabled gateway, a gateway not on its vendor's allowlist, or a gateway id that belongs to another
vendor -> 0x05; the database unreachable -> 0x03.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable

from sqlalchemy import Engine

from meterhub.logs import get_logger
from meterhub.storage import registry
from meterhub.transport import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_UNAVAILABLE,
    AuthResult,
    Principal,
)

log = get_logger(__name__)


def gateway_password(client_id: str, username: str) -> str:
    """The password a gateway must present: md5 hex of clientId + username."""
    return hashlib.md5((client_id + username).encode()).hexdigest()


def gateway_principal(client_id: str, username: str | None, vendor_id: int | None) -> Principal:
    prefix = f"gateway_id/{client_id}/"
    return Principal(
        client_id=client_id,
        username=username,
        kind="gateway",
        publish_prefix=prefix,
        subscribe_prefix=prefix,
        extra={"vendor_id": vendor_id},
    )


def check_gateway(engine: Engine, client_id: str, username: str | None, password: bytes | None) -> AuthResult:
    """The whole decision, synchronously (runs in a worker thread)."""
    if not username or password is None:
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "username and password required")
    vendor = registry.vendor_by_username(engine, username)
    expected = gateway_password(client_id, username).encode()
    if vendor is None:
        hmac.compare_digest(expected, password)  # same work either way
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "unknown username")
    if not hmac.compare_digest(expected, password.strip().lower()):
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "wrong password")
    if not vendor.enabled:
        return AuthResult(CONNACK_NOT_AUTHORIZED, None, "vendor disabled")
    gateway = registry.get_gateway(engine, client_id)
    if gateway is not None:
        if gateway.vendor_id is not None and gateway.vendor_id != vendor.id:
            return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway id belongs to another vendor")
        if not gateway.enabled:
            return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway disabled")
    if vendor.allowlist_enabled and (gateway is None or not gateway.allowed):
        return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway not on the vendor's allowlist")
    return AuthResult(CONNACK_ACCEPTED, gateway_principal(client_id, username, vendor.id))


class GatewayAuthenticator:
    """:class:`meterhub.transport.Authenticator` for meter gateways, backed by the database.

    ``healthy`` is asked first: while storage cannot commit, new gateways get 0x03 rather than a
    connection whose reports could not be stored.
    """

    def __init__(self, engine: Engine, healthy: Callable[[], bool] = lambda: True) -> None:
        self._engine = engine
        self._healthy = healthy

    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        if not self._healthy():
            return AuthResult(CONNACK_UNAVAILABLE, None, "storage unavailable")
        try:
            return await asyncio.to_thread(check_gateway, self._engine, client_id, username, password)
        except Exception as exc:
            log.error("authentication lookup failed", error=str(exc), client_id=client_id)
            return AuthResult(CONNACK_UNAVAILABLE, None, "storage unavailable")
