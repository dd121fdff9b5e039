"""Runs the API on uvicorn inside the hub's event loop (the same loop as the MQTT server).

:class:`ApiServer` also starts the alarm monitor (a listener on the protocol service), since the
API is what serves alarms. ``Hub.start()`` calls :meth:`ApiServer.start`, ``Hub.stop()``
:meth:`ApiServer.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from meterhub.api.app import create_app
from meterhub.core.alarms import FAULT, WATCHED_CODES, AlarmMonitor
from meterhub.logs import get_logger

log = get_logger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (raises OSError, e.g. when the port is taken)."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the hub owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.app: Any = None
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Start the alarm monitor and the HTTP server; returns the bound port."""
        hub = self.hub
        handler = hub.handler
        if handler is not None and hasattr(handler, "listeners") and hasattr(handler, "models"):
            monitor = AlarmMonitor(hub.engine, hub.writer)
            monitor.ids = getattr(getattr(hub, "cluster", None), "alarm_ids", None)  # None: one node
            watched: dict[str, str] = {}
            for model in handler.models:
                for dp in model:
                    if dp.type == FAULT:
                        watched[dp.id_str] = FAULT
                    elif dp.code in WATCHED_CODES:
                        watched[dp.id_str] = dp.code
            monitor.models = list(handler.models)
            monitor.raise_after = hub.settings.alarm_raise_after
            monitor.clear_after = hub.settings.alarm_clear_after
            monitor.max_devices = hub.settings.device_cache_max
            cluster = getattr(hub, "cluster", None)
            if cluster is not None and not cluster.solo:  # no-data sweeps: each node its own gateways'

                def holds(cid: str, devices: Any = handler.devices, held: Any = cluster.held) -> bool:
                    dev = devices.get(cid)
                    return dev is not None and dev.gateway_id in held

                monitor.holds = holds
            await asyncio.to_thread(monitor.load, watched)
            handler.listeners.append(monitor)
            hub.alarms = monitor
            await self._start_notifier(monitor)
            from meterhub.core.prepaid import PrepaidService

            hub.prepaid = PrepaidService(hub)
            await hub.prepaid.start()
        self.app = create_app(hub, extra_routers=getattr(hub, "http_routers", None))
        settings = hub.settings
        config = uvicorn.Config(
            self.app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self.server = _Server(config)
        # Bind here, not in uvicorn: its bind failure is a sys.exit() that would stop the event loop.
        sock = bind_socket(settings.http_host, settings.http_port)
        self.task = asyncio.get_running_loop().create_task(self.server.serve([sock]), name="meterhub-http")
        while not self.server.started:
            if self.task.done():
                sock.close()
                exc = self.task.exception() if not self.task.cancelled() else None
                raise RuntimeError(
                    f"HTTP server failed to start on {settings.http_host}:{settings.http_port}"
                ) from exc
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        log.info("http listening", host=settings.http_host, port=self.port)
        return self.port

    async def _start_notifier(self, monitor: AlarmMonitor) -> None:
        """The notification outbox (meterhub.core.notify) and the alarm monitor's periodic work."""
        from meterhub.core.notify import Notifier

        s = self.hub.settings
        node = getattr(getattr(self.hub, "cluster", None), "node_id", None) or s.node_id or "local"
        self.hub.notifier = Notifier(
            self.hub.engine, str(node), s.notify_backoff, s.notify_max_attempts, s.notify_poll
        )
        await self.hub.notifier.start()
        monitor.notify = self.hub.notifier.outbox_ops
        self.sweeper = asyncio.get_running_loop().create_task(self._sweep(monitor), name="meterhub-alarms")

    async def _sweep(self, monitor: AlarmMonitor) -> None:
        """Every few seconds: no-data rules; every 10 s: rules and targets changed on other nodes."""
        n = 0
        while True:
            await asyncio.sleep(2.0)
            n += 1
            try:
                if n % 5 == 0:
                    await asyncio.to_thread(monitor.reload_rules)
                    await asyncio.to_thread(monitor.count_active)
                monitor.sweep_no_data()
            except Exception:
                log.exception("alarm sweep failed")

    async def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        if getattr(self.hub, "notifier", None) is not None:
            await self.hub.notifier.stop()
        if self.app is not None:
            await self.app.state.jobs.cancel_all()
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, SystemExit, Exception):
                await asyncio.wait_for(self.task, timeout=10)
        if getattr(self.hub, "prepaid", None) is not None:
            await self.hub.prepaid.stop()
        handler = self.hub.handler
        monitor = getattr(self.hub, "alarms", None)
        if monitor is not None and handler is not None and monitor in getattr(handler, "listeners", []):
            handler.listeners.remove(monitor)
