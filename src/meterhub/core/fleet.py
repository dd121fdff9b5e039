"""The fleet over time, for the overview: summed active power per time bucket, and the meters that
went silent (online but not reporting for longer than they usually do, or offline). Blocking reads;
the energy per hour/day of the fleet is :func:`meterhub.core.energy.group_energy` over every device.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, Integer, and_, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from meterhub.storage import schema

#: The data point summed as the fleet's power (the overview's "Total power now" sums the same).
POWER_DP = "3"
#: A meter is silent after this many of its usual report intervals without a report ...
SILENT_FACTOR = 3.0
#: ... and never sooner than this (s): a meter that reports every 2 s is not silent after 7 s.
SILENT_MIN = 30.0
#: Usual interval of a meter with too few power reports to tell (s).
DEFAULT_INTERVAL = 60.0
#: Power reports a meter's usual interval is taken from (the median gap between them).
INTERVAL_SAMPLES = 7
#: Devices one fleet request covers at most.
MAX_DEVICES = 5000


class bucket_index(FunctionElement[int]):
    """``floor((t - start) / width)`` as an integer, the same on every database (t >= start)."""

    type = Integer()
    inherit_cache = True


@compiles(bucket_index)
def _bucket_default(element: Any, compiler: Any, **kw: Any) -> str:
    t, start, width = (compiler.process(c, **kw) for c in element.clauses)
    return f"CAST(FLOOR(({t} - {start}) / {width}) AS INTEGER)"


@compiles(bucket_index, "sqlite")
def _bucket_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    # SQLite's CAST truncates toward zero: floor for the non-negative values of the range.
    t, start, width = (compiler.process(c, **kw) for c in element.clauses)
    return f"CAST(({t} - {start}) / {width} AS INTEGER)"


def fleet_cids(engine: Engine) -> list[str]:
    d = schema.devices
    with engine.connect() as conn:
        return [r.cid for r in conn.execute(select(d.c.cid).order_by(d.c.cid).limit(MAX_DEVICES + 1))]


def power_buckets(
    engine: Engine, cids: Sequence[str], start: float, end: float, count: int
) -> list[dict[str, Any]]:
    """``count`` buckets of ``[start, end)``: per bucket the sum over devices of each device's mean
    power (W) in it, and how many devices reported. A device without a report in a bucket adds nothing."""
    width = (end - start) / count
    r = schema.reports
    sums = [0.0] * count
    devices = [0] * count
    with engine.connect() as conn:
        for k in range(0, len(cids), 500):
            chunk = list(cids[k : k + 500])
            idx = bucket_index(r.c.t, start, width).label("i")
            q = (
                select(r.c.cid, idx, func.avg(r.c.num))
                .where(
                    and_(
                        r.c.cid.in_(chunk),
                        r.c.dp_id == POWER_DP,
                        r.c.t >= start,
                        r.c.t < end,
                        r.c.num.is_not(None),
                    )
                )
                .group_by(r.c.cid, idx)
            )
            for _cid, i, mean in conn.execute(q):
                i = min(int(i), count - 1)
                sums[i] += float(mean)
                devices[i] += 1
    return [
        {
            "start": start + i * width,
            "end": start + (i + 1) * width,
            "power_w": round(sums[i], 1) if devices[i] else None,
            "devices": devices[i],
        }
        for i in range(count)
    ]


def _usual_interval(conn: Any, cid: str) -> float | None:
    r = schema.reports
    ts = list(
        conn.execute(
            select(r.c.t)
            .where(r.c.cid == cid, r.c.dp_id == POWER_DP)
            .order_by(r.c.t.desc())
            .limit(INTERVAL_SAMPLES + 1)
        ).scalars()
    )
    gaps = [a - b for a, b in itertools.pairwise(ts) if a > b]
    return statistics.median(gaps) if len(gaps) >= 3 else None


def silent_meters(engine: Engine, now: float, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Meters online but without a report for longer than ``SILENT_FACTOR`` x their usual interval
    (at least ``SILENT_MIN`` s), and offline meters; the longest silent first. A meter that never
    reported is silent since it was first seen."""
    d, lv, p = schema.devices, schema.latest, schema.presence
    out: list[dict[str, Any]] = []
    with engine.connect() as conn:
        last = dict(conn.execute(select(lv.c.cid, func.max(lv.c.received_at)).group_by(lv.c.cid)).all())
        rows = conn.execute(
            select(d.c.cid, d.c.gateway_id, d.c.device_name, d.c.online, d.c.first_seen).limit(MAX_DEVICES)
        ).all()
        for row in rows:
            heard = last.get(row.cid)
            since = heard if heard is not None else row.first_seen
            quiet = max(0.0, now - since)
            interval: float | None = None
            if row.online:
                if quiet < SILENT_MIN:
                    continue
                interval = _usual_interval(conn, row.cid)
                if quiet < max(SILENT_MIN, SILENT_FACTOR * (interval or DEFAULT_INTERVAL)):
                    continue
            offline_at = None
            if not row.online:
                offline_at = conn.execute(
                    select(p.c.at)
                    .where(p.c.cid == row.cid, p.c.online.is_(False))
                    .order_by(p.c.at.desc(), p.c.id.desc())
                    .limit(1)
                ).scalar()
            out.append(
                {
                    "cid": row.cid,
                    "name": row.device_name,
                    "gateway_id": row.gateway_id,
                    "online": bool(row.online),
                    "last_report": heard,
                    "silent_for": round(quiet, 1),
                    "usual_interval": interval,
                    "offline_since": offline_at,
                }
            )
    out.sort(key=lambda m: -m["silent_for"])
    return out[:limit], len(out)
