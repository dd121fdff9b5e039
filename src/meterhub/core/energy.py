"""Energy consumption per day or month, derived from the meters' cumulative totals.

Sources: ``electric_total`` (dp 44) or, when a device has no dp 44 reading in or before the range,
``forward_energy_total`` (dp 50); one source per device and request, never a mix. Both are
cumulative counters in raw units (scale 4: kWh = raw / 10^4). The computation uses the raw
integers, so sums are exact; results are in kWh.

Rules (meterhub's choices, the protocol says nothing about them):

- Readings are sorted by measurement time ``t`` (not arrival), so buffered reports that arrive late
  or out of order count where they belong.
- Consumption between two consecutive readings is ``later - earlier`` and is attributed to the day
  (or month) of the *later* reading in the configured time zone (setting ``timezone``; days follow the
  zone's clock, so a DST change day has 23 or 25 hours). A reading at exactly midnight belongs to the
  day that starts then.
- Gaps: by default the whole delta goes to the day of the later reading. With ``spread=True`` it is
  spread linearly over the time between the two readings, across the days (months) it covers; the
  part that falls before the first day asked for is left out.
- The first delta of a range is measured from the last reading *before* the range, when there is one.
- Drops (a reading lower than the previous one):
  * a reading below ``RESET_FRACTION`` (10 %) of the previous one is a **meter reset**: the counter
    restarted from 0, so the energy since the reset is the new reading itself (delta = new value);
  * a smaller drop is a **rebase** (meter replaced, counter set, or a bad reading): nothing is counted
    and the new reading becomes the reference;
  * but when the reading *after* a drop is back at or above the level before the drop, the low
    reading was a **glitch**: it is skipped, and the consumption is measured across it (the first
    reading after the range is looked at to decide this for a drop at the very end).
  Every reset, rebase and glitch is returned in ``events``.
- A day with no readings (and nothing spread into it) has ``consumption_kwh = None`` (no data),
  which is not the same as 0.

Beside the derived numbers, each day (month) carries what the meter reports itself: the last
``electric_daily`` (dp 45) value of the day, or the last ``electric_month`` (dp 46) value of the
month (``reported_kwh``), for comparison.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from meterhub.storage import rollups, schema

__all__ = [
    "DAILY_DP",
    "MONTHLY_DP",
    "RESET_FRACTION",
    "SOURCE_DPS",
    "Bucket",
    "DeviceEnergy",
    "EnergyEvent",
    "Reading",
    "attribute",
    "buckets_for",
    "device_energy",
    "group_energy",
    "parse_period_key",
]

#: Cumulative totals, in order of preference.
SOURCE_DPS: tuple[tuple[str, str], ...] = (("44", "electric_total"), ("50", "forward_energy_total"))
DAILY_DP = "45"  # electric_daily
MONTHLY_DP = "46"  # electric_month
SCALE = 4
#: A drop to below this fraction of the previous reading is taken as a meter reset.
RESET_FRACTION = 0.1
#: Most buckets in one answer.
MAX_DAYS = 1098
MAX_MONTHS = 120


@dataclass(slots=True, frozen=True)
class Reading:
    t: float
    raw: int


@dataclass(slots=True, frozen=True)
class Bucket:
    """One day (``key`` "2026-11-21") or month ("2026-11"), as ``[start, end)`` Unix seconds."""

    key: str
    start: float
    end: float


@dataclass(slots=True)
class EnergyEvent:
    t: float
    kind: str  # reset | rebase | glitch
    before: int
    after: int

    def as_dict(self, divisor: int) -> dict[str, Any]:
        return {
            "t": self.t,
            "kind": self.kind,
            "before_kwh": self.before / divisor,
            "after_kwh": self.after / divisor,
        }


@dataclass(slots=True)
class Attribution:
    """Per bucket: consumption in raw units (None = no data), and number of readings."""

    sums: list[float | None]
    readings: list[int]
    events: list[EnergyEvent] = field(default_factory=list)


# --- calendar ------------------------------------------------------------------------------------


def parse_period_key(text: str, period: str) -> dt.date:
    """``YYYY-MM-DD`` (or ``YYYY-MM`` for months) -> the date (first of the month for months)."""
    text = text.strip()
    try:
        if period == "month" and len(text) == 7:
            return dt.date.fromisoformat(text + "-01")
        day = dt.date.fromisoformat(text)
    except ValueError:
        want = "YYYY-MM or YYYY-MM-DD" if period == "month" else "YYYY-MM-DD"
        raise ValueError(f"bad date {text!r}: expected {want}") from None
    return day.replace(day=1) if period == "month" else day


def _midnight(day: dt.date, tz: ZoneInfo) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def _next_month(day: dt.date) -> dt.date:
    return dt.date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def hour_buckets(start: float, hours: int, tz: ZoneInfo) -> list[Bucket]:
    """``hours`` consecutive hours from ``start`` (a full hour), keyed "2026-11-21T14" in zone ``tz``."""
    return [
        Bucket(
            dt.datetime.fromtimestamp(start + k * 3600, tz).strftime("%Y-%m-%dT%H"),
            start + k * 3600,
            start + (k + 1) * 3600,
        )
        for k in range(hours)
    ]


def buckets_for(period: str, first: dt.date, last: dt.date, tz: ZoneInfo) -> list[Bucket]:
    """The days (``period="day"``) or months from ``first`` to ``last`` inclusive, in zone ``tz``."""
    if period not in ("day", "month"):
        raise ValueError("period must be 'day' or 'month'")
    if last < first:
        raise ValueError("'to' is before 'from'")
    out: list[Bucket] = []
    if period == "day":
        if (last - first).days + 1 > MAX_DAYS:
            raise ValueError(f"at most {MAX_DAYS} days per request")
        day = first
        start = _midnight(day, tz)
        while day <= last:
            nxt = day + dt.timedelta(days=1)
            end = _midnight(nxt, tz)
            out.append(Bucket(day.isoformat(), start, end))
            day, start = nxt, end
    else:
        month = first.replace(day=1)
        stop = last.replace(day=1)
        if (stop.year - month.year) * 12 + stop.month - month.month + 1 > MAX_MONTHS:
            raise ValueError(f"at most {MAX_MONTHS} months per request")
        start = _midnight(month, tz)
        while month <= stop:
            nxt = _next_month(month)
            end = _midnight(nxt, tz)
            out.append(Bucket(month.strftime("%Y-%m"), start, end))
            month, start = nxt, end
    return out


# --- the computation -----------------------------------------------------------------------------


def attribute(
    readings: Iterable[Reading],
    bounds: Sequence[float],
    *,
    baseline: Reading | None = None,
    lookahead: Reading | None = None,
    spread: bool = False,
    reset_fraction: float = RESET_FRACTION,
) -> Attribution:
    """Attribute the consumption between consecutive readings to buckets ``[bounds[i], bounds[i+1])``.

    ``readings`` are those inside ``[bounds[0], bounds[-1])`` (any order); ``baseline`` is the last
    reading before ``bounds[0]`` and ``lookahead`` the first one at or after ``bounds[-1]``.
    """
    n = len(bounds) - 1
    sums: list[float | None] = [None] * n
    counts = [0] * n
    events: list[EnergyEvent] = []
    lo = bounds[0]

    def index(t: float) -> int:
        return bisect.bisect_right(bounds, t) - 1

    def add(t0: float, t1: float, amount: float) -> None:
        if spread and t1 > t0 and amount:
            start = max(t0, lo)
            if start >= t1:
                return
            span = t1 - t0
            i = index(start)
            while i < n and bounds[i] < t1:
                part = min(bounds[i + 1], t1) - max(bounds[i], start)
                if part > 0:
                    sums[i] = (sums[i] or 0) + amount * part / span
                i += 1
            return
        i = index(t1)
        if 0 <= i < n:
            sums[i] = (sums[i] or 0) + amount

    ordered = sorted(readings, key=lambda r: r.t)
    for r in ordered:
        i = index(r.t)
        if 0 <= i < n:
            counts[i] += 1
            if sums[i] is None:
                sums[i] = 0
    seq: list[Reading] = ([baseline] if baseline is not None else []) + ordered
    if lookahead is not None:
        seq.append(lookahead)
    last_index = len(seq) - 1 if lookahead is not None else None

    prev: Reading | None = None
    pending: Reading | None = None  # a drop waiting for the next reading to tell reset from glitch
    for k, r in enumerate(seq):
        beyond = k == last_index  # the lookahead reading only settles a pending drop
        if prev is None:
            prev = r
            continue
        if pending is not None:
            if r.raw >= prev.raw:
                events.append(EnergyEvent(pending.t, "glitch", prev.raw, pending.raw))
                pending = None
                if not beyond:
                    add(prev.t, r.t, r.raw - prev.raw)
                prev = r
                continue
            prev = _settle_drop(prev, pending, reset_fraction, events, add)
            pending = None
        if beyond:
            break
        if r.raw >= prev.raw:
            add(prev.t, r.t, r.raw - prev.raw)
            prev = r
        else:
            pending = r
    if pending is not None and prev is not None:
        _settle_drop(prev, pending, reset_fraction, events, add)
    return Attribution(sums, counts, events)


def _settle_drop(
    prev: Reading, low: Reading, reset_fraction: float, events: list[EnergyEvent], add: Any
) -> Reading:
    if low.raw < prev.raw * reset_fraction:
        events.append(EnergyEvent(low.t, "reset", prev.raw, low.raw))
        add(prev.t, low.t, low.raw)  # counted from 0
    else:
        events.append(EnergyEvent(low.t, "rebase", prev.raw, low.raw))
    return low


def _last_per_bucket(readings: Iterable[Reading], bounds: Sequence[float]) -> list[Reading | None]:
    out: list[Reading | None] = [None] * (len(bounds) - 1)
    for r in readings:
        i = bisect.bisect_right(bounds, r.t) - 1
        if 0 <= i < len(out):
            cur = out[i]
            if cur is None or r.t >= cur.t:
                out[i] = r
    return out


# --- from the database ---------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceEnergy:
    cid: str
    source: tuple[str, str] | None
    buckets: list[Bucket]
    consumption: list[float | None]  # kWh
    readings: list[int]
    reported: list[float | None]  # kWh, the meter's own daily / monthly counter
    events: list[EnergyEvent]

    @property
    def total(self) -> float | None:
        known = [c for c in self.consumption if c is not None]
        return round(sum(known), SCALE) if known else None


def _raw(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _readings(conn: Connection, cid: str, dp_id: str, start: float, end: float) -> list[Reading]:
    r = schema.reports
    rows = conn.execute(
        select(r.c.t, r.c.value)
        .where(r.c.cid == cid, r.c.dp_id == dp_id, r.c.t >= start, r.c.t < end)
        .order_by(r.c.t, r.c.id)
    ).all()
    return [Reading(t, raw) for t, v in rows if (raw := _raw(v)) is not None]


def _neighbour(conn: Connection, cid: str, dp_id: str, t: float, before: bool) -> Reading | None:
    r = schema.reports
    q = select(r.c.t, r.c.value).where(r.c.cid == cid, r.c.dp_id == dp_id)
    if before:
        q = q.where(r.c.t < t).order_by(r.c.t.desc(), r.c.id.desc())
    else:
        q = q.where(r.c.t >= t).order_by(r.c.t, r.c.id)
    for t_, v in conn.execute(q.limit(5)).all():
        raw = _raw(v)
        if raw is not None:
            return Reading(t_, raw)
    return None


# --- from rollups (PostgreSQL) ---------------------------------------------------------------------
#
# A rollup bucket that lies inside one asked-for bucket and whose numbers never decrease (``mono``)
# contributes exactly what its first and last readings contribute: the deltas inside it are all >= 0,
# all go to the same asked-for bucket, and no reset/rebase/glitch rule fires. So, when every rollup
# bucket of a device's range is monotonic and the sequence baseline, first_1, last_1, first_2, ... never
# decreases either (no drop at a bucket's edge, whose verdict would depend on the readings next to it),
# :func:`attribute` over those readings plus the raw rows above the rollups gives the answer of the raw
# rows alone; otherwise (or with a dirty bucket, a rollup row from before migration 0016, or a count
# of raw rows in the covered range that differs from the rollups') the
# device's range is read from the raw rows. The first/last values are read by report id (exact raw
# integers, whatever the data point's scale). ``spread`` reads raw rows (float sums in another order).


@dataclass(slots=True, frozen=True)
class Cover:
    """Rollups of resolution ``res`` answer ``[start, end)``; every asked-for bound in it is a bound of
    a rollup bucket (``starts``)."""

    res: int
    start: float
    end: float
    starts: frozenset[float]


def rollup_cover(conn: Connection, bounds: Sequence[float]) -> Cover | None:
    """The coarsest rollups that tile a non-empty start of ``[bounds[0], bounds[-1])`` below the rollup
    job's watermark without crossing an asked-for bound; None: read raw rows (SQLite, no rollups)."""
    if not rollups.uses_rollups(conn):
        return None
    done, zone_name = rollups.done_at(conn), rollups.zone_at(conn)
    if done is None or zone_name is None:
        return None
    start, hi = bounds[0], min(bounds[-1], done)
    if hi <= start:
        return None
    zone = ZoneInfo(zone_name)
    for res in rollups.RESOLUTIONS:
        starts = rollups.boundaries(res, start, hi, zone)
        if not starts or starts[0] != start or starts[-1] == start:
            continue
        have = frozenset(starts)
        if all(b in have for b in bounds if b <= starts[-1]):
            return Cover(res, start, starts[-1], have)
    return None


def _dirty(conn: Connection, cid: str, dp_id: str, cover: Cover) -> bool:
    d = schema.rollup_dirty
    q = select(d.c.bucket).where(
        d.c.cid == cid, d.c.dp_id == dp_id, d.c.bucket > cover.start - 300, d.c.bucket < cover.end
    )
    return conn.execute(q.limit(1)).first() is not None


def _rollup_rows(conn: Connection, cid: str, dp_id: str, cover: Cover) -> list[Any] | None:
    """The device's rollup rows in the cover, by bucket; None when a late report made one stale."""
    if _dirty(conn, cid, dp_id, cover):  # read before the rollups: a mark seen means they may be stale
        return None
    u = schema.rollups
    rows = conn.execute(
        select(
            u.c.bucket,
            u.c.n,
            u.c.first,
            u.c.first_t,
            u.c.first_id,
            u.c.last,
            u.c.last_t,
            u.c.last_id,
            u.c.mono,
        )
        .where(
            u.c.res == cover.res,
            u.c.cid == cid,
            u.c.dp_id == dp_id,
            u.c.bucket >= cover.start,
            u.c.bucket < cover.end,
        )
        .order_by(u.c.bucket)
    ).all()
    if any(row.bucket not in cover.starts for row in rows):  # rebuilt in another zone meanwhile
        return None
    # Every raw row must be in the rollups and no more: rows written past the writer (an import, a
    # restore), expired by retention or committed since the rollups were read make the counts differ.
    # An index-only count on (cid, dp_id, t).
    r = schema.reports
    raw = conn.execute(
        select(func.count())
        .select_from(r)
        .where(r.c.cid == cid, r.c.dp_id == dp_id, r.c.t >= cover.start, r.c.t < cover.end)
    ).scalar_one()
    if raw != sum(row.n for row in rows):
        return None
    return list(rows)


def _raw_by_id(conn: Connection, cid: str, dp_id: str, keys: set[tuple[int, float]]) -> dict[int, int | None]:
    if not keys:
        return {}
    r = schema.reports
    times = sorted({t for _, t in keys})
    rows = conn.execute(  # through the (cid, dp_id, t) index, the partitions of [first, last] only
        select(r.c.id, r.c.value).where(
            r.c.cid == cid,
            r.c.dp_id == dp_id,
            r.c.t >= times[0],
            r.c.t <= times[-1],
            r.c.t.in_(times),
            r.c.id.in_(sorted({id_ for id_, _ in keys})),
        )
    ).all()
    return {id_: _raw(v) for id_, v in rows}


def _series_from_rollups(
    conn: Connection, cid: str, dp_id: str, bounds: Sequence[float], baseline: Reading | None, cover: Cover
) -> tuple[list[Reading], list[int]] | None:
    """Readings standing for the rollup buckets (first and last of each) plus the raw rows above the
    cover, and per asked-for bucket the readings the stand-ins replace; None: read the raw rows."""
    rows = _rollup_rows(conn, cid, dp_id, cover)
    if rows is None:
        return None
    prev_num: float | None = None
    for row in rows:
        if row.mono is not True or (prev_num is not None and row.first < prev_num):
            return None
        prev_num = row.last
    values = _raw_by_id(
        conn,
        cid,
        dp_id,
        {(row.first_id, row.first_t) for row in rows} | {(row.last_id, row.last_t) for row in rows},
    )
    out: list[Reading] = []
    extra = [0] * (len(bounds) - 1)
    for row in rows:
        first, last = values.get(row.first_id), values.get(row.last_id)
        if first is None or last is None:  # raw rows expired (or not an integer): no exact answer here
            return None
        stand_ins = [Reading(row.first_t, first)]
        if row.last_id != row.first_id:
            stand_ins.append(Reading(row.last_t, last))
        out.extend(stand_ins)
        extra[bisect.bisect_right(bounds, row.bucket) - 1] += row.n - len(stand_ins)
    seq = ([baseline] if baseline is not None else []) + out
    if any(b.raw < a.raw for a, b in itertools.pairwise(seq)):
        return None
    return out + _readings(conn, cid, dp_id, cover.end, bounds[-1]), extra


def _series(
    conn: Connection,
    cid: str,
    dp_id: str,
    bounds: Sequence[float],
    baseline: Reading | None,
    cover: Cover | None,
) -> tuple[list[Reading], list[int] | None]:
    if cover is not None and (got := _series_from_rollups(conn, cid, dp_id, bounds, baseline, cover)):
        return got
    return _readings(conn, cid, dp_id, bounds[0], bounds[-1]), None


def _own(
    conn: Connection, cid: str, dp_id: str, bounds: Sequence[float], cover: Cover | None
) -> list[Reading | None]:
    """The last reading of ``dp_id`` per asked-for bucket (rollups' ``last`` where they answer)."""
    rows = _rollup_rows(conn, cid, dp_id, cover) if cover is not None else None
    if rows is None:
        return _last_per_bucket(_readings(conn, cid, dp_id, bounds[0], bounds[-1]), bounds)
    latest: dict[int, Any] = {}
    for row in rows:
        i = bisect.bisect_right(bounds, row.bucket) - 1
        if i not in latest or (row.last_t, row.last_id) > (latest[i].last_t, latest[i].last_id):
            latest[i] = row
    values = _raw_by_id(conn, cid, dp_id, {(row.last_id, row.last_t) for row in latest.values()})
    if any(values.get(row.last_id) is None for row in latest.values()):
        return _last_per_bucket(_readings(conn, cid, dp_id, bounds[0], bounds[-1]), bounds)
    out: list[Reading | None] = [None] * (len(bounds) - 1)
    for i, row in latest.items():
        out[i] = Reading(row.last_t, values[row.last_id])  # type: ignore[arg-type]
    assert cover is not None  # rows came from it
    tail = _last_per_bucket(_readings(conn, cid, dp_id, cover.end, bounds[-1]), bounds)
    return [t if t is not None else o for t, o in zip(tail, out, strict=True)]


def device_energy(
    conn: Connection,
    cid: str,
    period: str,
    buckets: list[Bucket],
    *,
    spread: bool = False,
    cover: Cover | bool = True,
) -> DeviceEnergy:
    """Consumption of one device over ``buckets`` (consecutive days, months or hours): from rollups
    where they give the raw rows' answer (PostgreSQL, see :class:`Cover`), else from the raw rows.
    ``cover``: True = find it, False = raw rows only, or one :func:`rollup_cover` for several devices."""
    bounds = [b.start for b in buckets] + [buckets[-1].end]
    start, end = bounds[0], bounds[-1]
    if cover is True:
        cover = rollup_cover(conn, bounds)
    use: Cover | None = cover if isinstance(cover, Cover) else None
    divisor = 10**SCALE
    source: tuple[str, str] | None = None
    readings: list[Reading] = []
    extra: list[int] | None = None
    baseline: Reading | None = None
    for dp_id, code in SOURCE_DPS:
        baseline = _neighbour(conn, cid, dp_id, start, before=True)
        readings, extra = _series(conn, cid, dp_id, bounds, baseline, None if spread else use)
        if readings or baseline is not None:
            source = (dp_id, code)
            break
    if source is not None:
        lookahead = _neighbour(conn, cid, source[0], end, before=False)
        att = attribute(readings, bounds, baseline=baseline, lookahead=lookahead, spread=spread)
        if extra is not None:
            att.readings = [c + e for c, e in zip(att.readings, extra, strict=True)]
    else:
        att = Attribution([None] * len(buckets), [0] * len(buckets))
    own_dp = {"day": DAILY_DP, "month": MONTHLY_DP}.get(period)  # hours: the meter keeps no register
    own = _own(conn, cid, own_dp, bounds, use) if own_dp else [None] * len(buckets)
    return DeviceEnergy(
        cid=cid,
        source=source,
        buckets=buckets,
        consumption=[None if s is None else round(s / divisor, SCALE) for s in att.sums],
        readings=att.readings,
        reported=[None if r is None else r.raw / divisor for r in own],
        events=att.events,
    )


def group_energy(
    conn: Connection,
    cids: Sequence[str],
    period: str,
    buckets: list[Bucket],
    *,
    spread: bool = False,
    use_rollups: bool = True,
) -> tuple[list[float | None], list[DeviceEnergy]]:
    """Per-bucket sums over several devices (None where no device has data), and each device's part."""
    bounds = [b.start for b in buckets] + [buckets[-1].end]
    cover: Cover | bool = False
    if use_rollups and not spread:
        cover = rollup_cover(conn, bounds) or False
    parts = [device_energy(conn, cid, period, buckets, spread=spread, cover=cover) for cid in cids]
    sums: list[float | None] = []
    for i in range(len(buckets)):
        known = [p.consumption[i] for p in parts if p.consumption[i] is not None]
        sums.append(round(sum(known), SCALE) if known else None)  # type: ignore[arg-type]
    return sums, parts
