"""Commands to devices: validation, sending, answers, timeouts, late answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ValueRejected
from meterhub.protocol.errors import ErrorCode, ProtocolError
from meterhub.protocol.messages import (
    decode_command_response,
    encode_command,
)
from meterhub.protocol.topics import Kind, commands_topic

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)
_REPORT = Kind.REPORT
_SYNC = Kind.SYNC


@dataclass(slots=True)
class CommandResult:
    """The outcome of a command. ``status``: ok, failed (the device answered a non-zero code),
    timeout, rejected (never sent: validation, unknown or offline device)."""

    request_id: str
    cid: str
    dp_id: str
    status: str
    code: int | None
    msg: str | None
    value: Any = None
    elapsed: float | None = None


@dataclass(slots=True)
class _PendingCommand:
    cid: str
    dp_id: str
    future: asyncio.Future[tuple[int, str]]
    sent_at: float = field(default_factory=time.monotonic)


class CommandsMixin:
    """Commands
    (methods of :class:`meterhub.core.service.ProtocolService`, which sets what they use)."""

    def _on_command_response(self, gw: str, payload: bytes) -> Any:
        now = self.clock()
        try:
            resp = decode_command_response(payload, now)
        except ProtocolError as exc:
            self.stats["rejected.command_response"] += 1
            _repeats.info(
                "command_response_rejected",
                "command response rejected",
                gateway_id=gw,
                code=int(exc.code),
                detail=exc.detail,
                request_id=exc.request_id,
            )
            return None
        pending = self.pending_commands.pop(resp.request_id, None)
        msg = resp.msg
        status = "ok" if resp.code == 0 else "failed"
        if pending is not None:
            values: dict[str, Any] = {"status": status}
        elif resp.request_id in self.timed_out:
            self.timed_out.pop(resp.request_id, None)
            self.stats["commands.late_answer"] += 1
            self.record(gw).commands["late_answer"] += 1
            _repeats.info(
                "late_answer",
                "late command answer recorded",
                gateway_id=gw,
                request_id=resp.request_id,
                code=resp.code,
            )
            values = {"late": True}
        else:
            self.stats["rejected.command_response_unknown"] += 1
            _repeats.info(
                "unknown_command_answer",
                "answer to an unknown command",
                gateway_id=gw,
                request_id=resp.request_id,
            )
            return None
        values.update(request_id=resp.request_id, code=resp.code, msg=msg, answered_at=now)
        written = self.writer.write([("command_update", values)])
        if pending is not None:
            # The caller learns the outcome once it is in the command log.
            def complete(_: asyncio.Future[None]) -> None:
                if not pending.future.done():
                    pending.future.set_result((resp.code, msg or ""))

            written.add_done_callback(complete)
        return written

    def resolve_data_point(self, model: ProductModel, dp: str | int) -> DataPoint | None:
        """A data point by id ("1", 1) or by code ("switch")."""
        found = model.get(dp)
        if found is None and isinstance(dp, str):
            found = model.by_code(dp)
        return found

    async def send_command(
        self, cid: str, dp: str | int, value: Any, timeout: float | None = None
    ) -> CommandResult:
        """Validate, send and await a command. Every command and its outcome goes to the command log."""
        if self.command_router is not None:
            routed = await self.command_router(cid, dp, value, timeout)
            if routed is not None:
                return routed  # type: ignore[no-any-return]
        timeout = self.settings.command_timeout if timeout is None else timeout
        request_id = str(uuid.uuid4())
        now = self.clock()
        dev = await self.find_device(cid)
        dp_obj = self.resolve_data_point(dev.model, dp) if dev is not None else None
        dp_id = dp_obj.id_str if dp_obj is not None else str(dp)
        log_row = {
            "request_id": request_id,
            "cid": cid,
            "gateway_id": dev.gateway_id if dev else None,
            "dp_id": dp_id[:16],
            "value": _jsonable(value),
            "created_at": now,
            "late": False,
        }

        async def rejected(code: int, msg: str) -> CommandResult:
            self.stats[f"commands.rejected.{code}"] += 1
            await self.writer.write(
                [("command_new", {**log_row, "status": "rejected", "code": code, "msg": msg})]
            )
            return CommandResult(request_id, cid, dp_id, "rejected", code, msg, value)

        if dev is None:
            return await rejected(ErrorCode.DEVICE_NOT_EXIST, "device not exist")
        if dp_obj is None:
            return await rejected(ErrorCode.NOT_SUPPORTED, f"unknown data point {dp!r}")
        try:
            canonical = dp_obj.check_command(value)
        except ValueRejected as exc:
            return await rejected(exc.code, exc.message)
        assert self.southbound is not None
        gw = dev.gateway_id
        if not dev.online or not self.southbound.is_connected(gw):
            return await rejected(ErrorCode.DEVICE_OFFLINE, "device is offline")
        log_row["value"] = _jsonable(canonical)
        await self.writer.write([("command_new", {**log_row, "status": "pending"})])
        loop = asyncio.get_running_loop()
        pending = _PendingCommand(cid, dp_id, loop.create_future())
        self.pending_commands[request_id] = pending
        wire = dp_obj.to_wire(canonical)
        payload = encode_command(cid, request_id, dp_obj.id_str, wire, self.clock())
        started = time.monotonic()
        if not self.southbound.publish(gw, commands_topic(gw), payload, 1):
            self.pending_commands.pop(request_id, None)
            self.stats["commands.undeliverable"] += 1
            msg = "gateway is not subscribed to its commands topic"
            await self.writer.write(
                [
                    (
                        "command_update",
                        {
                            "request_id": request_id,
                            "status": "rejected",
                            "code": ErrorCode.DEVICE_OFFLINE,
                            "msg": msg,
                        },
                    )
                ]
            )
            return CommandResult(request_id, cid, dp_id, "rejected", ErrorCode.DEVICE_OFFLINE, msg, canonical)
        self.stats["commands.sent"] += 1
        rec = self.record(gw)
        rec.commands["sent"] += 1
        try:
            code, msg = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except TimeoutError:
            self.pending_commands.pop(request_id, None)
            self.timed_out[request_id] = cid
            if len(self.timed_out) > 10_000:
                self.timed_out.popitem(last=False)
            self.stats["commands.timeout"] += 1
            rec.commands["timeout"] += 1
            await self.writer.write([("command_update", {"request_id": request_id, "status": "timeout"})])
            return CommandResult(
                request_id,
                cid,
                dp_id,
                "timeout",
                None,
                f"no answer within {timeout:g}s",
                canonical,
                time.monotonic() - started,
            )
        status = "ok" if code == 0 else "failed"
        self.stats[f"commands.{status}"] += 1
        rec.commands[status] += 1
        rec.command_latencies.append(time.monotonic() - started)
        return CommandResult(request_id, cid, dp_id, status, code, msg, canonical, time.monotonic() - started)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return repr(value)
