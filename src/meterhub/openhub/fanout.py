"""Open hub fan-out: device status and events, encrypted, to each subscribed user's source topic.

Off the report's hot path: the service's listener only checks (in O(1)) whether any connected link
cares about the device and appends the event to a bounded queue; a separate task builds, encrypts and
publishes the messages. Each subscriber's own MQTT session queue is bounded too (``max_queued``, oldest
dropped and counted) and a subscriber that stops reading is disconnected by the MQTT server's slow-client
rule, so a slow or dead subscriber never slows reports or other subscribers.

Messages (CLARIFICATIONS.md): ``{"protocol", "pv": "2.0", "sign", "t", "data"}`` with ``data`` encrypted
per the link's version. Protocol 4 = property report: ``{dataId, devId, productKey, status: [{code,
value, t, "<dp id>": value}]}`` where value is the data point's wire form. Protocol 20 = device event:
``{devId, productKey, bizCode: online|offline|nameUpdate, bizData: {devId, time[, name]}, ts}``.
Times are Unix milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, deque
from typing import Any

import msgspec
from sqlalchemy import Engine

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.openhub import crypto
from meterhub.openhub.store import all_bindings
from meterhub.transport import Principal, Southbound

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted

_encode = msgspec.json.Encoder().encode


class OpenHubFanout:
    def __init__(self, engine: Engine, southbound: Southbound, *, backlog: int = 100_000) -> None:
        self.engine = engine
        self.southbound = southbound
        self.bindings: dict[str, set[str]] = {}  # cid -> uids
        self.links: dict[str, dict[str, Principal]] = {}  # uid -> client_id -> principal
        self.pending: deque[tuple[str, dict[str, Any]]] = deque()
        self.backlog = backlog
        self.stats: Counter[str] = Counter()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, refresh_interval: float = 10.0) -> None:
        await self.refresh_bindings()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever(refresh_interval))

    async def stop(self) -> None:
        for task in (self._task, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def refresh_bindings(self) -> None:
        """Reload user-device bindings (the CLI may change them from another process)."""
        self.bindings = await asyncio.to_thread(all_bindings, self.engine)

    async def _refresh_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_bindings()
            except Exception:
                _repeats.error("refresh_failed", "open hub bindings refresh failed", exc_info=True)

    # --- the service's listener (runs on the hot path: keep it O(1)) ----------------------------

    def on_event(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "client":
            self._on_client(event)
            return
        if kind not in ("report", "presence", "sync") or not self.links:
            return
        uids = self.bindings.get(event["cid"])
        if not uids or not any(uid in self.links for uid in uids):
            return
        if kind == "sync" and not event.get("name_changed"):
            return
        if len(self.pending) >= self.backlog:
            self.pending.popleft()
            self.stats["fanout.dropped_backlog"] += 1
            _repeats.warning(
                "dropped_backlog", "open hub backlog full: oldest event dropped", backlog=self.backlog
            )
        self.pending.append((kind, event))
        self._wakeup.set()

    def _on_client(self, event: dict[str, Any]) -> None:
        principal: Principal = event["principal"]
        if principal.kind != "openhub":
            return
        uid = principal.extra["uid"]
        if event["connected"]:
            self.links.setdefault(uid, {})[principal.client_id] = principal
        else:
            links = self.links.get(uid)
            if links is not None and links.get(principal.client_id) is principal:
                del links[principal.client_id]
                if not links:
                    del self.links[uid]

    # --- the sender ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            sent = 0
            while self.pending:
                kind, event = self.pending.popleft()
                try:
                    self._send(kind, event)
                except Exception:
                    self.stats["fanout.errors"] += 1
                    _repeats.error(("send_failed", kind), "open hub message failed", kind=kind, exc_info=True)
                sent += 1
                if sent % 200 == 0:
                    await asyncio.sleep(0)  # let reports through

    def _send(self, kind: str, event: dict[str, Any]) -> None:
        cid = event["cid"]
        protocol, data = build_message(kind, event)
        plaintext = _encode(data)
        t = int(time.time() * 1000)  # the envelope's time; GCM's associated data
        for uid in self.bindings.get(cid, ()):
            for client_id, principal in list(self.links.get(uid, {}).items()):
                key: bytes = principal.extra["key"]
                version: str = principal.extra["version"]
                encrypted = crypto.encrypt(version, key, plaintext, t)
                message = _encode(
                    {
                        "protocol": protocol,
                        "pv": "2.0",
                        "sign": crypto.sign(key, encrypted, t),
                        "t": t,
                        "data": encrypted,
                    }
                )
                if self.southbound.publish(client_id, principal.extra["topic"], message, 1):
                    self.stats[f"fanout.sent.protocol{protocol}"] += 1
                else:
                    self.stats["fanout.not_subscribed"] += 1


def build_message(kind: str, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``(protocol, data)`` for a service event (report -> 4; presence / name change -> 20)."""
    cid = event["cid"]
    product = event.get("product_id") or ""
    if kind == "report":
        dp = event["dp"]
        wire = dp.to_wire(event["value"])
        t_ms = int(event["t"] * 1000)
        status = {"code": dp.code, "value": wire, "t": t_ms, dp.id_str: wire}
        return 4, {"dataId": uuid.uuid4().hex, "devId": cid, "productKey": product, "status": [status]}
    if kind == "presence":
        t_ms = int(event["at"] * 1000)
        biz = "online" if event["online"] else "offline"
        return 20, {
            "devId": cid,
            "productKey": product,
            "bizCode": biz,
            "bizData": {"devId": cid, "time": t_ms},
            "ts": t_ms,
        }
    # sync with a new name
    t_ms = int(time.time() * 1000)
    return 20, {
        "devId": cid,
        "productKey": product,
        "bizCode": "nameUpdate",
        "bizData": {"devId": cid, "name": event.get("name"), "time": t_ms},
        "ts": t_ms,
    }
