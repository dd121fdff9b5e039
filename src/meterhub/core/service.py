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

The code is split by responsibility: :mod:`meterhub.core.reports`, :mod:`meterhub.core.sync`,
:mod:`meterhub.core.presence` and :mod:`meterhub.core.commands` hold the methods (mixins of
:class:`ProtocolService`), :mod:`meterhub.core.device_cache` the devices in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from meterhub.bounded import BoundedList
from meterhub.cluster.store import reset_at_start
from meterhub.config import Settings
from meterhub.core.commands import CommandResult, CommandsMixin, _PendingCommand
from meterhub.core.dedupe import AnswerCache
from meterhub.core.device_cache import DeviceCache
from meterhub.core.devices import DeviceState, _may_take
from meterhub.core.presence import SEEN_FLUSH_MAX, PresenceMixin
from meterhub.core.reports import ReportsMixin
from meterhub.core.sync import VENDOR_REFUSED, SyncMixin
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import ProductModel
from meterhub.model.loader import ModelRegistry
from meterhub.protocol.errors import ErrorCode, ProtocolError
from meterhub.protocol.messages import (
    encode_response,
)
from meterhub.protocol.topics import Kind, parse_topic, response_topic
from meterhub.storage import registry
from meterhub.storage.database import GroupCommitWriter
from meterhub.transport import Principal, Southbound

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)

_REPORT = Kind.REPORT
_SYNC = Kind.SYNC
#: Re-exported: these names were defined here before the split by responsibility.
__all__ = [
    "SEEN_FLUSH_MAX",
    "VENDOR_REFUSED",
    "CommandResult",
    "DeviceState",
    "GatewayRecord",
    "ProtocolService",
    "_PendingCommand",
    "_may_take",
]


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
        self.status_times: BoundedList[float] = BoundedList(64)
        self.status_rejected = 0
        self.unknown_topic = 0
        self.commands: Counter[str] = Counter()  # sent, ok, failed, timeout, late_answer
        self.command_latencies: BoundedList[float] = BoundedList(256)


class ProtocolService(ReportsMixin, SyncMixin, PresenceMixin, CommandsMixin):
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
        #: Devices in memory, bounded and loaded on demand (meterhub.core.device_cache); ``devices`` and
        #: ``by_gateway`` are its mappings (the hot path's dict lookup).
        self.cache = DeviceCache(engine, settings.device_cache_max, self._device_from_row)
        self.devices: dict[str, DeviceState] = self.cache.devices
        self.by_gateway: dict[str, set[str]] = self.cache.by_gateway
        self.southbound: Southbound | None = None
        self.stats: Counter[str] = Counter()
        self.gateway_records: dict[str, GatewayRecord] = {}
        #: Gateways whose record changed since meterhub.core.conformance_store last took them.
        self.conformance_dirty: set[str] = set()
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
        #: Syncs started and not yet answered. Above ``sync_high_water`` ``on_pressure(True)`` is called
        #: (the transport stops reading from gateways), back at half of it ``on_pressure(False)``: a
        #: reconnect storm's syncs wait in TCP buffers instead of as tasks in this process.
        self.syncs_in_flight = 0
        self.sync_high_water = 2000
        self.sync_pressed = False
        self.on_pressure: Callable[[bool], None] | None = None

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
        """Read products; devices left online by a previous run are set offline. Devices are not
        loaded here: a gateway's devices are loaded when it connects (meterhub.core.device_cache)."""
        self.products = registry.list_products(self.engine)
        now = self.clock()
        with self.engine.begin() as conn:
            # One node: every device; in a cluster only this node's gateways (meterhub.cluster).
            reset_at_start(conn, now, self.presence_scope, self.settings.node_timeout)
        log.info("products loaded", products=len(self.products))

    def _device_from_row(self, r: Any) -> DeviceState | None:
        """A stored device as the cache keeps it (offline: presence starts from what this node hears;
        None when its model is unknown)."""
        model = self.models.get(r.model) or self.default_model
        if model is None:
            _repeats.warning(
                "load_unknown_model",
                "device model unknown, device ignored until it syncs",
                cid=r.cid,
                model=r.model,
            )
            return None
        return DeviceState(
            r.cid, r.gateway_id, r.product_id, model, False, r.last_seen, r.device_name, r.vendor_id
        )

    async def find_device(self, cid: str) -> DeviceState | None:
        """A device from memory, else from the database (then cached)."""
        dev = self.devices.get(cid)
        return dev if dev is not None else await self.cache.fetch(cid)

    def _remember(self, dev: DeviceState) -> None:
        self.cache.put(dev)

    # --- ApplicationHandler ----------------------------------------------------------------------

    def client_connected(self, principal: Principal, peer: str) -> None:
        if principal.kind != "gateway":
            self._emit("client", {"principal": principal, "connected": True, "peer": peer})
            return
        now = self.clock()
        self.stats["gateway.connected"] += 1
        self.cache.load_gateway(principal.client_id)  # its devices, for the hot path
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
        for dev in self.cache.of_gateway(gw):  # every online device is in memory
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
        kind = parsed[1]
        # The connection's own string (equal to the topic's): one object for all that the gateway's
        # devices and answers keep, not one per message.
        gw = principal.client_id
        self._dirty_gw_seen[gw] = self.clock()
        try:
            if kind is _REPORT:
                return self._on_report(gw, payload)
            if kind is Kind.STATUS:
                return self._on_status(gw, payload)
            if kind is _SYNC:
                return self._start_sync(gw, payload, principal.extra.get("vendor_id"))
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

    def _start_sync(self, gw: str, payload: bytes, vendor_id: int | None) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._on_sync(gw, payload, vendor_id))
        self.syncs_in_flight += 1
        if self.syncs_in_flight > self.sync_high_water and not self.sync_pressed:
            self._sync_pressure(True)
        task.add_done_callback(self._sync_done)
        return task

    def _sync_done(self, _task: asyncio.Future[None]) -> None:
        self.syncs_in_flight -= 1
        if self.sync_pressed and self.syncs_in_flight <= self.sync_high_water // 2:
            self._sync_pressure(False)

    def _sync_pressure(self, on: bool) -> None:
        self.sync_pressed = on
        if on:
            self.stats["flow.sync_pressure"] += 1
        if self.on_pressure is not None:
            self.on_pressure(on)

    # --- replies ---------------------------------------------------------------------------------

    def record(self, gw: str) -> GatewayRecord:
        """The gateway's conformance record since the last flush to the database (created on first
        use; at most 100,000 kept)."""
        self.conformance_dirty.add(gw)
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

    # --- devices/status --------------------------------------------------------------------------

    # --- commands --------------------------------------------------------------------------------

    # --- events for other components (open hub, live dashboard) ----------------------------------

    def _emit(self, kind: str, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, event)
            except Exception:
                _repeats.error(("listener", kind), "event listener failed", kind=kind, exc_info=True)
