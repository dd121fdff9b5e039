"""Ids a node gives out itself (alarm ids: a raise and its clear share one commit), without two nodes
ever giving out the same one: each node takes blocks of ids reserved in the ``id_blocks`` table.

A block is reserved in one locked transaction and starts at no less than the table's largest id + 1
(rows numbered by a node of one, before or after cluster mode, are never reused). The next block is
fetched in a worker thread when half of the current one is used, so ``take()`` does not wait for the
database except after a burst of more than half a block before the fetch returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine, func, select, update

from meterhub.logs import get_logger
from meterhub.storage import schema

log = get_logger(__name__)


def reserve_block(engine: Engine, name: str, table: Any, size: int) -> int:
    """Reserve ``size`` ids for ``name`` (PostgreSQL); returns the first one."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    b = schema.id_blocks
    with engine.begin() as conn:
        conn.execute(pg_insert(b).values(name=name, next=1).on_conflict_do_nothing(index_elements=["name"]))
        stored = conn.execute(select(b.c.next).where(b.c.name == name).with_for_update()).scalar_one()
        floor = (conn.execute(select(func.max(table.c.id))).scalar() or 0) + 1
        start = max(int(stored), int(floor))
        conn.execute(update(b).where(b.c.name == name).values(next=start + size))
    return start


class IdBlocks:
    """``take()`` gives out ids from reserved blocks (call ``reserve()`` once first, in a thread)."""

    def __init__(self, engine: Engine, name: str, table: Any, size: int = 1000) -> None:
        self.engine = engine
        self.name = name
        self.table = table
        self.size = size
        self.next = 0
        self.end = 0
        self.spare: int | None = None
        self._fetching = False

    def reserve(self) -> None:
        self.next = reserve_block(self.engine, self.name, self.table, self.size)
        self.end = self.next + self.size

    def take(self) -> int:
        if self.next >= self.end:
            if self.spare is not None:
                self.next, self.spare = self.spare, None
            else:  # a burst used the block before the next one arrived: wait for the database once
                log.warning("id block used up before the next one was fetched", name=self.name)
                self.next = reserve_block(self.engine, self.name, self.table, self.size)
            self.end = self.next + self.size
        value = self.next
        self.next += 1
        if self.spare is None and not self._fetching and self.end - self.next < self.size // 2:
            self._prefetch()
        return value

    def _prefetch(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._fetching = True
        fut = loop.run_in_executor(None, reserve_block, self.engine, self.name, self.table, self.size)

        def done(f: asyncio.Future[int]) -> None:
            self._fetching = False
            if f.cancelled() or f.exception() is not None:
                log.warning("id block not reserved", name=self.name, error=repr(f.exception()))
                return
            self.spare = f.result()

        fut.add_done_callback(done)
