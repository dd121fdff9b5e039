"""The edge protocol service: what meterhub does with each gateway message, and commands.

It implements :class:`meterhub.transport.ApplicationHandler` and talks to gateways only through
:class:`meterhub.transport.Southbound`, so it runs the same behind meterhub's own MQTT server or an
external broker.

Per message kind:
- ``devices/sync``: create or update the device (a change of gateway is allowed and recorded);
  answered after the commit.
- ``properties/report``: decode, validate against the device's product model, store (history + latest
  value, one group commit), then answer code 0. A QoS 1 redelivery (same gateway and request_id) gets
  the first answer again and is stored once.
- ``devices/status``: presence; no response topic exists, so invalid items are logged and counted.
- ``commands/response``: completes the waiting command (or is recorded as a late answer).

Presence: online on ``status: true`` or any report; offline on ``status: false``, the gateway's
disconnect, or ``presence_timeout`` seconds of silence. Every transition is stored with its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
from sqlalchemy import Engine, select

from meterhub.cluster.store import reset_at_start
from meterhub.config import Settings
from meterhub.core.dedupe import AnswerCache
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ValueRejected
from meterhub.model.loader import ModelRegistry
from meterhub.protocol.errors import ErrorCode, ProtocolError
from meterhub.protocol.messages import (
    decode_command_response,
    decode_report,
    decode_status,
    decode_sync,
    encode_command,
    encode_response,
)
from meterhub.protocol.topics import Kind, commands_topic, parse_topic, response_topic
from meterhub.storage import registry, schema
from meterhub.storage.database import GroupCommitWriter
from meterhub.storage.schema import report_digest
from meterhub.transport import Principal, Southbound

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)

_REPORT = Kind.REPORT
#: Most devices whose last-seen time one periodic flush writes (see ProtocolService._flush_seen).
SEEN_FLUSH_MAX = 5_000
# Sorted keys: the stored JSON of a raw object does not depend on the order the gateway sent its keys
# in, so the content digest of a redelivery is the same (storage.schema.report_digest).
_json = msgspec.json.Encoder(order="sorted").encode
_SYNC = Kind.SYNC
#: ``param.msg`` of the 400 answer to a sync of a device that belongs to another vendor.
VENDOR_REFUSED = "tedge error: device belongs to another vendor"


def _may_take(owner: int | None, vendor_id: int | None) -> bool:
    """Whether a gateway of vendor ``vendor_id`` may sync a device owned by ``owner`` (None: nobody
    yet, the first vendor to sync it takes it)."""
    return owner is None or owner == vendor_id


class DeviceState:
    """What the hot path needs to know about a device, kept in memory."""

    __slots__ = ("cid", "gateway_id", "last_heard", "model", "name", "online", "product_id", "vendor_id")

    def __init__(
        self,
        cid: str,
        gateway_id: str,
        product_id: str,
        model: ProductModel,
        online: bool,
        last_heard: float,
        name: str | None = None,
        vendor_id: int | None = None,
    ) -> None:
        self.cid = cid
        self.gateway_id = gateway_id
        self.product_id = product_id
        self.model = model
        self.online = online
        self.last_heard = last_heard
        self.name = name
        self.vendor_id = vendor_id  # the owning vendor: only its gateways may sync the device


class GatewayRecord:
    """What a gateway did at the protocol level, kept for its conformance report card (bounded)."""

    __slots__ = (
        "codes",
        "command_latencies",
        "commands",
        "request_id_reused",
        "status_rejected",
        "status_times",
        "unknown_topic",
    )

    def __init__(self) -> None:
        self.codes: dict[str, Counter[int]] = {"sync": Counter(), "report": Counter()}
        #: reports whose request_id was seen shortly before with other content
        self.request_id_reused = 0
        self.status_times: deque[float] = deque(maxlen=64)
        self.status_rejected = 0
        self.unknown_topic = 0
        self.commands: Counter[str] = Counter()  # sent, ok, failed, timeout, late_answer
        self.command_latencies: deque[float] = deque(maxlen=256)


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


class ProtocolService:
    """Handles the edge protocol for every connected gateway."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        writer: GroupCommitWriter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.writer = writer
        self.clock = clock
        self.models = ModelRegistry(settings.models_dir)
        self.default_model: ProductModel | None = None
        if settings.default_model:
            self.default_model = self.models.get(settings.default_model)
            if self.default_model is None:
                raise ValueError(f"default_model {settings.default_model!r} is not a known model")
        self.products: dict[str, str] = {}
        self.devices: dict[str, DeviceState] = {}
        self.by_gateway: dict[str, set[str]] = {}
        self.southbound: Southbound | None = None
        self.stats: Counter[str] = Counter()
        self.gateway_records: dict[str, GatewayRecord] = {}
        self._stat_keys = {
            (k, c): f"{k.name.lower()}.code.{int(c)}" for k in (_SYNC, _REPORT) for c in ErrorCode
        }
        self.pending_commands: dict[str, _PendingCommand] = {}
        self.timed_out: OrderedDict[str, str] = OrderedDict()
        self._dedupe: OrderedDict[tuple[str, str], int | asyncio.Future[Any]] = OrderedDict()
        #: reports' answers by (gateway, request_id) with their content digest, bounded in count and age
        self._reports = AnswerCache(settings.dedupe_window, settings.dedupe_max_age)
        self._dirty_seen: dict[str, float] = {}
        self._dirty_gw_seen: dict[str, float] = {}  # gateway id -> last message, flushed with devices'
        self._tasks: list[asyncio.Task[Any]] = []
        self.presence_interval = min(5.0, max(0.05, settings.presence_timeout / 10))
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # Cluster hooks (meterhub.cluster.node): whose devices start-up resets (None: all), and the
        # router that sends a command through the node holding the device's gateway.
        self.presence_scope: str | None = None
        self.command_router: Callable[..., Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, southbound: Southbound) -> None:
        self.southbound = southbound
        await asyncio.to_thread(self._load)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._presence_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._flush_seen(limit=None)
        for pending in self.pending_commands.values():
            if not pending.future.done():
                pending.future.cancel()

    def _load(self) -> None:
        """Read products and devices; devices left online by a previous run are set offline."""
        self.products = registry.list_products(self.engine)
        now = self.clock()
        d = schema.devices
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(
                    d.c.cid,
                    d.c.gateway_id,
                    d.c.product_id,
                    d.c.model,
                    d.c.online,
                    d.c.last_seen,
                    d.c.device_name,
                    d.c.vendor_id,
                )
            ).all()
            # One node: every device; in a cluster only this node's gateways (meterhub.cluster).
            reset_at_start(conn, now, self.presence_scope, self.settings.node_timeout)
        for r in rows:
            model = self.models.get(r.model) or self.default_model
            if model is None:
                _repeats.warning(
                    "load_unknown_model",
                    "device model unknown, device ignored until it syncs",
                    cid=r.cid,
                    model=r.model,
                )
                continue
            self._remember(
                DeviceState(
                    r.cid, r.gateway_id, r.product_id, model, False, r.last_seen, r.device_name, r.vendor_id
                )
            )
        log.info("devices loaded", devices=len(self.devices), products=len(self.products))

    def _remember(self, dev: DeviceState) -> None:
        self.devices[dev.cid] = dev
        self.by_gateway.setdefault(dev.gateway_id, set()).add(dev.cid)

    # --- ApplicationHandler ----------------------------------------------------------------------

    def client_connected(self, principal: Principal, peer: str) -> None:
        if principal.kind != "gateway":
            self._emit("client", {"principal": principal, "connected": True, "peer": peer})
            return
        now = self.clock()
        self.stats["gateway.connected"] += 1
        self.writer.submit(
            [
                (
                    "gateway",
                    {
                        "gateway_id": principal.client_id,
                        "vendor_id": principal.extra.get("vendor_id"),
                        "connected": True,
                        "client_address": peer,
                        "last_connected_at": now,
                        "last_seen": now,
                        "first_seen": now,  # kept once set (database._apply_gateways)
                    },
                )
            ]
        )
        self._emit("gateway", {"gateway_id": principal.client_id, "connected": True, "peer": peer})

    def client_disconnected(self, principal: Principal, reason: str) -> None:
        if principal.kind != "gateway":
            self._emit("client", {"principal": principal, "connected": False, "reason": reason})
            return
        gw = principal.client_id
        if reason == "takeover":  # the same gateway is connected again on a new socket
            return
        now = self.clock()
        self.stats["gateway.disconnected"] += 1
        ops: list[tuple[str, Any]] = [
            (
                "gateway",
                {
                    "gateway_id": gw,
                    "connected": False,
                    "last_disconnected_at": now,
                    "last_seen": now,
                },
            )
        ]
        for cid in self.by_gateway.get(gw, ()):
            dev = self.devices[cid]
            if dev.online:
                self._set_presence(dev, False, "gateway-disconnect", now, ops)
        self.writer.submit(ops)
        self._emit("gateway", {"gateway_id": gw, "connected": False, "reason": reason})

    def message(self, principal: Principal, topic: str, payload: bytes) -> Any:
        parsed = parse_topic(topic)
        if parsed is None or parsed[0] != principal.client_id:
            self.stats["rejected.unknown_topic"] += 1
            self.record(principal.client_id).unknown_topic += 1
            _repeats.info(
                "unknown_topic",
                "message on an unknown topic ignored",
                gateway_id=principal.client_id,
                topic=topic[:200],
            )
            return None
        gw, kind = parsed
        self._dirty_gw_seen[gw] = self.clock()
        try:
            if kind is _REPORT:
                return self._on_report(gw, payload)
            if kind is Kind.STATUS:
                return self._on_status(gw, payload)
            if kind is _SYNC:
                return asyncio.ensure_future(self._on_sync(gw, payload, principal.extra.get("vendor_id")))
            return self._on_command_response(gw, payload)
        except Exception:
            self.stats["errors.unexpected"] += 1
            _repeats.error(
                ("unexpected", kind),
                "unexpected failure handling a message",
                gateway_id=gw,
                topic=topic,
                exc_info=True,
            )
            if kind in (_REPORT, _SYNC):
                self._reply(gw, kind, None, None, ErrorCode.SYSTEM)
            return None

    # --- replies ---------------------------------------------------------------------------------

    def record(self, gw: str) -> GatewayRecord:
        """The gateway's conformance record (created on first use; at most 100,000 kept)."""
        records = self.gateway_records
        rec = records.get(gw)
        if rec is None:
            if len(records) >= 100_000:
                del records[next(iter(records))]
            rec = records[gw] = GatewayRecord()
        return rec

    def _reply(
        self, gw: str, kind: Kind, request_id: str | None, cid: str | None, code: int, msg: str | None = None
    ) -> None:
        key = self._stat_keys.get((kind, code)) or f"{kind.name.lower()}.code.{code}"
        self.stats[key] += 1
        self.record(gw).codes[kind.name.lower()][int(code)] += 1
        assert self.southbound is not None
        self.southbound.publish(
            gw, response_topic(gw, kind), encode_response(request_id, cid, code, self.clock(), msg), 1
        )

    def _dedupe_lookup(self, key: tuple[str, str]) -> int | asyncio.Future[Any] | None:
        return self._dedupe.get(key)

    def _dedupe_store(self, key: tuple[str, str], answer: int | asyncio.Future[Any]) -> None:
        dd = self._dedupe
        dd[key] = answer
        if len(dd) > self.settings.dedupe_window:
            dd.popitem(last=False)

    def _repeat(
        self, gw: str, kind: Kind, request_id: str, cid: str | None, previous: int | asyncio.Future[Any]
    ) -> Any:
        """Answer a redelivered request with its first answer, storing nothing."""
        self.stats[f"{kind.name.lower()}.duplicate"] += 1
        if isinstance(previous, int):
            self._reply(gw, kind, request_id, cid, previous)
            return None

        def again(fut: asyncio.Future[Any]) -> None:
            # The first one's outcome, from its own write (not from a cache the first one's callback
            # may not have updated yet): committed -> 0, failed -> 500.
            failed = fut.cancelled() or fut.exception() is not None
            self._reply(gw, kind, request_id, cid, ErrorCode.SYSTEM if failed else ErrorCode.SUCCESS)

        previous.add_done_callback(again)
        return previous

    # --- properties/report -----------------------------------------------------------------------

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
        fut.add_done_callback(partial(self._report_committed, gw, key, content, req.cid))
        if self.listeners:
            self._emit(
                "report",
                {"cid": req.cid, "dp": dp, "value": value, "num": num, "t": t, "product_id": dev.product_id},
            )
        return fut

    def _report_committed(
        self, gw: str, key: tuple[str, str], content: int, cid: str, fut: asyncio.Future[Any]
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

    def _answer_now(
        self, key: tuple[str, str], gw: str, kind: Kind, cid: str | None, code: int, detail: str
    ) -> None:
        self.stats[f"rejected.{kind.name.lower()}"] += 1
        _repeats.info(
            ("rejected", kind, int(code)),
            "request rejected",
            gateway_id=gw,
            kind=kind.name.lower(),
            request_id=key[1],
            cid=cid,
            code=int(code),
            detail=detail,
        )
        self._dedupe_store(key, int(code))
        self._reply(gw, kind, key[1], cid, code)

    def _reject(self, gw: str, kind: Kind, exc: ProtocolError) -> None:
        self.stats[f"rejected.{kind.name.lower()}"] += 1
        _repeats.info(
            ("rejected", kind, int(exc.code)),
            "request rejected",
            gateway_id=gw,
            kind=kind.name.lower(),
            request_id=exc.request_id,
            cid=exc.cid,
            code=int(exc.code),
            detail=exc.detail,
        )
        self._reply(gw, kind, exc.request_id, exc.cid, exc.code)

    # --- devices/sync ----------------------------------------------------------------------------

    async def _on_sync(self, gw: str, payload: bytes, vendor_id: int | None = None) -> None:
        """``vendor_id``: the syncing gateway's vendor. A device belongs to its vendor: a gateway of
        another vendor is answered 400 (``VENDOR_REFUSED``) and the device is left as it is."""
        now = self.clock()
        try:
            req = decode_sync(payload, now)
        except ProtocolError as exc:
            self._reject(gw, _SYNC, exc)
            return
        key = (gw, req.request_id)
        previous = self._dedupe.get(key)
        if previous is not None:
            result = self._repeat(gw, _SYNC, req.request_id, req.cid, previous)
            if result is not None:
                await asyncio.shield(result)
            return
        model = await self._model_for(req.product_id)
        if model is None:
            self._answer_now(
                key,
                gw,
                _SYNC,
                req.cid,
                ErrorCode.PARAMS_RANGE_INVALID,
                f"unknown product {req.product_id!r} and no default model",
            )
            return
        dev = self.devices.get(req.cid)
        if dev is not None and dev.gateway_id != gw and not _may_take(dev.vendor_id, vendor_id):
            # Not remembered for redeliveries: nothing was stored, and asking again changes nothing.
            self.stats["devices.vendor_refused"] += 1
            self.stats["rejected.sync"] += 1
            _repeats.warning(
                ("vendor_refused", gw),
                "sync refused: the device belongs to another vendor",
                gateway_id=gw,
                cid=req.cid,
                owner_gateway_id=dev.gateway_id,
            )
            self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.UPLINK, VENDOR_REFUSED)
            return
        ops: list[tuple[str, Any]] = []
        row: dict[str, Any] = {
            "cid": req.cid,
            "gateway_id": gw,
            "product_id": req.product_id,
            "model": model.model,
            "synced_at": now,
            "last_seen": now,
            "first_seen": now,
            "online": False,
        }
        row.update(req.fields)
        if vendor_id is not None:
            row["vendor_id"] = vendor_id
        ops.append(("device", row))
        name_changed = False
        created = dev is None
        if dev is None:
            dev = DeviceState(
                req.cid, gw, req.product_id, model, False, now, req.fields.get("device_name"), vendor_id
            )
            self._remember(dev)
            self.stats["devices.created"] += 1
        else:
            if vendor_id is not None:
                dev.vendor_id = vendor_id
            if dev.gateway_id != gw:
                rebind = {"cid": dev.cid, "old_gateway_id": dev.gateway_id, "new_gateway_id": gw, "at": now}
                ops.append(("rebind", {**rebind, "cause": "sync"}))
                _repeats.info(
                    "rebind", "device moved to another gateway", cid=dev.cid, old=dev.gateway_id, new=gw
                )
                self.by_gateway.get(dev.gateway_id, set()).discard(dev.cid)
                self.by_gateway.setdefault(gw, set()).add(dev.cid)
                dev.gateway_id = gw
                self.stats["devices.rebound"] += 1
            dev.product_id = req.product_id
            dev.model = model
            if "device_name" in req.fields and req.fields["device_name"] != dev.name:
                name_changed = dev.name is not None or req.fields["device_name"] is not None
                dev.name = req.fields["device_name"]
        fut = self.writer.write(ops)
        self._dedupe_store(key, fut)
        try:
            await fut
        except Exception as exc:
            _repeats.error("sync_not_stored", "sync not stored", gateway_id=gw, cid=req.cid, error=str(exc))
            self._dedupe.pop(key, None)
            if created:
                self.devices.pop(dev.cid, None)
                self.by_gateway.get(gw, set()).discard(dev.cid)
            self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.SYSTEM)
            return
        self._dedupe[key] = ErrorCode.SUCCESS
        self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.SUCCESS)
        self._emit(
            "sync",
            {
                "cid": dev.cid,
                "gateway_id": gw,
                "product_id": dev.product_id,
                "name": dev.name,
                "name_changed": name_changed,
            },
        )

    async def _model_for(self, product_id: str) -> ProductModel | None:
        name = self.products.get(product_id)
        if name is None:
            # An operator may have registered it from the CLI since we last looked.
            self.products = await asyncio.to_thread(registry.list_products, self.engine)
            name = self.products.get(product_id)
        if name is not None:
            model = self.models.get(name)
            if model is not None:
                return model
            _repeats.warning(
                "product_unknown_model",
                "product refers to an unknown model",
                product_id=product_id,
                model=name,
            )
        return self.models.for_product(product_id) or self.default_model

    async def move_device(self, cid: str, gateway_id: str) -> dict[str, Any]:
        """An operator moves a device to another gateway, of any vendor: the device then belongs to
        that gateway's vendor. Recorded in ``device_rebinds`` (cause ``operator``). From then on the
        old gateway's reports are answered 2003 (and its syncs 400 when it is of another vendor); the
        device is offline (cause ``moved``) until the new gateway reports it. Raises
        :class:`registry.UnknownDevice`, :class:`registry.UnknownGateway` or
        :class:`registry.RegistryError` (a gateway of no vendor)."""
        target = await asyncio.to_thread(registry.move_target, self.engine, cid, gateway_id)
        dev = self.devices.get(cid)
        old = dev.gateway_id if dev is not None else target.old_gateway_id
        out = {"cid": cid, "old_gateway_id": old, "gateway_id": gateway_id, "vendor": target.vendor}
        if old == gateway_id and (dev is None or dev.vendor_id == target.vendor_id):
            return {**out, "moved": False}
        now = self.clock()
        ops: list[tuple[str, Any]] = [
            ("device_move", {"cid": cid, "gateway_id": gateway_id, "vendor_id": target.vendor_id}),
            (
                "rebind",
                {
                    "cid": cid,
                    "old_gateway_id": old,
                    "new_gateway_id": gateway_id,
                    "at": now,
                    "cause": "operator",
                },
            ),
        ]
        saved = None
        if dev is not None:  # the cache changes now, so no report of the old gateway slips in meanwhile
            saved = (dev.gateway_id, dev.vendor_id, dev.online)
            self.by_gateway.get(dev.gateway_id, set()).discard(cid)
            self.by_gateway.setdefault(gateway_id, set()).add(cid)
            dev.gateway_id = gateway_id
            dev.vendor_id = target.vendor_id
            if dev.online:
                self._set_presence(dev, False, "moved", now, ops)
        elif target.online:
            ops.append(("presence", {"cid": cid, "online": False, "cause": "moved", "at": now}))
        try:
            await self.writer.write(ops)
        except Exception:
            if dev is not None and saved is not None and dev.gateway_id == gateway_id:
                self.by_gateway.get(gateway_id, set()).discard(cid)
                self.by_gateway.setdefault(saved[0], set()).add(cid)
                dev.gateway_id, dev.vendor_id, dev.online = saved
            raise
        self.stats["devices.moved"] += 1
        log.info("device moved by an operator", cid=cid, old=old, new=gateway_id, vendor=target.vendor)
        if dev is not None:  # like a sync: other nodes of a cluster reload the device from the database
            self._emit(
                "sync",
                {
                    "cid": cid,
                    "gateway_id": gateway_id,
                    "product_id": dev.product_id,
                    "name": dev.name,
                    "name_changed": False,
                },
            )
        return {**out, "moved": True}

    # --- devices/status --------------------------------------------------------------------------

    def _on_status(self, gw: str, payload: bytes) -> Any:
        now = self.clock()
        try:
            req = decode_status(payload, now)
        except ProtocolError as exc:
            self.stats["rejected.status"] += 1
            self.record(gw).status_rejected += 1
            _repeats.info(
                ("status_rejected", int(exc.code)),
                "status message rejected",
                gateway_id=gw,
                code=int(exc.code),
                detail=exc.detail,
                request_id=exc.request_id,
            )
            return None
        for reason in req.rejected:
            self.stats["rejected.status_item"] += 1
            _repeats.info(
                "status_item_rejected",
                "status item rejected",
                gateway_id=gw,
                request_id=req.request_id,
                detail=reason,
            )
        ops: list[tuple[str, Any]] = []
        for cid, online in req.items:
            dev = self.devices.get(cid)
            if dev is None or dev.gateway_id != gw:
                self.stats["rejected.status_item"] += 1
                _repeats.info(
                    "status_unknown_device",
                    "status for a device this gateway never synced",
                    gateway_id=gw,
                    cid=cid,
                )
                continue
            if online:
                dev.last_heard = now
                self._dirty_seen[cid] = now
            if dev.online != online:
                self._set_presence(dev, online, "status", now, ops)
        self.stats["status.accepted"] += 1
        self.record(gw).status_times.append(now)
        return self.writer.write(ops) if ops else None

    # --- presence --------------------------------------------------------------------------------

    def _set_presence(
        self, dev: DeviceState, online: bool, cause: str, now: float, ops: list[tuple[str, Any]]
    ) -> None:
        dev.online = online
        self.stats[f"presence.{'online' if online else 'offline'}.{cause}"] += 1
        ops.append(("presence", {"cid": dev.cid, "online": online, "cause": cause, "at": now}))
        self._emit(
            "presence",
            {"cid": dev.cid, "online": online, "cause": cause, "at": now, "product_id": dev.product_id},
        )

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(self.presence_interval)
            try:
                self.check_presence()
                self._flush_seen()
            except Exception:
                _repeats.error("presence_check", "presence check failed", exc_info=True)

    def check_presence(self) -> int:
        """Set offline every online device silent for ``presence_timeout``; returns how many."""
        now = self.clock()
        limit = now - self.settings.presence_timeout
        ops: list[tuple[str, Any]] = []
        for dev in self.devices.values():
            if dev.online and dev.last_heard < limit:
                self._set_presence(dev, False, "silence", now, ops)
        if ops:
            self.writer.submit(ops)
        return len(ops)

    def _flush_seen(self, limit: int | None = SEEN_FLUSH_MAX) -> None:
        """Write devices' last-seen times in one batch (not on every report), at most ``limit`` of
        them per call, longest waiting first: with 190,000 meters heard every minute a single flush
        was a six-figure UPDATE that held the writer (and every report's answer) for seconds."""
        gateways, self._dirty_gw_seen = self._dirty_gw_seen, {}
        if gateways:  # one row per gateway: a few thousand at most, unlike the devices
            self.writer.submit(
                [("gateway", {"gateway_id": gw, "last_seen": t}) for gw, t in gateways.items()]
            )
        dirty = self._dirty_seen
        if not dirty:
            return
        if limit is None or len(dirty) <= limit:
            seen, self._dirty_seen = dirty, {}
            items = list(seen.items())
        else:  # dicts keep first-insertion order: the devices dirty for longest come first
            items = list(itertools.islice(dirty.items(), limit))
            for cid, _ in items:
                del dirty[cid]
        self.writer.submit([("seen", {"cid": cid, "last_seen": t}) for cid, t in items])

    # --- commands --------------------------------------------------------------------------------

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
        dev = self.devices.get(cid)
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

    # --- events for other components (open hub, live dashboard) ----------------------------------

    def _emit(self, kind: str, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, event)
            except Exception:
                _repeats.error(("listener", kind), "event listener failed", kind=kind, exc_info=True)


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


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return repr(value)
