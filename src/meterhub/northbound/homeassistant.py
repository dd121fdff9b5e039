"""Home Assistant publisher: meterhub's meters on an MQTT broker the user runs, by MQTT discovery.

Enabled by ``ha_broker`` (``mqtt://host:1883`` or ``mqtts://host:8883``; ``ha_username``,
``ha_password``, ``ha_tls_ca``, ``ha_tls_insecure``). What goes where is in ``ha_discovery``.

Off the gateways' hot path: the service's event listener (:meth:`on_event`) only records the newest
value per (meter, data point) in a bounded map of meters waiting to be published (``ha_queue_max``;
when full, the meter waiting longest is dropped and counted, ``ha.dropped``; if it held a config or a
presence change, everything is republished from the database soon after); one task publishes them.
Before publishing, it waits for a storage barrier (an empty write group: the writer commits in order),
so what Home Assistant sees is committed. A slow broker only makes the map coalesce more; an absent one
costs nothing: while disconnected nothing is recorded, and every (re)connection publishes everything
again from the database (configs, presence, latest values). Reconnection uses exponential backoff with
jitter and logs one warning per outage (and one line when it is over).

On every connection meterhub also reads back its own retained configs (``<prefix>/+/<node>/+/config``)
and removes (empty retained payload) those of meters no longer in the database; the same check runs
every ``ha_resync_interval`` seconds, so a meter deleted by any process disappears from Home Assistant.
Home Assistant's birth message (``<prefix>/status`` = ``online``) triggers a full republish.

Commands: ``ON`` / ``OFF`` on a switch's command topic become ``ProtocolService.send_command`` (at most
one in flight per meter and data point; a newer command waits and replaces older waiting ones).
Retained command messages are ignored (a retained ``OFF`` would switch the meter off at every restart).
After the meter accepts (code 0) the new state is published at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from sqlalchemy import Engine, select

from meterhub.config import Settings
from meterhub.logs import get_logger
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.northbound import ha_discovery as hd
from meterhub.storage import schema

log = get_logger(__name__)

#: Publishes awaiting their PUBACK at once (one window, then the next).
WINDOW = 100
#: Devices per database query and per burst of configs.
CHUNK = 500
#: Commands from Home Assistant in flight at once (more are dropped and counted).
MAX_COMMANDS = 1000
_LOG_EVERY = 60.0
#: A connection that lasted this long resets the reconnection backoff (a broker that accepts and then
#: drops the client at once is not hammered).
STABLE_SECONDS = 10.0
#: Shortest time between two full republications after dropped config or presence changes.
FULL_SYNC_INTERVAL = 5.0


@dataclass(slots=True)
class _Pending:
    """A meter's changes waiting to be published: newest value per data point code wins."""

    values: dict[str, tuple[DataPoint, Any]] = field(default_factory=dict)
    online: bool | None = None
    config: bool = False


class HomeAssistantPublisher:
    """One connection to the Home Assistant broker for a hub (see the module docstring)."""

    reconnect_base = 0.5
    reconnect_cap = 30.0
    birth_delay = 1.0  # republish after Home Assistant's birth within uniform(0, birth_delay) s

    def __init__(self, settings: Settings, service: Any, engine: Engine, writer: Any) -> None:
        assert settings.ha_broker
        self.broker = hd.parse_broker(settings.ha_broker)
        self.username = settings.ha_username or self.broker.username
        self.password = settings.ha_password or self.broker.password
        self.settings = settings
        self.service = service
        self.engine = engine
        self.writer = writer
        self.topics = hd.Topics(settings.ha_discovery_prefix, settings.ha_base_topic)
        self.client_id = settings.ha_client_id or f"meterhub-{socket.gethostname()}"[:64]
        self.queue_max = settings.ha_queue_max
        self.resync_interval = settings.ha_resync_interval
        self.stats: Counter[str] = Counter()
        self.pending: OrderedDict[str, _Pending] = OrderedDict()
        self.announced: dict[str, ProductModel] = {}  # cid -> model whose configs are published
        self.by_slug: dict[str, str] = {}
        self.connected = False
        self._ssl = self._ssl_context() if self.broker.tls or settings.ha_tls_ca else None
        self._wake = asyncio.Event()
        self._birth = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._commands: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._next_command: dict[tuple[str, str], bool] = {}
        self._scan: dict[str, dict[str, bytes]] | None = None
        self._scan_known: set[str] = set()
        self._probe: tuple[str, asyncio.Event] | None = None
        self._logged: dict[str, float] = {}
        self._lost = False
        self._next_full = 0.0
        self._last_drain = 0.0
        self.publish_interval = settings.ha_publish_interval

    def _ssl_context(self) -> ssl.SSLContext:
        ca = self.settings.ha_tls_ca
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if self.settings.ha_tls_insecure:
            ctx.check_hostname = False
        return ctx

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.service.listeners.append(self.on_event)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.service.listeners.remove(self.on_event)
        client = self._client
        if client is not None and self.connected:
            # A clean DISCONNECT does not fire the will: say offline ourselves.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.publish(self.topics.bridge, hd.OFFLINE, 1, True), 2)
        for task in (self._task, *self._commands.values()):
            if task is not None:
                task.cancel()
        for task in (self._task, *self._commands.values()):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # --- the service's listener (hot path: O(1), no I/O) -----------------------------------------

    def on_event(self, kind: str, event: dict[str, Any]) -> None:
        if not self.connected:
            return  # everything is republished from the database on the next connection
        if kind == "report":
            dp = event["dp"]
            if not hd.mapped(dp):
                return
            rec = self._record(event["cid"])
            if dp.code in rec.values:
                self.stats["ha.coalesced"] += 1
            rec.values[dp.code] = (dp, event["value"])
        elif kind == "presence":
            self._record(event["cid"]).online = bool(event["online"])
        elif kind == "sync":
            self._record(event["cid"]).config = True
        else:
            return
        self._wake.set()

    def _record(self, cid: str) -> _Pending:
        pending = self.pending
        rec = pending.get(cid)
        if rec is None:
            if len(pending) >= self.queue_max:
                _, lost = pending.popitem(last=False)
                self.stats["ha.dropped"] += 1
                if lost.config or lost.online is not None:
                    self._lost = True  # a config or presence change: republish from the database
                self._log_once(
                    "dropped",
                    "Home Assistant broker is slow: oldest waiting meter updates dropped (counted)",
                    dropped=self.stats["ha.dropped"],
                )
            rec = pending[cid] = _Pending()
        return rec

    def _log_once(self, key: str, message: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[key] = now
            log.warning(message, **kw)

    # --- connection ------------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        outage_since: float | None = None
        broker = f"{self.broker.host}:{self.broker.port}"
        while True:
            client = aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                username=self.username,
                password=self.password,
                identifier=self.client_id,
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=True,
                keepalive=30,
                timeout=10,
                tls_context=self._ssl,
                will=aiomqtt.Will(self.topics.bridge, hd.OFFLINE, 1, True),
                max_inflight_messages=WINDOW,
            )
            client.pending_calls_threshold = WINDOW * 10
            session_started: float | None = None
            try:
                async with client:
                    self.stats["ha.connects"] += 1
                    if outage_since is not None:
                        log.info(
                            "Home Assistant broker reachable again",
                            broker=broker,
                            outage_seconds=round(time.monotonic() - outage_since, 1),
                        )
                        outage_since = None
                    else:
                        log.info("connected to the Home Assistant broker", broker=broker)
                    session_started = time.monotonic()
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.stats["ha.connection_errors"] += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning(
                        "Home Assistant broker unreachable; retrying with backoff (one line per outage)",
                        broker=broker,
                        error=str(exc) or type(exc).__name__,
                    )
            except Exception:
                self.stats["ha.errors"] += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                log.exception("Home Assistant publisher failed; reconnecting", broker=broker)
            finally:
                self.connected = False
                self._client = None
                self.pending.clear()
                self._scan = None
            if session_started is not None and time.monotonic() - session_started >= STABLE_SECONDS:
                attempt = 0  # a connection that lasted: back off from the base again
            delay = random.uniform(
                self.reconnect_base,
                max(self.reconnect_base, min(self.reconnect_cap, self.reconnect_base * 2**attempt)),
            )
            attempt = min(attempt + 1, 20)
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        self._client = client
        await client.subscribe(self.topics.commands, qos=1)
        await client.subscribe(self.topics.birth, qos=1)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._reader(client))
        worker = loop.create_task(self._work(client))
        try:
            done, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the session
        finally:
            for task in (reader, worker):
                task.cancel()
            for task in (reader, worker):
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _work(self, client: aiomqtt.Client) -> None:
        self.connected = True  # record events from now on...
        await self._barrier()  # ...and what was emitted before is committed: the database has it
        await self._full_sync(client, scan=True)
        next_check = time.monotonic() + self.resync_interval
        while True:
            deadline = min(next_check, self._next_full) if self._lost else next_check
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))
            self._wake.clear()
            if self._birth.is_set():
                self._birth.clear()
                await asyncio.sleep(random.uniform(0, self.birth_delay))
                await self._barrier()
                await self._full_sync(client, scan=False)
            if self.pending:
                # At most one batch per publish interval: meanwhile each meter's values coalesce.
                rest = self._last_drain + self.publish_interval - time.monotonic()
                if rest > 0:
                    await asyncio.sleep(rest)
                self._last_drain = time.monotonic()
                await self._drain(client)
            if self._lost and time.monotonic() >= self._next_full:
                # Dropped updates held a config or presence change: everything again from the database
                # (at most every FULL_SYNC_INTERVAL seconds; values alone are simply newer next time).
                self._lost = False
                self.stats["ha.resyncs"] += 1
                await self._barrier()
                await self._full_sync(client, scan=False)
                self._next_full = time.monotonic() + FULL_SYNC_INTERVAL
            if time.monotonic() >= next_check:
                await self._remove_deleted(client)
                next_check = time.monotonic() + self.resync_interval

    async def _barrier(self) -> None:
        """Wait until everything submitted to storage so far is committed (the writer keeps order)."""
        with contextlib.suppress(Exception):
            await self.writer.write([])

    async def _publish(self, client: aiomqtt.Client, messages: Iterable[tuple[str, bytes | str]]) -> None:
        """Publish retained, QoS 1, ``WINDOW`` at a time (each window waits for its PUBACKs)."""
        batch: list[Any] = []
        for topic, payload in messages:
            batch.append(client.publish(topic, payload, 1, True))
            if len(batch) >= WINDOW:
                await asyncio.gather(*batch)
                self.stats["ha.published"] += len(batch)
                batch = []
        if batch:
            await asyncio.gather(*batch)
            self.stats["ha.published"] += len(batch)

    # --- incoming ---------------------------------------------------------------------------------

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                self._dispatch(topic, payload, bool(message.retain))
            except Exception:
                self.stats["ha.errors"] += 1
                log.exception("Home Assistant message handling failed", topic=topic[:200])

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.topics.birth:
            if payload == b"online" and not retained:  # a retained one: we just published everything
                self._birth.set()
                self._wake.set()
            return
        probe = self._probe
        if probe is not None and topic == probe[0]:
            probe[1].set()
            return
        if topic.endswith("/config"):
            if self._scan is not None and payload:
                cid = hd.cid_of_config(payload)
                if cid is not None:
                    # Payloads only for meters that are gone (to clear what they point at); for the
                    # others the topic is enough (entities their model no longer has).
                    keep = b"" if cid in self._scan_known else payload
                    self._scan.setdefault(cid, {})[topic] = keep
            return
        parsed = self.topics.parse_command(topic)
        if parsed is not None:
            self._on_command(parsed[0], parsed[1], payload, retained)

    def _on_command(self, dev_slug: str, code: str, payload: bytes, retained: bool) -> None:
        if retained:
            self.stats["ha.commands.retained_ignored"] += 1
            self._log_once("retained", "retained Home Assistant command ignored", device=dev_slug, code=code)
            return
        cid = self.by_slug.get(dev_slug)
        specs = hd.ENTITIES.get(code)
        if cid is None or specs is None or specs[0].component != "switch":
            self.stats["ha.commands.unknown"] += 1
            self._log_once(
                "unknown", "Home Assistant command for an unknown entity", device=dev_slug, code=code
            )
            return
        text = payload.decode(errors="replace").strip()
        if text not in (hd.ON, hd.OFF):
            self.stats["ha.commands.invalid"] += 1
            self._log_once("invalid", "Home Assistant command payload is not ON/OFF", payload=text[:40])
            return
        key = (cid, code)
        if key in self._commands:
            if key in self._next_command:
                self.stats["ha.commands.superseded"] += 1
            self._next_command[key] = text == hd.ON
            return
        if len(self._commands) >= MAX_COMMANDS:
            self.stats["ha.commands.dropped"] += 1
            self._log_once("commands", "too many Home Assistant commands in flight: dropped (counted)")
            return
        task = asyncio.get_running_loop().create_task(self._command(cid, code, text == hd.ON))
        self._commands[key] = task
        task.add_done_callback(lambda _t, key=key: self._commands.pop(key, None))

    async def _command(self, cid: str, code: str, value: bool) -> None:
        key = (cid, code)
        while True:
            try:
                result = await self.service.send_command(cid, code, value)
            except Exception:
                self.stats["ha.errors"] += 1
                self._next_command.pop(key, None)
                log.exception("Home Assistant command failed", cid=cid, code=code)
                return
            self.stats[f"ha.commands.{result.status}"] += 1
            if result.status == "ok":
                dev = self.service.devices.get(cid)
                dp = dev.model.by_code(code) if dev is not None else None
                if dp is not None and self.connected:
                    self._record(cid).values[code] = (dp, result.value)
                    self._wake.set()
            else:
                log.info(
                    "Home Assistant command not applied",
                    cid=cid,
                    code=code,
                    status=result.status,
                    result_code=result.code,
                    msg=result.msg,
                )
            if key not in self._next_command:
                return
            value = self._next_command.pop(key)

    # --- publishing -------------------------------------------------------------------------------

    def _model(self, name: str | None) -> ProductModel | None:
        models = self.service.models
        return (models.get(name) if name else None) or self.service.default_model

    async def _full_sync(self, client: aiomqtt.Client, *, scan: bool) -> None:
        """Everything again: configs, presence, latest values from the database; with ``scan``, first
        read back our retained configs and remove those of meters that are gone."""
        found: dict[str, dict[str, bytes]] = {}
        cids = await asyncio.to_thread(_all_cids, self.engine)
        known = set(cids)
        if scan:
            self._scan_known = known
            try:
                found = await self._read_our_configs(client)
            finally:
                self._scan_known = set()
        stale = [cid for cid in found if cid not in known]
        for cid in stale:
            await self._clear(client, found[cid])
            self.stats["ha.removed"] += 1
        await self._publish(client, [(self.topics.bridge, hd.ONLINE)])
        for start in range(0, len(cids), CHUNK):
            chunk = cids[start : start + CHUNK]
            rows = await asyncio.to_thread(_devices, self.engine, chunk)
            messages: list[tuple[str, bytes | str]] = []
            for row in rows:
                info, model = self._info(row)
                if model is None:
                    continue
                configs = self._announce(info, model)
                old = found.get(info.cid, {})
                messages.extend((t, b"") for t in old if t not in configs)  # entities the model lost
                messages.extend(configs.items())
                messages.append(
                    (self.topics.availability(info.cid), hd.ONLINE if info.online else hd.OFFLINE)
                )
            await self._publish(client, messages)
            values = await asyncio.to_thread(_latest, self.engine, chunk)
            await self._publish(client, self._value_messages(values))

    async def _read_our_configs(self, client: aiomqtt.Client) -> dict[str, dict[str, bytes]]:
        """Our retained configs on the broker, by cid: subscribe, then a probe message on a topic of our
        own marks the end (the broker delivers in order)."""
        self._scan = {}
        probe = (f"{self.topics.base}/probe/{uuid.uuid4().hex}", asyncio.Event())
        self._probe = probe
        try:
            await client.subscribe(self.topics.our_configs, qos=1)
            await client.subscribe(probe[0], qos=1)
            await client.publish(probe[0], b"1", 1, False)
            try:
                await asyncio.wait_for(probe[1].wait(), 10)
            except TimeoutError:
                log.warning("reading back retained Home Assistant configs timed out; stale ones stay")
            await client.unsubscribe(self.topics.our_configs)
            await client.unsubscribe(probe[0])
            return self._scan
        finally:
            self._scan = None
            self._probe = None

    def _info(self, row: Any) -> tuple[hd.DeviceInfo, ProductModel | None]:
        info = hd.DeviceInfo(
            cid=row.cid,
            name=row.device_name,
            manufacturer=row.vendor_code or row.vendor_name,
            model=row.product_sub_type or row.product_id,
            model_id=row.product_id,
            suggested_area=row.install_location,
            mac_address=row.mac_address,
            online=bool(row.online),
        )
        return info, self._model(row.model)

    def _announce(self, info: hd.DeviceInfo, model: ProductModel) -> dict[str, bytes]:
        self.announced[info.cid] = model
        self.by_slug[hd.slug(info.cid)] = info.cid
        return hd.discovery_configs(self.topics, info, model)

    def _value_messages(self, rows: Sequence[Any]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for cid, dp_id, stored in rows:
            model = self.announced.get(cid)
            dp = model.get(dp_id) if model is not None else None
            if dp is None or not hd.mapped(dp):
                continue
            try:
                value = dp.coerce(stored)
            except Exception:
                continue
            out.extend(hd.state_messages(self.topics, cid, dp, value))
        return out

    async def _drain(self, client: aiomqtt.Client) -> None:
        if self.pending:
            batch, self.pending = self.pending, OrderedDict()
            await self._barrier()  # every value in the batch is committed now
            need = [cid for cid, rec in batch.items() if rec.config or cid not in self.announced]
            messages: list[tuple[str, bytes | str]] = []
            for start in range(0, len(need), CHUNK):
                rows = await asyncio.to_thread(_devices, self.engine, need[start : start + CHUNK])
                for row in rows:
                    info, model = self._info(row)
                    if model is None:
                        continue
                    previous = self.announced.get(info.cid)
                    configs = self._announce(info, model)
                    if previous is not None and previous is not model:  # a model change: drop lost entities
                        old = hd.discovery_configs(self.topics, hd.DeviceInfo(info.cid), previous)
                        messages.extend((t, b"") for t in old if t not in configs)
                    messages.extend(configs.items())
                    avail = hd.ONLINE if info.online else hd.OFFLINE
                    messages.append((self.topics.availability(info.cid), avail))
            for cid, rec in batch.items():
                if cid not in self.announced:
                    continue  # not in the database (deleted)
                if rec.online is not None:
                    messages.append((self.topics.availability(cid), hd.ONLINE if rec.online else hd.OFFLINE))
                for dp, value in rec.values.values():
                    messages.extend(hd.state_messages(self.topics, cid, dp, value))
            await self._publish(client, messages)

    async def _remove_deleted(self, client: aiomqtt.Client) -> None:
        """Remove from Home Assistant the meters no longer in the database."""
        known = set(await asyncio.to_thread(_all_cids, self.engine))
        for cid in [c for c in self.announced if c not in known]:
            model = self.announced.pop(cid)
            self.by_slug.pop(hd.slug(cid), None)
            configs = hd.discovery_configs(self.topics, hd.DeviceInfo(cid), model)
            clear = list(configs) + hd.retained_topics(self.topics, cid, model)
            await self._publish(client, [(t, b"") for t in clear])
            self.stats["ha.removed"] += 1
            log.info("meter removed from Home Assistant", cid=cid)

    async def _clear(self, client: aiomqtt.Client, configs: dict[str, bytes]) -> None:
        topics: list[str] = []
        for topic, payload in configs.items():
            topics.append(topic)
            topics.extend(hd.topics_in_config(payload, self.topics.bridge))
        await self._publish(client, [(t, b"") for t in dict.fromkeys(topics)])


# --- database (worker threads) --------------------------------------------------------------------


def _all_cids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(schema.devices.c.cid).order_by(schema.devices.c.cid)).scalars())


def _devices(engine: Engine, cids: Sequence[str]) -> list[Any]:
    d, g, v = schema.devices, schema.gateways, schema.vendors
    query = (
        select(
            d.c.cid,
            d.c.model,
            d.c.product_id,
            d.c.product_sub_type,
            d.c.device_name,
            d.c.vendor_code,
            d.c.install_location,
            d.c.mac_address,
            d.c.online,
            v.c.name.label("vendor_name"),
        )
        .select_from(d.outerjoin(g, g.c.gateway_id == d.c.gateway_id).outerjoin(v, v.c.id == g.c.vendor_id))
        .where(d.c.cid.in_(list(cids)))
    )
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def _latest(engine: Engine, cids: Sequence[str]) -> list[tuple[str, str, Any]]:
    """``(cid, dp_id, canonical value)`` of the meters' latest values (filtered by model later: the
    data point ids of the mapped codes may differ between models)."""
    lv = schema.latest
    query = select(lv.c.cid, lv.c.dp_id, lv.c.value).where(lv.c.cid.in_(list(cids)))
    with engine.connect() as conn:
        return [(r.cid, r.dp_id, r.value) for r in conn.execute(query)]
