"""Devices: list, detail with latest values, presence history, data point history."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, PagingDep, iso, iso_required, parse_time, protocol, zone
from meterhub.api.errors import ApiError, device_not_found
from meterhub.api.responses import errors
from meterhub.api.routers.alarms import alarm_out
from meterhub.api.routers.registry import device_summary, models_of
from meterhub.api.schemas import (
    DeviceDetail,
    DeviceMoveIn,
    DeviceMoveOut,
    DeviceSummary,
    HistoryOut,
    Page,
    PresenceEvent,
)
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.protocol.errors import ErrorCode
from meterhub.storage import registry, rollups
from meterhub.storage.database import StorageError

router = APIRouter(tags=["devices"])

CidParam = Annotated[str, Path(min_length=1, max_length=128, description="The device id (cid).")]
DpParam = Annotated[str, Path(min_length=1, max_length=64, description='Data point id ("5") or code.')]
TimeQuery = Annotated[
    str | None,
    Query(max_length=64, description="Unix seconds or ISO 8601 (no offset: the configured time zone)."),
]
PHASE_FIELDS = ("voltage", "current", "power", "electricity")
MAX_BUCKETS = 10_000


@router.get("/devices", response_model=Page[DeviceSummary])
async def list_devices(
    hub: Hub,
    paging: PagingDep,
    gateway: Annotated[str | None, Query(max_length=128)] = None,
    product: Annotated[str | None, Query(max_length=128)] = None,
    online: bool | None = None,
    q: Annotated[str | None, Query(max_length=128, description="Part of the cid, name or location.")] = None,
) -> dict[str, Any]:
    """Devices, by cid, with filters."""
    rows, total = await run_in_threadpool(
        lambda: queries.devices(
            hub.engine,
            gateway=gateway,
            product=product,
            online=online,
            q=q,
            limit=paging.limit,
            offset=paging.offset,
        )
    )
    tz = zone(hub)
    return paging.page([device_summary(hub, r, tz) for r in rows], total)


def _model_for(hub: Any, cid: str, model_name: str | None) -> ProductModel | None:
    state = getattr(hub.handler, "devices", {}).get(cid)
    if state is not None:
        return state.model
    if model_name is None:
        return None
    return models_of(hub).get(model_name)


def _latest(dp: DataPoint | None, row: dict[str, Any], tz: Any) -> dict[str, Any]:
    raw = row["value"]
    scaled = None
    if dp is not None and dp.type == "value" and isinstance(raw, int) and not isinstance(raw, bool):
        scaled = float(dp.scaled(raw))
    return {
        "dp_id": row["dp_id"],
        "code": dp.code if dp else None,
        "name": dp.name if dp else None,
        "type": dp.type if dp else None,
        "raw": raw,
        "scaled": scaled,
        "unit": dp.unit if dp else None,
        "display_unit": dp.display_unit if dp else None,
        "t": row["t"],
        "t_iso": iso_required(row["t"], tz),
        "received_at": row["received_at"],
    }


def _dp_sort_key(row: dict[str, Any]) -> tuple[int, str]:
    dp_id = row["dp_id"]
    return (int(dp_id), dp_id) if dp_id.isdigit() else (1 << 30, dp_id)


@router.get("/devices/{cid}", response_model=DeviceDetail, responses=errors(404))
async def get_device(hub: Hub, cid: CidParam) -> dict[str, Any]:
    """A device: every sync field, presence, the latest value of each data point, active alarms."""
    row = await run_in_threadpool(queries.device, hub.engine, cid)
    if row is None:
        raise device_not_found(cid)
    tz = zone(hub)
    model = _model_for(hub, cid, row["model"])
    values = sorted(row.pop("values"), key=_dp_sort_key)
    last = row.pop("last_presence")
    summary = device_summary(hub, row, tz)
    state = getattr(hub.handler, "devices", {}).get(cid)
    online = state.online if state is not None else bool(row["online"])
    since = last["at"] if last and bool(last["online"]) == online else None
    monitor = getattr(hub, "alarms", None)
    active = await monitor.active_of(cid) if monitor is not None else []
    return {
        **{k: row[k] for k in DeviceDetail.model_fields if k in row and k not in ("last_seen",)},
        "last_seen": summary["last_seen"],
        "last_seen_iso": summary["last_seen_iso"],
        "presence": {
            "online": online,
            "since": since,
            "since_iso": iso(since, tz),
            "cause": last["cause"] if since is not None and last else None,
        },
        "values": [_latest(model.get(v["dp_id"]) if model else None, v, tz) for v in values],
        "alarms": [alarm_out(a.as_dict(), tz) for a in active],
    }


@router.get("/devices/{cid}/presence", response_model=Page[PresenceEvent], responses=errors(404))
async def presence_history(
    hub: Hub,
    cid: CidParam,
    paging: PagingDep,
    from_: Annotated[TimeQuery, Query(alias="from")] = None,
    to: TimeQuery = None,
) -> dict[str, Any]:
    """Online/offline changes with their cause (report, status, gateway-disconnect, silence,
    server-restart), newest first. Default range: everything."""
    tz = zone(hub)
    start = parse_time(from_, "from", tz, 0.0)
    end = parse_time(to, "to", tz, 1e11)
    if not await run_in_threadpool(queries.device_exists, hub.engine, cid):
        raise device_not_found(cid)
    rows, total = await run_in_threadpool(
        queries.presence, hub.engine, cid, start, end, paging.limit, paging.offset
    )
    items = [
        {"online": bool(r["online"]), "cause": r["cause"], "at": r["at"], "at_iso": iso_required(r["at"], tz)}
        for r in rows
    ]
    return paging.page(items, total)


@router.post("/devices/{cid}/move", response_model=DeviceMoveOut, responses=errors(404, 409))
async def move_device(hub: Hub, cid: CidParam, body: DeviceMoveIn) -> dict[str, Any]:
    """Move a device to another gateway, also one of another vendor (admin tokens only): the device
    then belongs to that gateway's vendor, the move is recorded like a rebind (cause `operator`), the
    old gateway's reports get 2003 and the device is offline until the new gateway reports it.
    404: unknown device (code 2003) or gateway; 409: the gateway belongs to no vendor yet."""
    handler = protocol(hub)
    try:
        return await handler.move_device(cid, body.gateway_id)
    except registry.UnknownDevice:
        raise device_not_found(cid) from None
    except registry.UnknownGateway as exc:
        raise ApiError(404, str(exc)) from None
    except registry.RegistryError as exc:
        raise ApiError(409, str(exc)) from None
    except StorageError as exc:
        raise ApiError(503, f"storage unavailable: {exc}") from None


async def resolve_device_dp(hub: Any, cid: str, dp: str | int) -> tuple[DataPoint, ProductModel]:
    """The device's model and data point (404/2003 unknown device, 400/2002 unknown data point)."""
    state = getattr(hub.handler, "devices", {}).get(cid)
    model = state.model if state is not None else None
    if model is None:
        row = await run_in_threadpool(queries.device, hub.engine, cid)
        if row is None:
            raise device_not_found(cid)
        model = models_of(hub).get(row["model"])
        if model is None:
            raise ApiError(
                400, f"device {cid!r} has an unknown model {row['model']!r}", int(ErrorCode.NOT_SUPPORTED)
            )
    found = model.get(dp)
    if found is None and isinstance(dp, str):
        found = model.get(dp.strip()) or model.by_code(dp)
    if found is None:
        raise ApiError(
            400, f"unknown data point {dp!r} for model {model.model}", int(ErrorCode.NOT_SUPPORTED)
        )
    return found, model


def _field_of(value: Any, field: str) -> float | None:
    if isinstance(value, dict):
        x = value.get(field)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
    return None


@router.get("/devices/{cid}/history/{dp}", response_model=HistoryOut, responses=errors(400, 404))
async def history(
    hub: Hub,
    cid: CidParam,
    dp: DpParam,
    from_: Annotated[TimeQuery, Query(alias="from")] = None,
    to: TimeQuery = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="raw mode: rows per page.")] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    buckets: Annotated[
        int | None, Query(ge=1, le=1000, description="Downsample into this many buckets.")
    ] = None,
    interval: Annotated[
        float | None, Query(ge=1, le=31_622_400, description="Downsample into buckets of this many seconds.")
    ] = None,
    field: Annotated[
        Literal["voltage", "current", "power", "electricity"] | None,
        Query(description="Phase data points (30-32): the field to chart."),
    ] = None,
) -> dict[str, Any]:
    """History of one data point over [from, to] (default: the last 24 hours), by measurement time.

    Without `buckets` or `interval`: the stored reports (paged). With one of them: buckets with
    count/min/max/avg/last of the number charted (scaled value; 1/0 for bool; the phase `field`).
    """
    tz = zone(hub)
    end = parse_time(to, "to", tz, time.time())
    start = parse_time(from_, "from", tz, end - 86400.0)
    if end <= start:
        raise ApiError(422, "'to' must be after 'from'", int(ErrorCode.PARAMS_RANGE_INVALID))
    data_point, _ = await resolve_device_dp(hub, cid, dp)
    phase = data_point.layout == "phase"
    if field is not None and not phase:
        raise ApiError(422, f"'field' applies to phase data points only, not {data_point.code}")
    numeric = data_point.type in ("value", "bool") or (phase and field is not None)
    out: dict[str, Any] = {
        "cid": cid,
        "dp_id": data_point.id_str,
        "code": data_point.code,
        "unit": data_point.unit,
        "display_unit": data_point.display_unit,
        "field": field,
        "from": start,
        "to": end,
    }
    if buckets is None and interval is None:
        rows, total = await run_in_threadpool(
            queries.history_rows, hub.engine, cid, data_point.id_str, start, end, limit, offset
        )
        items = []
        for r in rows:
            value = _field_of(r["value"], field) if field is not None else r["num"]
            items.append(
                {
                    "t": r["t"],
                    "t_iso": iso_required(r["t"], tz),
                    "raw": r["value"],
                    "value": value,
                    "received_at": r["received_at"],
                }
            )
        return {**out, "mode": "raw", "total": total, "limit": limit, "offset": offset, "items": items}
    if buckets is not None and interval is not None:
        raise ApiError(422, "give 'buckets' or 'interval', not both")
    if not numeric:
        if phase:
            raise ApiError(422, f"{data_point.code}: give 'field' ({', '.join(PHASE_FIELDS)}) to downsample")
        raise ApiError(
            400,
            f"{data_point.code} ({data_point.type}) has no numeric value to downsample",
            int(ErrorCode.NOT_SUPPORTED),
        )
    span = end - start
    if interval is not None:
        count = math.ceil(span / interval)
        if count > MAX_BUCKETS:
            raise ApiError(
                422,
                f"at most {MAX_BUCKETS} buckets: use a larger interval",
                int(ErrorCode.PARAMS_RANGE_INVALID),
            )
        width = interval
    else:
        assert buckets is not None
        count = buckets
        width = span / buckets
    out["interval"] = width
    out["mode"] = "buckets"
    # PostgreSQL, long ranges: 5-minute / hourly / daily rollups where they cover a bucket whole
    res = None if phase else rollups.pick_resolution(span, width)
    aggs = None
    if res is not None:
        aggs = await run_in_threadpool(
            queries.history_rollup_buckets,
            hub.engine,
            cid,
            data_point.id_str,
            start,
            end,
            width,
            count,
            res,
            tz,
        )
    if aggs is not None:
        out["buckets"] = format_buckets(aggs, start, end, width, tz)
        return out
    points = await run_in_threadpool(
        queries.history_points, hub.engine, cid, data_point.id_str, start, end, phase
    )
    out["buckets"] = downsample(points, start, end, width, count, field, tz)
    return out


def downsample(
    points: list[tuple[float, Any]],
    start: float,
    end: float,
    width: float,
    count: int,
    field: str | None,
    tz: Any,
) -> list[dict[str, Any]]:
    """Buckets ``[start + i*width, start + (i+1)*width)`` (the last one also holds ``end``)."""
    aggs = [rollups.Agg() for _ in range(count)]
    for t, x in points:
        value = _field_of(x, field) if field is not None else x
        if value is None:
            continue
        i = min(int((t - start) // width), count - 1)
        if i < 0:
            continue
        aggs[i].add(1, value, value, value, value, t)
    return format_buckets(aggs, start, end, width, tz)


def format_buckets(
    aggs: list[rollups.Agg], start: float, end: float, width: float, tz: Any
) -> list[dict[str, Any]]:
    out = []
    for i, a in enumerate(aggs):
        b_start = start + i * width
        out.append(
            {
                "start": b_start,
                "end": min(b_start + width, end),
                "start_iso": iso_required(b_start, tz),
                "count": a.n,
                "min": a.lo,
                "max": a.hi,
                "avg": a.total / a.n if a.n else None,
                "last": a.last,
            }
        )
    return out


__all__ = ["protocol", "resolve_device_dp", "router"]
