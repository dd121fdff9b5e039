"""meterhub's MQTT 3.1.1 endpoint for meter gateways (and open hub subscribers): the asyncio plumbing.

A protocol adapter, not a general-purpose broker: messages that clients publish go to the
application (:class:`meterhub.transport.ApplicationHandler`); messages the application publishes go
to the clients whose subscriptions match. Clients never route to each other.

Layers: ``codec`` turns bytes into packets and back (sans-I/O); :class:`~meterhub.mqtt.session.Session`
(sans-I/O too) runs the MQTT rules of one client's session: QoS 1/2 handshakes both ways, in-flight
window, queue, inbound acknowledgement order, subscriptions, per-client back-pressure decisions;
:class:`MQTTConnection` is the asyncio protocol that drives one socket through it (CONNECT and
authentication, pausing the transport, coalesced writes); :class:`MQTTServer` owns listeners, the
sessions, the keep-alive sweeper and the limits.

Flow control, so that memory stays bounded whatever clients do (the session's part is described in
:mod:`meterhub.mqtt.session`):
- inbound QoS 1/2 messages are acknowledged only when the application's work for them completes,
  in order; a client with ``max_pending_inbound`` unacknowledged messages is not read from;
- nothing QoS 1/2 owed to a connected gateway is dropped: a full queue holds its requests back
  (its acknowledgements are still read), up to ``max_held_inbound`` bytes, then it is not read;
- a client whose socket buffer passes ``write_buffer_high`` is paused (not read, not written) and
  disconnected if it stays so (or held back past ``max_held_inbound``) for ``slow_client_timeout``;
- while the application says it is behind (:meth:`MQTTServer.set_intake_paused`, e.g. storage has
  too much queued), no client that may publish is read from at all: what they send waits in TCP
  buffers, and the keep-alive check spares them (their silence is the server's doing).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.mqtt import codec
from meterhub.mqtt.proxy_protocol import ProxyHeaderReader, ProxyProtocolError
from meterhub.mqtt.session import (
    PAUSE_AUTH,
    PAUSE_HELD,
    PAUSE_INBOUND,
    PAUSE_INTAKE,
    PAUSE_WRITE,
    SERVER_PAUSES,
    SESSION_PAUSES,
    ClientRecord,
    Limits,
    Session,
    owner_of,
)
from meterhub.mqtt.session_store import SessionStore
from meterhub.transport import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_PROTOCOL,
    CONNACK_ID_REJECTED,
    CONNACK_UNAVAILABLE,
    ApplicationHandler,
    Authenticator,
    AuthResult,
    Principal,
)

__all__ = [
    "PAUSE_AUTH",
    "PAUSE_HELD",
    "PAUSE_INBOUND",
    "PAUSE_INTAKE",
    "PAUSE_WRITE",
    "SERVER_PAUSES",
    "ClientRecord",
    "Limits",
    "MQTTConnection",
    "MQTTServer",
    "Session",
    "client_id_problem",
    "fit_to_fd_limit",
    "owner_of",
]

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted

_FORBIDDEN_ID_CHARS = frozenset("/+#")

#: File descriptors kept back from MQTT sockets: the database, the HTTP API, WebSocket clients, logs.
FD_RESERVE = 256
#: Client ids remembered as handed over to another node (meterhub.cluster), oldest forgotten first.
MOVED_MAX = 100_000


def fit_to_fd_limit(limits: Limits) -> int:
    """Make ``limits.max_connections`` fit the process's open-files limit; returns it.

    The soft limit is raised as far as ``max_connections + FD_RESERVE`` needs (up to the hard limit);
    if it is still lower, ``max_connections`` is lowered to match (with a warning). Connections past
    it are then refused cleanly (CONNACK 0x03, or closed at once before CONNECT) instead of making
    accept() fail, which would leave clients waiting on a TCP connection nobody reads and starve the
    HTTP API and the database of descriptors.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return limits.max_connections
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + FD_RESERVE
    if soft != unlimited and soft < wanted:
        target = wanted if hard == unlimited else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != unlimited and soft - FD_RESERVE < limits.max_connections:
        allowed = max(16, soft - FD_RESERVE)
        log.warning(
            "the open-files limit caps MQTT connections",
            open_files_limit=soft,
            max_connections=allowed,
            configured=limits.max_connections,
        )
        limits.max_connections = allowed
    return limits.max_connections


def client_id_problem(client_id: str, max_length: int) -> str | None:
    """Why a client id is refused (CONNACK 0x02), or None if it is fine."""
    if not client_id:
        return "empty client id"
    if len(client_id) > max_length:
        return "client id too long"
    for ch in client_id:
        if ch in _FORBIDDEN_ID_CHARS or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            return "client id has a forbidden character"
    return None


class MQTTConnection(asyncio.Protocol):
    """One client socket: decode packets, authenticate the CONNECT, drive the session, write bytes."""

    __slots__ = (
        "clean_disconnect",
        "close_reason",
        "created",
        "decoder",
        "flush_scheduled",
        "keep_alive",
        "last_rx",
        "out",
        "own_out_size",
        "peer",
        "pending",
        "principal",
        "proxy",
        "read_pause",
        "receiving",
        "record",
        "server",
        "session",
        "state",
        "transport",
        "will",
        "write_paused_since",
    )

    def __init__(self, server: MQTTServer, proxy_protocol: bool = False) -> None:
        self.server = server
        # a PROXY protocol header is required first (mqtt/proxy_protocol.py): the reader until it is in
        self.proxy = ProxyHeaderReader() if proxy_protocol else None
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.Decoder(server_side=True, max_packet_size=server.limits.max_packet_size)
        self.state = "new"  # new -> connecting -> connected -> closed
        self.session: Session | None = None
        self.principal: Principal | None = None
        self.keep_alive = 0
        now = time.monotonic()
        self.created = now
        self.last_rx = now
        self.read_pause = 0  # bitmask of reasons reading is paused: PAUSE_* in meterhub.mqtt.session
        self.will: codec.Will | None = None
        self.clean_disconnect = False
        self.close_reason = ""
        self.peer = ""
        self.pending: list[Any] | None = None
        self.write_paused_since: float | None = None
        self.record: ClientRecord | None = None
        self.out: list[bytes] | None = None  # bytes written before there is a session (refusals)
        self.own_out_size = 0
        self.receiving = False
        self.flush_scheduled = False

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        high = self.server.limits.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server = self.server
        server.connections.add(self)
        server.stats["connections.opened"] += 1
        if len(server.connections) > server.limits.max_connections + FD_RESERVE // 2:
            # over the descriptor budget before even a CONNECT: close now, keep the fd for others
            server.stats["refused.over_capacity"] += 1
            self.abort("over-capacity")

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.proxy is not None:
            data = self._proxy_header(data)
            if not data:
                return
        try:
            packets = self.decoder.feed(data)
        except codec.MQTTProtocolError as exc:
            self.server.stats[f"protocol_error.{exc.reason}"] += 1
            _repeats.info(
                ("malformed", exc.reason),
                "malformed packet, closing",
                peer=self.peer,
                client_id=self._cid(),
                reason=exc.reason,
            )
            self.abort(f"protocol-error:{exc.reason}")
            return
        self.receiving = True
        try:
            state = self.state
            if state == "connected":
                self._receive(packets)
                return
            for i, packet in enumerate(packets):
                if self.state == "connecting":
                    if self.pending is None:
                        self.pending = []
                    self.pending.append(packet)
                    continue
                if self.state == "closed":
                    return
                if self.state == "connected":  # a CONNECT in this read was accepted at once
                    self._receive(packets[i:])
                    return
                if type(packet) is not codec.Connect:
                    self.server.stats["protocol_error.not-connected"] += 1
                    self.abort("protocol-error:first-packet-not-connect")
                    return
                self._on_connect(packet)
        finally:
            self.receiving = False
            self.flush()

    def _proxy_header(self, data: bytes) -> bytes:
        """Read the PROXY protocol header: the client's address becomes this connection's peer.
        Returns the bytes after it (empty while it is incomplete or when the connection is closed)."""
        proxy = self.proxy
        assert proxy is not None
        stats = self.server.stats
        try:
            header = proxy.feed(data)
        except ProxyProtocolError as exc:
            stats[f"proxy_protocol.refused.{exc.reason}"] += 1
            _repeats.info(
                ("proxy_protocol", exc.reason),
                "connection without a valid PROXY protocol header, closing",
                peer=self.peer,
                reason=str(exc),
            )
            self.proxy = None
            self.abort(f"proxy-protocol:{exc.reason}")
            return b""
        if header is None:
            return b""
        self.proxy = None
        if header.peer is None:  # LOCAL (the balancer's health check) or no address given
            stats["proxy_protocol.local"] += 1
        else:
            stats["proxy_protocol.accepted"] += 1
            self.peer = header.peer
        return proxy.rest

    def _receive(self, packets: Iterable[Any]) -> None:
        """Hand packets of a connected client to its session and act on what it returns."""
        session = self.session
        assert session is not None
        process = session._process  # the fast path: nothing held back
        flush_bytes = self.server.flush_bytes
        connect = codec.Connect
        publish = codec.Publish
        for packet in packets:
            if self.state != "connected":
                return
            kind = type(packet)
            if kind is connect:
                self.server.stats["protocol_error.second-connect"] += 1
                self.abort("protocol-error:second-connect")
                return
            event = process(packet) if session.held is None else session.receive(packet)
            if event is not None:
                if type(event) is publish:
                    self._deliver(session, event)
                else:
                    self._on_event(session, event)
            if session.out_size >= flush_bytes:
                self.flush()
        if session.held is not None or session.wants_pause != self.read_pause & SESSION_PAUSES:
            self._after(session)

    def _on_event(self, session: Session, event: Any) -> None:
        if type(event) is codec.Publish:
            self._deliver(session, event)
        else:  # codec.Disconnect
            self.clean_disconnect = True
            self.will = None
            self.close("disconnect")

    def _deliver(self, session: Session, packet: codec.Publish) -> None:
        server = self.server
        principal = self.principal
        assert principal is not None
        try:
            result = server.handler.message(principal, packet.topic, packet.payload)
        except Exception:
            server.stats["handler.errors"] += 1
            _repeats.error(
                "handler_failed",
                "message handler failed",
                client_id=principal.client_id,
                topic=packet.topic,
                exc_info=True,
            )
            result = None
        if not packet.qos:
            return
        if result is not None and not isinstance(result, asyncio.Future):
            result = asyncio.ensure_future(result)
        wait = session.inbound_result(packet, result)
        if wait is not None:
            wait.add_done_callback(self._ack_ready)

    def _ack_ready(self, _fut: asyncio.Future[Any]) -> None:
        session = self.session
        if self.state != "connected" or session is None or session.connection is not self:
            return
        wait = session.ack_ready()
        if wait is not None:
            wait.add_done_callback(self._ack_ready)
        self._after(session)
        self._wrote(session)

    def _after(self, session: Session) -> None:
        """Run held-back packets that may go now, and apply the read pauses the session wants."""
        if session.held is not None:
            while self.state == "connected":
                event = session.next_released()
                if event is None:
                    break
                self._on_event(session, event)
        want = session.wants_pause
        if want != self.read_pause & SESSION_PAUSES:
            for bit in (PAUSE_INBOUND, PAUSE_HELD):
                if want & bit and not self.read_pause & bit:
                    self._pause_reading(bit)
                elif not want & bit and self.read_pause & bit:
                    self._resume_reading(bit)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        server.stats["connections.closed"] += 1
        if self.proxy is not None and not self.close_reason:  # the peer left before its PROXY header
            server.stats["proxy_protocol.closed_before_header"] += 1
        was_connected = self.state == "connected"
        self.state = "closed"
        if not was_connected:
            return
        session = self.session
        principal = self.principal
        assert session is not None and principal is not None
        if session.connection is self:
            session.detach(time.monotonic())
            if server.sessions.get(session.client_id) is session:
                if session.clean:
                    del server.sessions[session.client_id]
                else:
                    server.went_offline(session)
                    if server.store is not None:
                        server.store.save(session)
        reason = self.close_reason or ("disconnect" if self.clean_disconnect else "connection-lost")
        if self.will is not None and not self.clean_disconnect:
            server.stats["will.published"] += 1
            server.deliver(principal, self.will.topic, self.will.payload)
        if server.connected.get(principal.client_id) is self:
            del server.connected[principal.client_id]
        try:
            server.handler.client_disconnected(principal, reason)
        except Exception:
            _repeats.error(
                "disconnect_handler",
                "client_disconnected handler failed",
                client_id=principal.client_id,
                exc_info=True,
            )

    def pause_writing(self) -> None:
        self.write_paused_since = time.monotonic()
        self.server.stats["flow.write_paused"] += 1
        self._pause_reading(PAUSE_WRITE)
        session = self.session
        if session is not None and session.connection is self:
            session.writable = False

    def resume_writing(self) -> None:
        self.write_paused_since = None
        self._resume_reading(PAUSE_WRITE)
        session = self.session
        if session is not None and self.state == "connected" and session.connection is self:
            session.set_writable(True)
            self._after(session)
            self._wrote(session)

    # --- helpers ---------------------------------------------------------------------------------

    def _cid(self) -> str | None:
        return self.principal.client_id if self.principal else None

    def _pause_reading(self, bit: int) -> None:
        if not self.read_pause and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.read_pause |= bit

    def _resume_reading(self, bit: int) -> None:
        if not self.read_pause & bit:
            return
        if bit & SERVER_PAUSES:
            self.last_rx = time.monotonic()  # the silence was ours: the keep-alive starts again
        self.read_pause &= ~bit
        if not self.read_pause and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def out_size(self) -> int:
        """Bytes written but not yet handed to the transport."""
        session = self.session
        own = self.own_out_size
        if session is not None and session.connection is self:
            return own + session.out_size
        return own

    def write(self, data: bytes) -> None:
        """Bytes for the socket outside the session (CONNACK refusals); sent at the end of the read."""
        if self.out is None:
            self.out = [data]
        else:
            self.out.append(data)
        self.own_out_size += len(data)
        self._schedule_flush()

    def _wrote(self, session: Session) -> None:
        """The session wrote outside a read: send soon (in one system call with what follows in this
        turn of the event loop), or at once past ``flush_bytes``."""
        if session.out is None:
            return
        if session.out_size >= self.server.flush_bytes:
            self.flush()
        else:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.receiving and not self.flush_scheduled:
            self.flush_scheduled = True
            self.server.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        out = self.out
        if out is not None:
            self.out = None
            self.own_out_size = 0
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))
        session = self.session
        if session is not None and session.out is not None and session.connection is self:
            data = session.data_to_send()
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def abort(self, reason: str) -> None:
        """Close at once, dropping unsent data (protocol errors, timeouts)."""
        if not self.close_reason:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """Close after flushing what is written."""
        if not self.close_reason:
            self.close_reason = reason
        self.flush()
        if self.transport is not None:
            self.transport.close()

    @property
    def can_send(self) -> bool:
        return self.state == "connected" and self.write_paused_since is None

    # --- CONNECT -------------------------------------------------------------------------------

    def _on_connect(self, packet: codec.Connect) -> None:
        self.state = "connecting"
        self._pause_reading(PAUSE_AUTH)
        task = asyncio.get_running_loop().create_task(self._authenticate(packet))
        self.server.background.add(task)
        task.add_done_callback(self.server.background.discard)

    async def _authenticate(self, packet: codec.Connect) -> None:
        server = self.server
        code, reason = server.precheck(packet)
        result = AuthResult(code, None, reason)
        stored: tuple[str, dict[str, Any], int] | None = None
        if code == CONNACK_ACCEPTED:
            try:
                result = await asyncio.wait_for(
                    server.authenticator.authenticate(
                        packet.client_id, packet.username, packet.password, self.peer
                    ),
                    server.limits.auth_timeout,
                )
            except TimeoutError:
                server.stats["auth.timeout"] += 1
                _repeats.warning("auth_timeout", "authentication timed out", client_id=packet.client_id)
                result = AuthResult(CONNACK_UNAVAILABLE, None, "authenticator timed out")
            except Exception:
                _repeats.error(
                    "auth_error",
                    "authentication failed with an error",
                    client_id=packet.client_id,
                    exc_info=True,
                )
                result = AuthResult(CONNACK_UNAVAILABLE, None, "authenticator error")
            code = result.code
            if code == CONNACK_ACCEPTED and result.principal is None:
                code = CONNACK_UNAVAILABLE
            if (
                code == CONNACK_ACCEPTED
                and packet.will is not None
                and not result.principal.may_publish(packet.will.topic)  # type: ignore[union-attr]
            ):
                code, result.reason = 0x05, "will topic not allowed"
            stored = None
            if code == CONNACK_ACCEPTED and not packet.clean_session:
                stored = await server.load_stored(packet.client_id)
            if code == CONNACK_ACCEPTED and not server.admit(result.principal, packet.clean_session):  # type: ignore[arg-type]
                code, result.reason = CONNACK_UNAVAILABLE, "too many persistent sessions"
            if code == CONNACK_ACCEPTED and not packet.clean_session and self.state != "closed":
                stored = await server.claim_stored(result.principal, stored)  # type: ignore[arg-type]
        if self.state == "closed" or code != CONNACK_ACCEPTED:
            server.resuming.pop(packet.client_id, None)  # messages forwarded meanwhile: nobody to take them
            if server.store is not None:  # a claim made for this CONNECT is not taken up here
                server.store.claimed.discard(packet.client_id)
        if self.state == "closed":
            return
        server.stats[f"connack.{code}"] += 1
        if code != CONNACK_BAD_PROTOCOL and code != CONNACK_ID_REJECTED:
            record = server.client_record(packet.client_id)
            record.connects.append((time.time(), code))
            record.keepalive = packet.keep_alive
            record.clean_session = packet.clean_session
            self.record = record
        if code != CONNACK_ACCEPTED:
            _repeats.info(
                ("refused", code),
                "connection refused",
                peer=self.peer,
                client_id=packet.client_id,
                username=packet.username,
                code=code,
                reason=result.reason,
            )
            self.write(codec.encode(codec.ConnAck(False, code)))
            self.close(f"refused:{code}")
            return
        principal = result.principal
        assert principal is not None
        self.principal = principal
        self.keep_alive = packet.keep_alive
        self.will = packet.will
        session = server.attach(self, principal, packet.clean_session, stored)  # writes the CONNACK
        session.record = self.record
        self.state = "connected"
        log.debug("client connected", client_id=principal.client_id, peer=self.peer)
        try:
            server.handler.client_connected(principal, self.peer)
        except Exception:
            _repeats.error(
                "connect_handler",
                "client_connected handler failed",
                client_id=principal.client_id,
                exc_info=True,
            )
        if self.state != "connected":
            return
        session.resume()
        pending, self.pending = self.pending, None
        if pending:
            self._receive(pending)
        else:
            self._after(session)
        if self.state != "connected":
            return
        if server.intake_paused and principal.publishes:
            self._pause_reading(PAUSE_INTAKE)
        self._resume_reading(PAUSE_AUTH)
        self.flush()


def _last_rx(conn: MQTTConnection) -> float:
    return conn.last_rx


class MQTTServer:
    """Listeners, sessions and limits. Implements :class:`meterhub.transport.Southbound`."""

    def __init__(self, authenticator: Authenticator, handler: ApplicationHandler, limits: Limits) -> None:
        self.authenticator = authenticator
        self.handler = handler
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self.connected: dict[str, MQTTConnection] = {}
        self.connections: set[MQTTConnection] = set()
        self.stats: Counter[str] = Counter()
        self.client_records: dict[str, ClientRecord] = {}
        #: Client ids whose record changed since meterhub.core.conformance_store last took them.
        self.records_dirty: set[str] = set()
        # Persistent sessions: how many per owner (vendor), and the offline ones oldest first.
        self.persistent_count: Counter[str] = Counter()
        self.persistent_total = 0
        self.offline: dict[str, Session] = {}
        self.offline_by_owner: dict[str, dict[str, Session]] = {}
        self.limited_log = RateLimitedLog(log)  # this server's refusals (sessions share it)
        #: Where persistent sessions are stored (meterhub.mqtt.session_store); None: memory only.
        self.store: SessionStore | None = None
        #: Cluster: client id -> the node this one handed its persistent session to (bounded, oldest
        #: forgotten): a QoS>0 message for it here goes there (``forward``), not into a stale copy.
        self.moved: OrderedDict[str, str] = OrderedDict()
        #: Cluster: client ids whose session is being read and claimed for a CONNECT here -> messages
        #: forwarded to it meanwhile, delivered once it is attached.
        self.resuming: dict[str, list[tuple[str, bytes, int]]] = {}
        #: ``forward(node, client_id, topic, payload, qos, hops)``: set by meterhub.cluster.
        self.forward: Callable[[str, str, str, bytes, int, int], None] | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self.accepting = True
        self.intake_paused = False
        self._intake_paused_at = 0.0
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        # Coalesced writes go to the transport at once beyond this, so memory held for a client stays
        # under 1.5 x write_buffer_high (+ one message).
        self.flush_bytes = max(4096, limits.write_buffer_high // 4)

    # --- lifecycle -------------------------------------------------------------------------------

    async def listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, proxy_protocol: bool = False
    ) -> int:
        """Open a listener; returns the bound port (useful with port 0). With ``proxy_protocol`` every
        connection must start with a PROXY protocol v2 (or v1) header (a TCP balancer in front)."""
        loop = self.loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: MQTTConnection(self, proxy_protocol),
            host,
            port,
            ssl=ssl_context,
            backlog=4096,
            reuse_address=True,
        )
        self._servers.append(srv)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_forever())
            if self.store is not None:
                limits = self.limits
                purge = self.store.purge_forever(
                    60.0, limits.max_persistent_sessions_per_vendor, limits.max_persistent_sessions
                )
                task = loop.create_task(purge)
                self.background.add(task)
                task.add_done_callback(self.background.discard)
        bound = srv.sockets[0].getsockname()[1]
        log.info(
            "mqtt listening",
            host=host,
            port=bound,
            tls=ssl_context is not None,
            proxy_protocol=proxy_protocol,
        )
        return bound

    async def close(self) -> None:
        self.accepting = False
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.close("shutdown")
        for srv in self._servers:
            await srv.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.background):
            task.cancel()
        store = self.store
        if store is not None:  # the persistent sessions connected here, stored offline
            store.closing = True
            for session in self.sessions.values():
                if not session.clean and session.connection is not None:
                    store.save(session)
            await store.flush()

    # --- flow control ----------------------------------------------------------------------------

    def set_intake_paused(self, paused: bool) -> None:
        """Stop (or start again) reading from every client that may publish to the application.

        For an application that is behind (storage queue over its high-water mark): clients' messages
        then wait in their TCP buffers instead of piling up in this process. Subscribers only (open hub
        links) are still read, so that they keep acknowledging what they are sent.
        """
        if paused == self.intake_paused:
            return
        self.intake_paused = paused
        now = time.monotonic()
        if paused:
            self.stats["flow.intake_paused"] += 1
            self._intake_paused_at = now
            for conn in self.connections:
                if conn.state == "connected" and conn.principal is not None and conn.principal.publishes:
                    conn._pause_reading(PAUSE_INTAKE)
        else:
            self.stats["flow.intake_paused_ms"] += int((now - self._intake_paused_at) * 1000)
            # Longest unread first: the event loop reads sockets in about the order they are resumed,
            # and the high-water mark is soon reached again, so a fixed order would serve the same
            # few hundred gateways every time and starve the rest.
            held = [conn for conn in self.connections if conn.read_pause & PAUSE_INTAKE]
            held.sort(key=_last_rx)
            for conn in held:
                conn._resume_reading(PAUSE_INTAKE)

    # --- connection admission --------------------------------------------------------------------

    def precheck(self, packet: codec.Connect) -> tuple[int, str]:
        """Checks that need no authenticator: protocol level, client id, keep-alive, capacity."""
        limits = self.limits
        if not (
            (packet.protocol_name == "MQTT" and packet.protocol_level == 4)
            or (packet.protocol_name == "MQIsdp" and packet.protocol_level == 3)
        ):
            return CONNACK_BAD_PROTOCOL, f"protocol level {packet.protocol_level} not supported"
        problem = client_id_problem(packet.client_id, limits.max_client_id_length)
        if problem:
            return CONNACK_ID_REJECTED, problem
        if limits.keepalive_max and packet.keep_alive > limits.keepalive_max:
            return CONNACK_ID_REJECTED, f"keep-alive above {limits.keepalive_max}s"
        if not self.accepting:
            return CONNACK_UNAVAILABLE, "shutting down"
        if len(self.connected) >= limits.max_connections:
            return CONNACK_UNAVAILABLE, "connection limit reached"
        return CONNACK_ACCEPTED, ""

    def admit(self, principal: Principal, clean: bool) -> bool:
        """Make room for the persistent session a CONNECT will create (forgetting the oldest offline
        one of the same vendor, or of all, at the bounds); False if there is none to forget."""
        if clean:
            return True
        existing = self.sessions.get(principal.client_id)
        owner = owner_of(principal)
        if existing is not None and not existing.clean and existing.owner == owner:
            return True  # resumed: no new session
        limits = self.limits
        if self.persistent_count[owner] >= limits.max_persistent_sessions_per_vendor:
            oldest = next(iter(self.offline_by_owner.get(owner, ())), None)
            if oldest is None:
                return self._refuse_persistent(principal, "vendor")
            self._forget_offline(self.offline[oldest], "vendor")
        if self.persistent_total >= limits.max_persistent_sessions:
            oldest = next(iter(self.offline), None)
            if oldest is None:
                return self._refuse_persistent(principal, "total")
            self._forget_offline(self.offline[oldest], "total")
        return True

    def _refuse_persistent(self, principal: Principal, bound: str) -> bool:
        self.stats[f"sessions.refused_{bound}_limit"] += 1
        self.limited_log.info(
            f"session_refused_{bound}",
            "persistent session refused: every session at the limit is connected",
            client_id=principal.client_id,
            owner=owner_of(principal),
            bound=bound,
        )
        return False

    def _forget_offline(self, session: Session, bound: str) -> None:
        self.stats[f"sessions.forgotten_{bound}_limit"] += 1
        self.limited_log.info(
            f"session_forgotten_{bound}",
            "oldest offline persistent session forgotten: too many sessions",
            client_id=session.client_id,
            owner=session.owner,
            bound=bound,
        )
        self.forget(session)

    def went_offline(self, session: Session) -> None:
        """A persistent session lost its connection: it is now the newest offline one."""
        cid = session.client_id
        self.offline.pop(cid, None)
        self.offline[cid] = session
        by_owner = self.offline_by_owner.get(session.owner)
        if by_owner is None:
            by_owner = self.offline_by_owner[session.owner] = {}
        by_owner.pop(cid, None)
        by_owner[cid] = session

    def _online(self, session: Session) -> None:
        cid = session.client_id
        if self.offline.pop(cid, None) is not None:
            by_owner = self.offline_by_owner[session.owner]
            del by_owner[cid]
            if not by_owner:
                del self.offline_by_owner[session.owner]

    def forget(self, session: Session, keep_stored: bool = False) -> None:
        """Drop a session (expired, over a bound, or replaced by a new one for the same client id);
        its stored copy too unless ``keep_stored`` (handed over to another node)."""
        cid = session.client_id
        if self.sessions.get(cid) is session:
            del self.sessions[cid]
        if not session.clean:
            if self.store is not None:
                if keep_stored:
                    self.store.gens.pop(cid, None)
                else:
                    self.store.delete(cid)
            self._online(session)
            self.persistent_total -= 1
            count = self.persistent_count
            count[session.owner] -= 1
            if count[session.owner] <= 0:
                del count[session.owner]

    async def load_stored(self, client_id: str) -> tuple[str, dict[str, Any], int] | None:
        """For a CONNECT with clean_session=0: the stored session (the node that wrote it, its state)
        when memory may not have the newest (none here, or a cluster); None otherwise or on error."""
        store = self.store
        if store is None or (client_id in self.sessions and store.hand_over is None):
            return None
        if store.hand_over is not None and len(self.resuming) < self.limits.max_connections:
            self.resuming.setdefault(client_id, [])
        try:
            return await store.load(client_id)
        except Exception as exc:
            self.stats["sessions.load_failed"] += 1
            _repeats.warning(
                "session_load_failed", "stored session not read", client_id=client_id, error=str(exc)[:200]
            )
            return None

    async def claim_stored(
        self, principal: Principal, stored: tuple[str, dict[str, Any], int] | None
    ) -> tuple[str, dict[str, Any], int] | None:
        """Cluster: before the CONNACK of a persistent session, record in the store that this node
        holds it (:meth:`SessionStore.claim`). When another node claimed the row since it was read,
        read it again (asking that node to hand it over) and retry, at most 3 times. Returns the
        stored session to attach (as :meth:`load_stored`)."""
        store = self.store
        if store is None or store.hand_over is None:
            return stored  # one node: nobody else to claim it
        cid = principal.client_id
        owner = owner_of(principal)
        for _ in range(3):
            session = self.sessions.get(cid)
            if stored is not None:
                state = stored[1]
            elif session is not None and not session.clean and session.owner == owner:
                state = session.to_dict()
            else:
                state = Session(cid, principal, False).to_dict()
            try:
                if await store.claim(cid, owner, state, stored[2] if stored is not None else None):
                    return stored
            except Exception as exc:
                self.stats["sessions.claim_failed"] += 1
                _repeats.warning(
                    "session_claim_failed", "session claim not stored", client_id=cid, error=str(exc)[:200]
                )
                return stored
            self.stats["sessions.claim_raced"] += 1
            stored = await self.load_stored(cid)
        self.stats["sessions.claim_failed"] += 1
        return stored

    async def hand_over(self, client_id: str, to_node: str | None = None, wait: float = 1.0) -> None:
        """Another node (``to_node``) takes ``client_id``'s persistent session: close its connection
        here (no will), store the session and forget it from memory (the stored copy is the other
        node's); QoS>0 messages for it that come here afterwards are forwarded to ``to_node``."""
        conn = self.connected.get(client_id)
        if conn is not None:
            conn.will = None
            conn.close("takeover")
            deadline = time.monotonic() + wait
            while self.connected.get(client_id) is conn and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        session = self.sessions.get(client_id)
        if session is not None and conn is not None and session.connection is conn:
            session.detach(time.monotonic())  # not closed yet: its state is what it owes now
            if not session.clean:
                self.went_offline(session)
        written = None
        if (
            session is not None
            and not session.clean
            and session.connection is None
            and self.store is not None
        ):
            # Stored as it is now and forgotten in the same step: a message arriving from here on
            # is forwarded, so none goes into a copy nobody will read.
            written = self.store.write_now(session)
            self.forget(session, keep_stored=True)
            self.stats["sessions.handed_over"] += 1
        if to_node is not None and to_node != getattr(self.store, "node_id", None):
            self.moved.pop(client_id, None)
            self.moved[client_id] = to_node
            while len(self.moved) > MOVED_MAX:
                self.moved.popitem(last=False)
        if written is not None:
            await written

    def deliver_forwarded(self, client_id: str, topic: str, payload: bytes, qos: int, hops: int) -> bool:
        """A message another node forwarded for ``client_id`` (it handed the session to this node):
        into the session here, held until a CONNECT being resumed here has attached it, or on to
        the node this one handed it to in turn. False when nobody here can take it."""
        if client_id in self.sessions:
            return self.publish(client_id, topic, payload, qos)
        waiting = self.resuming.get(client_id)
        if waiting is not None:
            if len(waiting) < self.limits.max_queued:
                waiting.append((topic, payload, qos))
                return True
            self.stats["sessions.forward_dropped_queue_full"] += 1
            return False
        node = self.moved.get(client_id)
        if node is not None and self.forward is not None and hops < 3:
            self.forward(node, client_id, topic, payload, qos, hops + 1)
            return True
        self.stats["sessions.forward_lost"] += 1
        return False

    def attach(
        self,
        conn: MQTTConnection,
        principal: Principal,
        clean: bool,
        stored: tuple[str, dict[str, Any], int] | None = None,
    ) -> Session:
        """Bind an authenticated connection to its session (resumed, loaded from ``stored``, or new);
        the session writes the CONNACK with session_present."""
        cid = principal.client_id
        old = self.connected.pop(cid, None)
        if old is not None and old is not conn:
            # Session takeover: the old connection goes without its will and is reported as replaced.
            self.stats["connections.taken_over"] += 1
            old.state = "closed"
            old.close_reason = "takeover"
            if old.session is not None and old.session.connection is old:
                old.session.connection = None
            if old.transport is not None:
                old.transport.abort()
            try:
                self.handler.client_disconnected(old.principal, "takeover")  # type: ignore[arg-type]
            except Exception:
                _repeats.error(
                    "disconnect_handler", "client_disconnected handler failed", client_id=cid, exc_info=True
                )
        session = self.sessions.get(cid)
        present = False
        owner = owner_of(principal)
        store = self.store
        if (
            stored is not None
            and session is not None
            and store is not None
            and stored[0] != store.node_id
            and not clean
        ):
            self.forget(session, keep_stored=True)  # another node held it after us: its copy wins
            session = None
        if session is not None and not clean and not session.clean and session.owner == owner:
            present = True
            session.principal = principal
            self._online(session)
        else:
            if session is not None:
                self.forget(session)
            if stored is not None and not clean and stored[1].get("owner") == owner:
                session = Session.from_dict(stored[1], principal, self.limits, self.stats, self.limited_log)
                present = True
                self.stats["sessions.loaded"] += 1
            else:
                session = Session(cid, principal, clean, self.limits, self.stats, self.limited_log)
            self.sessions[cid] = session
            if not clean:
                self.persistent_count[session.owner] += 1
                self.persistent_total += 1
        if store is not None:
            if clean:
                store.delete(cid, whatever_gen=True)
            else:
                store.took(cid, stored[2] if stored is not None else None)
                session.on_change = store.save
                store.save(session)  # held by this node now
        session.attach(conn, principal, present)
        conn.session = session
        self.connected[cid] = conn
        self.moved.pop(cid, None)  # held here again
        for topic, payload, qos in self.resuming.pop(cid, ()):  # forwarded while it was resumed
            session.send(topic, payload, qos)
        return session

    def client_record(self, client_id: str) -> ClientRecord:
        self.records_dirty.add(client_id)
        records = self.client_records
        record = records.get(client_id)
        if record is None:
            if len(records) >= 100_000:  # forget the oldest client
                del records[next(iter(records))]
            record = records[client_id] = ClientRecord()
        return record

    # --- delivery --------------------------------------------------------------------------------

    def deliver(self, principal: Principal, topic: str, payload: bytes) -> None:
        """Hand a message to the application as if ``principal`` had published it (wills)."""
        try:
            self.handler.message(principal, topic, payload)
        except Exception:
            _repeats.error(
                "handler_failed",
                "message handler failed",
                client_id=principal.client_id,
                topic=topic,
                exc_info=True,
            )

    def publish(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        session = self.sessions.get(client_id)
        if session is None:
            node = self.moved.get(client_id) if qos else None
            if node is not None and self.forward is not None:  # handed to that node: it takes it
                self.stats["sessions.forwarded"] += 1
                self.forward(node, client_id, topic, payload, qos, 0)
                return True
            return False
        sent = session.send(topic, payload, qos)
        if session.out is not None:
            conn = session.connection
            if conn is not None:
                conn._wrote(session)
        return sent

    # --- Southbound ------------------------------------------------------------------------------

    def is_connected(self, client_id: str) -> bool:
        return client_id in self.connected

    def disconnect(self, client_id: str, reason: str = "") -> bool:
        conn = self.connected.get(client_id)
        if conn is None:
            return False
        if reason == "takeover":  # taken over on another node (meterhub.cluster): no will
            conn.will = None
            session = self.sessions.get(client_id)
            if session is not None and session.connection is conn and not session.clean:
                # The other node's copy is the session now: do not store this one over it.
                self.forget(session, keep_stored=True)
        conn.close(reason or "closed-by-server")
        return True

    def connected_clients(self) -> Iterable[tuple[str, str]]:
        return ((cid, conn.peer) for cid, conn in self.connected.items())

    # --- timers ----------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = self.limits.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                _repeats.error("sweep_failed", "sweep failed", exc_info=True)

    def sweep(self) -> None:
        """Close connections past their connect timeout, keep-alive, slow-client limit or expiry."""
        now = time.monotonic()
        wall = time.time()
        limits = self.limits
        stats = self.stats
        for conn in list(self.connections):
            state = conn.state
            if state == "new":
                if now - conn.created > limits.connect_timeout:
                    stats["closed.connect_timeout"] += 1
                    conn.abort("connect-timeout")
                continue
            if state == "connecting":
                continue  # CONNECT is in; auth_timeout bounds the wait and answers 0x03 if it passes
            if state != "connected":
                continue
            session = conn.session
            if Session.keepalive_expired(conn.keep_alive, conn.last_rx, now, conn.read_pause):
                stats["closed.keepalive"] += 1
                if conn.record is not None:
                    conn.record.keepalive_expired += 1
                    self.records_dirty.add(conn._cid())
                _repeats.info("keepalive", "keep-alive expired", client_id=conn._cid(), peer=conn.peer)
                conn.abort("keepalive-timeout")
            elif (
                conn.write_paused_since is not None
                and now - conn.write_paused_since > limits.slow_client_timeout
            ):
                stats["closed.slow_client"] += 1
                _repeats.info(
                    "slow_client", "slow client disconnected", client_id=conn._cid(), peer=conn.peer
                )
                conn.abort("slow-client")
            elif (
                session is not None
                and session.held_full_since is not None
                and now - session.held_full_since > limits.slow_client_timeout
            ):
                stats["closed.slow_client"] += 1
                _repeats.info(
                    "held_full",
                    "client sends without taking its answers, disconnected",
                    client_id=conn._cid(),
                )
                conn.abort("slow-client")
            elif (
                conn.principal is not None and conn.principal.expires_at and wall > conn.principal.expires_at
            ):
                stats["closed.expired"] += 1
                conn.close("credentials-expired")
        offline = self.offline
        while offline:
            session = next(iter(offline.values()))  # the oldest offline session
            if session.disconnected_at is not None and now - session.disconnected_at <= limits.session_expiry:
                break
            stats["sessions.expired"] += 1
            self.forget(session)
