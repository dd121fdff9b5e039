"""Assembles a running meterhub: storage, writer, protocol services, MQTT listeners.

``Hub`` is what ``meterhub serve`` runs and what tests start in-process (``await hub.start()``).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from typing import Any

from meterhub.config import Settings
from meterhub.core import gcwatch
from meterhub.core.auth import GatewayAuthenticator
from meterhub.logs import get_logger
from meterhub.mqtt.server import Limits, MQTTServer, fit_to_fd_limit
from meterhub.storage.database import GroupCommitWriter, create_db_engine, migrate
from meterhub.tools.echo import EchoHandler

log = get_logger(__name__)


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
        self.mqtt: MQTTServer | None = None
        self.handler: Any = None
        self.mqtt_port: int | None = None
        self.tls_port: int | None = None
        self.api: Any = None
        self.alarms: Any = None
        self.http_port: int | None = None
        self.openhub: Any = None
        self.http_routers: list[Any] = []
        self.cluster: Any = None

    async def start(self) -> None:
        settings = self.settings
        gcwatch.install()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate, self.engine)
        loop = asyncio.get_running_loop()
        self.writer = GroupCommitWriter(
            self.engine, loop, batch_max=settings.batch_max, high_water=settings.max_queued_writes
        )
        self.writer.start()
        writer = self.writer
        authenticator: Any = GatewayAuthenticator(self.engine, healthy=writer.admits_clients)
        limits = Limits.from_settings(settings)
        fit_to_fd_limit(limits)
        if self.handler_name == "echo":
            self.handler = EchoHandler()
            self.mqtt = MQTTServer(authenticator, self.handler, limits)
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
            gateways = self.cluster.wrap(self.handler)
            self.mqtt = MQTTServer(self.openhub.authenticator(authenticator), gateways, limits)
            await self.handler.start(self.mqtt)
            await self.cluster.start(self)
        writer.on_pressure = self.mqtt.set_intake_paused
        self.mqtt_port = await self.mqtt.listen(settings.mqtt_host, settings.mqtt_port)
        ctx = make_ssl_context(settings)
        if ctx is not None and settings.tls_port is not None:
            self.tls_port = await self.mqtt.listen(settings.mqtt_host, settings.tls_port, ctx)
        if self.openhub is not None:
            await self.openhub.start()
            self.http_routers = [OpenHubAPI(self).router]
        if self.cluster is not None:
            from meterhub.cluster.api import cluster_router

            self.http_routers.append(cluster_router(self))
        from meterhub.api.server import ApiServer

        self.api = ApiServer(self)
        self.http_port = await self.api.start()
        if self.cluster is not None:
            await self.cluster.ready()

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.stop()
        if self.openhub is not None:
            await self.openhub.stop()
        if self.mqtt is not None:
            await self.mqtt.close()
        if self.handler is not None and hasattr(self.handler, "stop"):
            await self.handler.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        self.engine.dispose()


async def serve(settings: Settings, *, handler: str = "protocol") -> None:
    """Run until SIGINT/SIGTERM."""
    hub = Hub(settings, handler=handler)
    await hub.start()
    gcwatch.tune_for_server(gcwatch.young_threshold_for(settings.max_queued_writes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("meterhub running", mqtt_port=hub.mqtt_port, tls_port=hub.tls_port, handler=handler)
    try:
        await stop.wait()
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
