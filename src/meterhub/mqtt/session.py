"""The MQTT 3.1.1 session as a sans-I/O state machine: packets in, bytes and events out.

Like h11 or wsproto, :class:`Session` knows no socket, timer or event loop. Its user (the asyncio
protocol in :mod:`meterhub.mqtt.server`, or a unit test) feeds it decoded packets
(:meth:`Session.receive`), messages the application publishes (:meth:`Session.send`) and completions
of the application's work (:meth:`Session.inbound_result`, :meth:`Session.ack_ready`); it takes the
bytes to write from :meth:`Session.data_to_send` and acts on the events returned (a
:class:`~meterhub.mqtt.codec.Publish` for the application, a :class:`~meterhub.mqtt.codec.Disconnect`)
and on :attr:`Session.wants_pause` (stop reading the client).

What lasts between connections (subscriptions, queued and in-flight messages, inbound QoS 2 packet
ids, the next packet id) is plain data: :meth:`Session.to_dict` / :meth:`Session.from_dict` round-trip
it through JSON-friendly values, so that it can be stored (e.g. for another node to take a client
over). The rest (acknowledgements waiting for the application, held-back packets, the output
buffer) belongs to one connection and is reset by :meth:`Session.attach` / :meth:`Session.detach`.

Flow control decided here (see docs/decisions.md):
- inbound QoS 1/2 messages are acknowledged in arrival order once the application's work for each is
  done (a *handle* with a ``done()`` method, e.g. an asyncio future); at ``max_pending_inbound``
  waiting, the session asks not to be read (``PAUSE_INBOUND``) and holds back the rest;
- outbound QoS 1/2 messages past ``max_inflight`` wait in a queue. For a connected client that
  publishes (a gateway) none is ever dropped: at ``max_queued`` its requests are held back
  unprocessed (its PUBACK/PUBREC/PUBCOMP/PINGREQ are still handled) until the queue is half empty;
  held-back packets past ``max_held_inbound`` bytes ask not to be read at all (``PAUSE_HELD``; what
  the read in progress brought is still held, so the bound is that plus one read).
  QoS 0 past the bound is dropped. Subscribers and offline sessions lose the oldest message.
"""

from __future__ import annotations

import base64
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from meterhub.bounded import BoundedList
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.mqtt import codec
from meterhub.mqtt.topics import matches, valid_filter
from meterhub.transport import CONNACK_ACCEPTED, Principal

log = get_logger(__name__)
#: Repeated refusals (publish or subscribe refused, sessions forgotten): one line per kind and interval.
RATE_LIMITED_LOG = RateLimitedLog(log)

_PINGRESP = b"\xd0\x00"

#: Reasons a connection is not read from (bits of ``MQTTConnection.read_pause``). The session asks
#: for PAUSE_INBOUND and PAUSE_HELD through :attr:`Session.wants_pause`; the others are the server's.
PAUSE_AUTH = 1  # CONNECT is being authenticated
PAUSE_INBOUND = 2  # max_pending_inbound messages await the application
PAUSE_WRITE = 4  # the client does not read what we write
PAUSE_INTAKE = 8  # the application is behind (server-wide)
PAUSE_HELD = 16  # more than max_held_inbound bytes of this client's packets are held back
#: Pauses that are the server's doing: the keep-alive check does not count them against the client.
SERVER_PAUSES = PAUSE_INBOUND | PAUSE_INTAKE
#: The pauses a session decides.
SESSION_PAUSES = PAUSE_INBOUND | PAUSE_HELD


@dataclass(slots=True)
class Limits:
    max_packet_size: int = 64 * 1024
    max_inflight: int = 32
    max_pending_inbound: int = 256
    max_queued: int = 1000
    max_held_inbound: int = 8 * 1024 * 1024
    max_subscriptions: int = 64
    max_persistent_sessions_per_vendor: int = 20_000
    max_persistent_sessions: int = 100_000
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


def owner_of(principal: Principal) -> str:
    """Whose quota a client's persistent session counts against: its vendor (gateways), its user
    (open hub links), else its username."""
    extra = principal.extra
    owner = extra.get("vendor_id")
    if owner is None:
        owner = extra.get("uid", principal.username)
    return f"{principal.kind}:{owner}"


class ClientRecord:
    """What a client did on the wire, kept for its conformance report card (bounded)."""

    __slots__ = ("acl_rejected", "clean_session", "connects", "keepalive", "keepalive_expired", "qos")

    def __init__(self) -> None:
        self.connects: BoundedList[tuple[float, int]] = BoundedList(64)  # (wall time, CONNACK code)
        self.keepalive = 0
        self.clean_session = True
        self.qos = [0, 0, 0]  # inbound PUBLISH count per QoS
        self.acl_rejected = 0
        self.keepalive_expired = 0


#: Packets handled even while a client's requests are held back: they answer what the server sent
#: (and free room in its in-flight window and queue), or keep the connection alive.
ACK_TYPES = frozenset({codec.PubAck, codec.PubRec, codec.PubComp, codec.PingReq})


def _held_size(packet: Any) -> int:
    """About what a held-back packet costs in memory."""
    if type(packet) is codec.Publish:
        return 96 + len(packet.topic) + len(packet.payload)
    return 96


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Session:
    """One client's MQTT session (see the module docstring). ``stats`` is a shared counter and
    ``limited_log`` a shared :class:`meterhub.logs.RateLimitedLog`; ``connection`` is an opaque
    reference to whatever drives the session now (None while the client is offline)."""

    __slots__ = (
        "ack_waiting",
        "acks",
        "clean",
        "client_id",
        "connection",
        "disconnected_at",
        "held",
        "held_bytes",
        "held_full_since",
        "inbound_qos2",
        "inflight",
        "limited_log",
        "limits",
        "match_cache",
        "next_pid",
        "on_change",
        "out",
        "out_size",
        "owner",
        "principal",
        "queue",
        "record",
        "releasing",
        "stats",
        "subscriptions",
        "wants_pause",
        "writable",
    )

    def __init__(
        self,
        client_id: str,
        principal: Principal,
        clean: bool,
        limits: Limits | None = None,
        stats: Counter[str] | None = None,
        limited_log: RateLimitedLog | None = None,
    ) -> None:
        self.client_id = client_id
        self.principal = principal
        self.owner = owner_of(principal)
        self.clean = clean
        self.limits = limits if limits is not None else Limits()
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.limited_log = limited_log if limited_log is not None else RATE_LIMITED_LOG
        # --- persistent state (to_dict / from_dict)
        self.subscriptions: dict[str, int] = {}
        # packet id -> [topic, payload, qos, stage]; stage 0 awaits PUBACK/PUBREC, 1 awaits PUBCOMP
        self.inflight: dict[int, list[Any]] = {}
        self.queue: deque[tuple[str, bytes, int]] | None = None
        self.inbound_qos2: set[int] | None = None
        self.next_pid = 1
        # --- derived / per connection
        self.match_cache: dict[str, int | None] = {}
        self.disconnected_at: float | None = None
        self.connection: Any = None
        self.record: ClientRecord | None = None
        #: Called with the session when its persistent state changes outside a connection's life
        #: (subscriptions changed, a message queued while offline); None for clean sessions.
        self.on_change: Any = None
        self._reset_connection_state()

    def _reset_connection_state(self) -> None:
        self.writable = True
        self.out: list[bytes] | None = None  # bytes to send, see data_to_send()
        self.out_size = 0
        # (handle, ack bytes) in arrival order; handle None or done() -> the ack may go
        self.acks: deque[tuple[Any, bytes]] | None = None
        self.ack_waiting = False
        self.held: deque[Any] | None = None  # packets read but not processed yet; None when none
        self.held_bytes = 0
        self.held_full_since: float | None = None
        self.releasing = False
        self.wants_pause = 0  # PAUSE_INBOUND | PAUSE_HELD wanted by the session

    # --- state (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """What lasts between connections, as JSON-friendly values (payloads in base64)."""
        return {
            "client_id": self.client_id,
            "owner": self.owner,
            "clean": self.clean,
            "subscriptions": dict(self.subscriptions),
            "inflight": [[pid, t, _b64(p), q, stage] for pid, (t, p, q, stage) in self.inflight.items()],
            "queue": [[t, _b64(p), q] for t, p, q in self.queue or ()],
            "inbound_qos2": sorted(self.inbound_qos2 or ()),
            "next_pid": self.next_pid,
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        principal: Principal,
        limits: Limits | None = None,
        stats: Counter[str] | None = None,
        limited_log: RateLimitedLog | None = None,
    ) -> Session:
        """A session from :meth:`to_dict` output, for ``principal`` (who connects now)."""
        s = cls(data["client_id"], principal, bool(data["clean"]), limits, stats, limited_log)
        s.owner = data["owner"]
        s.subscriptions = {str(f): int(q) for f, q in data["subscriptions"].items()}
        s.inflight = {
            int(pid): [t, base64.b64decode(p), int(q), int(stage)] for pid, t, p, q, stage in data["inflight"]
        }
        if data["queue"]:
            s.queue = deque((t, base64.b64decode(p), int(q)) for t, p, q in data["queue"])
        if data["inbound_qos2"]:
            s.inbound_qos2 = {int(pid) for pid in data["inbound_qos2"]}
        s.next_pid = int(data["next_pid"])
        return s

    # --- connection lifecycle ----------------------------------------------------------------

    def attach(self, connection: Any, principal: Principal, present: bool) -> None:
        """A connection takes the session: the CONNACK is written (resend with :meth:`resume`)."""
        self._reset_connection_state()
        self.connection = connection
        self.principal = principal
        self.disconnected_at = None
        self._write(codec.encode(codec.ConnAck(present, CONNACK_ACCEPTED)))

    def resume(self) -> None:
        """Retransmit unacknowledged messages (DUP set, or PUBREL), then send what is queued."""
        for pid, (topic, payload, qos, stage) in self.inflight.items():
            self.stats["publish.out_retransmitted"] += 1
            if stage == 0:
                self._write(codec.encode_publish(topic, payload, qos, pid, dup=True))
            else:
                self._write(b"\x62\x02" + pid.to_bytes(2, "big"))
        self.pump()

    def detach(self, now: float) -> None:
        """The connection is gone: what belonged to it is dropped (held packets were never
        acknowledged: the client sends them again)."""
        self.connection = None
        self.disconnected_at = now
        self._reset_connection_state()

    def set_writable(self, writable: bool) -> None:
        """The transport can (or cannot) take more bytes now."""
        self.writable = writable
        if writable:
            self.pump()

    @property
    def can_send(self) -> bool:
        return self.connection is not None and self.writable

    # --- output ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = [data]
            self.out_size = len(data)
        else:
            out.append(data)
            self.out_size += len(data)

    def data_to_send(self) -> bytes:
        """The bytes written since the last call (b"" if none)."""
        out = self.out
        if out is None:
            return b""
        self.out = None
        self.out_size = 0
        return out[0] if len(out) == 1 else b"".join(out)

    # --- inbound packets -----------------------------------------------------------------------

    def receive(self, packet: Any) -> Any:
        """Take one packet from the client (after CONNECT). Returns an event for the application:
        the :class:`codec.Publish` itself (deliver it; for QoS 1/2 then call :meth:`inbound_result`),
        a :class:`codec.Disconnect` (the client closes), or None."""
        if self.held is not None and type(packet) not in ACK_TYPES:
            self._hold(packet)
            return None
        return self._process(packet)

    def _process(self, packet: Any) -> Any:
        kind = type(packet)
        if kind is codec.Publish:
            return self._on_publish(packet)
        if kind is codec.PubAck:
            if self.inflight.pop(packet.packet_id, None) is None:
                self.stats["protocol.unknown_ack"] += 1
            self.pump()
        elif kind is codec.PubRec:
            entry = self.inflight.get(packet.packet_id)
            if entry is not None:
                entry[3] = 1
            self._write(b"\x62\x02" + packet.packet_id.to_bytes(2, "big"))
        elif kind is codec.PubRel:
            if self.inbound_qos2 is not None:
                self.inbound_qos2.discard(packet.packet_id)
            self._write(b"\x70\x02" + packet.packet_id.to_bytes(2, "big"))
        elif kind is codec.PubComp:
            self.inflight.pop(packet.packet_id, None)
            self.pump()
        elif kind is codec.PingReq:
            self._write(_PINGRESP)
        elif kind is codec.Subscribe:
            self._on_subscribe(packet)
        elif kind is codec.Unsubscribe:
            for topic_filter in packet.topics:
                self.subscriptions.pop(topic_filter, None)
            self.match_cache.clear()
            self._write(codec.encode(codec.UnsubAck(packet.packet_id)))
            if self.on_change is not None:
                self.on_change(self)
        elif kind is codec.Disconnect:
            return packet
        else:
            raise ValueError(f"unexpected packet {kind.__name__}")
        return None

    def _on_publish(self, packet: codec.Publish) -> codec.Publish | None:
        stats = self.stats
        stats["publish.in"] += 1
        topic = packet.topic
        qos = packet.qos
        record = self.record
        if record is not None:
            record.qos[qos] += 1
        principal = self.principal
        if len(topic) > self.limits.max_topic_length or not principal.may_publish(topic):
            stats["rejected.publish_acl"] += 1
            if record is not None:
                record.acl_rejected += 1
            self.limited_log.info(
                "publish_acl", "publish refused", client_id=principal.client_id, topic=topic[:200]
            )
        elif qos == 2 and self.inbound_qos2 is not None and packet.packet_id in self.inbound_qos2:
            stats["publish.in_duplicate_qos2"] += 1
        else:
            if qos == 2:
                if self.inbound_qos2 is None:
                    self.inbound_qos2 = set()
                self.inbound_qos2.add(packet.packet_id)  # type: ignore[arg-type]
            return packet
        if qos:
            self.inbound_result(packet, None)
        return None

    def inbound_result(self, packet: codec.Publish, handle: Any) -> Any:
        """The application took ``packet``; ``handle`` (None = done already) tells when its work is
        done, via ``handle.done()``. Returns a handle to call :meth:`ack_ready` on when it is done,
        or None."""
        qos = packet.qos
        if not qos:
            return None
        ack = (b"\x40\x02" if qos == 1 else b"\x50\x02") + packet.packet_id.to_bytes(2, "big")  # type: ignore[union-attr]
        acks = self.acks
        if handle is None and not acks:
            self._write(ack)
            return None
        if acks is None:
            acks = self.acks = deque()
        acks.append((handle, ack))
        if len(acks) >= self.limits.max_pending_inbound:
            self.stats["flow.inbound_paused"] += 1
            self.wants_pause |= PAUSE_INBOUND
            self.start_holding()  # the rest of this read waits too
        return self.flush_acks()

    def ack_ready(self) -> Any:
        """The handle :meth:`inbound_result` or :meth:`flush_acks` returned is done."""
        self.ack_waiting = False
        return self.flush_acks()

    def flush_acks(self) -> Any:
        """Write acknowledgements in arrival order, as far as the work behind them is done; returns
        the first pending handle if nobody waits on it yet."""
        acks = self.acks
        if self.connection is None or acks is None:
            return None
        wait = None
        while acks:
            handle, data = acks[0]
            if handle is not None and not handle.done():
                if not self.ack_waiting:
                    self.ack_waiting = True
                    wait = handle
                break
            acks.popleft()
            self._write(data)
        if self.wants_pause & PAUSE_INBOUND and len(acks) <= self.limits.max_pending_inbound // 2:
            self.wants_pause &= ~PAUSE_INBOUND
        if not acks:  # an empty deque is ~630 bytes: none kept per idle connection
            self.acks = None
        return wait

    # --- holding back (per-client back-pressure) -------------------------------------------------

    def start_holding(self) -> None:
        """Process no more requests from this client (its acknowledgements still are) until
        :meth:`next_released` finds room again."""
        if self.held is None:
            self.held = deque()
            self.stats["flow.held"] += 1

    def _hold(self, packet: Any) -> None:
        held = self.held
        assert held is not None
        held.append(packet)
        self.held_bytes += _held_size(packet)
        if self.held_bytes > self.limits.max_held_inbound and not self.wants_pause & PAUSE_HELD:
            self.stats["flow.held_full"] += 1
            self.held_full_since = time.monotonic()
            self.wants_pause |= PAUSE_HELD

    def gated(self) -> bool:
        """Whether this client's requests must wait: too many in processing, or its queue is full."""
        limits = self.limits
        acks = self.acks
        if acks is not None and len(acks) >= limits.max_pending_inbound:
            return True
        queue = self.queue
        return queue is not None and len(queue) >= limits.max_queued

    def next_released(self) -> Any:
        """Process held-back packets while there is room (a run starts once the queue is at most half
        full); returns the next event for the application, or None when nothing more can go now."""
        held = self.held
        if held is None or self.connection is None:
            return None
        limits = self.limits
        if not self.releasing:
            queue = self.queue
            if queue and len(queue) > limits.max_queued // 2:
                return None
            self.releasing = True
        while held:
            if self.gated():
                self.releasing = False
                return None
            packet = held.popleft()
            self.held_bytes -= _held_size(packet)
            if self.wants_pause & PAUSE_HELD and self.held_bytes <= limits.max_held_inbound // 2:
                self.wants_pause &= ~PAUSE_HELD
                self.held_full_since = None
            event = self._process(packet)
            if event is not None:
                return event
        self.releasing = False
        if not self.gated():
            self.held = None
            self.held_bytes = 0
        return None

    # --- subscriptions -----------------------------------------------------------------------

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        limits = self.limits
        principal = self.principal
        stats = self.stats
        codes: list[int] = []
        subscriptions = self.subscriptions
        for topic_filter, qos in packet.topics:
            if (
                len(topic_filter) > limits.max_topic_length
                or not valid_filter(topic_filter)
                or not principal.may_subscribe(topic_filter)
            ):
                stats["rejected.subscribe_acl"] += 1
                self.limited_log.info(
                    "subscribe_acl",
                    "subscribe refused",
                    client_id=principal.client_id,
                    filter=topic_filter[:200],
                )
                codes.append(0x80)
                continue
            if topic_filter not in subscriptions and len(subscriptions) >= limits.max_subscriptions:
                stats["rejected.subscribe_limit"] += 1
                self.limited_log.info(
                    "subscribe_limit",
                    "subscribe refused: too many subscriptions",
                    client_id=principal.client_id,
                    limit=limits.max_subscriptions,
                )
                codes.append(0x80)
                continue
            subscriptions[topic_filter] = qos
            codes.append(qos)
        self.match_cache.clear()
        self._write(codec.encode(codec.SubAck(packet.packet_id, codes)))
        if self.on_change is not None:
            self.on_change(self)
        self.pump()

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

    # --- outbound ----------------------------------------------------------------------------

    def alloc_pid(self) -> int:
        pid = self.next_pid
        inflight = self.inflight
        while pid in inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        return pid

    def send(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """A message for the client: written, or queued; False if no subscription matches."""
        granted = self.granted_qos(topic)
        stats = self.stats
        if granted is None:
            stats["publish.out_unsubscribed"] += 1
            return False
        if granted < qos:
            qos = granted
        connected = self.connection is not None
        if (
            connected
            and self.writable
            and not self.queue
            and (qos == 0 or len(self.inflight) < self.limits.max_inflight)
        ):
            self._send(topic, payload, qos)
            return True
        if qos == 0 and not connected:
            stats["publish.out_dropped_qos0_offline"] += 1
            return True
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        max_queued = self.limits.max_queued
        publishes = self.principal.publishes
        if len(queue) >= max_queued:
            if not connected or not publishes:
                # offline, or a subscriber nobody can slow down for: the oldest goes
                queue.popleft()
                stats["publish.out_dropped_queue_full"] += 1
            elif qos == 0:
                stats["publish.out_dropped_queue_full"] += 1
                return True
            else:
                stats["publish.out_queued_over_bound"] += 1
        queue.append((topic, payload, qos))
        if not connected and self.on_change is not None:
            self.on_change(self)
        if connected and publishes and len(queue) >= max_queued:
            self.start_holding()  # owed to a connected gateway: never dropped, slow it down instead
        return True

    def _send(self, topic: str, payload: bytes, qos: int) -> None:
        self.stats["publish.out"] += 1
        if qos == 0:
            self._write(codec.encode_publish(topic, payload, 0, None))
            return
        pid = self.alloc_pid()
        self.inflight[pid] = [topic, payload, qos, 0]
        self._write(codec.encode_publish(topic, payload, qos, pid))

    def pump(self) -> None:
        """Send queued messages while the connection and the in-flight window allow."""
        queue = self.queue
        if not queue or self.connection is None or not self.writable:
            return
        max_inflight = self.limits.max_inflight
        inflight = self.inflight
        while queue:
            topic, payload, qos = queue[0]
            if qos and len(inflight) >= max_inflight:
                break
            queue.popleft()
            self._send(topic, payload, qos)

    # --- timers ------------------------------------------------------------------------------

    @staticmethod
    def keepalive_expired(keep_alive: int, last_rx: float, now: float, read_pause: int) -> bool:
        """MQTT's 1.5 x keep-alive rule, not counting silences the server caused (its pauses)."""
        return bool(keep_alive) and now - last_rx > keep_alive * 1.5 and not read_pause & SERVER_PAUSES
