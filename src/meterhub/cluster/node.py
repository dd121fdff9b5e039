"""One meterhub node of a cluster: its heartbeat, gateway ownership, takeover, routed commands.

The embedded default is a cluster of one: the same :class:`ClusterNode` on the in-process bus
(:class:`~meterhub.cluster.bus.LocalBus`), where there is nobody to route to, take over from or
sweep, and start-up resets every device as it always did. With ``bus_url = nats://...`` (and a
PostgreSQL ``database_url``) several nodes share the database:

- **nodes**: each node has a row with a heartbeat every ``heartbeat_interval``; a node whose
  heartbeat is older than ``node_timeout`` is dead. On every heartbeat each node tries the
  dead-node sweep under a PostgreSQL advisory lock, so one node at a time does it: the dead node's
  devices go offline (cause ``node-lost``), its gateways are freed, its row becomes ``lost``.
- **ownership and takeover**: an accepted gateway CONNECT claims the gateway (``owner_node`` = this
  node, ``session_gen`` + 1) and publishes ``mh.takeover``; a node holding an older generation
  closes its connection (reason ``takeover``: no will, no offline transition). Each heartbeat also
  checks the database, so a lost takeover message only delays the close.
- **commands**: a command for a device whose gateway another live node holds is sent to that node
  (``mh.node.<id>.command`` request/reply) and runs there exactly as a local one.
- **events** go to the other nodes' open hub and live streams (:mod:`meterhub.cluster.events`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import os
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from meterhub import __version__
from meterhub.cluster import store
from meterhub.cluster.bus import Bus, BusError, BusTimeout, connect_bus
from meterhub.cluster.claims import ClaimBatcher
from meterhub.cluster.events import EventRelay
from meterhub.cluster.handler import ClusterHandler
from meterhub.cluster.ids import IdBlocks
from meterhub.config import Settings
from meterhub.logs import get_logger
from meterhub.protocol.errors import ErrorCode

log = get_logger(__name__)

TAKEOVER = "mh.takeover"
CACHE = "mh.cache"  # {"node", "what": "products" | "bindings"}: reload that cache
_encode = msgspec.json.Encoder(enc_hook=repr).encode
_decode = msgspec.json.Decoder().decode
#: Set while a command runs on behalf of another node (it must not be routed again).
_ROUTED: contextvars.ContextVar[bool] = contextvars.ContextVar("meterhub_routed_command", default=False)


def default_node_id(settings: Settings) -> str:
    """Host name and MQTT port; with an ephemeral port (0), host name and process id."""
    host = socket.gethostname()
    return f"{host}:{settings.mqtt_port}" if settings.mqtt_port else f"{host}:pid{os.getpid()}"


class ClusterNode:
    def __init__(self, settings: Settings, engine: Any) -> None:
        self.settings = settings
        self.engine = engine
        self.node_id = settings.node_id or default_node_id(settings)
        self.bus: Bus | None = None
        self.hub: Any = None
        self.service: Any = None
        self.southbound: Any = None
        self.handler: ClusterHandler | None = None
        self.relay: EventRelay | None = None
        self.alarm_ids: IdBlocks | None = None  # alarm ids from reserved blocks (several nodes only)
        self.held: dict[str, int] = {}  # gateway -> session generation this node holds
        self.claiming: Counter[str] = Counter()  # gateways with a claim under way
        self.claims = ClaimBatcher(engine, self.node_id)  # claims stored together, one commit per batch
        self.superseded: dict[str, int] = {}  # newer generations announced while we were claiming
        self.waiting: dict[str, list[Any]] = {}  # gateway -> messages waiting for its claim
        self.drained: set[str] = set()  # gateways closed by a drain, presence left to finish_drain
        self.stats: Counter[str] = Counter()
        self.started_at = time.time()
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.beat_ok_at: float | None = None  # last heartbeat stored (None: not registered yet)
        self._control_pool = ThreadPoolExecutor(1, thread_name_prefix="meterhub-cluster")

    @property
    def solo(self) -> bool:
        """A cluster of one (the in-process bus): nobody to route to, take over from or sweep."""
        return self.bus is None or self.bus.kind == "local"

    @property
    def reset_scope(self) -> str | None:
        """For the start-up reset: None = every device (one node), else only this node's gateways."""
        return None if self.solo else self.node_id

    # --- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Check the settings and join the bus (before the protocol service loads)."""
        s = self.settings  # the intervals are checked by Settings
        if s.bus_url and self.engine.dialect.name != "postgresql":
            raise ValueError("cluster mode (bus_url) needs a PostgreSQL database_url shared by the nodes")
        self.bus = await connect_bus(s.bus_url, self.node_id)
        log.info("cluster node", node_id=self.node_id, bus=self.bus.kind)

    def wrap(self, inner: Any) -> ClusterHandler:
        """The handler to give the MQTT server."""
        self.handler = ClusterHandler(inner, self)
        return self.handler

    async def start(self, hub: Any) -> None:
        """Register, subscribe and sweep (after the service started, before MQTT listens)."""
        assert self.bus is not None
        self.hub = hub
        self.service = hub.handler
        self.southbound = hub.mqtt
        self.service.command_router = self.route_command
        now = time.time()
        await asyncio.to_thread(
            store.register_node,
            self.engine,
            {
                "node_id": self.node_id,
                "host": socket.gethostname(),
                "version": __version__,
                "mqtt_port": hub.mqtt_port,
                "http_port": hub.http_port,
                "started_at": now,
                "heartbeat_at": now,
            },
        )
        if not self.solo:
            from meterhub.storage import schema

            self.alarm_ids = IdBlocks(self.engine, "alarms", schema.alarms)
            await asyncio.to_thread(self.alarm_ids.reserve)
            bus = self.bus
            self._subs.append(await bus.subscribe(TAKEOVER, self._on_takeover))
            self._subs.append(
                await bus.subscribe(f"mh.node.{self.node_id}.command", self._on_command, concurrent=True)
            )
            self._subs.append(
                await bus.subscribe(f"mh.node.{self.node_id}.session", self._on_hand_over, concurrent=True)
            )
            self._subs.append(
                await bus.subscribe(f"mh.node.{self.node_id}.deliver", self._on_deliver, concurrent=True)
            )
            self.relay = EventRelay(
                self.node_id,
                bus,
                self.service,
                self._remote_sinks,
                backlog=self.settings.openhub_backlog,
                on_remote_sync=self._on_remote_sync,
            )
            await self.relay.start()
            self._subs.append(await bus.subscribe(CACHE, self._on_cache_changed))
            self.service.listeners.append(self.relay)
            await self._sweep()

    async def ready(self) -> None:
        """Everything listens: record the ports and start the heartbeat."""
        await self._beat()
        self._loop_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def stop(self) -> None:
        """Leave the cluster (after the MQTT server closed: own gateways are already disconnected)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        if self.relay is not None:
            if self.service is not None and self.relay in self.service.listeners:
                self.service.listeners.remove(self.relay)
            await self.relay.stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.hub is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(store.stop_node, self.engine, self.node_id, time.time())
        if self.bus is not None:
            await self.bus.close()
        self._control_pool.shutdown(wait=False)

    def readiness(self) -> dict[str, Any]:
        """For ``GET /ready``: registered (a heartbeat stored within ``node_timeout``, so the other
        nodes see this one alive) and the bus connected."""
        age = None if self.beat_ok_at is None else time.time() - self.beat_ok_at
        registered = age is not None and age < self.settings.node_timeout
        bus = self.bus is not None and bool(self.bus.connected)
        return {"node_id": self.node_id, "registered": registered, "heartbeat_age": age, "bus_connected": bus}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- heartbeat and the dead-node sweep ---------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self._beat()
            except Exception as exc:
                self.stats["heartbeat.failed"] += 1
                log.warning("heartbeat failed", error=str(exc)[:200] or type(exc).__name__)

    def links(self) -> int:
        fanout = getattr(getattr(self.hub, "openhub", None), "fanout", None)
        if fanout is None:
            return 0
        return sum(len(v) for v in fanout.links.values())

    async def _control(self, fn: Any, *args: Any) -> Any:
        """Run a heartbeat's database work on the node's own thread: in the default pool it queued
        behind thousands of gateway claims in a reconnect storm, the heartbeat came seconds late
        (with the time it was queued at), and nodes declared each other dead (bench/cluster.py)."""
        return await asyncio.get_running_loop().run_in_executor(self._control_pool, fn, *args)

    async def _beat(self) -> None:
        hub = self.hub
        info = {"links": self.links(), "mqtt_port": hub.mqtt_port, "http_port": hub.http_port}
        state = await self._control(lambda: store.heartbeat(self.engine, self.node_id, time.time(), info))
        self.beat_ok_at = time.time()
        if self.solo:
            return
        if state == "lost":
            # We were silent too long and another node swept our gateways: let them reconnect.
            log.warning("this node was declared dead; closing its gateways so they reconnect")
            for gw in list(self.held):
                self._release(gw)
        elif self.held:
            for gw in await self._control(store.not_owned, self.engine, self.node_id, list(self.held)):
                if gw in self.held and not self.claiming[gw]:
                    self.stats["takeover.by_reconcile"] += 1
                    self._release(gw)
        await self._sweep()

    async def _sweep(self) -> None:
        timeout = self.settings.node_timeout
        swept = await self._control(lambda: store.sweep_dead(self.engine, self.node_id, time.time(), timeout))
        if swept is None or not swept.nodes:
            return
        log.warning(
            "dead nodes swept", nodes=swept.nodes, devices=len(swept.devices), gateways=len(swept.gateways)
        )
        self.stats["sweep.nodes"] += len(swept.nodes)
        now = time.time()
        service = self.service
        for cid, product_id in swept.devices:
            dev = service.devices.get(cid)
            if dev is not None:
                dev.online = False
            service._emit(
                "presence",
                {"cid": cid, "online": False, "cause": "node-lost", "at": now, "product_id": product_id},
            )
        for gw in swept.gateways:
            service._emit("gateway", {"gateway_id": gw, "connected": False, "reason": "node-lost"})

    async def finish_drain(self, grace: float) -> int:
        """After a drain closed this node's gateways: give them ``grace`` s to reconnect to another
        node (its claim makes it the owner), then set the devices of those still owned here offline
        (cause ``node-drain``). Returns how many gateways that was."""
        if self.solo or not self.drained:
            return 0
        gws = sorted(self.drained)
        end = time.monotonic() + grace
        left = gws
        while True:
            taken = set(await asyncio.to_thread(store.not_owned, self.engine, self.node_id, gws))
            left = [gw for gw in gws if gw not in taken]
            if not left or time.monotonic() >= end:
                break
            await asyncio.sleep(0.2)
        self.drained.clear()
        if not left:
            return 0
        now = time.time()
        devices, gateways = await asyncio.to_thread(
            store.release_drained, self.engine, self.node_id, left, now
        )
        service = self.service
        for cid, product_id in devices:
            dev = service.devices.get(cid)
            if dev is not None:
                dev.online = False
            service._emit(
                "presence",
                {"cid": cid, "online": False, "cause": "node-drain", "at": now, "product_id": product_id},
            )
        for gw in gateways:
            service._emit("gateway", {"gateway_id": gw, "connected": False, "reason": "node-drain"})
        log.info("drained gateways not back within the grace", gateways=len(gateways), devices=len(devices))
        return len(gateways)

    # --- ownership and takeover ------------------------------------------------------------------

    def gateway_connected(self, gw: str) -> None:
        """An authenticated CONNECT was accepted here: claim the gateway."""
        self.claiming[gw] += 1
        if not self.solo:
            self.waiting.setdefault(gw, [])
        self._spawn(self._claim(gw))

    def gateway_disconnected(self, gw: str, reason: str) -> bool:
        """Whether the disconnect is to be recorded (False: another node holds the gateway now)."""
        if reason == "takeover":  # replaced by a new connection here: still held
            return True
        if reason == "node-drain" and not self.solo:  # finish_drain decides, after a grace
            if self.held.pop(gw, None) is not None:
                self.drained.add(gw)
            return False
        if self.held.pop(gw, None) is not None or self.solo:
            return True
        return self.claiming[gw] > 0

    async def _claim(self, gw: str) -> None:
        try:
            prev, gen = await self.claims.claim(gw)
        except Exception as exc:
            self.stats["claim.failed"] += 1
            log.error("gateway ownership not stored", gateway_id=gw, error=str(exc)[:200])
            self._open_gate(gw)
            self._claim_done(gw)
            return
        if not self.southbound.is_connected(gw):
            # Gone while the claim was stored: its disconnect may have been written before the claim.
            self.service.writer.submit([("gateway", {"gateway_id": gw, "connected": False})])
            self._open_gate(gw)
            self._claim_done(gw)
            return
        self.held[gw] = max(gen, self.held.get(gw, 0))
        try:
            if not self.solo:
                assert self.bus is not None
                await self.bus.publish(TAKEOVER, _encode({"gw": gw, "node": self.node_id, "gen": gen}))
                if prev != self.node_id:
                    await self._refresh(gw)
        except Exception as exc:
            log.warning("takeover not announced", gateway_id=gw, error=str(exc)[:200])
        finally:
            newer = self.superseded.get(gw, 0)  # announced by another node while we were claiming
            self._open_gate(gw)
            self._claim_done(gw)
        if newer > gen:
            self.stats["takeover.released"] += 1
            self._release(gw)

    def _claim_done(self, gw: str) -> None:
        self.claiming[gw] -= 1
        if self.claiming[gw] <= 0:
            del self.claiming[gw]
            self.superseded.pop(gw, None)

    def _open_gate(self, gw: str) -> None:
        waiting = self.waiting.pop(gw, None)
        if waiting and self.handler is not None:
            self.handler.release(waiting)

    async def _on_takeover(self, data: bytes) -> None:
        msg = _decode(data)
        if msg["node"] == self.node_id:
            return
        gw, gen = msg["gw"], int(msg["gen"])
        if self.claiming[gw]:  # decided when our claim is stored: the higher generation wins
            self.superseded[gw] = max(gen, self.superseded.get(gw, 0))
            return
        held = self.held.get(gw)
        if held is not None and held < gen:
            self.stats["takeover.released"] += 1
            self._release(gw)

    def _release(self, gw: str) -> None:
        """Another node holds the gateway now: close our connection without recording anything."""
        self.held.pop(gw, None)
        service = self.service
        for cid in service.by_gateway.get(gw, ()):
            dev = service.devices.get(cid)
            if dev is not None:
                dev.online = False  # memory only: the new holder keeps the stored presence
        if self.southbound.disconnect(gw, "takeover"):
            log.info("gateway taken over by another node: connection closed", gateway_id=gw)

    async def _refresh(self, gw: str) -> None:
        """Reload the gateway's devices (another node may have synced, moved or heard them)."""
        service = self.service
        cids = list(service.by_gateway.get(gw, ()))
        rows = await asyncio.to_thread(store.load_devices, self.engine, gw, cids)
        for row in rows:
            self._cache(row, held=row.gateway_id in self.held)
        monitor = getattr(self.hub, "alarms", None)
        if monitor is not None and rows:  # alarms raised or cleared by the previous holder
            monitor.replace(await asyncio.to_thread(monitor.read_devices, [r.cid for r in rows]))

    def _cache(self, row: Any, held: bool) -> None:
        """Put a device row into the service's device cache."""
        from meterhub.core.service import DeviceState

        service = self.service
        model = service.models.get(row.model) or service.default_model
        if model is None:
            return
        online = bool(row.online) and held
        dev = service.devices.get(row.cid)
        if dev is None:
            service._remember(
                DeviceState(
                    row.cid,
                    row.gateway_id,
                    row.product_id,
                    model,
                    online,
                    row.last_seen,
                    row.device_name,
                    row.vendor_id,
                )
            )
            return
        if dev.gateway_id != row.gateway_id:
            service.cache.move(dev, row.gateway_id)
        dev.product_id = row.product_id
        dev.model = model
        dev.name = row.device_name
        dev.vendor_id = row.vendor_id  # a device belongs to its vendor (moved only by an operator)
        if held:
            dev.online = bool(row.online)
            dev.last_heard = max(dev.last_heard, row.last_seen)
        else:
            dev.online = False

    def _on_remote_sync(self, cid: str) -> None:
        self._spawn(self._reload(cid))

    async def _reload(self, cid: str) -> None:
        rows = await asyncio.to_thread(store.load_devices, self.engine, None, [cid])
        for row in rows:
            self._cache(row, held=row.gateway_id in self.held)
        self.stats["cache.reloaded"] += 1

    async def products_changed(self) -> None:
        """A product was registered or re-mapped here: the other nodes reload their product map."""
        await self._cache_changed("products")

    async def bindings_changed(self) -> None:
        """Open hub user-device bindings changed here: the other nodes' fan-out reloads them."""
        await self._cache_changed("bindings")

    async def _cache_changed(self, what: str) -> None:
        if not self.solo:
            assert self.bus is not None
            await self.bus.publish(CACHE, _encode({"node": self.node_id, "what": what}))

    async def _on_cache_changed(self, data: bytes) -> None:
        msg = _decode(data)
        if msg.get("node") == self.node_id:
            return
        what = msg.get("what")
        if what == "products":
            from meterhub.storage import registry

            self.service.products = await asyncio.to_thread(registry.list_products, self.engine)
        elif what == "bindings":
            fanout = getattr(getattr(self.hub, "openhub", None), "fanout", None)
            if fanout is not None:
                await fanout.refresh_bindings()
        else:
            return
        self.stats[f"cache.{what}_reloaded"] += 1

    def _remote_sinks(self) -> list[Any]:
        sinks: list[Any] = []
        fanout = getattr(getattr(self.hub, "openhub", None), "fanout", None)
        if fanout is not None:
            sinks.append(fanout.on_event)
        app = getattr(getattr(self.hub, "api", None), "app", None)
        broker = getattr(getattr(app, "state", None), "web_stream", None)
        if broker is not None and broker.count:
            sinks.append(broker)
        return sinks

    # --- commands from any node ------------------------------------------------------------------

    async def route_command(self, cid: str, dp: Any, value: Any, timeout: float | None) -> Any:
        """The result of sending the command through the node holding the device's gateway, or None
        when it is to be handled here (held here, nobody holds it, or a cluster of one)."""
        if self.solo or _ROUTED.get():
            return None
        service = self.service
        dev = service.devices.get(cid)
        if dev is not None and self.southbound.is_connected(dev.gateway_id):
            return None
        route = await asyncio.to_thread(
            store.route_of, self.engine, cid, time.time(), self.settings.node_timeout
        )
        if route is None or not route.connected or not route.owner_alive:
            return None
        owner = route.owner_node
        if owner is None or owner == self.node_id:
            return None
        from meterhub.core.service import CommandResult

        wait = self.settings.command_timeout if timeout is None else timeout
        request = _encode({"cid": cid, "dp": dp, "value": value, "timeout": wait})
        assert self.bus is not None
        self.stats["commands.routed"] += 1
        try:
            reply = await self.bus.request(f"mh.node.{owner}.command", request, wait + 5.0)
        except BusError as exc:
            status = "timeout" if isinstance(exc, BusTimeout) else "rejected"
            self.stats[f"commands.routed_{status}"] += 1
            return CommandResult(
                str(uuid.uuid4()),
                cid,
                str(dp),
                status,
                None if status == "timeout" else int(ErrorCode.DEVICE_OFFLINE),
                f"node {owner} holding the gateway did not answer",
                value,
            )
        return CommandResult(**_decode(reply))

    async def sends_elsewhere(self, cid: str, dp: Any, value: Any) -> bool:
        """Whether a command the local checks would refuse as offline is sent through another node
        (a known device, a valid value, its gateway connected to another live node)."""
        if self.solo:
            return False
        dev = await self.service.find_device(cid)
        dp_obj = self.service.resolve_data_point(dev.model, dp) if dev is not None else None
        if dp_obj is None:
            return False
        try:
            dp_obj.check_command(value)
        except Exception:
            return False
        route = await asyncio.to_thread(
            store.route_of, self.engine, cid, time.time(), self.settings.node_timeout
        )
        return (
            route is not None
            and route.connected
            and route.owner_alive
            and route.owner_node not in (None, self.node_id)
        )

    async def _on_command(self, data: bytes) -> bytes:
        req = _decode(data)
        _ROUTED.set(True)
        result = await self.service.send_command(req["cid"], req["dp"], req["value"], timeout=req["timeout"])
        return _encode(dataclasses.asdict(result))

    # --- persistent MQTT sessions (meterhub.mqtt.session_store) -----------------------------------

    def use_session_store(self, store: Any) -> None:
        """With other nodes: a session stored as held by another node is asked from it first, and
        messages for a session handed to another node are forwarded there."""
        if not self.solo:
            store.hand_over = self._ask_hand_over
            if self.southbound is not None:
                self.southbound.forward = self._forward

    async def _ask_hand_over(self, node: str, client_id: str) -> None:
        """Ask ``node`` to close ``client_id``'s connection and store its session; returns once
        it has (the caller bounds the wait)."""
        assert self.bus is not None
        self.stats["sessions.hand_over_asked"] += 1
        request = _encode({"cid": client_id, "to": self.node_id})
        await self.bus.request(f"mh.node.{node}.session", request, 5.0)

    async def _on_hand_over(self, data: bytes) -> bytes:
        msg = _decode(data)
        await self.southbound.hand_over(msg["cid"], msg.get("to"))
        return b"{}"

    def _forward(self, node: str, client_id: str, topic: str, payload: bytes, qos: int, hops: int) -> None:
        """A QoS>0 message for a session this node handed to ``node``: send it there (in order per
        client: one request at a time per client id would cost a round trip each; NATS keeps the
        order of one publisher's messages to one subscriber)."""
        self.stats["sessions.forwarded"] += 1
        body = {"cid": client_id, "topic": topic, "payload": base64.b64encode(payload).decode(), "qos": qos}
        self._spawn(self._send_forward(node, _encode({**body, "hops": hops})))

    async def _send_forward(self, node: str, data: bytes) -> None:
        assert self.bus is not None
        try:
            reply = await self.bus.request(f"mh.node.{node}.deliver", data, 5.0)
        except BusError:
            self.stats["sessions.forward_failed"] += 1
            log.warning("message for a handed-over session not delivered: node did not answer", node=node)
            return
        if not _decode(reply).get("ok"):
            self.stats["sessions.forward_refused"] += 1

    async def _on_deliver(self, data: bytes) -> bytes:
        msg = _decode(data)
        ok = self.southbound.deliver_forwarded(
            msg["cid"], msg["topic"], base64.b64decode(msg["payload"]), int(msg["qos"]), int(msg["hops"])
        )
        return _encode({"ok": ok})

    # --- status ------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        nodes = await asyncio.to_thread(store.list_nodes, self.engine)
        now = time.time()
        timeout = self.settings.node_timeout
        out = []
        for info in nodes:
            alive = info.state == "alive" and now - info.heartbeat_at <= timeout
            out.append(
                {
                    "node_id": info.node_id,
                    "state": ("alive" if alive else "dead") if info.state == "alive" else info.state,
                    "version": info.version,
                    "host": info.host,
                    "mqtt_port": info.mqtt_port,
                    "http_port": info.http_port,
                    "started_at": info.started_at,
                    "heartbeat_age": round(now - info.heartbeat_at, 3),
                    "gateways": info.gateways,
                    "links": self.links() if info.node_id == self.node_id else info.links,
                    "self": info.node_id == self.node_id,
                }
            )
        return {
            "node_id": self.node_id,
            "bus": self.bus.kind if self.bus is not None else None,
            "node_timeout": timeout,
            "heartbeat_interval": self.settings.heartbeat_interval,
            "held": len(self.held),
            "stats": dict(self.stats),
            "nodes": out,
        }
