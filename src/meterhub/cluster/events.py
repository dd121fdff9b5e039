"""Fan-out across nodes: the protocol service's events, to the other nodes' open hub and live streams.

Every event a node's :class:`~meterhub.core.service.ProtocolService` emits (report, presence, sync,
gateway) reaches that node's own listeners directly, as in a single process. :class:`EventRelay` is
one more listener: it queues the event (bounded, oldest dropped and counted; never blocking the
report) and a task publishes it on ``mh.events`` with the node's id. Every other node delivers it to
its *remote sinks* only, the open hub fan-out and the dashboard's live stream, and skips its own
events: so each subscriber gets each event exactly once, and the alarm monitor (a local listener)
still evaluates a report once, on the node that received it.

A remote ``sync`` event also refreshes the receiving node's cached copy of the device (rebinds,
renames, model changes made through another node).

Wire form (JSON): ``{"o": node, "k": kind, "e": event}``; a report carries its data point as
``dp`` (id), ``m`` (model name) and ``w`` (wire value), rebuilt with the receiver's model registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import msgspec

from meterhub.logs import get_logger

log = get_logger(__name__)

SUBJECT = "mh.events"
RELAYED = frozenset({"report", "presence", "sync", "gateway"})
_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.Decoder().decode


class EventRelay:
    """Publishes local events to the bus and hands other nodes' events to the remote sinks."""

    def __init__(
        self,
        node_id: str,
        bus: Any,
        service: Any,
        sinks: Callable[[], list[Callable[[str, dict[str, Any]], None]]],
        *,
        backlog: int = 100_000,
        on_remote_sync: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.bus = bus
        self.service = service
        self.sinks = sinks
        self.on_remote_sync = on_remote_sync
        self.pending: deque[tuple[str, dict[str, Any]]] = deque()
        self.backlog = backlog
        self.stats: Counter[str] = Counter()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.subscribe(SUBJECT, self._on_bus)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    # --- local events out (a listener on the service: the report hot path, keep it cheap) -------

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind not in RELAYED:
            return
        if len(self.pending) >= self.backlog:
            self.pending.popleft()
            self.stats["relay.dropped_backlog"] += 1
        self.pending.append((kind, event))  # encoded later, in the sender task
        self._wakeup.set()

    def _pack(self, kind: str, event: dict[str, Any]) -> bytes:
        if kind == "report":
            dp = event["dp"]
            dev = self.service.devices.get(event["cid"])
            body = {
                "cid": event["cid"],
                "dp": dp.id_str,
                "m": dev.model.model if dev is not None else None,
                "w": dp.to_wire(event["value"]),
                "num": event["num"],
                "t": event["t"],
                "product_id": event.get("product_id"),
            }
        else:
            body = event
        return _encode({"o": self.node_id, "k": kind, "e": body})

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            sent = 0
            while self.pending:
                kind, event = self.pending.popleft()
                try:
                    data = self._pack(kind, event)
                except Exception:
                    self.stats["relay.unencodable"] += 1
                    continue
                try:
                    await self.bus.publish(SUBJECT, data)
                    self.stats["relay.published"] += 1
                except Exception as exc:
                    self.stats["relay.publish_failed"] += 1
                    if self.stats["relay.publish_failed"] % 1000 == 1:
                        log.warning("event not published to the bus", error=str(exc) or type(exc).__name__)
                sent += 1
                if sent % 500 == 0:
                    await asyncio.sleep(0)

    # --- other nodes' events in ----------------------------------------------------------------

    async def _on_bus(self, data: bytes) -> None:
        try:
            msg = _decode(data)
            if msg.get("o") == self.node_id:
                return
            kind, event = msg["k"], msg["e"]
            if kind == "report":
                event = self._unpack_report(event)
                if event is None:
                    self.stats["relay.unknown_report"] += 1
                    return
        except Exception:
            self.stats["relay.bad_message"] += 1
            return
        self.stats[f"relay.received.{kind}"] += 1
        if kind == "sync" and self.on_remote_sync is not None:
            self.on_remote_sync(event["cid"])
        for sink in self.sinks():
            try:
                sink(kind, event)
            except Exception:
                log.exception("remote event sink failed", kind=kind)

    def _unpack_report(self, body: dict[str, Any]) -> dict[str, Any] | None:
        service = self.service
        model = service.models.get(body["m"]) if body.get("m") else None
        if model is None:
            dev = service.devices.get(body["cid"])
            model = dev.model if dev is not None else None
        dp = model.get(body["dp"]) if model is not None else None
        if dp is None:
            return None
        return {
            "cid": body["cid"],
            "dp": dp,
            "value": dp.coerce(body["w"]),
            "num": body["num"],
            "t": body["t"],
            "product_id": body.get("product_id"),
        }
