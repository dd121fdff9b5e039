"""The open hub as one component of a running hub: authentication, fan-out, WebSocket listener, URLs."""

from __future__ import annotations

from typing import Any

from meterhub.logs import get_logger
from meterhub.openhub.auth import OpenHubAuthenticator
from meterhub.openhub.fanout import OpenHubFanout
from meterhub.openhub.replay import MAX_CLOCK_SKEW_MS, ReplayGuard
from meterhub.transport import Authenticator

log = get_logger(__name__)


class OpenHub:
    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.fanout: OpenHubFanout | None = None
        self.ws_server: Any = None
        self.ws_port: int | None = None
        #: Signed requests seen (shared with the other nodes through the database).
        self.replay = ReplayGuard(hub.engine, MAX_CLOCK_SKEW_MS)

    def authenticator(self, gateways: Authenticator) -> Authenticator:
        return OpenHubAuthenticator(self.hub.engine, gateways)

    async def start(self) -> None:
        hub = self.hub
        self.fanout = OpenHubFanout(hub.engine, hub.mqtt, backlog=self.settings.openhub_backlog)
        hub.handler.listeners.append(self.fanout.on_event)
        await self.fanout.start()
        if self.settings.ws_port is not None:
            from meterhub.mqtt.websocket import listen_websocket

            self.ws_server, self.ws_port = await listen_websocket(
                hub.mqtt, self.settings.mqtt_host, self.settings.ws_port
            )

    async def stop(self) -> None:
        if self.ws_server is not None:
            self.ws_server.close()
            await self.ws_server.wait_closed()
        if self.fanout is not None:
            await self.fanout.stop()

    def url(self, link_type: str, request_host: str) -> str:
        """Where a link's client connects: always with the port (CLARIFICATIONS.md)."""
        host = self.settings.openhub_host or request_host
        if link_type == "websocket":
            if self.ws_port is None:
                raise ValueError("no WebSocket listener configured (ws_port)")
            return f"ws://{host}:{self.ws_port}/mqtt"
        if self.settings.openhub_tls and self.hub.tls_port:
            return f"ssl://{host}:{self.hub.tls_port}"
        return f"tcp://{host}:{self.hub.mqtt_port}"
