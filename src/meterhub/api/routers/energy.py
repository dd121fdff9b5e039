"""Energy consumption per day or month, per device or for a group (rules: meterhub.core.energy)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, iso_required, zone
from meterhub.api.errors import ApiError, device_not_found
from meterhub.api.responses import errors
from meterhub.api.routers.devices import CidParam
from meterhub.api.schemas import DeviceEnergyOut, GroupEnergyOut
from meterhub.core import energy
from meterhub.protocol.errors import ErrorCode

router = APIRouter(tags=["energy"])

Period = Annotated[Literal["day", "month"], Query(description="Days or months in the configured time zone.")]
DateQuery = Annotated[
    str | None,
    Query(max_length=10, description="YYYY-MM-DD (day) or YYYY-MM (month); default: this month / this year."),
]
Spread = Annotated[
    bool, Query(description="Spread the consumption of a gap linearly over the days it covers.")
]
MAX_GROUP = 5000


def _range(hub: Any, period: str, from_: str | None, to: str | None) -> tuple[list[energy.Bucket], str, str]:
    tz = zone(hub)
    today = dt.datetime.now(tz).date()
    try:
        last = energy.parse_period_key(to, period) if to else today
        if from_:
            first = energy.parse_period_key(from_, period)
        else:
            first = last.replace(day=1) if period == "day" else last.replace(month=1, day=1)
        buckets = energy.buckets_for(period, first, last, tz)
    except (ValueError, OverflowError) as exc:
        raise ApiError(422, str(exc), int(ErrorCode.PARAMS_RANGE_INVALID)) from None
    return buckets, buckets[0].key, buckets[-1].key


def _events(events: list[energy.EnergyEvent], tz: Any) -> list[dict[str, Any]]:
    divisor = 10**energy.SCALE
    return [{**e.as_dict(divisor), "t_iso": iso_required(e.t, tz)} for e in events]


def _source(src: tuple[str, str] | None) -> dict[str, str] | None:
    return {"dp_id": src[0], "code": src[1]} if src else None


@router.get("/devices/{cid}/energy", response_model=DeviceEnergyOut, responses=errors(404))
async def device_energy(
    hub: Hub,
    cid: CidParam,
    period: Period = "day",
    from_: Annotated[DateQuery, Query(alias="from")] = None,
    to: DateQuery = None,
    spread: Spread = False,
) -> dict[str, Any]:
    """Consumption per day or month in kWh, from the cumulative total (dp 44, else dp 50), with what the
    meter reports itself (dp 45 daily / dp 46 monthly) beside it, and any resets, rebases or glitches."""
    buckets, first, last = _range(hub, period, from_, to)
    if not await run_in_threadpool(queries.device_exists, hub.engine, cid):
        raise device_not_found(cid)

    def compute() -> energy.DeviceEnergy:
        with hub.engine.connect() as conn:
            return energy.device_energy(conn, cid, period, buckets, spread=spread)

    result = await run_in_threadpool(compute)
    tz = zone(hub)
    return {
        "cid": cid,
        "period": period,
        "timezone": hub.settings.timezone,
        "from": first,
        "to": last,
        "spread": spread,
        "source": _source(result.source),
        "total_kwh": result.total,
        "buckets": [
            {
                "period": b.key,
                "start": b.start,
                "end": b.end,
                "start_iso": iso_required(b.start, tz),
                "consumption_kwh": result.consumption[i],
                "readings": result.readings[i],
                "reported_kwh": result.reported[i],
            }
            for i, b in enumerate(buckets)
        ],
        "events": _events(result.events, tz),
    }


@router.get("/energy", response_model=GroupEnergyOut, responses=errors(404))
async def group_energy(
    hub: Hub,
    period: Period = "day",
    from_: Annotated[DateQuery, Query(alias="from")] = None,
    to: DateQuery = None,
    cid: Annotated[list[str] | None, Query(description="Devices (repeat the parameter).")] = None,
    gateway: Annotated[str | None, Query(max_length=128, description="All devices of this gateway.")] = None,
    spread: Spread = False,
) -> dict[str, Any]:
    """The summed consumption of several devices (`cid` repeated, and/or all devices of a `gateway`)."""
    buckets, first, last = _range(hub, period, from_, to)
    cids: list[str] = []
    for c in cid or []:
        if c not in cids:
            cids.append(c)
    if gateway is not None:
        for c in await run_in_threadpool(queries.gateway_devices, hub.engine, gateway):
            if c not in cids:
                cids.append(c)
    if not cid and gateway is None:
        raise ApiError(422, "give one or more 'cid' or a 'gateway'")
    if len(cids) > MAX_GROUP:
        raise ApiError(422, f"at most {MAX_GROUP} devices per request")
    for c in cid or []:
        if len(c) > 128 or not await run_in_threadpool(queries.device_exists, hub.engine, c):
            raise device_not_found(c)

    def compute() -> tuple[list[float | None], list[energy.DeviceEnergy]]:
        with hub.engine.connect() as conn:
            return energy.group_energy(conn, cids, period, buckets, spread=spread)

    sums, parts = await run_in_threadpool(compute)
    tz = zone(hub)
    known = [s for s in sums if s is not None]
    return {
        "period": period,
        "timezone": hub.settings.timezone,
        "from": first,
        "to": last,
        "spread": spread,
        "total_kwh": round(sum(known), energy.SCALE) if known else None,
        "buckets": [
            {
                "period": b.key,
                "start": b.start,
                "end": b.end,
                "start_iso": iso_required(b.start, tz),
                "consumption_kwh": sums[i],
                "devices_with_data": sum(1 for p in parts if p.consumption[i] is not None),
            }
            for i, b in enumerate(buckets)
        ],
        "devices": [
            {"cid": p.cid, "source": _source(p.source), "total_kwh": p.total, "events": _events(p.events, tz)}
            for p in parts
        ],
    }
