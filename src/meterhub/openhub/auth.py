"""MQTT authentication for open hub links, in front of the gateways' authenticator.

A username starting with ``ohu_`` is an open hub link: its client id, username and password must match
credentials issued by ``device.openHubConfig``. Such a client may subscribe only to its own source topic
and publish nowhere (the sink topic is "not supported" in the document: commands go through HTTP).
Expired credentials get CONNACK 0x05, which makes Tuya's SDK fetch a new configuration; unknown or
wrong ones get 0x04.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.openhub.store import find_link
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
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted

USERNAME_PREFIX = "ohu_"


class OpenHubAuthenticator:
    def __init__(self, engine: Engine, fallback: Authenticator) -> None:
        self._engine = engine
        self._fallback = fallback

    async def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, peer: str
    ) -> AuthResult:
        if not username or not username.startswith(USERNAME_PREFIX):
            return await self._fallback.authenticate(client_id, username, password, peer)
        if password is None:
            return AuthResult(CONNACK_BAD_CREDENTIALS, None, "password required")
        try:
            link, why = await asyncio.to_thread(
                find_link, self._engine, client_id, username, password.decode("utf-8", "replace")
            )
        except Exception as exc:
            _repeats.error("lookup_failed", "open hub credential lookup failed", error=str(exc))
            return AuthResult(CONNACK_UNAVAILABLE, None, "storage unavailable")
        if link is None:
            code = CONNACK_NOT_AUTHORIZED if why == "credentials expired" else CONNACK_BAD_CREDENTIALS
            return AuthResult(code, None, why)
        principal = Principal(
            client_id=client_id,
            username=username,
            kind="openhub",
            subscribe_exact=frozenset({link.source_topic}),
            expires_at=link.expires_at,
            extra={"uid": link.uid, "key": link.key, "version": link.msg_version, "topic": link.source_topic},
        )
        return AuthResult(CONNACK_ACCEPTED, principal)
