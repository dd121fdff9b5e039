"""Alarms: list (active and past), one alarm, acknowledge (admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, PagingDep, iso, iso_required, zone
from meterhub.api.errors import ApiError, not_found
from meterhub.api.responses import errors
from meterhub.api.schemas import AckIn, AlarmOut, Page

router = APIRouter(tags=["alarms"])

AlarmId = Annotated[int, Path(ge=1, le=2**53, description="The alarm id.")]


def alarm_out(row: dict[str, Any], tz: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "cid": row["cid"],
        "kind": row["kind"],
        "label": row["label"],
        "level": row["level"],
        "active": row["cleared_at"] is None,
        "raised_at": row["raised_at"],
        "raised_at_iso": iso_required(row["raised_at"], tz),
        "cleared_at": row["cleared_at"],
        "cleared_at_iso": iso(row["cleared_at"], tz),
        "acknowledged_at": row["acknowledged_at"],
        "acknowledged_by": row["acknowledged_by"],
        "details": row["details"],
        "count": row.get("count") or 1,
        "sources": row.get("sources"),
        "last_raised_at": row.get("last_raised_at"),
    }


@router.get("/alarms", response_model=Page[AlarmOut])
async def list_alarms(
    hub: Hub,
    paging: PagingDep,
    cid: Annotated[str | None, Query(max_length=128)] = None,
    level: Annotated[Literal["general", "serious", "urgent"] | None, Query()] = None,
    kind: Annotated[Literal["fault", "threshold", "rule"] | None, Query()] = None,
    active: Annotated[bool | None, Query(description="true: not cleared yet; false: cleared.")] = None,
) -> dict[str, Any]:
    """Alarms, newest first. See meterhub.core.alarms for what raises and clears them."""
    rows, total = await run_in_threadpool(
        lambda: queries.alarms(
            hub.engine,
            cid=cid,
            level=level,
            kind=kind,
            active=active,
            limit=paging.limit,
            offset=paging.offset,
        )
    )
    tz = zone(hub)
    return paging.page([alarm_out(r, tz) for r in rows], total)


async def _find(hub: Any, alarm_id: int) -> dict[str, Any]:
    monitor = getattr(hub, "alarms", None)
    alarm = monitor.find_active(alarm_id) if monitor is not None else None
    if alarm is not None:
        return alarm.as_dict()
    row = await run_in_threadpool(queries.alarm, hub.engine, alarm_id)
    if row is None:
        raise not_found(f"alarm {alarm_id}")
    return row


@router.get("/alarms/{alarm_id}", response_model=AlarmOut, responses=errors(404))
async def get_alarm(hub: Hub, alarm_id: AlarmId) -> dict[str, Any]:
    return alarm_out(await _find(hub, alarm_id), zone(hub))


@router.post("/alarms/{alarm_id}/ack", response_model=AlarmOut, responses=errors(404))
async def acknowledge(
    hub: Hub, request: Request, alarm_id: AlarmId, body: Annotated[AckIn | None, Body()] = None
) -> dict[str, Any]:
    """Acknowledge an alarm (active or cleared). The first acknowledgement is kept."""
    row = await _find(hub, alarm_id)
    monitor = getattr(hub, "alarms", None)
    if monitor is None:
        raise ApiError(503, "the alarm monitor is not running")
    token = getattr(request.state, "token", None)
    by = (body.by if body is not None else None) or (token.name if token is not None else "api")
    return alarm_out(await monitor.acknowledge(alarm_id, by, row), zone(hub))
