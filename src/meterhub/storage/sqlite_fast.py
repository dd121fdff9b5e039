"""The writer's hot statements on SQLite, through the sqlite3 driver itself.

Every report runs two statements (history row, latest value) and most batches a third (``last_seen``);
every sync an upsert of its device row.
Through SQLAlchemy's ``exec_driver_sql`` each costs an execution context, events and a cursor per
batch; here they are ``executemany`` calls on the raw sqlite3 connection, whose statement cache keeps
them prepared. They run inside the transaction SQLAlchemy began on that same connection (pysqlite
opens it implicitly on the first write), so a batch is still one transaction and one commit.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import exc as sa_exc

from meterhub.storage import schema

REPORTS_SQL = (
    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gateway_id, request_id, digest, t) DO NOTHING"
)
LATEST_SQL = (
    "INSERT INTO latest_values (cid, dp_id, value, num, t, received_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (cid, dp_id) DO UPDATE SET value = excluded.value, num = excluded.num, t = excluded.t, "
    "received_at = excluded.received_at WHERE latest_values.t <= excluded.t"
)
SEEN_SQL = "UPDATE devices SET last_seen = ? WHERE cid = ?"


def _executemany(dbapi: Any, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """``executemany`` with the driver's errors as SQLAlchemy's (``IntegrityError`` and the others), so
    the writer tells refused data from a failing database exactly as on the SQLAlchemy path."""
    try:
        dbapi.executemany(sql, rows)
    except sqlite3.Error as exc:
        raise sa_exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc


def apply_reports(dbapi: Any, rows: list[tuple[Any, ...]]) -> None:
    """History rows in column order (see ``database._apply_reports``)."""
    _executemany(dbapi, REPORTS_SQL, rows)


def newest_per_data_point(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Of latest-value rows ``(cid, dp_id, value_json, num, t, received_at)``, the newest (by ``t``)
    per data point: what a batch writes (on every database)."""
    newest: dict[tuple[str, str], tuple[Any, ...]] = {}
    for row in rows:
        key = (row[0], row[1])
        seen = newest.get(key)
        if seen is None or seen[4] <= row[4]:
            newest[key] = row
    return list(newest.values())


def apply_latest(dbapi: Any, rows: list[tuple[Any, ...]]) -> None:
    """Latest values: the newest per data point of the batch, never over a newer stored one."""
    _executemany(dbapi, LATEST_SQL, newest_per_data_point(rows))


def apply_seen(dbapi: Any, rows: list[dict[str, Any]]) -> None:
    """``last_seen`` of each device: the latest of the batch."""
    latest: dict[str, float] = {}
    for row in rows:
        cid, t = row["cid"], row["last_seen"]
        if t > latest.get(cid, 0.0):
            latest[cid] = t
    _executemany(dbapi, SEEN_SQL, [(t, c) for c, t in latest.items()])


_DEVICE_COLUMNS = frozenset(schema.devices.c.keys())
#: Columns a sync sets only when it creates the device (as database._apply_devices).
_DEVICE_INSERT_ONLY = frozenset({"first_seen", "online"})


@functools.lru_cache(maxsize=64)
def _device_sql(columns: tuple[str, ...]) -> str:
    """The upsert for rows with exactly ``columns`` (names checked against the schema by the caller)."""
    updates = [c for c in columns if c != "cid" and c not in _DEVICE_INSERT_ONLY]
    action = "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in updates) if updates else "DO NOTHING"
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO devices ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT (cid) {action}"


def apply_devices(dbapi: Any, rows: list[dict[str, Any]]) -> None:
    """Device rows of syncs, as ``database._apply_devices``: rows of one device merged (later values
    win, insert-only columns keep the first's), then one prepared upsert per set of columns."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = merged.get(row["cid"])
        if seen is None:
            merged[row["cid"]] = dict(row)
        else:
            seen.update({k: v for k, v in row.items() if k not in _DEVICE_INSERT_ONLY})
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in merged.values():
        columns = tuple(sorted(row))
        groups.setdefault(columns, []).append(tuple(row[c] for c in columns))
    for columns, params in groups.items():
        if not _DEVICE_COLUMNS.issuperset(columns):  # refused like SQLAlchemy's unknown columns
            raise ValueError(f"unknown device columns {sorted(set(columns) - _DEVICE_COLUMNS)}")
        _executemany(dbapi, _device_sql(columns), params)


#: Kinds the writer hands to the raw sqlite3 connection instead of the SQLAlchemy one.
FAST: dict[str, Callable[[Any, list[Any]], None]] = {
    "device": apply_devices,
    "report": apply_reports,
    "latest": apply_latest,
    "seen": apply_seen,
}
