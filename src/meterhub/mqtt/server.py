"""meterhub's MQTT 3.1.1 endpoint for meter gateways (and, later, open hub subscribers).

A protocol adapter, not a general-purpose broker: messages that clients publish go to the
application (:class:`meterhub.transport.ApplicationHandler`); messages the application publishes go
to the clients whose subscriptions match. Clients never route to each other.

Layers: ``codec`` turns bytes into packets and back (sans-I/O); :class:`Session` holds what MQTT
keeps between connections (subscriptions, queued and in-flight messages); :class:`MQTTConnection` is
the asyncio protocol that drives one socket; :class:`MQTTServer` owns listeners, sessions, the
keep-alive sweeper and the limits.

Flow control, so that memory stays bounded whatever clients do:
- inbound QoS 1/2 messages are acknowledged only when the application's work for them completes,
  in order; a client with ``max_pending_inbound`` unacknowledged messages is not read from;
- outbound QoS 1/2 messages beyond ``max_inflight`` wait in a per-session queue of ``max_queued``
  (oldest dropped and counted);
- a client whose socket buffer passes ``write_buffer_high`` is paused (not read, not written) and
  disconnected if it stays so for ``slow_client_timeout`` seconds;
- while the application says it is behind (:meth:`MQTTServer.set_intake_paused`, e.g. storage has
  too much queued), no client that may publish is read from at all: what they send waits in TCP
  buffers, and the keep-alive check spares them (their silence is the server's doing).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from meterhub.logs import get_logger
from meterhub.mqtt import codec
from meterhub.mqtt.topics import matches, valid_filter
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

log = get_logger(__name__)

_PINGRESP = b"\xd0\x00"
_FORBIDDEN_ID_CHARS = frozenset("/+#")


@dataclass(slots=True)
class Limits:
    max_packet_size: int = 64 * 1024
    max_inflight: int = 32
    max_pending_inbound: int = 256
    max_queued: int = 1000
    write_buffer_high: int = 256 * 1024
    slow_client_timeout: float = 60.0
    connect_timeout: float = 10.0
    max_client_id_length: int = 128
    max_topic_length: int = 256
    max_connections: int = 100_000
    keepalive_max: int = 3600
    auth_timeout: float = 10.0
    sweep_interval: float = 0.5
    session_expiry: float = 7 * 24 * 3600.0

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        names = [n for n in cls.__slots__ if hasattr(settings, n)]  # type: ignore[attr-defined]
        return cls(**{n: getattr(settings, n) for n in names})


#: File descriptors kept back from MQTT sockets: the database, the HTTP API, WebSocket clients, logs.
FD_RESERVE = 256


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


class ClientRecord:
    """What a client did on the wire, kept for its conformance report card (bounded)."""

    __slots__ = ("acl_rejected", "clean_session", "connects", "keepalive", "keepalive_expired", "qos")

    def __init__(self) -> None:
        self.connects: deque[tuple[float, int]] = deque(maxlen=64)  # (wall time, CONNACK code)
        self.keepalive = 0
        self.clean_session = True
        self.qos = [0, 0, 0]  # inbound PUBLISH count per QoS
        self.acl_rejected = 0
        self.keepalive_expired = 0


class Session:
    """MQTT session state that outlives a connection when clean_session is 0."""

    __slots__ = (
        "clean",
        "client_id",
        "connection",
        "disconnected_at",
        "inbound_qos2",
        "inflight",
        "match_cache",
        "next_pid",
        "principal",
        "queue",
        "subscriptions",
    )

    def __init__(self, client_id: str, principal: Principal, clean: bool) -> None:
        self.client_id = client_id
        self.principal = principal
        self.clean = clean
        self.subscriptions: dict[str, int] = {}
        # packet id -> [topic, payload, qos, stage]; stage 0 awaits PUBACK/PUBREC, 1 awaits PUBCOMP
        self.inflight: dict[int, list[Any]] = {}
        self.queue: deque[tuple[str, bytes, int]] | None = None
        self.inbound_qos2: set[int] | None = None
        self.connection: MQTTConnection | None = None
        self.next_pid = 1
        self.match_cache: dict[str, int | None] = {}
        self.disconnected_at: float | None = None

    def granted_qos(self, topic: str) -> int | None:
        """The highest QoS granted by a subscription matching ``topic``; None if none matches."""
        cache = self.match_cache
        try:
            return cache[topic]
        except KeyError:
            pass
        best: int | None = None
        for topic_filter, qos in self.subscriptions.items():
            if matches(topic_filter, topic) and (best is None or qos > best):
                best = qos
        if len(cache) > 64:
            cache.clear()
        cache[topic] = best
        return best

    def alloc_pid(self) -> int:
        pid = self.next_pid
        inflight = self.inflight
        while pid in inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        return pid


#: Reasons a connection is not read from (bits of ``MQTTConnection.read_pause``).
PAUSE_AUTH = 1  # CONNECT is being authenticated
PAUSE_INBOUND = 2  # max_pending_inbound messages await the application
PAUSE_WRITE = 4  # the client does not read what we write
PAUSE_INTAKE = 8  # the application is behind (server-wide)
#: Pauses that are the server's doing: the keep-alive check does not count them against the client.
SERVER_PAUSES = PAUSE_INBOUND | PAUSE_INTAKE


class MQTTConnection(asyncio.Protocol):
    """One client socket: decode packets, run the MQTT rules, write replies."""

    __slots__ = (
        "ack_waiting",
        "acks",
        "clean_disconnect",
        "close_reason",
        "created",
        "decoder",
        "flush_scheduled",
        "keep_alive",
        "last_rx",
        "out",
        "out_size",
        "peer",
        "pending",
        "principal",
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

    def __init__(self, server: MQTTServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.Decoder(server_side=True, max_packet_size=server.limits.max_packet_size)
        self.state = "new"  # new -> connecting -> connected -> closed
        self.session: Session | None = None
        self.principal: Principal | None = None
        self.keep_alive = 0
        now = time.monotonic()
        self.created = now
        self.last_rx = now
        self.acks: deque[tuple[asyncio.Future[Any] | None, bytes]] | None = None
        self.ack_waiting = False
        self.read_pause = 0  # bitmask of reasons reading is paused: PAUSE_* below
        self.will: codec.Will | None = None
        self.clean_disconnect = False
        self.close_reason = ""
        self.peer = ""
        self.pending: list[Any] | None = None
        self.write_paused_since: float | None = None
        self.record: ClientRecord | None = None
        self.out: list[bytes] | None = None  # bytes written but not yet handed to the transport
        self.out_size = 0
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
        try:
            packets = self.decoder.feed(data)
        except codec.MQTTProtocolError as exc:
            self.server.stats[f"protocol_error.{exc.reason}"] += 1
            log.info("malformed packet, closing", peer=self.peer, client_id=self._cid(), reason=exc.reason)
            self.abort(f"protocol-error:{exc.reason}")
            return
        self.receiving = True
        try:
            for packet in packets:
                if self.state == "connecting":
                    if self.pending is None:
                        self.pending = []
                    self.pending.append(packet)
                    continue
                if self.state == "closed":
                    return
                self._dispatch(packet)
        finally:
            self.receiving = False
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)
        server.stats["connections.closed"] += 1
        was_connected = self.state == "connected"
        self.state = "closed"
        if not was_connected:
            return
        session = self.session
        principal = self.principal
        assert session is not None and principal is not None
        if session.connection is self:
            session.connection = None
            session.disconnected_at = time.monotonic()
            if session.clean and server.sessions.get(session.client_id) is session:
                del server.sessions[session.client_id]
        reason = self.close_reason or ("disconnect" if self.clean_disconnect else "connection-lost")
        if self.will is not None and not self.clean_disconnect:
            server.stats["will.published"] += 1
            server.deliver(principal, self.will.topic, self.will.payload)
        if server.connected.get(principal.client_id) is self:
            del server.connected[principal.client_id]
        try:
            server.handler.client_disconnected(principal, reason)
        except Exception:
            log.exception("client_disconnected handler failed", client_id=principal.client_id)

    def pause_writing(self) -> None:
        self.write_paused_since = time.monotonic()
        self.server.stats["flow.write_paused"] += 1
        self._pause_reading(PAUSE_WRITE)

    def resume_writing(self) -> None:
        self.write_paused_since = None
        self._resume_reading(PAUSE_WRITE)
        if self.session is not None and self.state == "connected":
            self.server.pump(self.session)

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

    def write(self, data: bytes) -> None:
        """Queue bytes for the socket. Writes made while handling one read (or in one turn of the event
        loop) go out in a single send: one system call instead of one per packet."""
        out = self.out
        if out is None:
            self.out = [data]
            self.out_size = len(data)
            if not self.receiving and not self.flush_scheduled:
                self.flush_scheduled = True
                self.server.loop.call_soon(self.flush)
            return
        out.append(data)
        self.out_size += len(data)
        if self.out_size >= self.server.flush_bytes:
            self.flush()

    def flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if out is None:
            return
        self.out = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))

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

    # --- packet handling -------------------------------------------------------------------------

    def _dispatch(self, packet: Any) -> None:
        handler = _DISPATCH.get(type(packet))
        if self.state == "new":
            if type(packet) is not codec.Connect:
                self.server.stats["protocol_error.not-connected"] += 1
                self.abort("protocol-error:first-packet-not-connect")
                return
        elif type(packet) is codec.Connect:
            self.server.stats["protocol_error.second-connect"] += 1
            self.abort("protocol-error:second-connect")
            return
        assert handler is not None
        handler(self, packet)

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
                log.warning("authentication timed out", client_id=packet.client_id)
                result = AuthResult(CONNACK_UNAVAILABLE, None, "authenticator timed out")
            except Exception:
                log.exception("authentication failed with an error", client_id=packet.client_id)
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
            log.info(
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
        session_present = server.attach(self, principal, packet.clean_session)
        self.state = "connected"
        self.write(codec.encode(codec.ConnAck(session_present, CONNACK_ACCEPTED)))
        log.debug("client connected", client_id=principal.client_id, peer=self.peer)
        try:
            server.handler.client_connected(principal, self.peer)
        except Exception:
            log.exception("client_connected handler failed", client_id=principal.client_id)
        server.resend_inflight(self.session)  # type: ignore[arg-type]
        pending, self.pending = self.pending, None
        if pending:
            for pkt in pending:
                if self.state != "connected":
                    return
                self._dispatch(pkt)
        if server.intake_paused and principal.publishes:
            self._pause_reading(PAUSE_INTAKE)
        self._resume_reading(PAUSE_AUTH)

    def _on_publish(self, packet: codec.Publish) -> None:
        server = self.server
        stats = server.stats
        stats["publish.in"] += 1
        principal = self.principal
        session = self.session
        assert principal is not None and session is not None
        topic = packet.topic
        qos = packet.qos
        pid = packet.packet_id
        result: Any = None
        record = self.record
        if record is not None:
            record.qos[qos] += 1
        if len(topic) > server.limits.max_topic_length or not principal.may_publish(topic):
            stats["rejected.publish_acl"] += 1
            if record is not None:
                record.acl_rejected += 1
            log.info("publish refused", client_id=principal.client_id, topic=topic[:200])
        elif qos == 2 and session.inbound_qos2 is not None and pid in session.inbound_qos2:
            stats["publish.in_duplicate_qos2"] += 1
        else:
            if qos == 2:
                if session.inbound_qos2 is None:
                    session.inbound_qos2 = set()
                session.inbound_qos2.add(pid)  # type: ignore[arg-type]
            try:
                result = server.handler.message(principal, topic, packet.payload)
            except Exception:
                stats["handler.errors"] += 1
                log.exception("message handler failed", client_id=principal.client_id, topic=topic)
                result = None
            if result is not None and not isinstance(result, asyncio.Future):
                result = asyncio.ensure_future(result)
        if qos == 0:
            return
        ack = (b"\x40\x02" if qos == 1 else b"\x50\x02") + pid.to_bytes(2, "big")  # type: ignore[union-attr]
        acks = self.acks
        if result is None and not acks:
            self.write(ack)
            return
        if acks is None:
            acks = self.acks = deque()
        acks.append((result, ack))
        if len(acks) >= server.limits.max_pending_inbound:
            stats["flow.inbound_paused"] += 1
            self._pause_reading(PAUSE_INBOUND)
        self._flush_acks()

    def _ack_ready(self, _fut: asyncio.Future[Any]) -> None:
        self.ack_waiting = False
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Write acknowledgements in arrival order, as far as the work behind them is done."""
        if self.state != "connected" or self.acks is None:
            return
        acks = self.acks
        transport = self.transport
        assert transport is not None
        while acks:
            fut, data = acks[0]
            if fut is not None and not fut.done():
                if not self.ack_waiting:
                    self.ack_waiting = True
                    fut.add_done_callback(self._ack_ready)
                break
            acks.popleft()
            self.write(data)
        if self.read_pause & PAUSE_INBOUND and len(acks) <= self.server.limits.max_pending_inbound // 2:
            self._resume_reading(PAUSE_INBOUND)

    def _on_puback(self, packet: codec.PubAck) -> None:
        session = self.session
        assert session is not None
        entry = session.inflight.pop(packet.packet_id, None)
        if entry is None:
            self.server.stats["protocol.unknown_ack"] += 1
        self.server.pump(session)

    def _on_pubrec(self, packet: codec.PubRec) -> None:
        session = self.session
        assert session is not None
        entry = session.inflight.get(packet.packet_id)
        if entry is not None:
            entry[3] = 1
        self.write(b"\x62\x02" + packet.packet_id.to_bytes(2, "big"))

    def _on_pubrel(self, packet: codec.PubRel) -> None:
        session = self.session
        assert session is not None
        if session.inbound_qos2 is not None:
            session.inbound_qos2.discard(packet.packet_id)
        self.write(b"\x70\x02" + packet.packet_id.to_bytes(2, "big"))

    def _on_pubcomp(self, packet: codec.PubComp) -> None:
        session = self.session
        assert session is not None
        session.inflight.pop(packet.packet_id, None)
        self.server.pump(session)

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        session = self.session
        principal = self.principal
        assert session is not None and principal is not None
        limits = self.server.limits
        codes: list[int] = []
        for topic_filter, qos in packet.topics:
            if (
                len(topic_filter) > limits.max_topic_length
                or not valid_filter(topic_filter)
                or not principal.may_subscribe(topic_filter)
            ):
                self.server.stats["rejected.subscribe_acl"] += 1
                log.info("subscribe refused", client_id=principal.client_id, filter=topic_filter[:200])
                codes.append(0x80)
                continue
            session.subscriptions[topic_filter] = qos
            codes.append(qos)
        session.match_cache.clear()
        self.write(codec.encode(codec.SubAck(packet.packet_id, codes)))
        self.server.pump(session)

    def _on_unsubscribe(self, packet: codec.Unsubscribe) -> None:
        session = self.session
        assert session is not None
        for topic_filter in packet.topics:
            session.subscriptions.pop(topic_filter, None)
        session.match_cache.clear()
        self.write(codec.encode(codec.UnsubAck(packet.packet_id)))

    def _on_pingreq(self, _packet: codec.PingReq) -> None:
        self.write(_PINGRESP)

    def _on_disconnect(self, _packet: codec.Disconnect) -> None:
        self.clean_disconnect = True
        self.will = None
        self.close("disconnect")


_DISPATCH: dict[type, Any] = {
    codec.Connect: MQTTConnection._on_connect,
    codec.Publish: MQTTConnection._on_publish,
    codec.PubAck: MQTTConnection._on_puback,
    codec.PubRec: MQTTConnection._on_pubrec,
    codec.PubRel: MQTTConnection._on_pubrel,
    codec.PubComp: MQTTConnection._on_pubcomp,
    codec.Subscribe: MQTTConnection._on_subscribe,
    codec.Unsubscribe: MQTTConnection._on_unsubscribe,
    codec.PingReq: MQTTConnection._on_pingreq,
    codec.Disconnect: MQTTConnection._on_disconnect,
}


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

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Open a listener; returns the bound port (useful with port 0)."""
        loop = self.loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: MQTTConnection(self), host, port, ssl=ssl_context, backlog=4096, reuse_address=True
        )
        self._servers.append(srv)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_forever())
        bound = srv.sockets[0].getsockname()[1]
        log.info("mqtt listening", host=host, port=bound, tls=ssl_context is not None)
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

    def attach(self, conn: MQTTConnection, principal: Principal, clean: bool) -> bool:
        """Bind an authenticated connection to its session; returns session_present."""
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
                log.exception("client_disconnected handler failed", client_id=cid)
        session = self.sessions.get(cid)
        present = False
        if session is not None and not clean and not session.clean:
            present = True
            session.principal = principal
        else:
            session = Session(cid, principal, clean)
            self.sessions[cid] = session
        session.connection = conn
        session.disconnected_at = None
        conn.session = session
        self.connected[cid] = conn
        return present

    def client_record(self, client_id: str) -> ClientRecord:
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
            log.exception("message handler failed", client_id=principal.client_id, topic=topic)

    def publish(self, client_id: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        session = self.sessions.get(client_id)
        if session is None:
            return False
        granted = session.granted_qos(topic)
        if granted is None:
            self.stats["publish.out_unsubscribed"] += 1
            return False
        if granted < qos:
            qos = granted
        conn = session.connection
        if (
            conn is not None
            and conn.can_send
            and not session.queue
            and (qos == 0 or len(session.inflight) < self.limits.max_inflight)
        ):
            self._send(conn, session, topic, payload, qos)
            return True
        if qos == 0 and conn is None:
            self.stats["publish.out_dropped_qos0_offline"] += 1
            return True
        queue = session.queue
        if queue is None:
            queue = session.queue = deque()
        if len(queue) >= self.limits.max_queued:
            queue.popleft()
            self.stats["publish.out_dropped_queue_full"] += 1
        queue.append((topic, payload, qos))
        return True

    def _send(self, conn: MQTTConnection, session: Session, topic: str, payload: bytes, qos: int) -> None:
        self.stats["publish.out"] += 1
        if qos == 0:
            conn.write(codec.encode_publish(topic, payload, 0, None))
            return
        pid = session.alloc_pid()
        session.inflight[pid] = [topic, payload, qos, 0]
        conn.write(codec.encode_publish(topic, payload, qos, pid))

    def pump(self, session: Session) -> None:
        """Send queued messages while the connection and the in-flight window allow."""
        queue = session.queue
        conn = session.connection
        if not queue or conn is None:
            return
        max_inflight = self.limits.max_inflight
        while queue and conn.can_send:
            topic, payload, qos = queue[0]
            if qos and len(session.inflight) >= max_inflight:
                break
            queue.popleft()
            self._send(conn, session, topic, payload, qos)

    def resend_inflight(self, session: Session) -> None:
        """After a session resumes: retransmit unacknowledged messages (DUP set), then the queue."""
        conn = session.connection
        if conn is None:
            return
        for pid, (topic, payload, qos, stage) in session.inflight.items():
            self.stats["publish.out_retransmitted"] += 1
            if stage == 0:
                conn.write(codec.encode_publish(topic, payload, qos, pid, dup=True))
            else:
                conn.write(b"\x62\x02" + pid.to_bytes(2, "big"))
        self.pump(session)

    # --- Southbound ------------------------------------------------------------------------------

    def is_connected(self, client_id: str) -> bool:
        return client_id in self.connected

    def disconnect(self, client_id: str, reason: str = "") -> bool:
        conn = self.connected.get(client_id)
        if conn is None:
            return False
        if reason == "takeover":  # taken over on another node (meterhub.cluster): no will
            conn.will = None
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
                log.exception("sweep failed")

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
            if (
                conn.keep_alive
                and now - conn.last_rx > conn.keep_alive * 1.5
                and not conn.read_pause & SERVER_PAUSES
            ):
                stats["closed.keepalive"] += 1
                if conn.record is not None:
                    conn.record.keepalive_expired += 1
                log.info("keep-alive expired", client_id=conn._cid(), peer=conn.peer)
                conn.abort("keepalive-timeout")
            elif (
                conn.write_paused_since is not None
                and now - conn.write_paused_since > limits.slow_client_timeout
            ):
                stats["closed.slow_client"] += 1
                log.info("slow client disconnected", client_id=conn._cid(), peer=conn.peer)
                conn.abort("slow-client")
            elif (
                conn.principal is not None and conn.principal.expires_at and wall > conn.principal.expires_at
            ):
                stats["closed.expired"] += 1
                conn.close("credentials-expired")
        expired = [
            cid
            for cid, s in self.sessions.items()
            if s.connection is None and s.disconnected_at and now - s.disconnected_at > limits.session_expiry
        ]
        for cid in expired:
            del self.sessions[cid]
