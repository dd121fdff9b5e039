"""CSV exports for people who live in spreadsheets: a device's history, the alarms list."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import and_, select
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, iso, iso_required, parse_time, zone
from meterhub.api.errors import ApiError, device_not_found
from meterhub.api.responses import errors
from meterhub.api.routers.devices import CidParam, TimeQuery, _model_for
from meterhub.protocol.errors import ErrorCode
from meterhub.storage import schema

router = APIRouter(tags=["export"])

#: Most rows in one export (a month of a meter reporting 50 data points every 10 s is ~13 million:
#: narrow the time range for more).
MAX_ROWS = 1_000_000
_CSV = "text/csv; charset=utf-8"


def _csv(rows: Iterator[list[Any]], filename: str) -> Response:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(buf.getvalue(), media_type=_CSV, headers=headers)


def _history_rows(engine: Any, cid: str, start: float, end: float) -> list[Any]:
    r = schema.reports
    q = (
        select(r.c.t, r.c.dp_id, r.c.value, r.c.num, r.c.received_at)
        .where(and_(r.c.cid == cid, r.c.t >= start, r.c.t <= end))
        .order_by(r.c.t, r.c.id)
        .limit(MAX_ROWS + 1)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(q)]


@router.get(
    "/devices/{cid}/history.csv",
    responses={200: {"content": {"text/csv": {}}}, **errors(404, 422)},
)
async def device_history_csv(
    hub: Hub, cid: CidParam, from_: Annotated[TimeQuery, Query(alias="from")] = None, to: TimeQuery = None
) -> Response:
    """Every report of a device over [from, to] (default: the last 7 days) as CSV, one row per
    report: time (Unix and ISO in the server's time zone), data point, value in its real unit, unit,
    and the raw wire value."""
    tz = zone(hub)
    end = parse_time(to, "to", tz, time.time())
    start = parse_time(from_, "from", tz, end - 7 * 86400.0)
    if end <= start:
        raise ApiError(422, "'to' must be after 'from'", int(ErrorCode.PARAMS_RANGE_INVALID))
    device = await run_in_threadpool(queries.device, hub.engine, cid)
    if device is None:
        raise device_not_found(cid)
    model = _model_for(hub, cid, device.get("model"))
    rows = await run_in_threadpool(_history_rows, hub.engine, cid, start, end)
    if len(rows) > MAX_ROWS:
        raise ApiError(422, f"more than {MAX_ROWS} reports: narrow 'from'/'to'")

    def lines() -> Iterator[list[Any]]:
        yield ["t", "time", "dp_id", "code", "value", "unit", "raw", "received_at"]
        for row in rows:
            dp = model.get(row["dp_id"]) if model is not None else None
            raw = row["value"]
            if dp is not None and dp.type == "value" and row["num"] is not None:
                value: Any = format(dp.scaled(raw) if isinstance(raw, int) else row["num"], "")
            elif isinstance(raw, (dict, list)):
                value = json.dumps(raw, separators=(",", ":"))
            else:
                value = raw
            unit = (dp.display_unit or dp.unit or "") if dp is not None else ""
            raw_text = json.dumps(raw, separators=(",", ":")) if not isinstance(raw, str) else raw
            t = row["t"]
            code = dp.code if dp else ""
            yield [t, iso_required(t, tz), row["dp_id"], code, value, unit, raw_text, row["received_at"]]

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cid)
    return _csv(lines(), f"{safe}-history.csv")


@router.get("/alarms.csv", responses={200: {"content": {"text/csv": {}}}})
async def alarms_csv(
    hub: Hub,
    cid: Annotated[str | None, Query(max_length=128)] = None,
    level: Annotated[Literal["general", "serious", "urgent"] | None, Query()] = None,
    kind: Annotated[Literal["fault", "threshold"] | None, Query()] = None,
    active: Annotated[bool | None, Query(description="true: not cleared yet; false: cleared.")] = None,
) -> Response:
    """The alarms list (same filters as ``GET /alarms``), newest first, as CSV."""
    rows, _ = await run_in_threadpool(
        lambda: queries.alarms(
            hub.engine, cid=cid, level=level, kind=kind, active=active, limit=MAX_ROWS, offset=0
        )
    )
    tz = zone(hub)

    def lines() -> Iterator[list[Any]]:
        yield [
            "id",
            "cid",
            "kind",
            "label",
            "level",
            "state",
            "raised_at",
            "cleared_at",
            "acknowledged_at",
            "acknowledged_by",
            "details",
        ]
        for r in rows:
            state = "active" if r["cleared_at"] is None else "cleared"
            if r["acknowledged_at"] is not None:
                state += ", acknowledged"
            details = r["details"]
            yield [
                r["id"],
                r["cid"],
                r["kind"],
                r["label"],
                r["level"],
                state,
                iso_required(r["raised_at"], tz),
                iso(r["cleared_at"], tz) or "",
                iso(r["acknowledged_at"], tz) or "",
                r["acknowledged_by"] or "",
                json.dumps(details, separators=(",", ":")) if details not in (None, "") else "",
            ]

    return _csv(lines(), "alarms.csv")
