"""Gateway claims stored in batches: every CONNECT that arrives while a claim is being stored waits
for the next transaction, which stores them all.

Before, each accepted CONNECT claimed its gateway in a transaction of its own on the thread pool: a
reconnect storm of 10,000 gateways was 10,000 fsync'd commits from six pool threads fighting the
writer thread for SQLite's one write lock (busy waits; authentications timed out and were answered
0x03). Now one claim job runs at a time and takes every claim queued meanwhile (at most ``batch_max``),
in arrival order sorted by gateway id (PostgreSQL row locks always taken in the same order, so two
nodes claiming overlapping sets cannot deadlock). Each claim still gets its own generation: the same
gateway twice in a batch gets two, in order.
"""

from __future__ import annotations

import asyncio
import random
import time

from sqlalchemy import Engine

from meterhub.cluster import store
from meterhub.storage.database import TRANSIENT_RETRIES, transient


class ClaimBatcher:
    """``await claim(gw)`` -> ``(previous owner, new generation)``, as :func:`store.claim_gateway`."""

    def __init__(self, engine: Engine, node_id: str, batch_max: int = 1000) -> None:
        self.engine = engine
        self.node_id = node_id
        self.batch_max = batch_max
        self._queued: list[tuple[str, asyncio.Future[tuple[str | None, int]]]] = []
        self._running = False
        self.batches = 0
        self.retries = 0  # batches tried again after a deadlock

    async def claim(self, gateway_id: str) -> tuple[str | None, int]:
        fut: asyncio.Future[tuple[str | None, int]] = asyncio.get_running_loop().create_future()
        self._queued.append((gateway_id, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[: self.batch_max], self._queued[self.batch_max :]
                batch.sort(key=lambda item: item[0])  # stable: one gateway's claims keep their order
                try:
                    results = await self._store([gw for gw, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._running = False

    async def _store(self, gateway_ids: list[str]) -> list[tuple[str | None, int]]:
        """One transaction for the batch, tried again (a few times, after a short pause) when the
        database aborts it for another transaction's sake: a deadlock with the writer's batch or a
        draining node's release must not fail every CONNECT of the batch."""
        for attempt in range(TRANSIENT_RETRIES):
            try:
                return await asyncio.to_thread(
                    store.claim_gateways, self.engine, gateway_ids, self.node_id, time.time()
                )
            except Exception as exc:
                if not transient(exc) or attempt == TRANSIENT_RETRIES - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(0.01 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")
