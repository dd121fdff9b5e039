"""``properties/report``: decode, validate against the device's product model, store, answer."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

import msgspec

from meterhub.core.devices import DeviceState
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import DataPoint
from meterhub.model.errors import ValueRejected
from meterhub.protocol.errors import ErrorCode, ProtocolError
from meterhub.protocol.messages import (
    decode_report,
)
from meterhub.protocol.topics import Kind
from meterhub.storage.schema import report_digest

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)
_REPORT = Kind.REPORT
_SYNC = Kind.SYNC
# Sorted keys: the stored JSON of a raw object does not depend on the order the gateway sent its keys
# in, so the content digest of a redelivery is the same (storage.schema.report_digest).
_json = msgspec.json.Encoder(order="sorted").encode


class ReportsMixin:
    """Reports
    (methods of :class:`meterhub.core.service.ProtocolService`, which sets what they use)."""

    def _on_report(self, gw: str, payload: bytes) -> Any:
        now = self.clock()
        try:
            req = decode_report(payload, now)
        except ProtocolError as exc:
            self._reject(gw, _REPORT, exc)
            return None
        key = (gw, req.request_id)
        content = _request_digest(req.cid, req.dp_id, req.value, req.t, payload)
        previous = self._reports.get(key)
        if previous is not None:
            if previous[0] == content:
                return self._repeat(gw, _REPORT, req.request_id, req.cid, previous[1])
            # Same request_id, other content (a gateway restarted its counter): a new report.
            self.stats["report.request_id_reused"] += 1
            self.record(gw).request_id_reused += 1
            _repeats.info(
                ("request_id_reused", gw),
                "request_id reused for other content: handled as a new report",
                gateway_id=gw,
                request_id=req.request_id,
                cid=req.cid,
            )
        dev = self.devices.get(req.cid)
        if dev is None:  # not in memory: ask the database (the gateway's reports wait for nothing else)
            return asyncio.ensure_future(self._report_miss(gw, req, key, content, now))
        return self._accept_report(gw, req, key, content, dev, now)

    async def _report_miss(self, gw: str, req: Any, key: tuple[str, str], content: int, now: float) -> None:
        try:
            dev = await self.cache.fetch(req.cid)
        except Exception:
            self._reply(gw, _REPORT, req.request_id, req.cid, ErrorCode.SYSTEM)
            return
        result = self._accept_report(gw, req, key, content, dev, now)
        if result is not None:
            with contextlib.suppress(Exception):  # answered by _report_committed
                await result

    def _accept_report(
        self, gw: str, req: Any, key: tuple[str, str], content: int, dev: DeviceState | None, now: float
    ) -> Any:
        if dev is None or dev.gateway_id != gw:
            return self._refuse_report(
                key,
                content,
                req.cid,
                ErrorCode.DEVICE_NOT_EXIST,
                "report for a device this gateway never synced",
            )
        dp = dev.model.get(req.dp_id)
        if dp is None:
            return self._refuse_report(
                key, content, req.cid, ErrorCode.NOT_SUPPORTED, f"unknown data point {req.dp_id}"
            )
        try:
            value = dp.coerce(req.value)
        except ValueRejected as exc:
            return self._refuse_report(key, content, req.cid, exc.code, exc.message)
        num = _numeric(dp, value)
        t = req.t
        dp_id = dp.id_str
        stored = _json(value).decode()
        # Rows as tuples in column order, for the writer's prepared statements (see storage.database);
        # the digest makes a redelivery a conflict on the unique index in any process of a cluster.
        ops: list[tuple[str, Any]] = [
            (
                "report",
                (
                    gw,
                    req.request_id,
                    req.cid,
                    dp_id,
                    stored,
                    num,
                    t,
                    now,
                    report_digest(req.cid, dp_id, stored, t),
                ),
            ),
            ("latest", (req.cid, dp_id, stored, num, t, now)),
        ]
        dev.last_heard = now
        self._dirty_seen[dev.cid] = now
        if not dev.online:
            self._set_presence(dev, True, "report", now, ops)
        fut = self.writer.write(ops)
        self._reports.put(key, content, fut)
        # Listeners (open hub, live streams, alarms, other nodes) hear of the report once it is stored:
        # never of one answered with an error because the commit failed.
        event = (
            {"cid": req.cid, "dp": dp, "value": value, "num": num, "t": t, "product_id": dev.product_id}
            if self.listeners
            else None
        )
        fut.add_done_callback(partial(self._report_committed, gw, key, content, req.cid, event))
        return fut

    def _report_committed(
        self,
        gw: str,
        key: tuple[str, str],
        content: int,
        cid: str,
        event: dict[str, Any] | None,
        fut: asyncio.Future[Any],
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            code = ErrorCode.SYSTEM
            _repeats.error(
                "report_not_stored",
                "report not stored",
                gateway_id=gw,
                request_id=key[1],
                error=None if fut.cancelled() else str(fut.exception()),
            )
            self._reports.discard(key, content)  # a redelivery may try again
        else:
            code = ErrorCode.SUCCESS
            self._reports.settle(key, content, code)
        self._reply(gw, _REPORT, key[1], cid, code)
        if event is not None and code == ErrorCode.SUCCESS:
            self._emit("report", event)

    def _refuse_report(self, key: tuple[str, str], content: int, cid: str, code: int, detail: str) -> None:
        """Answer a report with an error code now; a redelivery of it gets the same answer."""
        gw = key[0]
        self.stats["rejected.report"] += 1
        _repeats.info(
            ("rejected", _REPORT, int(code)),
            "request rejected",
            gateway_id=gw,
            kind="report",
            request_id=key[1],
            cid=cid,
            code=int(code),
            detail=detail,
        )
        self._reports.put(key, content, int(code))
        self._reply(gw, _REPORT, key[1], cid, code)


def _request_digest(cid: str, dp_id: str, value: Any, t: float, payload: bytes) -> int:
    """What the answer cache compares to tell a redelivery (same content) from a reused request_id:
    a hash of the report's device, data point, value as sent and time (of the payload itself when the
    value cannot be encoded, e.g. an integer of more than 4300 digits). In-process only: the
    database's ``report_digest`` is what makes a redelivery a conflict across processes."""
    try:
        return hash((cid, dp_id, _json(value), t))
    except (ValueError, TypeError, OverflowError, msgspec.EncodeError):
        return hash(payload)


def _numeric(dp: DataPoint, value: Any) -> float | None:
    """The number to chart for a stored value: scaled value, 1/0 for bool, else None."""
    if dp.type == "value":
        return float(dp.scaled(value))
    if dp.type == "bool":
        return 1.0 if value else 0.0
    return None
