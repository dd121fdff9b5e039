"""Database access: engine set-up, migrations, and the group-commit writer.

Callers never see SQL dialects: :class:`Database` picks SQLite or PostgreSQL flavours of the few
statements that differ (upserts), and everything else is SQLAlchemy Core.

Writes on the message hot path go through :class:`GroupCommitWriter`: a thread that takes every
operation queued since its last commit, applies them in one transaction, commits, and only then
tells the callers (in the event loop) that their data is durable. Many reports share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, event, insert, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.storage import conformance_rows, pg_bulk, schema, sqlite_fast

log = get_logger(__name__)
#: Failed writes are logged once per kind and interval, with a count (a full disk fails every batch).
_repeats = RateLimitedLog(log)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class StorageError(Exception):
    """The database could not do what was asked (unavailable, full, locked)."""


def brief_error(exc: BaseException, limit: int = 300) -> str:
    """A database error in one short line: the driver's message without SQLAlchemy's statement and
    parameters (for a batch of 2,000 rows those made every log line kilobytes long)."""
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line[:limit]


class RowRefused(StorageError):
    """The database refused this group's data (a constraint, a value it cannot hold) while it
    committed the others: the group is not stored, and the database is not failing."""


def row_refused(error: BaseException) -> bool:
    """Whether ``error`` is the database refusing the data rather than the database failing.

    Refusals: integrity errors (a constraint, a trigger raising ``RAISE(ABORT)``/``check_violation``),
    data errors (a value the column type cannot hold: NUL in PostgreSQL text, a number out of range,
    a string too long) and errors binding one row's parameters in Python. Everything else (lost or
    refused connections, locks, a disk full, a missing table, pool timeouts) is the database failing.
    """
    if isinstance(error, (sa_exc.IntegrityError, sa_exc.DataError)):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        return False
    if isinstance(error, sa_exc.StatementError):  # a parameter failed in Python, before the database
        return True
    if isinstance(error, sa_exc.SQLAlchemyError):
        return False
    return isinstance(error, (TypeError, ValueError, OverflowError))


#: SQLSTATEs of a transaction the database aborted so that another could go on (deadlock detected,
#: serialization failure): the same transaction tried again is expected to succeed.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
#: How often the writer tries a batch again after such an abort (other failures: once).
TRANSIENT_RETRIES = 5


def transient(error: BaseException) -> bool:
    """Whether ``error`` is the database aborting the transaction for another's sake (PostgreSQL's
    deadlock detector, a serialization failure): worth trying again, not a failing database."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) in TRANSIENT_SQLSTATES


def create_db_engine(url: str, *, sqlite_synchronous: str = "FULL") -> Engine:
    """Create an engine; for SQLite, turn on WAL and the chosen durability level."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        sync_mode = sqlite_synchronous.upper()
        if sync_mode not in {"FULL", "NORMAL", "EXTRA"}:
            raise ValueError(f"sqlite_synchronous must be FULL, NORMAL or EXTRA, not {sqlite_synchronous!r}")

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync_mode}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
    )


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def upsert(
    conn: Connection,
    table: Any,
    keys: Sequence[str],
    rows: list[dict[str, Any]],
    update_cols: Sequence[str],
    where_newer: str | None = None,
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE for SQLite and PostgreSQL alike.

    ``where_newer`` names a column: the row is only updated when the new value of that column is not
    older than the stored one (so buffered, older reports do not overwrite the latest state).
    """
    if not rows:
        return
    stmt = _upsert_statement(conn.dialect.name, table, tuple(keys), tuple(update_cols), where_newer)
    conn.execute(stmt, rows)


@functools.lru_cache(maxsize=256)
def _upsert_statement(
    dialect: str, table: Any, keys: tuple[str, ...], update_cols: tuple[str, ...], where_newer: str | None
) -> Any:
    """The statement of :func:`upsert`, built once per shape. Building it makes an ``excluded``
    alias of the table (a copy of every column, in reference cycles): per commit, that was ~60
    objects of garbage only a full collection frees (a 10,000-gateway connect burst left 180,000)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(table)
    set_ = {c: stmt.excluded[c] for c in update_cols}
    where = None
    if where_newer is not None:
        where = table.c[where_newer] <= stmt.excluded[where_newer]
    return stmt.on_conflict_do_update(index_elements=list(keys), set_=set_, where=where)


# --- operations the writer understands -------------------------------------------------------------
# Each kind is applied in this order within a batch, so a device sync in the same batch as its first
# report is written first. Within a kind, submission order is kept.


def _merged_upserts(
    conn: Connection, table: Any, key: str, rows: list[dict[str, Any]], insert_only: frozenset[str]
) -> None:
    """Upsert rows that each carry their own set of columns (columns a row leaves out are kept).

    Rows for the same key are merged first (later values win, as if applied in order; ``insert_only``
    columns keep the first row's), then rows with the same columns go in one executemany: a fleet
    re-syncing at once is a few statements per batch, not one per device.
    """
    merged: dict[Any, dict[str, Any]] = {}
    for row in rows:
        seen = merged.get(row[key])
        if seen is None:
            merged[row[key]] = dict(row)
        else:
            seen.update({k: v for k, v in row.items() if k not in insert_only})
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    # by key: row locks taken in one order (as gateway claims take theirs), fewer deadlocks
    for _, row in sorted(merged.items()):
        groups.setdefault(tuple(sorted(row)), []).append(row)
    for columns, group in groups.items():
        upsert(conn, table, [key], group, [c for c in columns if c != key and c not in insert_only])


def _apply_devices(conn: Connection, rows: list[dict[str, Any]]) -> None:
    # Each sync carries its own set of fields: fields a sync leaves out are kept.
    _merged_upserts(conn, schema.devices, "cid", rows, frozenset({"first_seen", "online"}))


def _apply_device_moves(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """An operator's move of a device to another gateway (and so to that gateway's vendor)."""
    d = schema.devices
    conn.execute(
        update(d)
        .where(d.c.cid == bindparam("b_cid"))
        .values(gateway_id=bindparam("b_gateway_id"), vendor_id=bindparam("b_vendor_id")),
        [{"b_cid": r["cid"], "b_gateway_id": r["gateway_id"], "b_vendor_id": r["vendor_id"]} for r in rows],
    )


def _apply_rebinds(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(schema.device_rebinds), rows)


# The two statements every report runs go to the driver directly: rows are tuples in column order,
# values already JSON text. SQLAlchemy's per-row parameter processing for executemany cost more CPU
# than the rest of the report's path (measured: docs/benchmarks.md).
_REPORTS_SQL = (
    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest) "
    "VALUES ({p}) ON CONFLICT (gateway_id, request_id, digest, t) DO NOTHING"
)
_LATEST_SQL = (
    "INSERT INTO latest_values (cid, dp_id, value, num, t, received_at) VALUES ({p}) "
    "ON CONFLICT (cid, dp_id) DO UPDATE SET value = excluded.value, num = excluded.num, t = excluded.t, "
    "received_at = excluded.received_at WHERE latest_values.t <= excluded.t"
)
_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def _driver_sql(conn: Connection, template: str, columns: int) -> str:
    marker = _MARKERS.get(conn.dialect.paramstyle)
    if marker is None:  # pragma: no cover - the drivers meterhub supports use one of the above
        raise StorageError(f"unsupported DBAPI paramstyle {conn.dialect.paramstyle}")
    return template.format(p=", ".join([marker] * columns))


def _apply_reports(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """History rows ``(gateway_id, request_id, cid, dp_id, value_json, num, t, received_at, digest)``;
    a redelivery (same gateway, request_id and content digest, ``schema.report_digest``) is skipped by
    the unique index, in this process or any other on the same database. PostgreSQL: one ``unnest``
    insert into the partitioned table that also updates the rollups (:mod:`meterhub.storage.pg_bulk`)."""
    if conn.dialect.name == "postgresql":
        pg_bulk.apply_reports(conn, rows)
        return
    conn.exec_driver_sql(_driver_sql(conn, _REPORTS_SQL, 9), rows)


def _apply_latest(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Latest values ``(cid, dp_id, value_json, num, t, received_at)``: only the newest per data point
    in the batch is written, and never over a newer stored one (buffered reports arrive late)."""
    newest = sqlite_fast.newest_per_data_point(rows)
    if conn.dialect.name == "postgresql":
        pg_bulk.apply_latest(conn, newest)
        return
    conn.exec_driver_sql(_driver_sql(conn, _LATEST_SQL, 6), newest)


def _apply_presence(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Presence transitions: every one into the log, the last one per device onto the device."""
    conn.execute(insert(schema.presence), rows)
    last = {row["cid"]: row["online"] for row in rows}
    conn.execute(
        update(schema.devices)
        .where(schema.devices.c.cid == bindparam("b_cid"))
        .values(online=bindparam("b_online")),
        [{"b_cid": cid, "b_online": online} for cid, online in last.items()],
    )


def _apply_device_seen(conn: Connection, rows: list[dict[str, Any]]) -> None:
    latest_by_cid: dict[str, float] = {}
    for row in rows:
        latest_by_cid[row["cid"]] = max(row["last_seen"], latest_by_cid.get(row["cid"], 0.0))
    conn.exec_driver_sql(
        _driver_sql(conn, "UPDATE devices SET last_seen = {p} WHERE cid = {p}", 1),
        [(t, c) for c, t in latest_by_cid.items()],
    )


def _apply_commands_new(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(schema.commands), rows)


def _apply_commands_update(conn: Connection, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        values = {k: v for k, v in row.items() if k != "request_id"}
        conn.execute(
            update(schema.commands).where(schema.commands.c.request_id == row["request_id"]).values(**values)
        )


def _apply_gateways(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert gateway rows; ``first_seen`` is only ever filled in, never moved."""
    g = schema.gateways
    first: dict[str, float] = {}
    plain: list[dict[str, Any]] = []
    for row in rows:
        if "first_seen" in row:
            row = dict(row)
            first.setdefault(row["gateway_id"], row.pop("first_seen"))
        plain.append(row)
    _merged_upserts(conn, g, "gateway_id", plain, frozenset())
    for gw, at in first.items():
        conn.execute(update(g).where(g.c.gateway_id == gw, g.c.first_seen.is_(None)).values(first_seen=at))


def _apply_alarm_raise(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(schema.alarms), rows)


def _apply_alarm_update(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Change columns of an alarm by id (clear, level change, acknowledge)."""
    for row in rows:
        values = {k: v for k, v in row.items() if k != "id"}
        conn.execute(update(schema.alarms).where(schema.alarms.c.id == row["id"]).values(**values))


def _apply_notify(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(insert(schema.notify_outbox), rows)


def _apply_token_used(conn: Connection, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        conn.execute(
            update(schema.api_tokens)
            .where(schema.api_tokens.c.id == row["id"])
            .values(last_used_at=row["last_used_at"])
        )


def _apply_mqtt_sessions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Persistent MQTT sessions (meterhub.mqtt.session_store): the last row per client id wins;
    a row whose ``state`` is None deletes the stored session. Neither applies over a row of a newer
    ``gen`` (written by the node that took the session after this one's copy)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        last[row["client_id"]] = row
    t = schema.mqtt_sessions
    gone = [{"b_cid": cid, "b_gen": row["gen"]} for cid, row in last.items() if row["state"] is None]
    if gone:
        conn.execute(
            t.delete().where(t.c.client_id == bindparam("b_cid"), t.c.gen <= bindparam("b_gen")), gone
        )
    kept = [row for row in last.values() if row["state"] is not None]
    if kept:
        upsert(conn, t, ["client_id"], kept, [c for c in kept[0] if c != "client_id"], where_newer="gen")


APPLY_ORDER: dict[str, Callable[[Connection, list[Any]], None]] = {
    "gateway": _apply_gateways,
    "device": _apply_devices,
    "device_move": _apply_device_moves,
    "rebind": _apply_rebinds,
    "report": _apply_reports,
    "latest": _apply_latest,
    "seen": _apply_device_seen,
    "presence": _apply_presence,
    "command_new": _apply_commands_new,
    "command_update": _apply_commands_update,
    "alarm_raise": _apply_alarm_raise,
    "alarm_clear": _apply_alarm_update,
    "alarm_update": _apply_alarm_update,
    "notify": _apply_notify,
    "token_used": _apply_token_used,
    "mqtt_session": _apply_mqtt_sessions,
    "conformance": conformance_rows.apply_deltas,
}

DoneCallback = Callable[[BaseException | None], None]

#: Seconds between two "storage is behind" warnings (the episodes in between are only counted).
PRESSURE_LOG_INTERVAL = 60.0


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    operations: int = 0
    failures: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    commit_seconds_total: float = 0.0
    max_commit_seconds: float = 0.0
    pressure_episodes: int = 0
    #: Groups the database refused (answered as failed) while their batch-mates were committed.
    rows_refused: int = 0
    #: Batches that failed on refused data and were split to find the refused groups.
    batches_split: int = 0
    #: Tries again of a batch the database aborted for another transaction's sake (a deadlock).
    transient_retries: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class GroupCommitWriter:
    """A thread applying queued write operations in batches, one transaction and one commit each.

    ``submit(ops, callback)`` queues a group of operations ``[(kind, row), ...]`` that must be
    committed together; ``callback(None)`` (or ``callback(exc)``) runs in the event loop once the
    batch holding them has committed (or failed). ``submit`` and ``write`` are called on the event loop.

    Back-pressure: ``outstanding`` counts groups submitted and not yet finished. When it passes
    ``high_water``, ``on_pressure(True)`` is called (the transport then stops reading from clients);
    once it is back to ``high_water // 2``, ``on_pressure(False)``. So a storage slower than the
    offered load holds a bounded amount of work in memory and the rest waits in TCP buffers.
    """

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        *,
        batch_max: int = 2000,
        high_water: int = 20_000,
        linger: float = 0.002,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._batch_max = batch_max
        #: Seconds a batch may wait for company when the writer was idle and traffic is dense (see
        #: :meth:`_run`); 0 commits whatever is queued at once.
        self.linger = linger
        self._sqlite = engine.dialect.name == "sqlite"
        self._conn: Connection | None = None  # the writer thread's own connection, kept between batches
        self.high_water = high_water
        self.outstanding = 0
        self.pressed = False
        self.on_pressure: Callable[[bool], None] | None = None
        self._pressure_logged_at = -PRESSURE_LOG_INTERVAL
        self._queue: queue.SimpleQueue[tuple[list[tuple[str, Any]], DoneCallback | None] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="meterhub-writer", daemon=True)
        self.stats = WriterStats()
        #: False after a batch the database failed to commit (not one whose data it refused: see
        #: :func:`row_refused`), True again after a batch without such a failure.
        self.healthy = True
        #: Seconds after a failed batch during which :meth:`admits_clients` says no. Past that, new
        #: clients are let in again even if nothing has been written since (no traffic, no proof), so a
        #: fleet that was turned away during an outage is not turned away for ever.
        self.retry_after = 5.0
        self._failed_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def admits_clients(self) -> bool:
        """Whether new clients should be let in (CONNACK 0x03 otherwise): storage committed its last
        batch, or its last failure is older than ``retry_after``."""
        return self.healthy or time.monotonic() - self._failed_at > self.retry_after

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, ops: list[tuple[str, Any]], callback: DoneCallback | None = None) -> None:
        self._queue.put((ops, callback))
        self.outstanding += 1
        if self.outstanding > self.high_water and not self.pressed:
            self._set_pressed(True)

    def _set_pressed(self, pressed: bool) -> None:
        self.pressed = pressed
        if pressed:
            self.stats.pressure_episodes += 1
            now = time.monotonic()
            if now - self._pressure_logged_at >= PRESSURE_LOG_INTERVAL:  # overloaded: pauses every second
                self._pressure_logged_at = now
                log.warning(
                    "storage is behind: pausing intake (logged at most once a minute; all are counted)",
                    outstanding=self.outstanding,
                    episodes=self.stats.pressure_episodes,
                )
        else:
            log.debug("storage caught up: resuming intake", outstanding=self.outstanding)
        if self.on_pressure is not None:
            try:
                self.on_pressure(pressed)
            except Exception:
                _repeats.error("pressure_callback", "pressure callback failed", exc_info=True)

    def _finished(self, count: int, results: list[tuple[DoneCallback, BaseException | None]]) -> None:
        """In the event loop: a batch of ``count`` groups is done (committed or failed)."""
        self.outstanding -= count
        _run_callbacks(results)
        if self.pressed and self.outstanding <= self.high_water // 2:
            self._set_pressed(False)

    def write(self, ops: list[tuple[str, Any]]) -> asyncio.Future[None]:
        """Queue ``ops``; the returned future completes when they are committed."""
        fut: asyncio.Future[None] = self._loop.create_future()

        def done(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self.submit(ops, done)
        return fut

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        """Commit policy: whatever queued up during the last commit is committed at once (it has waited
        one commit already). When the writer was idle, the group that woke it is a batch of one, and a
        commit's fixed cost (fsync, transaction, two thread hand-offs) would be paid per report at
        moderate rates. So if it came soon after the last commit ended (sooner than ``linger``: traffic
        is dense, more is on its way), the writer sleeps ``linger`` and takes everything that arrived
        meanwhile (half of it if nothing came in the first half); sparse traffic (a gap longer than
        ``linger``) is committed at once. A report's answer waits at most ``linger`` more; answers
        still go out only after the commit."""
        stopping = False
        idle_since = time.monotonic()
        q = self._queue
        try:
            while not stopping:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = q.get()
                    if item is not None and self.linger > 0 and time.monotonic() - idle_since < self.linger:
                        # in two halves: if nothing came in the first, nothing more is on its way (a
                        # closed-loop burst that arrived whole): commit now
                        time.sleep(self.linger / 2)
                        if q.qsize():
                            time.sleep(self.linger / 2)
                if item is None:
                    break
                batch = [item]
                while len(batch) < self._batch_max:
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                self._commit_batch(batch)
                idle_since = time.monotonic()
        finally:
            self._drop_connection(invalidate=False)

    def _commit_batch(self, batch: list[tuple[list[tuple[str, Any]], DoneCallback | None]]) -> None:
        """Commit ``batch`` in one transaction. If the database refuses some of its data, split it in
        halves until the refused groups are found (each half in its own transaction, in order): only
        those fail, their batch-mates are committed, and storage stays healthy. If the database itself
        fails (twice in a row: a deadlock or a replaced connection gets one more try), every group
        fails and storage is marked unhealthy (new clients get CONNACK 0x03 for ``retry_after`` s)."""
        started = time.perf_counter()
        results: list[tuple[DoneCallback, BaseException | None]] = []
        failing = False
        try:
            self._apply(batch)
        except Exception as exc:
            if row_refused(exc):
                self.stats.batches_split += 1
                _repeats.warning(
                    "batch_refused",
                    "the database refused part of a batch: isolating it",
                    error=brief_error(exc),
                    size=len(batch),
                )
                failing = self._isolate(batch, exc, results)
            else:
                _repeats.warning(
                    "batch_failed",
                    "storage batch failed, trying again",
                    error=brief_error(exc),
                    size=len(batch),
                )
                again = self._retry(batch, exc)
                if again is None:
                    results = [(cb, None) for _, cb in batch if cb is not None]
                elif row_refused(again):
                    failing = self._isolate(batch, again, results)
                else:
                    failing = True
                    self._fail(batch, again, results)
        else:
            results = [(cb, None) for _, cb in batch if cb is not None]
        self.healthy = not failing
        if failing:
            self._failed_at = time.monotonic()
        elapsed = time.perf_counter() - started
        st = self.stats
        st.batches += 1
        st.operations += len(batch)
        st.last_batch_size = len(batch)
        st.last_commit_seconds = elapsed
        st.max_commit_seconds = max(st.max_commit_seconds, elapsed)
        st.commit_seconds_total += elapsed
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._finished, len(batch), results)

    def _retry(
        self, batch: list[tuple[list[tuple[str, Any]], DoneCallback | None]], error: BaseException
    ) -> BaseException | None:
        """Apply ``batch`` again after ``error`` (the database failing, not refusing data): once, or up
        to :data:`TRANSIENT_RETRIES` times with a short, growing pause while the database keeps aborting
        it for another transaction's sake (a deadlock with a node's gateway claims, say). Returns the
        last error, or None once it is committed."""
        attempt = 0
        while True:
            if attempt:
                time.sleep(min(0.2, 0.01 * 2**attempt) * (0.5 + random.random()))
            attempt += 1
            try:
                self._apply(batch)
            except Exception as exc:
                if row_refused(exc) or not transient(exc) or attempt >= TRANSIENT_RETRIES:
                    return exc
                self.stats.transient_retries += 1
            else:
                return None

    def _isolate(
        self,
        batch: list[tuple[list[tuple[str, Any]], DoneCallback | None]],
        error: BaseException,
        results: list[tuple[DoneCallback, BaseException | None]],
    ) -> bool:
        """``batch`` failed with refused data (``error``): commit what the database accepts, fail the
        refused groups. Returns True if the database itself failed meanwhile."""
        if len(batch) == 1:
            ops, cb = batch[0]
            self.stats.failures += 1
            self.stats.rows_refused += 1
            _repeats.error(
                "write_refused",
                "the database refused a write",
                error=brief_error(error),
                ops=sorted({k for k, _ in ops}),
            )
            if cb is not None:
                results.append((cb, RowRefused(brief_error(error))))
            return False
        middle = len(batch) // 2
        failing = False
        for half in (batch[:middle], batch[middle:]):
            if failing:  # the database is failing: do not try the rest one by one
                self._fail(half, StorageError("storage failed while isolating a refused write"), results)
                continue
            try:
                self._apply(half)
            except Exception as exc:
                if row_refused(exc):
                    failing = self._isolate(half, exc, results)
                else:
                    failing = True
                    self._fail(half, exc, results)
            else:
                results.extend((cb, None) for _, cb in half if cb is not None)
        return failing

    def _fail(
        self,
        groups: list[tuple[list[tuple[str, Any]], DoneCallback | None]],
        error: BaseException,
        results: list[tuple[DoneCallback, BaseException | None]],
    ) -> None:
        """Every group of ``groups`` failed because the database did (not because of its data)."""
        self.stats.failures += len(groups)
        _repeats.error("write_failed", "storage write failed", error=brief_error(error), groups=len(groups))
        for _, cb in groups:
            if cb is not None:
                results.append((cb, StorageError(brief_error(error))))

    def _apply(self, batch: list[tuple[list[tuple[str, Any]], DoneCallback | None]]) -> None:
        """One transaction on the writer's own connection (kept between batches: no pool check-out,
        reset and check-in per commit). On SQLite the hot kinds go to the sqlite3 driver directly
        (:mod:`meterhub.storage.sqlite_fast`), in the same transaction. A failure that is not refused
        data drops the connection, so the retry and later batches start on a fresh one."""
        grouped: dict[str, list[Any]] = {}
        for ops, _ in batch:
            for kind, row in ops:
                grouped.setdefault(kind, []).append(row)
        conn = self._conn
        if conn is None:
            conn = self._conn = self._engine.connect()
        try:
            with conn.begin():
                dbapi = conn.connection.driver_connection if self._sqlite else None
                for kind, apply in APPLY_ORDER.items():
                    rows = grouped.get(kind)
                    if rows:
                        fast = sqlite_fast.FAST.get(kind) if dbapi is not None else None
                        if fast is not None:
                            fast(dbapi, rows)
                        else:
                            apply(conn, rows)
        except Exception as exc:
            if not row_refused(exc):
                self._drop_connection()
            raise

    def _drop_connection(self, invalidate: bool = True) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if invalidate:  # a failed connection is not given back to the pool
                with contextlib.suppress(Exception):
                    conn.invalidate()
            with contextlib.suppress(Exception):
                conn.close()


def _run_callbacks(results: list[tuple[DoneCallback, BaseException | None]]) -> None:
    for cb, exc in results:
        try:
            cb(exc)
        except Exception:
            _repeats.error("callback_failed", "storage callback failed", exc_info=True)
