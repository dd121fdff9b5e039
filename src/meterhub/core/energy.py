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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.engine import Connection

from meterhub.storage import schema

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


def device_energy(
    conn: Connection, cid: str, period: str, buckets: list[Bucket], *, spread: bool = False
) -> DeviceEnergy:
    """Consumption of one device over ``buckets`` (consecutive days or months)."""
    bounds = [b.start for b in buckets] + [buckets[-1].end]
    start, end = bounds[0], bounds[-1]
    divisor = 10**SCALE
    source: tuple[str, str] | None = None
    readings: list[Reading] = []
    baseline: Reading | None = None
    for dp_id, code in SOURCE_DPS:
        readings = _readings(conn, cid, dp_id, start, end)
        baseline = _neighbour(conn, cid, dp_id, start, before=True)
        if readings or baseline is not None:
            source = (dp_id, code)
            break
    if source is not None:
        lookahead = _neighbour(conn, cid, source[0], end, before=False)
        att = attribute(readings, bounds, baseline=baseline, lookahead=lookahead, spread=spread)
    else:
        att = Attribution([None] * len(buckets), [0] * len(buckets))
    own_dp = {"day": DAILY_DP, "month": MONTHLY_DP}.get(period)  # hours: the meter keeps no register
    own = (
        _last_per_bucket(_readings(conn, cid, own_dp, start, end), bounds)
        if own_dp
        else [None] * len(buckets)
    )
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
    conn: Connection, cids: Sequence[str], period: str, buckets: list[Bucket], *, spread: bool = False
) -> tuple[list[float | None], list[DeviceEnergy]]:
    """Per-bucket sums over several devices (None where no device has data), and each device's part."""
    parts = [device_energy(conn, cid, period, buckets, spread=spread) for cid in cids]
    sums: list[float | None] = []
    for i in range(len(buckets)):
        known = [p.consumption[i] for p in parts if p.consumption[i] is not None]
        sums.append(round(sum(known), SCALE) if known else None)  # type: ignore[arg-type]
    return sums, parts
