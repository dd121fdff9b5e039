"""Gateway authentication: the document's md5(clientId + username) rule, vendors and allowlists.

CONNACK codes (CLARIFICATIONS.md): unknown username or wrong password -> 0x04; a disabled vendor,
a disabled gateway, a gateway not on its vendor's allowlist, or a gateway id that belongs to another
vendor -> 0x05; the database unreachable -> 0x03. Too many failed logins (:class:`ThrottledAuthenticator`,
:mod:`meterhub.core.throttle`) -> 0x04 without checking, for a short ban.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Sequence

from sqlalchemy import Engine

from meterhub.core.throttle import LoginThrottle
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.storage import registry
from meterhub.transport import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_UNAVAILABLE,
    Authenticator,
    AuthResult,
    Principal,
)

log = get_logger(__name__)
_repeats = RateLimitedLog(log)


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


def decide(
    client_id: str,
    username: str | None,
    password: bytes | None,
    vendor: registry.Vendor | None,
    gateway: registry.GatewayRecord | None,
) -> AuthResult:
    """The decision for one gateway, given its vendor (by username) and its row (None if none)."""
    if not username or password is None:
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "username and password required")
    expected = gateway_password(client_id, username).encode()
    if vendor is None:
        hmac.compare_digest(expected, password)  # same work either way
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "unknown username")
    if not hmac.compare_digest(expected, password.strip().lower()):
        return AuthResult(CONNACK_BAD_CREDENTIALS, None, "wrong password")
    if not vendor.enabled:
        return AuthResult(CONNACK_NOT_AUTHORIZED, None, "vendor disabled")
    if gateway is not None:
        if gateway.vendor_id is not None and gateway.vendor_id != vendor.id:
            return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway id belongs to another vendor")
        if not gateway.enabled:
            return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway disabled")
    if vendor.allowlist_enabled and (gateway is None or not gateway.allowed):
        return AuthResult(CONNACK_NOT_AUTHORIZED, None, "gateway not on the vendor's allowlist")
    return AuthResult(CONNACK_ACCEPTED, gateway_principal(client_id, username, vendor.id))


Credentials = tuple[str, str | None, bytes | None]  # client id, username, password


def check_gateways(engine: Engine, requests: Sequence[Credentials]) -> list[AuthResult]:
    """The decisions for many connecting gateways, with two queries for the lot (runs in a thread)."""
    asking = [(c, u) for c, u, p in requests if u and p is not None]
    with engine.connect() as conn:
        vendors = registry.vendors_by_usernames(conn, {u for _, u in asking if u})
        gateways = registry.gateways_by_ids(conn, {c for c, _ in asking})
    return [decide(c, u, p, vendors.get(u or ""), gateways.get(c)) for c, u, p in requests]


class GatewayAuthenticator:
    """:class:`meterhub.transport.Authenticator` for meter gateways, backed by the database.

    ``healthy`` is asked first: while storage cannot commit, new gateways get 0x03 rather than a
    connection whose reports could not be stored.

    Lookups are batched: one worker-thread job at a time answers every CONNECT that arrived meanwhile
    with two queries. A fleet reconnecting at once (a restart, a network outage) costs a few queries
    per loop turn, not two per gateway, so the CONNACKs keep up instead of timing out and feeding a
    reconnection storm.
    """

    #: Most CONNECTs answered by one lookup.
    batch_max = 2000

    def __init__(self, engine: Engine, healthy: Callable[[], bool] = lambda: True) -> None:
        self._engine = engine
        self._healthy = healthy
        self._waiting: list[tuple[Credentials, asyncio.Future[AuthResult]]] = []
        self._drainer: asyncio.Task[None] | None = None  # at most one lookup job at a time
        self.lookups = 0  # lookup jobs run (one per batch of CONNECTs)

    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        if not self._healthy():
            return AuthResult(CONNACK_UNAVAILABLE, None, "storage unavailable")
        if not username or password is None:
            return decide(client_id, username, password, None, None)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AuthResult] = loop.create_future()
        self._waiting.append(((client_id, username, password), fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.batch_max]
            del self._waiting[: self.batch_max]
            batch = [(creds, fut) for creds, fut in batch if not fut.done()]  # timed out meanwhile
            if not batch:
                continue
            self.lookups += 1
            try:
                results = await asyncio.to_thread(check_gateways, self._engine, [c for c, _ in batch])
            except Exception as exc:
                _repeats.error(
                    "lookup_failed", "authentication lookup failed", error=str(exc), gateways=len(batch)
                )
                results = [AuthResult(CONNACK_UNAVAILABLE, None, "storage unavailable")] * len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


class ThrottledAuthenticator:
    """Any authenticator behind a :class:`meterhub.core.throttle.LoginThrottle`: a CONNECT from an
    address or for a client id (from the addresses that failed) past its failure budget gets
    CONNACK 0x04 at once, without its password being checked; other CONNECTs are checked by
    ``inner`` and its 0x04 answers are counted against the budgets."""

    def __init__(self, inner: Authenticator, throttle: LoginThrottle) -> None:
        self.inner = inner
        self.throttle = throttle

    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        why = self.throttle.refusal(client_id, peer)
        if why is not None:
            return AuthResult(CONNACK_BAD_CREDENTIALS, None, why)
        result = await self.inner.authenticate(client_id, username, password, peer)
        if result.code == CONNACK_BAD_CREDENTIALS:
            self.throttle.failed(client_id, peer)
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # the rest is the inner authenticator's (e.g. ``lookups``)
