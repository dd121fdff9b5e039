"""One MQTT 3.1.1 connection for the gateway SDK: paho-mqtt driven by the asyncio loop, public APIs only.

paho's documented "external event loop" interface (``on_socket_*`` callbacks, ``loop_read``,
``loop_write``, ``loop_misc``, ``want_write``, ``socket``) is all this uses. Socket registration is
decided at the time the loop runs it, from the socket paho holds *then*: a write interest announced
just before the server went away never reaches the selector with a closed file descriptor (the
``add_writer(...)``/``Bad file descriptor`` traceback that scheduling ``add_writer`` for later gives).
A ``Link`` is one connection: once lost it stays lost; the gateway makes a new one to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["Link", "LinkError", "LinkRefused"]


class LinkError(Exception):
    """The connection could not be made, or was lost."""


class LinkRefused(LinkError):
    """The server answered CONNECT with a refusal; ``rc`` is paho's reason code value."""

    def __init__(self, rc: int, text: str) -> None:
        super().__init__(text)
        self.rc = rc


def _rc_value(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else -1


class Link:
    """An MQTT connection: ``connect``, ``subscribe``, ``publish`` (awaits the PUBACK),
    ``publish_nowait`` (returns paho's rc), ``wait_lost``, ``abort`` and ``close``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str,
        password: str,
        clean_session: bool,
        keepalive: int,
        tls_context: ssl.SSLContext | None,
        max_inflight: int,
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self._on_message_cb = on_message
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        c.username_pw_set(username, password)
        if tls_context is not None:
            c.tls_set_context(tls_context)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # unbounded: the gateway's response window bounds it
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_event
        c.on_socket_register_write = self._on_socket_event
        c.on_socket_unregister_write = self._on_socket_event
        c.on_socket_close = self._on_socket_close
        self._client = c
        self._started = False  # registrations start once connect() returned in the loop
        self._fd: int | None = None
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._lost.add_done_callback(lambda f: f.exception())  # retrieved: never "never retrieved"
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    # --- public ----------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost.done()

    async def connect(self, timeout: float) -> None:
        """Connect and wait for the CONNACK; ``LinkRefused`` or ``LinkError`` when that fails."""
        try:
            await self._loop.run_in_executor(None, self._client.connect, self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:
            self._close_socket()
            raise LinkError(str(exc) or type(exc).__name__) from None
        self._started = True
        self._refresh()
        self._misc = self._loop.create_task(self._misc_loop())
        done, _ = await asyncio.wait(
            {self._connack, self._lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self._connack in done:
            self._connack.result()  # raises LinkRefused
            return
        self._teardown()
        if self._lost in done:
            self._lost.result()
        raise LinkError(f"no CONNACK within {timeout:g}s")

    async def subscribe(self, topics: list[tuple[str, int]]) -> list[Any]:
        """Subscribe and return the granted reason codes."""
        rc, mid = self._client.subscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"could not subscribe ({mqtt.error_string(rc)})")
        return await self._wait(mid)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and (QoS 1) wait for the PUBACK for as long as the connection lives."""
        rc = self.publish_nowait(topic, payload, qos)
        if rc[0] != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"could not publish ({mqtt.error_string(rc[0])})")
        if qos:
            await self._wait(rc[1])

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> tuple[int, int]:
        """Hand a message to paho (it keeps ``max_inflight`` on the wire and queues the rest)."""
        if self._lost.done():
            return mqtt.MQTT_ERR_NO_CONN, 0
        info = self._client.publish(topic, payload, qos)
        return info.rc, info.mid

    async def wait_lost(self) -> None:
        """Return never; raise ``LinkError`` when the connection is lost."""
        await asyncio.shield(self._lost)

    def abort(self) -> bool:
        """Cut the connection abruptly (no DISCONNECT), as a network failure would."""
        sock = self._client.socket()
        if sock is None or self._lost.done():
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    async def close(self, timeout: float = 1.0) -> None:
        """Send DISCONNECT (if still connected) and release the socket."""
        if not self._lost.done() and self._started:
            self._client.disconnect()
            self._refresh()
            with contextlib.suppress(asyncio.TimeoutError, LinkError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        self._teardown()

    # --- the loop side ---------------------------------------------------------------------------

    async def _wait(self, mid: int) -> Any:
        fut = self._waiting.get(mid)
        if fut is None:  # answered before we got here (paho may call back from within publish)
            fut = self._waiting[mid] = self._loop.create_future()
        try:
            done, _ = await asyncio.wait({fut, self._lost}, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            self._lost.result()
            raise LinkError("connection lost")
        finally:
            self._waiting.pop(mid, None)

    def _resolve(self, mid: int, value: Any) -> None:
        fut = self._waiting.get(mid)
        if fut is None:
            fut = self._waiting[mid] = self._loop.create_future()
        if not fut.done():
            fut.set_result(value)

    def _refresh(self) -> None:
        """Bring the selector in line with paho's socket and write interest as they are now."""
        if not self._started or self._lost.done():
            return
        sock = self._client.socket()
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            self._unregister()
            return
        if self._fd is None:
            self._loop.add_reader(fd, self._readable)
            self._fd = fd
        want = self._client.want_write()
        if want and not self._writing:
            self._loop.add_writer(fd, self._writable)
            self._writing = True
        elif not want and self._writing:
            self._loop.remove_writer(fd)
            self._writing = False

    def _unregister(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
            self._fd = None
            self._writing = False

    def _readable(self) -> None:
        rc = self._client.loop_read()
        sock = self._client.socket()
        while rc == mqtt.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
            rc = self._client.loop_read()
        self._after(rc)

    def _writable(self) -> None:
        self._after(self._client.loop_write())

    def _after(self, rc: int) -> None:
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._set_lost(LinkError(f"connection lost ({mqtt.error_string(rc)})"))
        else:
            self._refresh()

    async def _misc_loop(self) -> None:
        while not self._lost.done():
            await asyncio.sleep(1.0)
            rc = self._client.loop_misc()  # keep-alive: PINGREQ, and a dead link noticed
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._set_lost(LinkError(f"connection lost ({mqtt.error_string(rc)})"))
            else:
                self._refresh()

    def _set_lost(self, exc: LinkError) -> None:
        if not self._lost.done():
            self._lost.set_exception(exc)
        if not self._connack.done():
            self._connack.set_exception(exc)
            self._connack.exception()
        self._unregister()

    def _teardown(self) -> None:
        self._set_lost(LinkError("connection closed"))
        if self._misc is not None and asyncio.current_task() is not self._misc:
            self._misc.cancel()
        self._close_socket()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # --- paho callbacks (in the loop thread, except during connect() in the executor) ------------

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_event(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._refresh)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # Called before paho closes the socket: the descriptor is still ours to unregister.
        if threading.get_ident() == self._thread:
            self._unregister()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        def settle() -> None:
            if self._connack.done():
                return
            if getattr(reason, "is_failure", False):
                self._connack.set_exception(LinkRefused(_rc_value(reason), str(reason)))
            else:
                self._connack.set_result(None)

        self._in_loop(settle)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._in_loop(lambda: self._set_lost(LinkError(f"connection lost: {reason}")))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._resolve(mid, list(codes))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if mid in self._waiting:
            self._resolve(mid, None)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message_cb(message.topic, bytes(message.payload))
