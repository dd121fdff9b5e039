"""Commands: send one (wait for the answer, or 202 and poll), the command log.

Every command runs as its own task (kept in :class:`CommandJobs`), so a client that goes away does
not cancel a command half way. The answer's ``id`` is meterhub's job id; ``GET /api/v1/commands/{id}``
takes it or the protocol ``request_id``.

HTTP status of the outcome: ok 200; the device answered a non-zero code 502; no answer in time 504;
refused before sending: 404 (2003 unknown device), 409 (2001 offline), 422 (1101/1102/1103 bad
value), 400 (2002 unknown or read-only data point). Error answers carry the command under
``command``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, PagingDep, iso, protocol, zone
from meterhub.api.errors import ApiError, device_not_found
from meterhub.api.responses import errors
from meterhub.api.routers.devices import CidParam
from meterhub.api.schemas import CommandAccepted, CommandIn, CommandOut, Page
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.errors import ValueRejected
from meterhub.protocol.errors import ErrorCode

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted
router = APIRouter(tags=["commands"])

MAX_JOBS = 10_000


@dataclass(slots=True)
class Job:
    id: str
    cid: str
    dp_id: str
    created_at: float
    task: asyncio.Task[Any]


class CommandJobs:
    """Commands started through the API (the newest ``MAX_JOBS``), by job id and by request_id."""

    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.by_request: dict[str, str] = {}

    def start(self, hub: Any, cid: str, dp: str | int, dp_id: str, value: Any, timeout: float | None) -> Job:
        handler = protocol(hub)
        job_id = uuid.uuid4().hex
        metrics = self.metrics

        async def run() -> Any:
            result = await handler.send_command(cid, dp, value, timeout=timeout)
            self.by_request[result.request_id] = job_id
            if metrics is not None:
                metrics.observe_command(result.status, result.elapsed)
            return result

        job = Job(job_id, cid, dp_id, time.time(), asyncio.get_running_loop().create_task(run()))
        job.task.add_done_callback(_log_failure)
        self.jobs[job_id] = job
        while len(self.jobs) > MAX_JOBS:
            _, old = self.jobs.popitem(last=False)
            if old.task.done() and not old.task.cancelled() and old.task.exception() is None:
                self.by_request.pop(old.task.result().request_id, None)
        return job

    def get(self, key: str) -> Job | None:
        job = self.jobs.get(key)
        if job is None and key in self.by_request:
            job = self.jobs.get(self.by_request[key])
        return job

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self.jobs.values() if not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _repeats.error("task_failed", "command task failed", error=repr(task.exception()))


def job_out(job: Job, tz: Any) -> dict[str, Any]:
    base = {
        "id": job.id,
        "cid": job.cid,
        "created_at": job.created_at,
        "created_at_iso": iso(job.created_at, tz),
    }
    task = job.task
    if not task.done():
        return {
            **base,
            "request_id": None,
            "dp_id": job.dp_id,
            "status": "pending",
            "code": None,
            "msg": None,
        }
    if task.cancelled() or task.exception() is not None:
        return {
            **base,
            "request_id": None,
            "dp_id": job.dp_id,
            "status": "failed",
            "code": int(ErrorCode.SYSTEM),
            "msg": "the command was interrupted (server stopping or internal error)",
        }
    r = task.result()
    return {
        **base,
        "request_id": r.request_id,
        "dp_id": r.dp_id,
        "status": r.status,
        "code": r.code,
        "msg": r.msg,
        "value": r.value,
        "elapsed": r.elapsed,
    }


def outcome(out: dict[str, Any]) -> dict[str, Any]:
    """The answer for a finished command: the body, or an ApiError for anything but ok."""
    status, code, msg = out["status"], out["code"], out["msg"] or ""
    if status == "ok":
        return out
    if status == "failed":
        raise ApiError(502, f"the device answered code {code}: {msg}", code, command=out)
    if status == "timeout":
        raise ApiError(504, msg or "no answer in time", None, command=out)
    raise ApiError.from_code(code if code is not None else 500, msg or "command refused", command=out)


def _precheck(hub: Any, cid: str, dp: str | int, value: Any) -> tuple[bool, str]:
    """Whether the command would be sent (device known and online, value valid), and its dp id."""
    handler = protocol(hub)
    dev = handler.devices.get(cid)
    if dev is None:
        return False, str(dp)
    dp_obj = handler.resolve_data_point(dev.model, dp)
    if dp_obj is None:
        return False, str(dp)
    try:
        dp_obj.check_command(value)
    except ValueRejected:
        return False, dp_obj.id_str
    mqtt = hub.mqtt
    online = dev.online and mqtt is not None and mqtt.is_connected(dev.gateway_id)
    return online, dp_obj.id_str


@router.post(
    "/devices/{cid}/commands",
    response_model=CommandOut,
    responses={
        202: {"model": CommandAccepted, "description": "wait=false: accepted; poll the id."},
        **errors(400, 404, 409, 502, 504),
    },
)
async def send_command(hub: Hub, request: Request, cid: CidParam, body: CommandIn) -> Any:
    """Send a command to a device and wait for its answer (or, with `wait: false`, return 202 and an
    id to poll). A value that is refused, an unknown device, or an offline one is answered at once."""
    jobs: CommandJobs = request.app.state.jobs
    dp: str | int = body.dp
    if isinstance(dp, str):
        dp = dp.strip()
    await protocol(hub).find_device(cid)  # into the cache if it is only in the database
    will_send, dp_id = _precheck(hub, cid, dp, body.value)
    if not will_send and not body.wait and getattr(hub, "cluster", None) is not None:
        will_send = await hub.cluster.sends_elsewhere(cid, dp, body.value)  # held by another node
    job = jobs.start(hub, cid, dp, dp_id, body.value, body.timeout)
    tz = zone(hub)
    if body.wait or not will_send:
        with contextlib.suppress(Exception):
            await asyncio.shield(job.task)
        return outcome(job_out(job, tz))
    accepted = {
        "id": job.id,
        "status": "pending",
        "cid": cid,
        "dp_id": dp_id,
        "poll": f"/api/v1/commands/{job.id}",
    }
    return JSONResponse(accepted, status_code=202)


CommandId = Annotated[str, Path(min_length=1, max_length=128)]


@router.get("/commands/{command_id}", response_model=CommandOut, responses=errors(404))
async def get_command(hub: Hub, request: Request, command_id: CommandId) -> dict[str, Any]:
    """A command by job id or request_id: `pending` until answered, then its outcome (as a 200)."""
    tz = zone(hub)
    job = request.app.state.jobs.get(command_id)
    if job is not None:
        out = job_out(job, tz)
        if out["request_id"] is not None:
            row = await run_in_threadpool(queries.command, hub.engine, out["request_id"])
            if row is not None:
                out.update(created_at=row["created_at"], created_at_iso=iso(row["created_at"], tz))
                out.update(answered_at=row["answered_at"], late=bool(row["late"]))
                if row["late"]:
                    out.update(code=row["code"], msg=row["msg"])
        return out
    row = await run_in_threadpool(queries.command, hub.engine, command_id)
    if row is None:
        raise ApiError(404, f"command {command_id!r} not found")
    return log_out(row, tz)


def log_out(row: dict[str, Any], tz: Any) -> dict[str, Any]:
    return {
        "id": row["request_id"],
        "request_id": row["request_id"],
        "cid": row["cid"],
        "dp_id": row["dp_id"],
        "status": row["status"],
        "code": row["code"],
        "msg": row["msg"],
        "value": row["value"],
        "elapsed": (row["answered_at"] - row["created_at"])
        if row["answered_at"] and not row["late"]
        else None,
        "created_at": row["created_at"],
        "created_at_iso": iso(row["created_at"], tz),
        "answered_at": row["answered_at"],
        "late": bool(row["late"]),
    }


@router.get("/devices/{cid}/commands", response_model=Page[CommandOut], responses=errors(404))
async def command_log(hub: Hub, cid: CidParam, paging: PagingDep) -> dict[str, Any]:
    """The device's command log, newest first (every command and its outcome; late answers marked)."""
    if not await run_in_threadpool(queries.device_exists, hub.engine, cid):
        raise device_not_found(cid)
    rows, total = await run_in_threadpool(queries.commands, hub.engine, cid, paging.limit, paging.offset)
    tz = zone(hub)
    return paging.page([log_out(r, tz) for r in rows], total)
