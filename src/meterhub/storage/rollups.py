"""Rollups: 5-minute, hourly and daily aggregates of the reports' numbers (PostgreSQL).

Per (res, cid, dp_id, bucket) the table ``rollups`` holds ``n`` (count), ``total`` (sum), ``lo``/``hi``
(min/max) and ``last`` (the number of the latest report by (t, id), with ``last_t``/``last_id``) of the
``num`` of every stored report in ``[bucket, bucket_end)``, and (migration 0016) ``first`` (with
``first_t``/``first_id``) and ``mono`` (the numbers never decrease in (t, id) order), for energy
(meterhub.core.energy). 5-minute and hourly buckets are UTC-aligned;
daily buckets are the days of the configured time zone (23 or 25 hours on DST change days).

Maintenance is incremental and in the same transaction as the reports (meterhub.storage.pg_bulk): the
writer's INSERT returns only the rows it stored (a redelivery conflicts on the dedupe key and returns
nothing), and those are folded into the rollup rows with an upsert (count and sum add, min/max combine,
``last`` moves only to a later (t, id)), so late reports count where they belong and a redelivery never
counts twice. Every aggregate is exact to combine, so a query may mix rollup rows of buckets that lie
fully inside what it asks for with raw rows for the remainder (:func:`history_buckets`).

:func:`rebuild` recomputes everything from the raw rows; :func:`ensure_zone` does so when the configured
time zone differs from the one the daily rollups were computed in (and on the first start after the
migration). SQLite has no rollups: its queries read the raw rows (docs/storage.md).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine
from sqlalchemy.engine import Connection

#: Resolutions (seconds; 86400 = a day of the configured zone), coarsest first.
RESOLUTIONS = (86400, 3600, 300)
#: A query reads rollups of a resolution when its buckets are at least this many times as wide
#: (finer rollups and raw rows fill the edges of each bucket, :func:`cover`) ...
WIDTH_FACTOR = 2
#: ... and it spans at least this long (shorter ranges have few raw rows: read them).
MIN_SPAN = 6 * 3600.0


def _day_sql(t: str, zone: str, end: bool) -> str:
    local = f"date_trunc('day', to_timestamp({t}) AT TIME ZONE {zone})"
    if end:
        local = f"({local} + interval '1 day')"
    return f"extract(epoch from {local} AT TIME ZONE {zone})::float8"


def points_sql(source: str, zone: str) -> str:
    """SELECT of (id, cid, dp_id, num, t, res, bucket, bucket_end): every numeric row of ``source``
    (a table or CTE with id, cid, dp_id, num, t) once per resolution. ``zone``: an SQL expression."""
    return (
        f"SELECT s.id, s.cid, s.dp_id, s.num, s.t, b.res, b.bucket, b.bucket_end FROM {source} s "
        "CROSS JOIN LATERAL (VALUES "
        "(300, floor(s.t / 300) * 300, floor(s.t / 300) * 300 + 300), "
        "(3600, floor(s.t / 3600) * 3600, floor(s.t / 3600) * 3600 + 3600), "
        f"(86400, {_day_sql('s.t', zone, False)}, {_day_sql('s.t', zone, True)})"
        ") AS b(res, bucket, bucket_end) WHERE s.num IS NOT NULL"
    )


_FIRST = "(array_agg({v} ORDER BY {t}, {i}))[1], min({t}), (array_agg({i} ORDER BY {t}, {i}))[1]"
_AGGREGATE = (
    "SELECT res, cid, dp_id, bucket, max(bucket_end), count(*), sum(num), min(num), max(num), "
    "(array_agg(num ORDER BY t DESC, id DESC))[1], max(t), (array_agg(id ORDER BY t DESC, id DESC))[1], "
    f"{_FIRST.format(v='num', t='t', i='id')}, bool_and(prev IS NULL OR num >= prev) "
    "FROM (SELECT *, lag(num) OVER (PARTITION BY res, cid, dp_id, bucket ORDER BY t, id) AS prev FROM pts) p "
    "GROUP BY res, cid, dp_id, bucket ORDER BY res, cid, dp_id, bucket"
)
_COLUMNS = (
    "(res, cid, dp_id, bucket, bucket_end, n, total, lo, hi, last, last_t, last_id, "
    + "first, first_t, first_id, mono)"
)
_LATER = "(excluded.last_t, excluded.last_id) > (r.last_t, r.last_id)"
_EARLIER = "(excluded.first_t, excluded.first_id) < (r.first_t, r.first_id)"

#: Folds the rows of CTE ``pts`` (see :func:`points_sql`) into the rollups. The job folds windows of
#: later ``t`` than what a row holds, so ``mono`` stays true when the new part starts at or above the
#: old ``last`` (any overlap in (t, id), or a row from before migration 0016 (NULL), makes it false/NULL).
UPSERT_SQL = (
    f"INSERT INTO rollups AS r {_COLUMNS} {_AGGREGATE} "
    "ON CONFLICT (res, cid, dp_id, bucket) DO UPDATE SET n = r.n + excluded.n, "
    "total = r.total + excluded.total, lo = least(r.lo, excluded.lo), hi = greatest(r.hi, excluded.hi), "
    f"last = CASE WHEN {_LATER} THEN excluded.last ELSE r.last END, "
    f"last_id = CASE WHEN {_LATER} THEN excluded.last_id ELSE r.last_id END, "
    "last_t = greatest(r.last_t, excluded.last_t), "
    f"first = CASE WHEN {_EARLIER} THEN excluded.first ELSE r.first END, "
    f"first_id = CASE WHEN {_EARLIER} THEN excluded.first_id ELSE r.first_id END, "
    "first_t = least(r.first_t, excluded.first_t), "
    "mono = r.mono AND excluded.mono AND CASE "
    "WHEN (excluded.first_t, excluded.first_id) > (r.last_t, r.last_id) THEN excluded.first >= r.last "
    "WHEN (r.first_t, r.first_id) > (excluded.last_t, excluded.last_id) THEN r.first >= excluded.last "
    "ELSE false END"
)

ZONE_KEY = "rollup_zone"
#: Reports with ``t`` below this are late: their writer marks their 5-minute buckets dirty.
THRESHOLD_KEY = "rollup_threshold"
#: Rollups hold every report with ``t`` below this (queries read raw rows above it).
DONE_KEY = "rollup_done"
#: The threshold trails the clock by this much (s): reports on time are rolled up in bulk once their
#: 5-minute bucket is this far in the past, not one by one as they are written.
LAG = 60.0
#: PostgreSQL advisory lock key of the rollup job (``pg_try_advisory_xact_lock``).
LOCK_KEY = 0x6D68_0003

_FROM_RAW = (
    "SELECT res, cid, dp_id, bucket, bucket_end, count(*), sum(num), min(num), max(num), "
    "(array_agg(num ORDER BY t DESC, id DESC))[1], max(t), (array_agg(id ORDER BY t DESC, id DESC))[1], "
    f"{_FIRST.format(v='num', t='t', i='id')}, bool_and(prev IS NULL OR num >= prev) FROM ("
    "SELECT k.res, k.cid, k.dp_id, k.bucket, k.bucket_end, r.num, r.t, r.id, "
    "lag(r.num) OVER (PARTITION BY k.res, k.cid, k.dp_id, k.bucket ORDER BY r.t, r.id) AS prev "
    "FROM unnest(%(res)s::int[], %(cid)s::varchar[], %(dp)s::varchar[], %(b)s::float8[], %(e)s::float8[]) "
    "AS k(res, cid, dp_id, bucket, bucket_end) JOIN reports r ON r.cid = k.cid AND r.dp_id = k.dp_id "
    "AND r.t >= k.bucket AND r.t < least(k.bucket_end, %(done)s) AND r.num IS NOT NULL) p "
    "GROUP BY res, cid, dp_id, bucket, bucket_end"
)
_FROM_FINE = (
    "SELECT res, cid, dp_id, bucket, bucket_end, sum(n), sum(total), min(lo), max(hi), "
    "(array_agg(last ORDER BY last_t DESC, last_id DESC))[1], max(last_t), "
    "(array_agg(last_id ORDER BY last_t DESC, last_id DESC))[1], "
    f"{_FIRST.format(v='first', t='first_t', i='first_id')}, "
    "bool_and(coalesce(mono, false) AND (prev IS NULL OR first >= prev)) FROM ("
    "SELECT k.res, k.cid, k.dp_id, k.bucket, k.bucket_end, f.n, f.total, f.lo, f.hi, f.last, f.last_t, "
    "f.last_id, f.first, f.first_t, f.first_id, f.mono, "
    "lag(f.last) OVER (PARTITION BY k.res, k.cid, k.dp_id, k.bucket ORDER BY f.bucket) AS prev "
    "FROM unnest(%(res)s::int[], %(cid)s::varchar[], %(dp)s::varchar[], %(b)s::float8[], %(e)s::float8[]) "
    "AS k(res, cid, dp_id, bucket, bucket_end) JOIN rollups f ON f.res = 300 AND f.cid = k.cid "
    "AND f.dp_id = k.dp_id AND f.bucket >= k.bucket AND f.bucket < least(k.bucket_end, %(done)s)) p "
    "GROUP BY res, cid, dp_id, bucket, bucket_end"
)
_DELETE_KEYS = (
    "DELETE FROM rollups r USING unnest(%(res)s::int[], %(cid)s::varchar[], %(dp)s::varchar[], "
    "%(b)s::float8[]) AS k(res, cid, dp_id, bucket) "
    "WHERE r.res = k.res AND r.cid = k.cid AND r.dp_id = k.dp_id AND r.bucket = k.bucket"
)


def _get_state(conn: Connection, name: str) -> str | None:
    row = conn.exec_driver_sql("SELECT value FROM storage_state WHERE name = %s", (name,)).first()
    return None if row is None else row[0]


def _set_state(conn: Connection, name: str, value: str) -> None:
    conn.exec_driver_sql(
        "INSERT INTO storage_state (name, value, updated_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (name, value, time.time()),
    )


def zone_at(conn: Connection) -> str | None:
    """The time zone of the daily rollups (None: never built)."""
    return _get_state(conn, ZONE_KEY)


def done_at(conn: Connection) -> float | None:
    """Rollups hold every report with ``t`` below this; None: no rollups yet (read raw rows)."""
    value = _get_state(conn, DONE_KEY)
    return None if value is None else float(value)


def _try_lock(conn: Connection) -> bool:
    return bool(conn.exec_driver_sql("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,)).scalar())


def _move_threshold(engine: Engine, now: float) -> float | None:
    """First transaction of a run: wait for the writers' transactions under way (they hold ROW
    EXCLUSIVE on rollup_dirty until they commit), then raise the threshold and commit. A writer that
    started before it committed has committed before the rows below the new threshold are read; one
    that starts after sees the new threshold and marks its late rows dirty. None: another node runs."""
    with engine.begin() as conn:
        if not _try_lock(conn):
            return None
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        conn.exec_driver_sql("LOCK TABLE rollup_dirty IN SHARE MODE")
        new = math.floor((now - LAG) / 300) * 300.0
        old = _get_state(conn, THRESHOLD_KEY)
        if old is None or float(old) < new:
            _set_state(conn, THRESHOLD_KEY, repr(new))
            return new
        return float(old)


def _keys(
    dirty: list[tuple[str, str, float]], zone: ZoneInfo
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The rollup rows a dirty 5-minute bucket changes: its own, its hour's and its day's."""
    fine: dict[str, list[Any]] = {"res": [], "cid": [], "dp": [], "b": [], "e": []}
    coarse: dict[str, list[Any]] = {"res": [], "cid": [], "dp": [], "b": [], "e": []}
    seen: set[tuple[Any, ...]] = set()
    for cid, dp, bucket in dirty:
        day = dt.datetime.fromtimestamp(bucket, zone).date()
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
        nxt = day + dt.timedelta(days=1)
        for res, b, e in (
            (300, bucket, bucket + 300),
            (3600, math.floor(bucket / 3600) * 3600.0, math.floor(bucket / 3600) * 3600.0 + 3600),
            (86400, midnight, dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).timestamp()),
        ):
            if (res, cid, dp, b) in seen:
                continue
            seen.add((res, cid, dp, b))
            into = fine if res == 300 else coarse
            for k, v in (("res", res), ("cid", cid), ("dp", dp), ("b", b), ("e", e)):
                into[k].append(v)
    return fine, coarse


def materialize(engine: Engine, zone: str, now: float | None = None) -> dict[str, Any] | None:
    """One run of the rollup job: fold the reports between the last run's threshold and the new one
    into the rollups (one bulk statement), then recompute the buckets that late reports made dirty
    (5-minute rows from the raw rows, their hours and days from the 5-minute rows). None when another
    node holds the job's lock. Redeliveries are never rows (the dedupe key), so nothing counts twice."""
    now = time.time() if now is None else now
    threshold = _move_threshold(engine, now)
    if threshold is None:
        return None
    tz = ZoneInfo(zone)
    with engine.begin() as conn:
        if not _try_lock(conn):
            return None
        done_text = _get_state(conn, DONE_KEY)
        done = -math.inf if done_text is None else float(done_text)  # never built: everything below
        folded = 0
        if threshold > done:
            lower = "" if done_text is None else f"t >= {done!r} AND "
            window = f"(SELECT id, cid, dp_id, num, t FROM reports WHERE {lower}t < {threshold!r})"
            folded = conn.exec_driver_sql(
                f"WITH pts AS ({points_sql(window, '%s')}) {UPSERT_SQL}", (zone, zone, zone, zone)
            ).rowcount
            done = threshold
        _set_state(conn, DONE_KEY, repr(done))
        dirty = [
            (c, d, b)
            for c, d, b in conn.exec_driver_sql("DELETE FROM rollup_dirty RETURNING cid, dp_id, bucket").all()
            if b < done
        ]
        if dirty:
            fine, coarse = _keys(dirty, tz)
            for keys, source in ((fine, _FROM_RAW), (coarse, _FROM_FINE)):
                params = {**keys, "done": done}
                conn.exec_driver_sql(_DELETE_KEYS, params)
                conn.exec_driver_sql(f"INSERT INTO rollups {_COLUMNS} {source}", params)
    return {"done": done, "folded": folded, "dirty": len(dirty)}


def rebuild(engine: Engine, zone: str, now: float | None = None) -> int:
    """Recompute every rollup from the raw rows (daily buckets in ``zone``) up to a new threshold;
    rollup rows written. Writers are not held up: the threshold moves first (as in :func:`materialize`),
    so what they write meanwhile is either above it or marked dirty for the next run."""
    from meterhub.storage import partitions

    now = time.time() if now is None else now
    threshold = _move_threshold(engine, now)
    if threshold is None:
        return 0
    with engine.begin() as conn:
        if not _try_lock(conn):
            return 0
        conn.exec_driver_sql("LOCK TABLE rollups IN EXCLUSIVE MODE")  # no query reads a half-built table
        low = conn.exec_driver_sql("SELECT min(t), max(t) FROM reports").first()
        if low is not None and low[0] is not None:
            partitions.ensure(conn, partitions.ROLLUPS, low[0] - partitions.DAY, low[1] + partitions.DAY)
        conn.exec_driver_sql("DELETE FROM rollups")
        conn.exec_driver_sql("DELETE FROM rollup_dirty")
        window = f"(SELECT id, cid, dp_id, num, t FROM reports WHERE t < {threshold!r})"
        result = conn.exec_driver_sql(
            f"WITH pts AS ({points_sql(window, '%(zone)s')}) INSERT INTO rollups {_COLUMNS} {_AGGREGATE}",
            {"zone": zone},
        )
        _set_state(conn, DONE_KEY, repr(threshold))
        _set_state(conn, ZONE_KEY, zone)
        return int(result.rowcount or 0)


def ensure_zone(engine: Engine, zone: str, now: float | None = None) -> bool:
    """Rebuild the rollups if their daily buckets are not in ``zone`` (or were never built)."""
    with engine.connect() as conn:
        if _get_state(conn, ZONE_KEY) == zone:
            return False
    rebuild(engine, zone, now)
    return True


# --- reading -------------------------------------------------------------------------------------


def uses_rollups(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def pick_resolution(span: float, width: float) -> int | None:
    """The coarsest resolution worth reading for buckets of ``width`` over ``span``; None: raw rows."""
    if span < MIN_SPAN:
        return None
    for res in RESOLUTIONS:
        if res * WIDTH_FACTOR <= width:
            return res
    return None


def boundaries(res: int, lo: float, hi: float, zone: ZoneInfo) -> list[float]:
    """Bucket starts of resolution ``res`` in ``[lo, hi]``, ascending."""
    if res != 86400:
        first = math.ceil(lo / res) * res
        return [float(b) for b in range(int(first), math.floor(hi) + 1, res) if lo <= b <= hi]
    out = []
    day = dt.datetime.fromtimestamp(lo, zone).date()
    while True:
        b = dt.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
        if b > hi:
            return out
        if b >= lo:
            out.append(b)
        day += dt.timedelta(days=1)


@dataclass(slots=True)
class Agg:
    """count / sum / min / max / last (with its time) of the numbers of one chart bucket."""

    n: int = 0
    total: float = 0.0
    lo: float | None = None
    hi: float | None = None
    last: float | None = None
    last_t: float = -math.inf

    def add(self, n: int, total: float, lo: float, hi: float, last: float, last_t: float) -> None:
        self.n += n
        self.total += total
        self.lo = lo if self.lo is None or lo < self.lo else self.lo
        self.hi = hi if self.hi is None or hi > self.hi else self.hi
        if last_t >= self.last_t:
            self.last, self.last_t = last, last_t


def cover(
    a: float, b: float, resolutions: tuple[int, ...], zone: ZoneInfo
) -> tuple[list[tuple[int, float, float]], list[tuple[float, float]]]:
    """Split ``[a, b)`` into whole rollup buckets, coarsest first, and raw remainders: the middle in
    buckets of ``resolutions[0]``, the two edges in the next finer resolution, and so on; what is
    left below the finest is read raw (less than 5 minutes at each end)."""
    if not resolutions:
        return [], [(a, b)] if b > a else []
    res, finer = resolutions[0], resolutions[1:]
    grid = boundaries(res, a, b, zone)
    if len(grid) < 2:
        return cover(a, b, finer, zone)
    c, d = grid[0], grid[-1]
    left = cover(a, c, finer, zone)
    right = cover(d, b, finer, zone)
    return [*left[0], (res, c, d), *right[0]], left[1] + right[1]


def history_buckets(
    conn: Connection,
    cid: str,
    dp_id: str,
    start: float,
    end: float,
    width: float,
    count: int,
    res: int,
    zone: ZoneInfo,
) -> list[Agg]:
    """The chart buckets ``[start + i*width, start + (i+1)*width)`` (the last one also holds ``end``)
    from whole rollup buckets (resolution ``res`` and finer, :func:`cover`) and raw rows for the
    rest: the same numbers as from the raw rows alone (sums up to float rounding)."""
    edges = [start + i * width for i in range(count)] + [math.nextafter(end, math.inf)]
    levels = tuple(r for r in RESOLUTIONS if r <= res)
    ranges: dict[int, tuple[list[float], list[float], list[int]]] = {r: ([], [], []) for r in levels}
    raw_lo: list[float] = []
    raw_hi: list[float] = []
    done = done_at(conn)
    done = -math.inf if done is None else done
    for i in range(count):
        a, b = edges[i], edges[i + 1]
        if b > done:  # not rolled up yet: raw rows
            raw_lo.append(max(a, done))
            raw_hi.append(b)
            b = min(b, done)
        if b <= a:
            continue
        whole, raw = cover(a, b, levels, zone)
        for r, c, d in whole:
            ranges[r][0].append(c)
            ranges[r][1].append(d)
            ranges[r][2].append(i)
        for a, b in raw:
            raw_lo.append(a)
            raw_hi.append(b)
    aggs = [Agg() for _ in range(count)]
    for r, (lo, hi, idx) in ranges.items():
        if not lo:
            continue
        rows = conn.exec_driver_sql(  # LATERAL + OFFSET 0 (not flattened): one index range scan per piece
            "SELECT g.i, x.n, x.total, x.lo, x.hi, x.last, x.last_t "
            "FROM unnest(%s::float8[], %s::float8[], %s::int[]) AS g(a, b, i) CROSS JOIN LATERAL "
            "(SELECT n, total, lo, hi, last, last_t FROM rollups WHERE res = %s AND cid = %s "
            "AND dp_id = %s AND bucket >= g.a AND bucket < g.b OFFSET 0) AS x",
            (lo, hi, idx, r, cid, dp_id),
        ).all()
        for i, n, total, lo_, hi_, last, last_t in rows:
            aggs[i].add(n, total, lo_, hi_, last, last_t)
    if raw_lo:
        rows = conn.exec_driver_sql(
            "SELECT x.t, x.num FROM unnest(%s::float8[], %s::float8[]) AS g(a, b) CROSS JOIN LATERAL "
            "(SELECT t, num, id FROM reports WHERE cid = %s AND dp_id = %s AND t >= g.a AND t < g.b "
            "AND num IS NOT NULL OFFSET 0) AS x ORDER BY x.t, x.id",
            (raw_lo, raw_hi, cid, dp_id),
        ).all()
        for t, num in rows:
            aggs[min(int((t - start) // width), count - 1)].add(1, num, num, num, num, t)
    return aggs
