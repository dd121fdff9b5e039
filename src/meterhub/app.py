"""Assembles a running meterhub: storage, writer, protocol services, MQTT listeners.

``Hub`` is what ``meterhub serve`` runs and what tests start in-process (``await hub.start()``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import ssl
from typing import Any

from meterhub.config import Settings
from meterhub.core import gcwatch
from meterhub.core.auth import GatewayAuthenticator, ThrottledAuthenticator
from meterhub.core.intake import IntakeGate
from meterhub.core.throttle import LoginThrottle
from meterhub.logs import get_logger, set_repeat_interval
from meterhub.mqtt.server import Limits, MQTTServer, fit_to_fd_limit
from meterhub.storage.database import GroupCommitWriter, create_db_engine, migrate
from meterhub.storage.lock import ServerLock
from meterhub.storage.maintenance import StorageMaintenance
from meterhub.tools.echo import EchoHandler

log = get_logger(__name__)


class StartupError(Exception):
    """meterhub cannot start (a port is taken, ...): the message is one line for the operator."""


def check_ports_free(settings: Settings) -> None:
    """Raise :class:`StartupError` if a configured listening port is taken, before anything else
    happens (so a server that cannot listen changes nothing in the database). Port 0 is not checked;
    a port taken in the moment between this check and the listener still fails the start, cleanly."""
    wanted = [
        ("MQTT", settings.mqtt_host, settings.mqtt_port),
        ("HTTP", settings.http_host, settings.http_port),
    ]
    if settings.tls_port is not None:
        wanted.append(("MQTT TLS", settings.mqtt_host, settings.tls_port))
    if settings.ws_port is not None:
        wanted.append(("WebSocket", settings.mqtt_host, settings.ws_port))
    for what, host, port in wanted:
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, type_, proto, _, addr = infos[0]
            with socket.socket(family, type_, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
                probe.bind(addr)
        except OSError as exc:
            raise StartupError(_listen_problem(what, host, port, exc)) from None


def _listen_problem(what: str, host: str, port: int, exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = " (another meterhub or broker?)" if exc.errno == errno.EADDRINUSE else ""
    return f"cannot listen for {what} on {host or '*'}:{port}: {reason}{hint}"


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_port is None:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("tls_port is set but tls_cert / tls_key are not")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


class Hub:
    """One meterhub process. ``handler`` is ``"protocol"`` (the edge protocol) or ``"echo"``."""

    def __init__(self, settings: Settings, *, handler: str = "protocol") -> None:
        self.settings = settings
        self.handler_name = handler
        self.engine = create_db_engine(
            settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        self.writer: GroupCommitWriter | None = None
        self.storage_maintenance: StorageMaintenance | None = None
        self.mqtt: MQTTServer | None = None
        self.handler: Any = None
        self.mqtt_port: int | None = None
        self.tls_port: int | None = None
        self.api: Any = None
        self.alarms: Any = None
        self.notifier: Any = None
        self.http_port: int | None = None
        self.openhub: Any = None
        self.homeassistant: Any = None
        self.http_routers: list[Any] = []
        self.lock = ServerLock.for_url(settings.resolved_database_url)
        self.cluster: Any = None
        self.conformance: Any = None  # meterhub.core.conformance_store.ConformanceStore
        self.draining = False

    async def start(self) -> None:
        """Start everything. First the embedded database's lock (:class:`DataDirInUse` when another
        server holds it) and a check of the ports (:class:`StartupError`): both before the database
        is touched."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        check_ports_free(settings)
        set_repeat_interval(settings.log_repeat_interval)
        gcwatch.install()
        await asyncio.to_thread(migrate, self.engine)
        # partitions, rollup zone and retention before the first report is written (then hourly)
        self.storage_maintenance = StorageMaintenance(
            self.engine,
            zone=settings.timezone,
            raw_days=settings.retention_raw_days,
            rollup_days=settings.retention_rollup_days,
            interval=settings.storage_maintenance_interval,
            rollup_interval=settings.rollup_interval,
        )
        await self.storage_maintenance.start()
        loop = asyncio.get_running_loop()
        self.writer = GroupCommitWriter(
            self.engine,
            loop,
            batch_max=settings.batch_max,
            high_water=settings.max_queued_writes,
            linger=settings.commit_linger,
        )
        self.writer.start()
        writer = self.writer
        authenticator: Any = GatewayAuthenticator(self.engine, healthy=writer.admits_clients)
        self.login_throttle = LoginThrottle(
            window=settings.login_fail_window,
            client_budget=settings.login_fail_budget_client,
            source_budget=settings.login_fail_budget_source,
            ban_seconds=settings.login_ban_seconds,
        )
        limits = Limits.from_settings(settings)
        fit_to_fd_limit(limits)
        if self.handler_name == "echo":
            self.handler = EchoHandler()
            self.mqtt = MQTTServer(
                ThrottledAuthenticator(authenticator, self.login_throttle), self.handler, limits
            )
            self.handler.southbound = self.mqtt
        else:
            from meterhub.cluster.node import ClusterNode
            from meterhub.core.service import ProtocolService
            from meterhub.openhub.component import OpenHub
            from meterhub.openhub.http import OpenHubAPI

            # A cluster of one (in-process bus) unless bus_url names NATS: see docs/cluster.md.
            self.cluster = ClusterNode(settings, self.engine)
            await self.cluster.connect()
            self.handler = ProtocolService(settings, self.engine, self.writer)
            self.handler.presence_scope = self.cluster.reset_scope
            self.openhub = OpenHub(self)
            authenticator = ThrottledAuthenticator(
                self.openhub.authenticator(authenticator), self.login_throttle
            )
            gateways = self.cluster.wrap(self.handler)
            self.mqtt = MQTTServer(authenticator, gateways, limits)
            await self.handler.start(self.mqtt)
            await self.cluster.start(self)
        # Reading from gateways pauses while storage is behind or too many syncs are in flight.
        gate = IntakeGate(self.mqtt.set_intake_paused)
        writer.on_pressure = gate.setter("storage")
        if self.handler_name != "echo":
            self.handler.on_pressure = gate.setter("syncs")
        self.conformance = self._conformance_store(writer)
        self.mqtt.store = self._session_store(writer, limits)
        self.login_throttle.stats = self.mqtt.stats  # counted with the server's events (metrics)
        self.mqtt_port = await self.mqtt.listen(
            settings.mqtt_host, settings.mqtt_port, proxy_protocol=settings.proxy_protocol
        )
        ctx = make_ssl_context(settings)
        if ctx is not None and settings.tls_port is not None:
            self.tls_port = await self.mqtt.listen(settings.mqtt_host, settings.tls_port, ctx)
        if self.openhub is not None:
            await self.openhub.start()
            from meterhub.cluster.api import cluster_router, ready_router
            from meterhub.openhub.device_api import DeviceAPI

            openhub_api = OpenHubAPI(self)
            devices_api = DeviceAPI(self, openhub_api)
            # the device API's catch-all for other Tuya paths goes last
            self.http_routers = [
                openhub_api.router,
                devices_api.router,
                cluster_router(self),
                ready_router(self),
                devices_api.fallback,
            ]
        from meterhub.api.server import ApiServer

        self.api = ApiServer(self)
        self.http_port = await self.api.start()
        if settings.ha_broker and self.handler_name == "protocol":
            from meterhub.northbound.homeassistant import HomeAssistantPublisher

            self.homeassistant = HomeAssistantPublisher(settings, self.handler, self.engine, self.writer)
            await self.homeassistant.start()
        if self.cluster is not None:
            await self.cluster.ready()

    async def drain(self) -> None:
        """Before :meth:`stop` on SIGTERM: stop accepting, answer what was read, close gateway
        connections (they reconnect to other nodes), give them ``drain_grace`` to do so
        (:mod:`meterhub.mqtt.drain`, docs/cluster.md)."""
        from meterhub.mqtt.drain import drain

        self.draining = True  # GET /ready answers 503 from now on: the balancer sends nobody new
        if self.mqtt is not None:
            await drain(self.mqtt, self.settings.drain_timeout)
        if self.cluster is not None:
            await self.cluster.finish_drain(self.settings.drain_grace)

    def _conformance_store(self, writer: GroupCommitWriter) -> Any:
        """Gateways' conformance records in the database (meterhub.core.conformance_store)."""
        from meterhub.core.conformance_store import ConformanceStore

        service = self.handler if self.handler_name != "echo" else None
        store = ConformanceStore(
            self.engine, writer, service, self.mqtt, self.settings.conformance_flush_interval
        )
        store.stats = self.mqtt.stats if self.mqtt is not None else None
        store.start()
        return store

    def _session_store(self, writer: GroupCommitWriter, limits: Limits) -> Any:
        """Persistent MQTT sessions in the database (meterhub.mqtt.session_store)."""
        from meterhub.mqtt.session_store import SessionStore

        node_id = self.cluster.node_id if self.cluster is not None else (self.settings.node_id or "local")
        store = SessionStore(self.engine, writer, node_id, expiry=limits.session_expiry)
        assert self.mqtt is not None
        store.stats = self.mqtt.stats
        if self.cluster is not None:
            self.cluster.use_session_store(store)
        return store

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.stop()
        if self.homeassistant is not None:
            await self.homeassistant.stop()
        if self.openhub is not None:
            await self.openhub.stop()
        if self.mqtt is not None:
            await self.mqtt.close()
        if self.conformance is not None:
            await self.conformance.close()
        if self.handler is not None and hasattr(self.handler, "stop"):
            await self.handler.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.storage_maintenance is not None:
            await self.storage_maintenance.stop()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        self.engine.dispose()
        self.lock.release()


async def start_or_explain(hub: Hub) -> None:
    """``hub.start()``; when it fails the hub is stopped again (its lock released), and an OSError (a
    listener that could not bind after all) becomes a one-line :class:`StartupError`."""
    try:
        await hub.start()
    except OSError as exc:
        await hub.stop()
        raise StartupError(f"cannot start: {exc}") from None
    except BaseException:
        await hub.stop()
        raise


async def serve(settings: Settings, *, handler: str = "protocol") -> None:
    """Run until SIGINT/SIGTERM."""
    hub = Hub(settings, handler=handler)
    await start_or_explain(hub)
    gcwatch.tune_for_server(gcwatch.young_threshold_for(settings.max_queued_writes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("meterhub running", mqtt_port=hub.mqtt_port, tls_port=hub.tls_port, handler=handler)
    try:
        await stop.wait()
        stop.clear()
        log.info("meterhub draining (a second signal stops at once)")
        drain = asyncio.ensure_future(hub.drain())
        again = asyncio.ensure_future(stop.wait())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, again):
            task.cancel()
        if drain.done() and not drain.cancelled() and drain.exception() is not None:
            log.error("drain failed", error=repr(drain.exception())[:200])
    finally:
        log.info("meterhub stopping")
        await hub.stop()


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
