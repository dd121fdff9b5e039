"""Alarm rules, notification targets (webhook / e-mail), the notification log and dead letters.

The records live in :mod:`meterhub.core.alarm_rules` and :mod:`meterhub.core.notify`. Mistakes get
404 (unknown rule, target, site, dead letter), 409 (duplicate target name) or 422 with a message.
A change is applied at once on this node and within 10 s on the other nodes of a cluster.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from meterhub.api.deps import Hub
from meterhub.api.errors import ApiError
from meterhub.api.responses import errors
from meterhub.core import alarm_rules, notify

router = APIRouter(tags=["alarm rules and notifications"])

Id = Annotated[int, Path(ge=1, le=2**53)]
Level = Literal["general", "serious", "urgent"]
Seconds = Annotated[float, Field(ge=0, le=86_400 * 7)]


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["above", "below", "rate", "no_data", "tune"]
    label: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.*-]+$")]
    code: Annotated[str | None, Field(max_length=64)] = None
    value: float | None = Field(None, description="above/below: limit; rate: per minute; no_data: minutes")
    level: Level = "general"
    product_id: Annotated[str | None, Field(max_length=64)] = None
    site_id: Annotated[int | None, Field(ge=1, le=2**31 - 1)] = None
    hysteresis: Annotated[float, Field(ge=0)] = 0.0
    raise_after: Seconds = 0.0
    clear_after: Seconds = 0.0
    enabled: bool = True


class RulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: Annotated[str | None, Field(max_length=64)] = None
    value: float | None = None
    level: Level | None = None
    hysteresis: Annotated[float | None, Field(ge=0)] = None
    raise_after: Seconds | None = None
    clear_after: Seconds | None = None
    enabled: bool | None = None


class TargetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]*$")]
    kind: Literal["webhook", "email"]
    site_id: Annotated[int | None, Field(ge=1, le=2**31 - 1)] = None
    levels: list[Level] = Field(default_factory=lambda: ["general", "serious", "urgent"], min_length=1)
    events: list[Literal["raise", "escalate", "clear"]] = Field(
        default_factory=lambda: ["raise", "escalate", "clear"], min_length=1
    )
    config: dict[str, Any] = Field(
        description="webhook: url, secret; email: host, port, starttls, username, password, sender, to"
    )
    enabled: bool = True


async def _call(fn: Any, *args: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args)
    except (alarm_rules.RuleError, notify.TargetError) as exc:
        raise ApiError(exc.status, exc.message) from None


async def _rules_changed(hub: Any) -> None:
    monitor = getattr(hub, "alarms", None)
    if monitor is not None:
        await asyncio.to_thread(monitor.reload_rules)


async def _targets_changed(hub: Any) -> None:
    notifier = getattr(hub, "notifier", None)
    if notifier is not None:
        await asyncio.to_thread(notifier.load_targets)


@router.get("/alarm-rules")
async def list_rules(hub: Hub) -> dict[str, Any]:
    return {"items": await _call(alarm_rules.list_rules, hub.engine)}


@router.post("/alarm-rules", status_code=201, responses=errors(404, 422))
async def create_rule(hub: Hub, body: Annotated[RuleIn, Body()]) -> dict[str, Any]:
    """A rule (above / below / rate / no_data) or a ``tune`` row for an alarm label (``*``: all)."""
    rule = await _call(alarm_rules.create_rule, hub.engine, body.model_dump())
    await _rules_changed(hub)
    return rule


@router.get("/alarm-rules/{rule_id}", responses=errors(404))
async def get_rule(hub: Hub, rule_id: Id) -> dict[str, Any]:
    return await _call(alarm_rules.get_rule, hub.engine, rule_id)


@router.patch("/alarm-rules/{rule_id}", responses=errors(404, 422))
async def update_rule(hub: Hub, rule_id: Id, body: Annotated[RulePatch, Body()]) -> dict[str, Any]:
    rule = await _call(alarm_rules.update_rule, hub.engine, rule_id, body.model_dump(exclude_none=True))
    await _rules_changed(hub)
    return rule


@router.delete("/alarm-rules/{rule_id}", status_code=204, responses=errors(404))
async def delete_rule(hub: Hub, rule_id: Id) -> None:
    await _call(alarm_rules.delete_rule, hub.engine, rule_id)
    await _rules_changed(hub)


@router.get("/notify/targets")
async def list_targets(hub: Hub) -> dict[str, Any]:
    rows = await _call(notify.list_targets, hub.engine)
    return {"items": [notify.target_out(r) for r in rows]}


@router.post("/notify/targets", status_code=201, responses=errors(409, 422))
async def create_target(hub: Hub, body: Annotated[TargetIn, Body()]) -> dict[str, Any]:
    row = await _call(notify.create_target, hub.engine, body.model_dump())
    await _targets_changed(hub)
    return notify.target_out(row)


@router.delete("/notify/targets/{target_id}", status_code=204, responses=errors(404))
async def delete_target(hub: Hub, target_id: Id) -> None:
    await _call(notify.delete_target, hub.engine, target_id)
    await _targets_changed(hub)


@router.get("/notify/log")
async def notification_log(
    hub: Hub,
    status: Annotated[Literal["pending", "sent", "dead"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """The notification log, newest first; ``status=dead``: the dead letters."""
    return {"items": await _call(notify.outbox, hub.engine, status, limit, offset)}


@router.get("/notify/dead")
async def dead_letters(hub: Hub, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    return {"items": await _call(notify.outbox, hub.engine, "dead", limit, 0)}


@router.post("/notify/dead/{outbox_id}/retry", responses=errors(404))
async def retry_dead(hub: Hub, outbox_id: Id) -> dict[str, Any]:
    """Send a dead letter again (its attempts start over)."""
    row = await _call(notify.retry_dead, hub.engine, outbox_id)
    notifier = getattr(hub, "notifier", None)
    if notifier is not None:
        notifier.wake.set()
    return row
