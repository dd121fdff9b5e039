"""``Gateway``: an asyncio meter gateway speaking meterhub's edge protocol (MQTT 3.1.1, QoS 1).

Lifecycle: ``await gw.start()`` connects (or ``async with Gateway(...) as gw``); the gateway then stays
connected, reconnecting forever after drops with exponential backoff and full jitter
(``uniform(0, min(reconnect_cap, reconnect_base * 2**attempt))``). On every (re)connection it subscribes
to its three downlink topics (``commands``, ``devices/sync/response``, ``properties/report/response``),
re-syncs every device it knows, publishes their status, and then sends what is waiting. The backoff
starts again from ``reconnect_base`` only after a connection that lasted ``STABLE_SECONDS`` (10 s), so a
server that accepts and then drops the gateway at once is not hammered.

Choices made where the protocol is silent:

- Reports are end-to-end acknowledged by ``properties/report/response`` (matched by ``request_id``), not
  by the MQTT PUBACK. A report stays *pending* until that response arrives; when the connection drops,
  every pending report goes back to the front of the send queue, in order, and is sent again after the
  reconnection with the same ``request_id`` and ``t`` (the server answers a repeated request_id with its
  first answer and stores it once). A pending report unanswered for ``response_timeout`` seconds while
  connected is given up and counted as ``errors["timeout"]``.
- Store-and-forward: reports made while disconnected (and those not yet sent) wait in one bounded queue
  of ``buffer_size`` reports; when it is full the oldest is dropped and counted (``stats.dropped``).
  They are sent with their original ``t``, so they must reach the server within its 30 days.
- Flow control: at most ``max_pending`` reports await their response (the server answers once a
  report is stored, so this bounds the work queued at the server too); the queue waits beyond that.
  ``max_inflight`` is the MQTT window of publishes awaiting their PUBACK.
- ``t`` is sent in whole seconds (the document's unit). ``report(..., t=...)`` takes Unix seconds (or a
  ``datetime``); more than 5 minutes ahead or older than 30 days is refused locally.
- Device status: every ``status_interval`` s, right after each (re)connection, and right after a
  device's first successful sync, ``devices/status`` lists every device with the online flag set by
  ``set_online`` (True after ``sync``); at most ``STATUS_CHUNK`` devices per message.
- A device whose sync is answered with a non-zero code is forgotten (not re-synced).
- Commands: the value handed to the handler is in real units (``to_real``: 40.5 A, not 405000), the
  same units ``report`` takes. An unknown data point, a report-only one, or an invalid value is answered
  by the SDK (2002 / 1101 / 1102 / 1103) without calling the handler; so is a command for a device this
  gateway has not synced (2003) or arriving while no handler is set (2002). The handler returns the code
  (``None`` means 0); an exception in it is answered 500. The answer's ``msg`` is the document's
  message for the code ("success" for 0).
- The first connection: a CONNACK refusal that retrying cannot fix (0x01 protocol, 0x02 identifier,
  0x04 credentials, 0x05 not authorised) makes ``start()`` raise ``GatewayConnectError``. After the
  gateway has been connected once, every failure is retried (an operator may re-enable it).
- ``drop(offline_for)`` cuts the connection abruptly (no DISCONNECT packet, like a network failure) and
  keeps the gateway offline for ``offline_for`` seconds: for simulators and tests.
- Logging uses the standard ``logging`` module (logger ``meterhub.sdk``), so the SDK needs none of the
  server's dependencies: only paho-mqtt (public API, see ``link.py``) and msgspec.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import inspect
import logging
import math
import random
import ssl
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from paho.mqtt.client import MQTT_ERR_SUCCESS

from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ValueRejected
from meterhub.model.loader import builtin_model
from meterhub.protocol.errors import MESSAGES, ErrorCode
from meterhub.protocol.messages import (
    MAX_AGE_SECONDS,
    MAX_FUTURE_SECONDS,
    encode_command_response,
    encode_report,
    encode_status,
    encode_sync,
)
from meterhub.sdk.link import Link, LinkError, LinkRefused
from meterhub.sdk.values import InvalidValue, resolve, to_real, to_wire

__all__ = [
    "STATUS_CHUNK",
    "CommandHandler",
    "Gateway",
    "GatewayConnectError",
    "GatewayStats",
    "ReportDropped",
    "gateway_password",
]

log = logging.getLogger("meterhub.sdk")

#: A connection that lasted this long (seconds) resets the reconnection backoff.
STABLE_SECONDS = 10.0
#: Reports handed to paho before the sender yields to the event loop.
SEND_BATCH = 100
#: Most devices listed in one devices/status message (keeps it well under the server's packet limit).
STATUS_CHUNK = 500
#: How long a QoS 1 sync/status/command-response publish waits for its PUBACK: for as long as the
#: connection lives. meterhub acknowledges after the durable commit, which can take long while a whole
#: fleet re-syncs at once; timing out there would drop the connection and make the herd bigger. A dead
#: connection is noticed by the keep-alive, and the wait is cancelled with the session.
PUBACK_WAIT = math.inf
#: CONNACK codes (3.1.1 and their MQTT 5 reason codes as paho reports them) that retrying cannot fix.
_PERMANENT_REFUSALS = {1, 2, 4, 5, 0x84, 0x85, 0x86, 0x87}
_REFUSAL_TEXT = {
    1: "unacceptable protocol version",
    2: "identifier rejected (the gateway id)",
    4: "bad user name or password",
    5: "not authorized (vendor or gateway disabled, or not on the vendor's allowlist)",
    0x84: "unacceptable protocol version",
    0x85: "identifier rejected (the gateway id)",
    0x86: "bad user name or password",
    0x87: "not authorized (vendor or gateway disabled, or not on the vendor's allowlist)",
}

#: ``(cid, data point, value in real units) -> code`` (``None`` = 0); a coroutine function or a plain one.
CommandHandler = Callable[[str, DataPoint, Any], Awaitable[int | None] | int | None]

_DROPPED: Any = object()  # a report's future result: pushed out of the full buffer
_EXPIRED: Any = object()  # a report's future result: no response within response_timeout


def gateway_password(client_id: str, username: str) -> str:
    """The document's password rule: md5 hex of clientId + username."""
    return hashlib.md5((client_id + username).encode()).hexdigest()


class GatewayConnectError(ConnectionError):
    """The server refused the gateway's first connection for a reason retrying cannot fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReportDropped(RuntimeError):
    """The report was pushed out of the full store-and-forward buffer before it could be sent."""


@dataclass
class GatewayStats:
    """Counters of one gateway. ``latencies`` holds recent report -> response times in seconds."""

    sent: int = 0  # report publishes, resends included
    resent: int = 0  # reports sent again after a reconnection
    acked: int = 0  # reports answered with code 0
    errors: Counter[int | str] = field(default_factory=Counter)  # other codes, and "timeout"
    dropped: int = 0  # pushed out of the full buffer
    connects: int = 0
    reconnects: int = 0  # successful connections after the first
    late_responses: int = 0  # responses to reports already answered or given up
    syncs: int = 0
    statuses: int = 0  # devices/status messages published
    commands: Counter[int] = field(default_factory=Counter)  # command answers by code
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def take_latencies(self) -> list[float]:
        """The latency samples collected since the last call (and forget them)."""
        out = list(self.latencies)
        self.latencies.clear()
        return out


class _Report:
    __slots__ = ("cid", "dp_id", "future", "payload", "request_id", "sent_at", "sent_before", "seq")

    def __init__(self, seq: int, request_id: str, cid: str, dp_id: str, payload: bytes) -> None:
        self.seq = seq
        self.request_id = request_id
        self.cid = cid
        self.dp_id = dp_id
        self.payload = payload
        self.future: asyncio.Future[Any] | None = None
        self.sent_at = 0.0
        self.sent_before = False


@dataclass
class _Device:
    product_id: str
    fields: dict[str, str | None]
    online: bool = True
    announced: bool = False  # a status has been published for it on this connection


class _ResponseParam(msgspec.Struct):
    cid: Any = None
    msg: Any = None
    code: Any = 0


class _Response(msgspec.Struct):
    request_id: Any = None
    param: _ResponseParam | None = None


class _CommandParam(msgspec.Struct):
    id: Any = msgspec.UNSET
    value: Any = msgspec.UNSET


class _Command(msgspec.Struct):
    request_id: Any = None
    cid: Any = None
    param: Any = msgspec.UNSET


_RESPONSE_DECODER = msgspec.json.Decoder(_Response)
_COMMAND_DECODER = msgspec.json.Decoder(_Command)
_ID_FORBIDDEN = frozenset("/+#")


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ValueError(f"{what} must be a string of 1-128 characters, got {value!r}")
    if any(ch in _ID_FORBIDDEN or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} {value!r} must not contain '/', '+', '#' or control characters")
    return value


def _ssl_context(tls_ca: str | Path | ssl.SSLContext | None) -> ssl.SSLContext | None:
    if tls_ca is None or isinstance(tls_ca, ssl.SSLContext):
        return tls_ca
    return ssl.create_default_context(cafile=str(tls_ca))


def _code_of(exc: LinkRefused) -> int | None:
    return exc.rc if exc.rc >= 0 else None


class Gateway:
    """A meter gateway: devices, typed reports with store-and-forward, status heartbeats, commands.

    All methods must be used from the event loop the gateway was started in.
    """

    def __init__(
        self,
        host: str,
        port: int,
        gateway_id: str,
        username: str,
        *,
        tls_ca: str | Path | ssl.SSLContext | None = None,
        product_model: str | ProductModel = "smart-meter",
        keepalive: int = 60,
        status_interval: float = 60.0,
        buffer_size: int = 10_000,
        clean_session: bool = False,
        phase_encoding: str = "binary",
        response_timeout: float = 10.0,
        max_inflight: int = 64,
        max_pending: int = 1000,
        reconnect_base: float = 0.5,
        reconnect_cap: float = 30.0,
        command_handler: CommandHandler | None = None,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.gateway_id = _check_id(gateway_id, "gateway_id")
        if not isinstance(username, str) or not username:
            raise ValueError("username (the vendor's username) is required")
        self.username = username
        self.password = gateway_password(gateway_id, username)
        self.ssl_context = _ssl_context(tls_ca)
        self.model = builtin_model(product_model) if isinstance(product_model, str) else product_model
        if buffer_size < 1 or max_inflight < 1 or max_pending < 1:
            raise ValueError("buffer_size, max_inflight and max_pending must be >= 1")
        if status_interval <= 0 or response_timeout <= 0:
            raise ValueError("status_interval and response_timeout must be > 0")
        if phase_encoding not in ("binary", "object"):
            raise ValueError(f"phase_encoding must be 'binary' or 'object', not {phase_encoding!r}")
        self.keepalive = keepalive
        self.status_interval = status_interval
        self.buffer_size = buffer_size
        self.clean_session = clean_session
        self.phase_encoding = phase_encoding
        self.response_timeout = response_timeout
        self.max_inflight = max_inflight
        self.max_pending = max_pending
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.command_handler: CommandHandler | None = command_handler
        self.stats = GatewayStats()

        prefix = f"gateway_id/{gateway_id}/"
        self._t_sync = prefix + "devices/sync"
        self._t_report = prefix + "properties/report"
        self._t_status = prefix + "devices/status"
        self._t_command_response = prefix + "commands/response"
        self._t_commands = prefix + "commands"
        self._t_sync_response = prefix + "devices/sync/response"
        self._t_report_response = prefix + "properties/report/response"

        self._devices: dict[str, _Device] = {}
        self._outbox: deque[_Report] = deque()
        self._pending: dict[str, _Report] = {}
        self._seq = 0
        self._sync_requests: dict[str, str] = {}  # request_id -> cid
        self._sync_waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._client: Link | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._session_tasks: set[asyncio.Task[Any]] = set()
        self._fatal: BaseException | None = None
        self._last_error: str | None = None
        self._hold_until = 0.0
        self._connected_once = False
        # Created in start() (they must belong to the running loop).
        self._closing: asyncio.Event | None = None
        self._linked: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._outbox_ready: asyncio.Event | None = None
        self._pending_room: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start connecting (and keep connected). With ``wait``, return once connected and synced.

        Raises ``GatewayConnectError`` when the server refuses the first connection for good, and
        ``TimeoutError`` when no connection was made within ``timeout`` (the gateway is then stopped).
        """
        if self._run_task is not None:
            raise RuntimeError("gateway already started")
        self._closing = asyncio.Event()
        self._linked = asyncio.Event()
        self._ready = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._pending_room = asyncio.Event()
        self._pending_room.set()
        self._idle = asyncio.Event()
        self._update_idle()
        if self._outbox:
            self._outbox_ready.set()
        self._run_task = asyncio.get_running_loop().create_task(
            self._run(), name=f"gateway-{self.gateway_id}"
        )
        if not wait:
            return
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._run_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._fatal is not None:
            await self.close(flush_timeout=0)
            raise self._fatal
        if not self._ready.is_set():
            last = self._last_error
            await self.close(flush_timeout=0)
            where = f"{self.host}:{self.port}"
            raise TimeoutError(
                f"gateway {self.gateway_id} not connected to {where} within {timeout:g}s"
                + (f" (last error: {last})" if last else "")
            )

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Stop: wait up to ``flush_timeout`` s for queued reports to be answered (reconnecting if need
        be), then disconnect. What is still queued stays in the buffer (``start`` again to send it)."""
        if self._run_task is None:
            return
        assert self._closing is not None and self._idle is not None
        if flush_timeout > 0 and not self._idle.is_set() and not self._run_task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), flush_timeout)
        self._closing.set()
        await asyncio.wait({self._run_task})  # (raises nothing of the task's; our own cancel goes through)
        self._run_task = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Connected, subscribed and devices re-synced: reports are being sent."""
        return self._ready is not None and self._ready.is_set()

    @property
    def buffered(self) -> int:
        """Reports waiting to be sent (made while disconnected, or not sent yet)."""
        return len(self._outbox)

    @property
    def pending(self) -> int:
        """Reports sent and awaiting their response."""
        return len(self._pending)

    @property
    def devices(self) -> dict[str, bool]:
        """The devices this gateway syncs, with their online flag."""
        return {cid: dev.online for cid, dev in self._devices.items()}

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until ``connected`` (``TimeoutError`` after ``timeout`` s)."""
        if self._ready is None:
            raise RuntimeError("gateway not started")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until nothing is queued or awaiting a response (``TimeoutError`` after ``timeout`` s)."""
        if self._idle is None:
            raise RuntimeError("gateway not started")
        await asyncio.wait_for(self._idle.wait(), timeout)

    def drop(self, offline_for: float = 0.0) -> bool:
        """Cut the connection abruptly (as a network failure would) and stay offline ``offline_for`` s.

        Returns False when not connected. The gateway reconnects by itself afterwards.
        """
        self._hold_until = max(self._hold_until, time.monotonic() + max(0.0, offline_for))
        client = self._client
        if client is None:
            return False
        return client.abort()

    # --- devices ---------------------------------------------------------------------------------

    async def sync(
        self, cid: str, product_id: str, *, timeout: float | None = None, **fields: str | None
    ) -> int:
        """Sync (activate) a device and return the server's code (0 = success).

        The device is remembered and re-synced after every reconnection; a non-zero answer forgets it.
        Optional fields are the document's (device_name, vendor_code, mac_address, ...). While
        disconnected this waits for the connection (``TimeoutError`` after ``timeout``, default
        ``response_timeout``; the device stays remembered).
        """
        _check_id(cid, "cid")
        if not isinstance(product_id, str) or len(product_id) > 128:
            raise ValueError("product_id must be a string of at most 128 characters")
        for key, value in fields.items():
            if value is not None and (not isinstance(value, str) or len(value) > 255):
                raise ValueError(f"{key} must be a string of at most 255 characters or None")
        previous = self._devices.get(cid)
        device = _Device(product_id, dict(fields), online=previous.online if previous else True)
        self._devices[cid] = device
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._sync_waiters.setdefault(cid, []).append(fut)
        client = self._client
        if client is not None and self._linked is not None and self._linked.is_set():
            self._spawn(self._send_sync(client, cid, device))
        try:
            code = await asyncio.wait_for(asyncio.shield(fut), timeout or self.response_timeout)
        finally:
            waiters = self._sync_waiters.get(cid)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
        if code != 0 and self._devices.get(cid) is device:
            del self._devices[cid]
        return code

    def set_online(self, cid: str, online: bool) -> None:
        """Set a device's online flag (reported in every devices/status); published at once if connected."""
        device = self._devices.get(cid)
        if device is None:
            raise KeyError(f"device {cid!r} was never synced by this gateway")
        changed = device.online != bool(online)
        device.online = bool(online)
        client = self._client
        if changed and client is not None and self.connected:
            self._spawn(self._publish_status(client, [cid]))

    # --- reports ---------------------------------------------------------------------------------

    def _make_report(
        self,
        cid: str,
        dp: DataPoint | int | str,
        value: Any,
        t: float | _dt.datetime | None,
        raw: bool,
        phase_encoding: str | None,
    ) -> _Report:
        if not isinstance(cid, str) or not 0 < len(cid) <= 128:
            raise ValueError(f"cid must be a string of 1-128 characters, got {cid!r}")
        point = resolve(self.model, dp)
        wire = to_wire(point, value, raw=raw, phase_encoding=phase_encoding or self.phase_encoding)
        now = time.time()
        if t is None:
            ts = now
        elif isinstance(t, _dt.datetime):
            ts = t.timestamp()
        elif isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
            ts = float(t)
        else:
            raise ValueError(f"t must be Unix seconds or a datetime, got {t!r}")
        if ts > now + MAX_FUTURE_SECONDS:
            raise InvalidValue(ErrorCode.REQUEST_TIME_INVALID, f"t={ts} is more than 5 minutes in the future")
        if ts < now - MAX_AGE_SECONDS:
            raise InvalidValue(ErrorCode.REQUEST_TIME_INVALID, f"t={ts} is older than 30 days")
        request_id = str(uuid.uuid4())
        self._seq += 1
        return _Report(
            self._seq, request_id, cid, point.id_str, encode_report(request_id, cid, point.id, wire, ts)
        )

    def _enqueue(self, item: _Report) -> None:
        outbox = self._outbox
        while len(outbox) >= self.buffer_size:
            self._drop_oldest()
        outbox.append(item)
        if self._outbox_ready is not None:
            self._outbox_ready.set()
            self._idle.clear()  # type: ignore[union-attr]

    def _drop_oldest(self) -> None:
        old = self._outbox.popleft()
        self.stats.dropped += 1
        if old.future is not None and not old.future.done():
            old.future.set_result(_DROPPED)

    def report_nowait(
        self,
        cid: str,
        dp: DataPoint | int | str,
        value: Any,
        t: float | _dt.datetime | None = None,
        *,
        raw: bool = False,
        phase_encoding: str | None = None,
    ) -> str:
        """Queue a report without waiting for its answer; returns its request_id.

        ``value`` is in real units (see ``meterhub.sdk.values.to_wire``); an unknown data point or a value
        the server would refuse raises ``InvalidValue`` (a ``ValueError``) here and nothing is queued.
        The outcome is only counted in ``stats``.
        """
        item = self._make_report(cid, dp, value, t, raw, phase_encoding)
        self._enqueue(item)
        return item.request_id

    def report_many(
        self,
        cid: str,
        values: Mapping[DataPoint | int | str, Any],
        t: float | _dt.datetime | None = None,
        *,
        phase_encoding: str | None = None,
    ) -> list[str]:
        """``report_nowait`` for several data points of one device; all are checked before any is queued."""
        items = [self._make_report(cid, dp, v, t, False, phase_encoding) for dp, v in values.items()]
        for item in items:
            self._enqueue(item)
        return [item.request_id for item in items]

    async def report(
        self,
        cid: str,
        dp: DataPoint | int | str,
        value: Any,
        t: float | _dt.datetime | None = None,
        *,
        raw: bool = False,
        phase_encoding: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Report a value (real units) and return the server's code (0 = stored).

        ``InvalidValue`` (``ValueError``) for a value or data point the server would refuse, before
        anything is sent. ``TimeoutError`` when no answer came within ``timeout`` (default
        ``response_timeout``) -- while disconnected the report stays buffered and is still delivered
        later. ``ReportDropped`` when the full buffer pushed it out.
        """
        item = self._make_report(cid, dp, value, t, raw, phase_encoding)
        item.future = asyncio.get_running_loop().create_future()
        self._enqueue(item)
        wait = self.response_timeout if timeout is None else timeout
        try:
            result = await asyncio.wait_for(asyncio.shield(item.future), wait)
        except TimeoutError:
            raise TimeoutError(f"no answer to report {item.request_id} within {wait:g}s") from None
        if result is _DROPPED:
            raise ReportDropped(f"report {item.request_id} dropped: the buffer of {self.buffer_size} is full")
        if result is _EXPIRED:
            raise TimeoutError(f"no answer to report {item.request_id} within {self.response_timeout:g}s")
        return int(result)

    # --- the connection loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._closing is not None
        attempt = 0
        outage_since: float | None = None
        while not self._closing.is_set():
            hold = self._hold_until - time.monotonic()
            if hold > 0 and await self._sleep(hold):
                break
            client = Link(
                self.host,
                self.port,
                client_id=self.gateway_id,
                username=self.username,
                password=self.password,
                clean_session=self.clean_session,
                keepalive=self.keepalive,
                tls_context=self.ssl_context,
                max_inflight=self.max_inflight,
                on_message=self._dispatch,
            )
            session_started: float | None = None
            try:
                await client.connect(self.response_timeout)
                session_started = time.monotonic()
                self._client = client
                self.stats.connects += 1
                if self._connected_once:
                    self.stats.reconnects += 1
                self._connected_once = True
                if outage_since is None:
                    log.info("gateway %s connected to %s:%s", self.gateway_id, self.host, self.port)
                else:
                    log.debug(
                        "gateway %s reconnected after %.1fs", self.gateway_id, time.monotonic() - outage_since
                    )
                outage_since = None
                await self._serve(client)
            except LinkRefused as exc:
                code = _code_of(exc)
                text = _REFUSAL_TEXT.get(code or -1, str(exc))
                self._last_error = f"connection refused: {text}"
                if not self._connected_once and code in _PERMANENT_REFUSALS:
                    self._fatal = GatewayConnectError(
                        code or 0,
                        f"{self.host}:{self.port} refused gateway {self.gateway_id!r}: {text}",
                    )
                    return
            except LinkError as exc:
                self._last_error = str(exc) or type(exc).__name__
            except Exception as exc:
                self._last_error = repr(exc)
                log.exception("gateway %s: unexpected failure, reconnecting", self.gateway_id)
            finally:
                self._link_down()
                await client.close()
            if self._closing.is_set():
                break
            if outage_since is None:  # one line per outage; the retries are quiet (debug)
                outage_since = time.monotonic()
                what = "lost its connection" if session_started is not None else "could not connect"
                log.warning("gateway %s %s (%s); reconnecting", self.gateway_id, what, self._last_error)
            else:
                log.debug("gateway %s: still offline (%s)", self.gateway_id, self._last_error)
            if self._closing.is_set():
                break
            if session_started is not None and time.monotonic() - session_started >= STABLE_SECONDS:
                attempt = 0  # a connection that lasted: start the backoff again from the base
            delay = random.uniform(0, min(self.reconnect_cap, self.reconnect_base * 2**attempt))
            attempt = min(attempt + 1, 30)
            if await self._sleep(delay):
                break

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` s; True when close() was called meanwhile."""
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), delay)
        except TimeoutError:
            return False
        return True

    async def _serve(self, client: Link) -> None:
        """Run one connection: until it is lost (raises MqttError) or close() is called (returns)."""
        assert self._closing is not None
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._reader(client))
        session = loop.create_task(self._session(client))
        closing = loop.create_task(self._closing.wait())
        try:
            done, _ = await asyncio.wait({reader, session, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, session, closing, *self._session_tasks):
                task.cancel()
            await asyncio.gather(reader, session, closing, *self._session_tasks, return_exceptions=True)
            self._session_tasks.clear()
        for task in (reader, session):
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def _link_down(self) -> None:
        """The connection is gone: unanswered reports go back to the front of the queue, in order."""
        self._client = None
        if self._linked is not None:
            self._linked.clear()
            self._ready.clear()  # type: ignore[union-attr]
        for dev in self._devices.values():
            dev.announced = False
        self._sync_requests.clear()
        if self._pending:
            items = sorted(self._pending.values(), key=lambda r: r.seq, reverse=True)
            self._pending.clear()
            for item in items:
                item.sent_before = True
                self._outbox.appendleft(item)
            while len(self._outbox) > self.buffer_size:
                self._drop_oldest()
            if self._outbox_ready is not None:
                self._outbox_ready.set()
        if self._pending_room is not None:
            self._pending_room.set()
        self._update_idle()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._session_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._session_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, LinkError):
                log.error("gateway %s: task failed: %r", self.gateway_id, exc, exc_info=exc)

    async def _session(self, client: Link) -> None:
        """Subscribe, re-sync, announce, then send the queue, heartbeats and expiries until cancelled."""
        assert self._linked is not None and self._ready is not None
        granted = await client.subscribe(
            [(self._t_commands, 1), (self._t_sync_response, 1), (self._t_report_response, 1)]
        )
        refused = [rc for rc in granted if getattr(rc, "is_failure", rc == 0x80)]
        if refused:
            raise LinkError(f"subscription refused by the server ({refused})")
        self._linked.set()
        if self._devices:
            results = await asyncio.gather(
                *(self._send_sync(client, cid, dev) for cid, dev in list(self._devices.items())),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, LinkError):
                    raise result
                if isinstance(result, Exception):
                    log.error("gateway %s: re-sync failed: %r", self.gateway_id, result)
        self._ready.set()
        await self._publish_status(client, None)
        loop = asyncio.get_running_loop()
        workers = {
            loop.create_task(c) for c in (self._sender(client), self._heartbeat(client), self._expire())
        }
        self._session_tasks.update(workers)  # _serve cancels them when the connection ends
        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _send_sync(self, client: Link, cid: str, device: _Device) -> int | None:
        """Publish one sync and wait for its answer (None when none came in time)."""
        request_id = str(uuid.uuid4())
        self._sync_requests[request_id] = cid
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._sync_waiters.setdefault(cid, []).append(fut)
        payload = encode_sync(request_id, cid, device.product_id, time.time(), **device.fields)
        self.stats.syncs += 1
        try:
            await client.publish(self._t_sync, payload, qos=1)
            code = await asyncio.wait_for(fut, self.response_timeout)
        except TimeoutError:
            # The request stays in _sync_requests until its answer comes or the connection ends, so a
            # late answer (a server busy with a whole fleet re-syncing) still reaches sync() callers
            # that wait longer than response_timeout.
            log.warning("gateway %s: no answer to the sync of %s yet", self.gateway_id, cid)
            return None
        finally:
            waiters = self._sync_waiters.get(cid)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
        if code != 0:
            log.warning("gateway %s: sync of %s answered %s", self.gateway_id, cid, code)
            if self._devices.get(cid) is device:
                del self._devices[cid]
        elif self.connected and not device.announced:
            await self._publish_status(client, [cid])  # a new device: online at once
        return code

    async def _publish_status(self, client: Link, cids: Iterable[str] | None) -> None:
        devices = self._devices
        items = [(cid, devices[cid].online) for cid in (devices if cids is None else cids) if cid in devices]
        for start in range(0, len(items), STATUS_CHUNK):
            chunk = items[start : start + STATUS_CHUNK]
            payload = encode_status(str(uuid.uuid4()), chunk, time.time())
            for cid, _ in chunk:
                devices[cid].announced = True
            await client.publish(self._t_status, payload, qos=1)
            self.stats.statuses += 1

    async def _heartbeat(self, client: Link) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            if self._devices:
                await self._publish_status(client, None)

    async def _sender(self, client: Link) -> None:
        """Send queued reports while fewer than ``max_pending`` await their response.

        Reports are handed to paho without awaiting each PUBACK (``publish_nowait``): paho keeps
        ``max_inflight`` of them on the wire and queues the rest, and the response window bounds that
        queue. An awaited publish would cost a future and a wait per report.
        """
        assert self._outbox_ready is not None and self._pending_room is not None
        outbox = self._outbox
        pending = self._pending
        stats = self.stats
        topic = self._t_report
        ok = MQTT_ERR_SUCCESS
        while True:
            if not outbox:
                self._outbox_ready.clear()
                self._update_idle()
                await self._outbox_ready.wait()
                continue
            room = self.max_pending - len(pending)
            if room <= 0:
                self._pending_room.clear()
                await self._pending_room.wait()
                continue
            now = time.monotonic()
            for _ in range(min(room, len(outbox), SEND_BATCH)):
                item = outbox.popleft()
                item.sent_at = now
                pending[item.request_id] = item
                stats.sent += 1
                if item.sent_before:
                    stats.resent += 1
                rc = client.publish_nowait(topic, item.payload, 1)[0]
                if rc != ok:  # not connected any more: the report stays pending and is sent again
                    raise LinkError(f"could not publish a report (rc {rc})")
            await asyncio.sleep(0)  # let the loop write, read and tick between batches

    async def _expire(self) -> None:
        """Give up pending reports unanswered for ``response_timeout`` s (counted as timeouts)."""
        while True:
            await asyncio.sleep(min(1.0, self.response_timeout / 2))
            limit = time.monotonic() - self.response_timeout
            expired = [item for item in self._pending.values() if item.sent_at < limit]
            for item in expired:
                del self._pending[item.request_id]
                self.stats.errors["timeout"] += 1
                if item.future is not None and not item.future.done():
                    item.future.set_result(_EXPIRED)
            if expired:
                log.warning("gateway %s: %d reports unanswered", self.gateway_id, len(expired))
                self._pending_room.set()  # type: ignore[union-attr]
                self._update_idle()

    def _update_idle(self) -> None:
        if self._idle is None:
            return
        if self._outbox or self._pending:
            self._idle.clear()
        else:
            self._idle.set()

    # --- incoming --------------------------------------------------------------------------------

    async def _reader(self, client: Link) -> None:
        """Messages are dispatched as they arrive (``_dispatch``); this only waits for the end."""
        await client.wait_lost()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Handle one incoming message (in the event loop thread, from paho's message callback)."""
        try:
            if topic == self._t_report_response:
                self._on_report_response(bytes(payload))
            elif topic == self._t_sync_response:
                self._on_sync_response(bytes(payload))
            elif topic == self._t_commands:
                client = self._client
                if client is not None:
                    self._spawn(self._on_command(client, bytes(payload)))
            else:
                log.info("gateway %s: message on unexpected topic %s ignored", self.gateway_id, topic)
        except Exception:  # never into paho: it would take the connection down
            log.exception("gateway %s: failed to handle a message", self.gateway_id)

    def _decode_response(self, payload: bytes) -> tuple[str, int] | None:
        try:
            resp = _RESPONSE_DECODER.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            self.stats.errors["bad_response"] += 1
            log.warning("gateway %s: unreadable response %r", self.gateway_id, payload[:200])
            return None
        code = resp.param.code if resp.param is not None else None
        if not isinstance(resp.request_id, str) or not isinstance(code, int) or isinstance(code, bool):
            self.stats.errors["bad_response"] += 1
            log.warning("gateway %s: response without request_id/code %r", self.gateway_id, payload[:200])
            return None
        return resp.request_id, code

    def _on_report_response(self, payload: bytes) -> None:
        decoded = self._decode_response(payload)
        if decoded is None:
            return
        request_id, code = decoded
        item = self._pending.pop(request_id, None)
        if item is None:
            self.stats.late_responses += 1
            return
        stats = self.stats
        stats.latencies.append(time.monotonic() - item.sent_at)
        if code == 0:
            stats.acked += 1
        else:
            stats.errors[code] += 1
            log.info(
                "gateway %s: report %s (cid %s dp %s) answered %s",
                self.gateway_id,
                request_id,
                item.cid,
                item.dp_id,
                code,
            )
        if item.future is not None and not item.future.done():
            item.future.set_result(code)
        if len(self._pending) < self.max_pending:
            self._pending_room.set()  # type: ignore[union-attr]
        if not self._pending and not self._outbox:
            self._idle.set()  # type: ignore[union-attr]

    def _on_sync_response(self, payload: bytes) -> None:
        decoded = self._decode_response(payload)
        if decoded is None:
            return
        request_id, code = decoded
        cid = self._sync_requests.pop(request_id, None)
        if cid is None:
            return
        for fut in self._sync_waiters.pop(cid, []):
            if not fut.done():
                fut.set_result(code)

    async def _on_command(self, client: Link, payload: bytes) -> None:
        try:
            cmd = _COMMAND_DECODER.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            log.warning("gateway %s: unreadable command %r", self.gateway_id, payload[:200])
            return
        request_id, cid = cmd.request_id, cmd.cid
        if not isinstance(request_id, str) or not request_id or not isinstance(cid, str) or not cid:
            log.warning("gateway %s: command without request_id/cid %r", self.gateway_id, payload[:200])
            return
        code = await self._execute(cid, cmd.param)
        self.stats.commands[code] += 1
        msg = MESSAGES.get(code, "failed")
        await client.publish(
            self._t_command_response,
            encode_command_response(request_id, cid, code, time.time(), msg=msg),
            qos=1,
        )

    async def _execute(self, cid: str, param: Any) -> int:
        """Check a command against the model and run the handler; the code to answer."""
        if param is msgspec.UNSET or param in ({}, []):
            return ErrorCode.PARAMS_EMPTY
        if param is None:
            return ErrorCode.PARAMS_NULL
        if not isinstance(param, dict):
            return ErrorCode.PARAMS_TYPE_INCORRECT
        if cid not in self._devices:
            return ErrorCode.DEVICE_NOT_EXIST
        dp_id, value = param.get("id", msgspec.UNSET), param.get("value", msgspec.UNSET)
        if dp_id is msgspec.UNSET or value is msgspec.UNSET:
            return ErrorCode.PARAMS_EMPTY
        if dp_id is None or value is None:
            return ErrorCode.PARAMS_NULL
        if isinstance(dp_id, bool) or not isinstance(dp_id, (str, int)):
            return ErrorCode.PARAMS_TYPE_INCORRECT
        dp = self.model.get(dp_id)
        if dp is None:
            return ErrorCode.NOT_SUPPORTED
        try:
            canonical = dp.check_command(value)
        except ValueRejected as exc:
            return int(exc.code)
        handler = self.command_handler
        if handler is None:
            log.warning("gateway %s: command for %s but no command handler is set", self.gateway_id, cid)
            return ErrorCode.NOT_SUPPORTED
        try:
            result = handler(cid, dp, to_real(dp, canonical))
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            log.exception("gateway %s: command handler failed (cid %s, dp %s)", self.gateway_id, cid, dp.code)
            return ErrorCode.SYSTEM
        if result is None:
            return 0
        if isinstance(result, bool) or not isinstance(result, int):
            log.error("gateway %s: command handler returned %r, not an int code", self.gateway_id, result)
            return ErrorCode.SYSTEM
        return result

    def on_command(self, handler: CommandHandler) -> CommandHandler:
        """Decorator: ``@gw.on_command`` sets ``command_handler``."""
        self.command_handler = handler
        return handler
