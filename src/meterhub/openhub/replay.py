"""Replay protection for the open hub's signed requests, shared by every node through the database.

A signed request is accepted while its ``t`` is within ``window_ms`` of the server's clock. Inside
that window the same request could be sent again (a replayed config call would hand out the link
password again), so each accepted signature (and nonce, when the caller sends one) is recorded in
``openhub_seen_requests`` under a unique key until its window is over; a second use anywhere in the
cluster hits the unique key and is refused with Tuya's 1113 "do not repeat the operation in a short
time". Expired rows are purged in bounded batches (``purge_batch``), at most one batch per accepted
request and only when one is due, so the purge keeps pace with the inserts without long deletes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from sqlalchemy import Engine

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.openhub import store
from meterhub.openhub.store import OpenHubError

log = get_logger(__name__)
log_repeated = RateLimitedLog(log)

MAX_CLOCK_SKEW_MS = 10 * 60 * 1000  # how far a signed request's t may be from the server's clock
REPLAY_CODE = 1113
REPLAY_MSG = "do not repeat the operation in a short time"


class ReplayGuard:
    #: Most expired rows deleted by one purge.
    purge_batch = 1000
    #: Seconds between purges while the last one found fewer than a full batch.
    purge_interval = 10.0

    def __init__(self, engine: Engine, window_ms: int) -> None:
        self._engine = engine
        self._window_s = window_ms / 1000
        self._next_purge = 0.0
        self.stats: Counter[str] = Counter()

    async def check(self, client_id: str, sign: str, nonce: str, t_ms: int) -> None:
        """Record this request; raises :class:`OpenHubError` 1113 if it was seen before."""
        keys = [store.seen_key("sign", client_id, sign.upper())]
        if nonce:
            keys.append(store.seen_key("nonce", client_id, nonce))
        expires_at = t_ms / 1000 + self._window_s + 1.0
        fresh = await asyncio.to_thread(store.remember_request, self._engine, keys, expires_at)
        if not fresh:
            self.stats["replay.refused"] += 1
            log_repeated.warning("replay", "replayed open hub request refused", client_id=client_id)
            raise OpenHubError(REPLAY_CODE, REPLAY_MSG)
        self.stats["replay.recorded"] += 1
        if time.monotonic() >= self._next_purge:
            await self._purge()

    async def _purge(self) -> None:
        try:
            purged = await asyncio.to_thread(
                store.purge_seen_requests, self._engine, time.time(), self.purge_batch
            )
        except Exception as exc:  # the purge is housekeeping: never fail the request for it
            log.warning("purging seen open hub requests failed", error=str(exc))
            purged = 0
        self.stats["replay.purged"] += purged
        # a full batch: more are waiting, purge again on the next request
        self._next_purge = 0.0 if purged >= self.purge_batch else time.monotonic() + self.purge_interval
