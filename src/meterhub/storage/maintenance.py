"""The storage maintenance job: partitions ahead of time, rollups in the right zone, retention.

Every ``storage_maintenance_interval`` seconds (and once at start, before reports are written), one
node of a cluster (PostgreSQL advisory lock :data:`LOCK_KEY`; the others skip the run) does:

- PostgreSQL: rebuild the rollups if their daily buckets are not in the configured ``timezone``
  (:func:`meterhub.storage.rollups.ensure_zone`; the first start after the migration), create the
  partitions of the window the protocol
  accepts (:func:`meterhub.storage.partitions.ensure_window`), drop the ``reports`` partitions older
  than ``retention_raw_days`` and the ``rollups`` partitions older than ``retention_rollup_days``
  (whole partitions, never a mass DELETE; a partition goes once its whole range has expired).
- SQLite: delete expired raw rows in chunks of :data:`SQLITE_CHUNK` (each its own short transaction,
  at most :data:`SQLITE_MAX_ROWS` per run), so the writer is never locked out for long.

and every ``rollup_interval`` seconds the rollup job (PostgreSQL, its own advisory lock) folds the
reports committed since into the rollups (:func:`meterhub.storage.rollups.materialize`).

What it did is in :class:`MaintenanceStats` (``/healthz`` ``storage.retention`` and ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine

from meterhub.logs import get_logger
from meterhub.storage import partitions, rollups

log = get_logger(__name__)

#: PostgreSQL advisory lock key of the maintenance run (``pg_try_advisory_xact_lock``).
LOCK_KEY = 0x6D68_0002
SQLITE_CHUNK = 5000
SQLITE_MAX_ROWS = 200_000
DAY = 86400.0


@dataclass(slots=True)
class MaintenanceStats:
    runs: int = 0
    skipped_locked: int = 0
    failures: int = 0
    last_run_at: float | None = None
    last_error: str | None = None
    partitions: int = 0
    oldest_partition: float | None = None
    oldest_report: float | None = None
    partitions_created: int = 0
    partitions_dropped: int = 0
    rows_deleted: int = 0
    rollup_rebuilds: int = 0
    rollup_runs: int = 0
    rollup_failures: int = 0
    #: rollups hold every report with t below this (Unix s)
    rollup_done: float | None = None
    rollup_last_seconds: float | None = None
    rollup_dirty_buckets: int = 0


class StorageMaintenance:
    """Runs :meth:`run_once` in a worker thread every ``interval`` seconds."""

    def __init__(
        self,
        engine: Engine,
        *,
        zone: str,
        raw_days: float | None,
        rollup_days: float | None,
        interval: float,
        rollup_interval: float = 30.0,
    ) -> None:
        self.engine = engine
        self.zone = zone
        self.raw_days = raw_days
        self.rollup_days = rollup_days
        self.interval = interval
        self.rollup_interval = rollup_interval
        self.stats = MaintenanceStats()
        self._tasks: list[asyncio.Task[None]] = []

    def info(self) -> dict[str, Any]:
        """For ``/healthz``: the settings and what the runs did."""
        return {
            "retention_raw_days": self.raw_days,
            "retention_rollup_days": self.rollup_days,
            "rollup_zone": self.zone,
            **asdict(self.stats),
        }

    async def start(self) -> None:
        await asyncio.to_thread(self.run_once)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(self.interval, self.run_once))]
        if self.engine.dialect.name == "postgresql":
            self._tasks.append(loop.create_task(self._loop(self.rollup_interval, self.run_rollups)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, interval: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(job)

    def run_rollups(self, now: float | None = None) -> dict[str, Any] | None:
        """One run of the rollup job (errors counted and logged, never raised)."""
        st = self.stats
        started = time.perf_counter()
        try:
            done = rollups.materialize(self.engine, self.zone, now)
        except Exception as exc:
            st.rollup_failures += 1
            log.warning("rollup job failed", error=str(exc).strip().splitlines()[0][:300] if str(exc) else "")
            return None
        st.rollup_runs += 1
        st.rollup_last_seconds = time.perf_counter() - started
        if done is not None:
            st.rollup_done = done["done"]
            st.rollup_dirty_buckets += done["dirty"]
        return done

    def run_once(self, now: float | None = None) -> MaintenanceStats:
        """One run (any error is counted and logged, never raised: the next run tries again)."""
        now = time.time() if now is None else now
        st = self.stats
        try:
            if self.engine.dialect.name == "postgresql":
                self._postgresql(now)
            else:
                self._sqlite(now)
            st.last_error = None
        except Exception as exc:
            st.failures += 1
            st.last_error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            log.warning("storage maintenance failed", error=st.last_error)
        st.runs += 1
        st.last_run_at = now
        return st

    def cutoff(self, days: float | None, now: float) -> float | None:
        return None if days is None else now - days * DAY

    def _postgresql(self, now: float) -> None:
        from meterhub.cluster.store import try_lock

        st = self.stats
        if rollups.ensure_zone(self.engine, self.zone, now):
            st.rollup_rebuilds += 1
            log.info("rollups rebuilt from the raw reports", zone=self.zone)
        with self.engine.begin() as conn:
            if not try_lock(conn, LOCK_KEY):
                st.skipped_locked += 1
                return
            raw_cut = self.cutoff(self.raw_days, now)
            roll_cut = self.cutoff(self.rollup_days, now)
            window = now - partitions.BEHIND_DAYS * DAY
            for spec, cut in ((partitions.REPORTS, raw_cut), (partitions.ROLLUPS, roll_cut)):
                lo = window if cut is None else max(window, cut)
                created = partitions.ensure(conn, spec, lo, now + partitions.AHEAD_DAYS * DAY)
                st.partitions_created += len(created)
                if cut is not None:
                    dropped = partitions.drop_before(conn, spec, cut)
                    st.partitions_dropped += len(dropped)
                    if dropped:
                        log.info("expired partitions dropped", table=spec.table, partitions=dropped)
            have = partitions.partitions(conn, partitions.REPORTS)
            st.partitions = len(have)
            st.oldest_partition = have[0].lo if have else None

    def _sqlite(self, now: float) -> None:
        st = self.stats
        cut = self.cutoff(self.raw_days, now)
        deleted = 0
        while cut is not None and deleted < SQLITE_MAX_ROWS:
            with self.engine.begin() as conn:
                n = conn.exec_driver_sql(
                    "DELETE FROM reports WHERE id IN (SELECT id FROM reports WHERE t < ? LIMIT ?)",
                    (cut, SQLITE_CHUNK),
                ).rowcount
            deleted += n
            if n < SQLITE_CHUNK:
                break
            time.sleep(0.01)  # let the writer in between chunks
        st.rows_deleted += deleted
        with self.engine.connect() as conn:
            st.oldest_report = conn.exec_driver_sql("SELECT min(t) FROM reports").scalar()
