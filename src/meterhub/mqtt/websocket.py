"""MQTT over WebSocket (subprotocol ``mqtt``, binary frames), for open hub links and browsers.

Each WebSocket connection drives the same :class:`~meterhub.mqtt.server.MQTTConnection` as a TCP socket,
through :class:`WebSocketTransport`, a small adapter with the ``asyncio.Transport`` methods the MQTT
connection uses (write, close, abort, pause/resume reading, write-buffer limits). MQTT packets may span
frames and a frame may carry several packets: the decoder is a stream decoder either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.mqtt.server import MQTTConnection, MQTTServer

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted


class WebSocketTransport(asyncio.Transport):
    def __init__(self, ws: ServerConnection, protocol: MQTTConnection) -> None:
        super().__init__()
        self._ws = ws
        self._protocol = protocol
        self._chunks: list[bytes] = []
        self._size = 0
        self._high = 256 * 1024
        self._low = 64 * 1024
        self._writing_paused = False
        self._closing = False
        self._wake = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # --- what MQTTConnection calls ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._chunks.append(bytes(data))
        self._size += len(data)
        self._wake.set()
        if not self._writing_paused and self._size > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()  # the write loop flushes, then closes

    def abort(self) -> None:
        self._closing = True
        self._chunks.clear()
        self._writer.cancel()
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._ws.remote_address
        return default

    # --- the writer ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._chunks:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    await self._ws.send(data)
                    self._size -= len(data)
                    if self._writing_paused and self._size <= self._low:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                if self._closing and not self._chunks:
                    await self._ws.close()
                    return
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception:
            _repeats.error("write_failed", "websocket write failed", exc_info=True)


async def listen_websocket(
    server: MQTTServer, host: str, port: int, path: str = "/mqtt"
) -> tuple[Server, int]:
    """Serve MQTT over WebSocket at ``ws://host:port{path}``; returns the server and its bound port."""

    def check_path(_conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != path:
            return _conn.respond(404, "MQTT over WebSocket is served at " + path + "\n")
        return None

    async def handle(ws: ServerConnection) -> None:
        if ws.subprotocol != "mqtt":
            await ws.close(1002, "subprotocol mqtt required")
            return
        conn = MQTTConnection(server)
        transport = WebSocketTransport(ws, conn)
        conn.connection_made(transport)
        try:
            while True:
                await transport.reading.wait()
                message = await ws.recv()
                if isinstance(message, str):
                    server.stats["protocol_error.websocket-text-frame"] += 1
                    transport.abort()
                    break
                conn.data_received(message)
        except ConnectionClosed:
            pass
        finally:
            with contextlib.suppress(Exception):
                transport.close()
            conn.connection_lost(None)

    ws_server = await serve(
        handle,
        host,
        port,
        subprotocols=["mqtt"],
        process_request=check_path,
        max_size=server.limits.max_packet_size + 1024,
        compression=None,
    )
    bound = next(iter(ws_server.sockets)).getsockname()[1]
    log.info("mqtt over websocket listening", host=host, port=bound, path=path)
    return ws_server, bound
