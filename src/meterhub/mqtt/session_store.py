"""Persistent MQTT sessions (clean_session=0) in the database, so they survive restarts and moves.

The sans-I/O :class:`~meterhub.mqtt.session.Session` knows nothing of this: the server tells the
store when a persistent session changed (:meth:`SessionStore.save`) or is gone
(:meth:`SessionStore.delete`), and asks it for a stored one on CONNECT (:meth:`SessionStore.load`).

Writes are coalesced per client id and go through the group-commit writer (op kind
``mqtt_session``) ``flush_delay`` after the first change, at most ``chunk`` sessions per event-loop
turn: never a synchronous database call on the event loop. What is stored is ``Session.to_dict()``
at the moment of the flush, so several changes in the window cost one row. A write that fails is
kept dirty and tried again at the next flush.

In a cluster, a row says which node holds the session (``node``, the last to write it). A node that
loads a session another node wrote first asks that node (:attr:`SessionStore.hand_over`, over the
bus) to close the connection if it has one, store its copy and forget it (it forwards what comes for
the client afterwards to the asking node), waiting at most ``hand_over_timeout``; then it reads the
row again. A node that does not answer (dead) leaves what it stored last. Before the CONNACK the
node records that it holds the session (:meth:`SessionStore.claim`: one conditional UPDATE, which
fails when another node claimed the row since it was read), so a CONNECT on a third node at any
moment after the CONNACK asks this node for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.storage import schema

log = get_logger(__name__)
_repeats = RateLimitedLog(log)
_encode = msgspec.json.encode
_decode = msgspec.json.decode

#: Rows removed at most per purge statement (expired sessions, sessions over a bound).
PURGE_BATCH = 1000


class SessionStore:
    """Coalesced, batched writes of persistent sessions; reads off the event loop."""

    def __init__(
        self,
        engine: Engine,
        writer: Any,
        node_id: str,
        *,
        expiry: float = 7 * 24 * 3600.0,
        flush_delay: float = 0.05,
        chunk: int = 1000,
        hand_over_timeout: float = 5.0,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.node_id = node_id
        self.expiry = expiry
        self.flush_delay = flush_delay
        self.chunk = chunk
        self.hand_over_timeout = hand_over_timeout
        #: client id -> the session to store (None: delete the stored one), not yet submitted.
        self.dirty: dict[str, Any] = {}
        #: Submitted, not yet committed: client id -> what was submitted.
        self.saving: dict[str, Any] = {}
        self.closing = False
        #: ``await hand_over(node_id, client_id)``: ask another node to close and store a session.
        self.hand_over: Callable[[str, str], Awaitable[None]] | None = None
        self.stats: Any = None  # a Counter shared with the MQTT server, set by it
        #: client id -> generation of this node's copy (see :meth:`took`); a delete of a client id
        #: this node has no copy of (a clean connect) applies whatever the stored generation.
        self.gens: dict[str, int] = {}
        #: client ids claimed by :meth:`claim` whose generation :meth:`took` must not raise again.
        self.claimed: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing = False
        self._inflight: set[asyncio.Future[None]] = set()

    # --- writes ----------------------------------------------------------------------------------

    def save(self, session: Any) -> None:
        """Store ``session`` (its state at the next flush)."""
        self.dirty[session.client_id] = session
        self._schedule()

    def delete(self, client_id: str, whatever_gen: bool = False) -> None:
        """Forget the stored session of ``client_id`` (unless another node took it since, or
        ``whatever_gen``: a clean_session=1 CONNECT discards it wherever it was)."""
        if whatever_gen:
            self.gens[client_id] = 1 << 62
        self.dirty[client_id] = None
        self._schedule()

    def took(self, client_id: str, stored_gen: int | None) -> None:
        """This node takes the session: one generation above the stored one (or its own copy's)."""
        if client_id in self.claimed:  # claim() stored that generation already
            self.claimed.discard(client_id)
            return
        base = stored_gen if stored_gen is not None else self.gens.get(client_id, 0)
        self.gens[client_id] = base + 1

    async def claim(self, client_id: str, owner: str, state: dict[str, Any], stored_gen: int | None) -> bool:
        """Record that this node holds ``client_id``'s session now (connected), one generation above
        ``stored_gen`` (None: no row was read), before the CONNACK. False when the row changed since
        it was read (another node claimed it): read it again (and ask that node) and retry."""
        gen = (stored_gen if stored_gen is not None else self.gens.get(client_id, 0)) + 1
        ok = await asyncio.to_thread(self._claim, client_id, owner, state, stored_gen, gen, time.time())
        if ok:
            self.gens[client_id] = gen
            self.claimed.add(client_id)
        return ok

    def _claim(
        self, cid: str, owner: str, state: dict[str, Any], stored_gen: int | None, gen: int, now: float
    ) -> bool:
        t = schema.mqtt_sessions
        held = {"node": self.node_id, "connected": True, "gen": gen, "updated_at": now}
        with self.engine.begin() as conn:
            if stored_gen is not None:
                done = conn.execute(
                    update(t).where(t.c.client_id == cid, t.c.gen == stored_gen).values(**held)
                )
                return done.rowcount == 1
            row = {**held, "client_id": cid, "owner": owner, "state": _encode(state).decode()}
            row["expires_at"] = now + self.expiry
            insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            stmt = insert(t).values(**row)
            stmt = stmt.on_conflict_do_update(  # over an expired row only
                index_elements=["client_id"],
                set_={k: stmt.excluded[k] for k in row if k != "client_id"},
                where=t.c.expires_at < now,
            )
            return conn.execute(stmt.returning(t.c.client_id)).first() is not None

    def write_now(self, session: Any) -> asyncio.Future[None]:
        """Submit ``session`` as it is at this moment (a hand-over: nothing queued after this call
        is in the row); the future completes at the commit."""
        cid = session.client_id
        self.dirty.pop(cid, None)
        fut = self.writer.write([("mqtt_session", self._row(cid, session, time.time()))])
        batch = {cid: session}
        self.saving.update(batch)
        self._inflight.add(fut)
        fut.add_done_callback(lambda f, b=batch: self._written(f, b))
        return fut

    def _schedule(self) -> None:
        if self._timer is None and not self._flushing:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_delay, self._flush_some)

    def _row(self, cid: str, session: Any, now: float) -> dict[str, Any]:
        if session is None:
            return {"client_id": cid, "state": None, "gen": self.gens.pop(cid, 1 << 62)}
        return {
            "client_id": cid,
            "owner": session.owner,
            "node": self.node_id,
            "connected": session.connection is not None and not self.closing,
            "state": _encode(session.to_dict()).decode(),
            "gen": self.gens.get(cid, 0),
            "updated_at": now,
            "expires_at": now + self.expiry,
        }

    def _flush_some(self) -> asyncio.Future[None] | None:
        """Submit up to ``chunk`` dirty sessions as one write group; the rest in the next turn."""
        self._timer = None
        if not self.dirty:
            return None
        now = time.time()
        batch: dict[str, Any] = {}
        dirty = self.dirty
        while dirty and len(batch) < self.chunk:
            cid = next(iter(dirty))
            batch[cid] = dirty.pop(cid)
        ops = [("mqtt_session", self._row(cid, s, now)) for cid, s in batch.items()]
        self.saving.update(batch)
        fut = self.writer.write(ops)
        self._inflight.add(fut)
        fut.add_done_callback(lambda f, b=batch: self._written(f, b))
        if dirty:
            self._timer = asyncio.get_running_loop().call_soon(self._flush_some)  # type: ignore[assignment]
        return fut

    def _written(self, fut: asyncio.Future[None], batch: dict[str, Any]) -> None:
        self._inflight.discard(fut)
        failed = fut.cancelled() or fut.exception() is not None
        stats = self.stats
        for cid, value in batch.items():
            if self.saving.get(cid, ...) is value:
                del self.saving[cid]
            if failed and cid not in self.dirty:
                self.dirty[cid] = value  # tried again at the next flush
        if stats is not None:
            stats["sessions.store_failed" if failed else "sessions.stored"] += len(batch)
        if failed:
            _repeats.warning(
                "session_store_failed", "persistent sessions not stored, retrying", count=len(batch)
            )
            self._schedule()

    async def flush(self) -> None:
        """Submit everything dirty now and wait until it is committed (or failed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flushing = True
        try:
            while self.dirty:
                self._flush_some()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            if self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)
        finally:
            self._flushing = False
        if self.dirty:
            self._schedule()

    # --- reads -----------------------------------------------------------------------------------

    async def load(self, client_id: str) -> tuple[str, dict[str, Any], int] | None:
        """The stored session of ``client_id``: the node that wrote it and its state
        (``Session.to_dict()`` form), or None when there is none (or it expired). Held by another
        node: that node is asked to hand it over first."""
        for pending in (self.dirty, self.saving):
            if client_id in pending and pending[client_id] is None:
                return None  # being deleted here
        row = await asyncio.to_thread(self._read, client_id)
        if row is not None and row.node != self.node_id and self.hand_over is not None:
            # connected there, or its offline copy there (it may queue into it): hand it over
            if self.stats is not None:
                self.stats["sessions.hand_over_asked"] += 1
            try:
                await asyncio.wait_for(self.hand_over(row.node, client_id), self.hand_over_timeout)
            except Exception as exc:  # that node is dead or slow: what it stored last
                if self.stats is not None:
                    self.stats["sessions.hand_over_failed"] += 1
                _repeats.info(
                    "hand_over_failed",
                    "the node holding a session did not hand it over; using its stored state",
                    client_id=client_id,
                    node=row.node,
                    error=type(exc).__name__,
                )
            row = await asyncio.to_thread(self._read, client_id)
        if row is None:
            return None
        if row.expires_at < time.time():
            self.delete(client_id)
            return None
        return row.node, _decode(row.state), int(row.gen)

    def _read(self, client_id: str) -> Any:
        t = schema.mqtt_sessions
        with self.engine.connect() as conn:
            return conn.execute(
                select(t.c.node, t.c.connected, t.c.state, t.c.gen, t.c.expires_at).where(
                    t.c.client_id == client_id
                )
            ).first()

    # --- purge -----------------------------------------------------------------------------------

    def purge(self, now: float, max_per_owner: int, max_total: int) -> int:
        """In a worker thread: delete expired sessions, and the oldest offline ones of owners (and of
        all) past the bounds, at most :data:`PURGE_BATCH` per statement. Returns how many went."""
        t = schema.mqtt_sessions
        removed = 0
        with self.engine.begin() as conn:
            expired = select(t.c.client_id).where(t.c.expires_at < now).limit(PURGE_BATCH)
            removed += conn.execute(delete(t).where(t.c.client_id.in_(expired))).rowcount or 0
            over = conn.execute(
                select(t.c.owner, func.count())
                .group_by(t.c.owner)
                .having(func.count() > max_per_owner)
                .limit(100)
            ).all()
            for owner, count in over:
                extra = (
                    select(t.c.client_id)
                    .where(t.c.owner == owner, t.c.connected.is_(False))
                    .order_by(t.c.updated_at)
                    .limit(min(PURGE_BATCH, count - max_per_owner))
                )
                removed += conn.execute(delete(t).where(t.c.client_id.in_(extra))).rowcount or 0
            total = conn.execute(select(func.count()).select_from(t)).scalar_one()
            if total > max_total:
                extra = (
                    select(t.c.client_id)
                    .where(t.c.connected.is_(False))
                    .order_by(t.c.updated_at)
                    .limit(min(PURGE_BATCH, total - max_total))
                )
                removed += conn.execute(delete(t).where(t.c.client_id.in_(extra))).rowcount or 0
        return removed

    async def purge_forever(self, interval: float, max_per_owner: int, max_total: int) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                removed = await asyncio.to_thread(self.purge, time.time(), max_per_owner, max_total)
                if removed and self.stats is not None:
                    self.stats["sessions.purged"] += removed
