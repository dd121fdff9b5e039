"""The whole fleet over time (the overview's charts): summed power, energy per hour or day, silent meters."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from meterhub.api.deps import Hub, iso, iso_required, zone
from meterhub.api.errors import ApiError
from meterhub.core import energy, fleet

router = APIRouter(tags=["fleet"])


def _cids(hub: Any) -> list[str]:
    cids = fleet.fleet_cids(hub.engine)
    if len(cids) > fleet.MAX_DEVICES:
        raise ApiError(422, f"the fleet has more than {fleet.MAX_DEVICES} devices: ask per gateway (/energy)")
    return cids


@router.get("/fleet/power")
async def fleet_power(
    hub: Hub,
    hours: Annotated[float, Query(gt=0, le=24 * 31, description="The last this many hours.")] = 24,
    buckets: Annotated[int, Query(ge=1, le=1000, description="Time buckets.")] = 96,
) -> dict[str, Any]:
    """The fleet's active power over time: per bucket, the sum over meters of each meter's mean
    ``power_current`` (dp 3, W) in it, and how many meters reported."""
    end = time.time()
    start = end - hours * 3600

    def compute() -> list[dict[str, Any]]:
        return fleet.power_buckets(hub.engine, _cids(hub), start, end, buckets)

    rows = await run_in_threadpool(compute)
    tz = zone(hub)
    return {
        "from": start,
        "to": end,
        "interval": (end - start) / buckets,
        "unit": "W",
        "buckets": [{**b, "start_iso": iso_required(b["start"], tz)} for b in rows],
    }


@router.get("/fleet/energy")
async def fleet_energy(
    hub: Hub,
    period: Annotated[
        Literal["hour", "day"], Query(description="Hours or days (configured time zone).")
    ] = "hour",
    count: Annotated[
        int | None, Query(ge=1, le=366, description="Buckets: default 48 hours / 14 days.")
    ] = None,
) -> dict[str, Any]:
    """The fleet's consumption (kWh) per hour or day, the newest bucket last (still running), from every
    meter's cumulative total as in ``/energy``."""
    tz = zone(hub)
    now = time.time()
    if period == "hour":
        n = count or 48
        if n > 24 * 31:
            raise ApiError(422, "at most 744 hours")
        first = now - now % 3600 - (n - 1) * 3600
        buckets = energy.hour_buckets(first, n, tz)
    else:
        n = count or 14
        today = dt.datetime.now(tz).date()
        buckets = energy.buckets_for("day", today - dt.timedelta(days=n - 1), today, tz)

    def compute() -> tuple[list[float | None], list[energy.DeviceEnergy], int]:
        cids = _cids(hub)
        with hub.engine.connect() as conn:
            sums, parts = energy.group_energy(conn, cids, period, buckets)
        return sums, parts, len(cids)

    sums, parts, devices = await run_in_threadpool(compute)
    known = [s for s in sums if s is not None]
    return {
        "period": period,
        "timezone": hub.settings.timezone,
        "unit": "kWh",
        "devices": devices,
        "devices_with_data": sum(1 for p in parts if p.total is not None),
        "total_kwh": round(sum(known), energy.SCALE) if known else None,
        "buckets": [
            {
                "period": b.key,
                "start": b.start,
                "end": b.end,
                "start_iso": iso_required(b.start, tz),
                "consumption_kwh": sums[i],
            }
            for i, b in enumerate(buckets)
        ],
    }


@router.get("/fleet/silent")
async def fleet_silent(
    hub: Hub, limit: Annotated[int, Query(ge=1, le=1000, description="At most this many meters.")] = 50
) -> dict[str, Any]:
    """Meters online but not reporting for longer than 3 x their usual interval (the median gap of their
    last power reports; at least 30 s), and offline meters: the longest silent first, with how long."""
    now = time.time()

    def compute() -> tuple[list[dict[str, Any]], int]:
        _cids(hub)  # a fleet above MAX_DEVICES: 422 rather than an answer about part of it
        return fleet.silent_meters(hub.engine, now, limit)

    items, total = await run_in_threadpool(compute)
    tz = zone(hub)
    for m in items:
        m["last_report_iso"] = iso(m["last_report"], tz)
        m["offline_since_iso"] = iso(m["offline_since"], tz)
    return {"items": items, "total": total, "now": now}
