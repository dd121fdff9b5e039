"""PostgreSQL range partitions of the time-series tables, kept by meterhub itself (no pg_partman).

``reports`` is partitioned by the measurement time ``t`` in UTC days, ``rollups`` by ``bucket`` in
30-day ranges from the epoch; each has a ``<table>_default`` partition so that a write never fails for
want of a partition. :func:`ensure` creates the partitions of the window the protocol accepts (30 days
back, :data:`AHEAD_DAYS` ahead) before any report needs them, moving rows that went to the default
partition meanwhile into the new one (PostgreSQL refuses to attach a range the default partition holds
rows of). :func:`drop_before` drops whole partitions past retention (never a mass DELETE).
Partitions are named ``<table>_pYYYYMMDD`` by the UTC date they start on.

The maintenance job (:mod:`meterhub.storage.maintenance`) runs these under an advisory lock, so one
node of a cluster at a time does it. Why not pg_partman: docs/decisions.md.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy.engine import Connection

DAY = 86400
#: Reports up to this many days old are accepted (protocol: 30 days) ...
BEHIND_DAYS = 31
#: ... and partitions exist this many days ahead (the protocol allows 5 minutes of clock skew; the
#: margin covers a maintenance job that did not run for a while).
AHEAD_DAYS = 3
#: Longest wait for a table lock when creating or dropping a partition; the next run tries again.
LOCK_TIMEOUT = "5s"

_BOUND = re.compile(r"FROM \('?(-?[0-9.e+]+)'?\) TO \('?(-?[0-9.e+]+)'?\)")


@dataclass(frozen=True, slots=True)
class Spec:
    """A partitioned table: its name, partition key and partition width (seconds)."""

    table: str
    key: str
    width: int


REPORTS = Spec("reports", "t", DAY)
ROLLUPS = Spec("rollups", "bucket", 30 * DAY)
SPECS = (REPORTS, ROLLUPS)


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    lo: float
    hi: float


def partition_name(spec: Spec, start: float) -> str:
    return f"{spec.table}_p" + dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y%m%d")


def is_partitioned(conn: Connection, table: str = "reports") -> bool:
    if conn.dialect.name != "postgresql":
        return False
    found = conn.exec_driver_sql(
        "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "WHERE c.relname = %s AND c.relnamespace = 'public'::regnamespace",
        (table,),
    ).first()
    return found is not None


def partitions(conn: Connection, spec: Spec) -> list[Partition]:
    """The range partitions of ``spec.table`` (not the default one), by start."""
    rows = conn.exec_driver_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relname = %s AND p.relnamespace = 'public'::regnamespace",
        (spec.table,),
    ).all()
    out = []
    for name, bound in rows:
        m = _BOUND.search(bound or "")
        if m:
            out.append(Partition(name, float(m.group(1)), float(m.group(2))))
    return sorted(out, key=lambda p: p.lo)


def _create(conn: Connection, spec: Spec, lo: int, hi: int) -> str:
    """Create the partition ``[lo, hi)``, moving in the rows the default partition holds of it."""
    name = partition_name(spec, lo)
    default = f"{spec.table}_default"
    run = conn.exec_driver_sql
    run(f"CREATE TABLE {name} (LIKE {spec.table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    # the CHECK lets ATTACH skip scanning the new table; dropped once attached
    run(f"ALTER TABLE {name} ADD CONSTRAINT {name}_range CHECK ({spec.key} >= {lo} AND {spec.key} < {hi})")
    run(
        f"WITH moved AS (DELETE FROM {default} WHERE {spec.key} >= {lo} AND {spec.key} < {hi} "
        f"RETURNING *) INSERT INTO {name} SELECT * FROM moved"
    )
    run(f"ALTER TABLE {spec.table} ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})")
    run(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range")
    return name


def ensure(conn: Connection, spec: Spec, start: float, end: float) -> list[str]:
    """Create the missing partitions of ``spec`` covering ``[start, end]``; their names."""
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    have = {p.lo for p in partitions(conn, spec)}
    created = []
    k = int(start // spec.width)
    while k * spec.width <= end:
        lo = k * spec.width
        if float(lo) not in have:
            created.append(_create(conn, spec, lo, lo + spec.width))
        k += 1
    return created


def ensure_window(conn: Connection, now: float) -> list[str]:
    """The partitions every report the protocol accepts at ``now`` needs (and its rollups)."""
    created = []
    for spec in SPECS:
        created += ensure(conn, spec, now - BEHIND_DAYS * DAY, now + AHEAD_DAYS * DAY)
    return created


def drop_before(conn: Connection, spec: Spec, cutoff: float) -> list[str]:
    """Drop every partition of ``spec`` whose range ends at or before ``cutoff``; their names.
    Rows of that age in the default partition are deleted (it holds only strays)."""
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    dropped = []
    for p in partitions(conn, spec):
        if p.hi <= cutoff:
            conn.exec_driver_sql(f"DROP TABLE {p.name}")
            dropped.append(p.name)
    conn.exec_driver_sql(f"DELETE FROM {spec.table}_default WHERE {spec.key} < %s", (cutoff,))
    return dropped
