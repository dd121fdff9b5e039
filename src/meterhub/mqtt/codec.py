"""Sans-I/O MQTT 3.1.1 packet codec (also accepts MQTT 3.1 "MQIsdp" CONNECTs).

Design, in the style of h11/wsproto: this module never touches sockets or event loops.

* :func:`encode` turns any packet object into wire bytes; :func:`encode_publish` is the allocation-light
  fast path for outbound PUBLISH packets (it never builds a :class:`Publish`).
* :class:`Decoder` is fed raw bytes as they arrive and returns complete packet objects.  Complete packets
  are decoded straight out of the caller's chunk by offset (fields are sliced out, the chunk itself is
  never copied into the buffer); only the trailing partial packet is kept in a ``bytearray``.  The
  fixed header is checked (packet type, direction, flag bits, remaining length against
  ``max_packet_size``) before any body byte is buffered, so a peer can never make the decoder hold
  more than ``max_packet_size`` bytes.

Everything a peer can send wrong is reported as :class:`MQTTProtocolError` (with a short ``reason``);
the connection must then be closed.  Values a caller passes to the encoders that cannot be put on the
wire raise :class:`ValueError`.

Decoder ``reason`` values: ``bad-packet-type`` (type 0 or 15), ``unexpected-packet`` (wrong direction),
``reserved-flags``, ``bad-qos``, ``bad-dup`` (DUP set on a QoS 0 PUBLISH), ``bad-remaining-length``
(5-byte length, or wrong length for a fixed-size packet), ``packet-too-large``, ``truncated`` (a field
runs past the end of its packet), ``trailing-bytes``, ``bad-utf8`` (malformed UTF-8 or U+0000),
``empty-topic``, ``wildcard-in-topic``, ``empty-topic-filter``, ``zero-packet-id``,
``empty-subscribe``, ``empty-unsubscribe``, ``empty-suback``, ``bad-return-code``,
``bad-protocol-name``, ``bad-will-flags``, ``password-without-username``, ``bad-connack``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from struct import Struct
from typing import ClassVar, NoReturn, TypeAlias

__all__ = [
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBCOMP",
    "PUBLISH",
    "PUBREC",
    "PUBREL",
    "SUBACK",
    "SUBSCRIBE",
    "SUPPORTED_PROTOCOLS",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MQTTProtocolError",
    "Packet",
    "PacketTooLarge",
    "PingReq",
    "PingResp",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "encode",
    "encode_publish",
]

# --------------------------------------------------------------------------------------------- constants

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

#: (protocol_name, protocol_level) pairs whose CONNECT body is fully decoded.  A CONNECT with another
#: level is still returned (only name, level, clean_session and keep_alive filled in) so that the server
#: can answer CONNACK 0x01 "unacceptable protocol version".
SUPPORTED_PROTOCOLS: frozenset[tuple[str, int]] = frozenset({("MQTT", 4), ("MQIsdp", 3)})

MAX_REMAINING_LENGTH = 268_435_455  # largest value a 4-byte remaining length can carry
_SUBACK_CODES = b"\x00\x01\x02\x80"


# --------------------------------------------------------------------------------------------- errors


class MQTTProtocolError(Exception):
    """Malformed or forbidden packet; the connection must be closed.

    ``reason`` is a short machine-friendly string such as ``'bad-utf8'`` (see the module docstring).
    When raised by :meth:`Decoder.feed`, ``packets`` holds the valid packets that preceded the bad one
    in the same chunk (the server may still act on them before closing).
    """

    reason: str

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message if message is not None else reason
        self.packets: list[Packet] = []

    def __str__(self) -> str:
        return self.message


class PacketTooLarge(MQTTProtocolError):
    """The remaining-length field announces a packet bigger than ``max_packet_size``."""


# --------------------------------------------------------------------------------------------- packets


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class Connect:
    packet_type: ClassVar[int] = CONNECT
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)  # keep secrets out of logs
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@dataclass(slots=True)
class ConnAck:
    packet_type: ClassVar[int] = CONNACK
    session_present: bool
    return_code: int


@dataclass(slots=True)
class Publish:
    packet_type: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(slots=True)
class PubAck:
    packet_type: ClassVar[int] = PUBACK
    packet_id: int


@dataclass(slots=True)
class PubRec:
    packet_type: ClassVar[int] = PUBREC
    packet_id: int


@dataclass(slots=True)
class PubRel:
    packet_type: ClassVar[int] = PUBREL
    packet_id: int


@dataclass(slots=True)
class PubComp:
    packet_type: ClassVar[int] = PUBCOMP
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    packet_type: ClassVar[int] = SUBSCRIBE
    packet_id: int
    topics: list[tuple[str, int]]  # (topic filter, requested QoS)


@dataclass(slots=True)
class SubAck:
    packet_type: ClassVar[int] = SUBACK
    packet_id: int
    return_codes: list[int]  # 0, 1, 2 (granted QoS) or 0x80 (failure)


@dataclass(slots=True)
class Unsubscribe:
    packet_type: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    topics: list[str]


@dataclass(slots=True)
class UnsubAck:
    packet_type: ClassVar[int] = UNSUBACK
    packet_id: int


@dataclass(slots=True)
class PingReq:
    packet_type: ClassVar[int] = PINGREQ


@dataclass(slots=True)
class PingResp:
    packet_type: ClassVar[int] = PINGRESP


@dataclass(slots=True)
class Disconnect:
    packet_type: ClassVar[int] = DISCONNECT


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)

# --------------------------------------------------------------------------------------------- encoding

_U16 = Struct(">H")
_HDR2_U16 = Struct(">BBH")  # first byte, 1-byte remaining length, u16
_pack_u16 = _U16.pack
_pack_hdr2_u16 = _HDR2_U16.pack


def _encode_rl(n: int) -> bytes:
    """Encode a remaining length (variable byte integer)."""
    if n < 128:
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet too large to encode: remaining length {n}")
    out = bytearray()
    while n:
        digit = n & 0x7F
        n >>= 7
        out.append(digit | 0x80 if n else digit)
    return bytes(out)


def _frame(first: int, body: bytes) -> bytes:
    return b"".join((bytes((first,)), _encode_rl(len(body)), body))


def _enc_str(s: str, what: str) -> bytes:
    """Length-prefixed UTF-8 string; UnicodeEncodeError (a ValueError) for lone surrogates."""
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError(f"{what} longer than 65535 bytes")
    if 0 in b:
        raise ValueError(f"{what} contains U+0000")
    return _pack_u16(len(b)) + b


def _enc_bin(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} longer than 65535 bytes")
    return _pack_u16(len(data)) + bytes(data)


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise ValueError("topic name must not be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"wildcard in topic name {topic!r}")


def _check_pid(packet_id: int) -> int:
    if type(packet_id) is not int or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id must be an int in 1..65535, got {packet_id!r}")
    return packet_id


def _check_qos(qos: int) -> int:
    if type(qos) is not int or not 0 <= qos <= 2:
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    return qos


def _check_uint(value: int, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an int in 0..{limit}, got {value!r}")
    return value


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    packet_id: int | None,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """Encode a PUBLISH packet directly (outbound fast path; no :class:`Publish` object is built).

    ``packet_id`` must be ``None`` for QoS 0 and in 1..65535 otherwise; ``dup`` is only allowed for QoS>0.
    """
    t = topic.encode("utf-8")
    tl = len(t)
    # (int in bytes) is much faster than (bytes in bytes) for single bytes: 43 '+', 35 '#', 0 NUL.
    if not 0 < tl <= 0xFFFF or 43 in t or 35 in t or 0 in t:
        _bad_topic_name(t)
    first = 0x31 if retain else 0x30
    if qos == 0:
        if packet_id is not None:
            raise ValueError("packet_id must be None for QoS 0")
        if dup:
            raise ValueError("dup must be False for QoS 0")
        rl = tl + 2 + len(payload)
        if rl < 128:
            return _pack_hdr2_u16(first, rl, tl) + t + payload
        return b"".join((bytes((first,)), _encode_rl(rl), _pack_u16(tl), t, payload))
    if qos != 1 and qos != 2:
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    if type(packet_id) is not int or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id must be an int in 1..65535 for QoS>0, got {packet_id!r}")
    first |= qos << 1
    if dup:
        first |= 0x08
    rl = tl + 4 + len(payload)
    if rl < 128:
        return _pack_hdr2_u16(first, rl, tl) + t + _pack_u16(packet_id) + payload
    return b"".join((bytes((first,)), _encode_rl(rl), _pack_u16(tl), t, _pack_u16(packet_id), payload))


def _bad_topic_name(t: bytes) -> NoReturn:
    if not t:
        raise ValueError("topic name must not be empty")
    if len(t) > 0xFFFF:
        raise ValueError("topic name longer than 65535 bytes")
    if 0 in t:
        raise ValueError("topic name contains U+0000")
    raise ValueError(f"wildcard in topic name {t.decode()!r}")


def _e_connect(p: Connect) -> bytes:
    keep_alive = _check_uint(p.keep_alive, 0xFFFF, "keep_alive")
    level = _check_uint(p.protocol_level, 0xFF, "protocol_level")
    flags = 0x02 if p.clean_session else 0
    parts = [_enc_str(p.protocol_name, "protocol name"), b"", _enc_str(p.client_id, "client id")]
    will = p.will
    if will is not None:
        _check_topic_name(will.topic)
        flags |= 0x04 | _check_qos(will.qos) << 3 | (0x20 if will.retain else 0)
        parts.append(_enc_str(will.topic, "will topic"))
        parts.append(_enc_bin(will.payload, "will payload"))
    if p.username is not None:
        flags |= 0x80
        parts.append(_enc_str(p.username, "username"))
    if p.password is not None:
        if p.username is None:
            raise ValueError("password without username is not allowed in MQTT 3.1.1")
        flags |= 0x40
        parts.append(_enc_bin(p.password, "password"))
    parts[1] = bytes((level, flags)) + _pack_u16(keep_alive)
    return _frame(0x10, b"".join(parts))


def _e_connack(p: ConnAck) -> bytes:
    _check_uint(p.return_code, 5, "CONNACK return code")
    if p.session_present and p.return_code:
        raise ValueError("session_present must be False when return_code != 0")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _e_publish(p: Publish) -> bytes:
    return encode_publish(p.topic, p.payload, p.qos, p.packet_id, p.retain, p.dup)


def _ack_encoder(first: int) -> Callable[[PubAck | PubRec | PubRel | PubComp | UnsubAck], bytes]:
    prefix = bytes((first, 2))

    def enc(p: PubAck | PubRec | PubRel | PubComp | UnsubAck) -> bytes:
        return prefix + _pack_u16(_check_pid(p.packet_id))

    return enc


def _e_subscribe(p: Subscribe) -> bytes:
    if not p.topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    parts = [_pack_u16(_check_pid(p.packet_id))]
    for topic_filter, qos in p.topics:
        if not topic_filter:
            raise ValueError("topic filter must not be empty")
        parts.append(_enc_str(topic_filter, "topic filter"))
        parts.append(bytes((_check_qos(qos),)))
    return _frame(0x82, b"".join(parts))


def _e_suback(p: SubAck) -> bytes:
    if not p.return_codes:
        raise ValueError("SUBACK needs at least one return code")
    for code in p.return_codes:
        if code not in (0, 1, 2, 0x80):
            raise ValueError(f"invalid SUBACK return code {code!r}")
    return _frame(0x90, _pack_u16(_check_pid(p.packet_id)) + bytes(p.return_codes))


def _e_unsubscribe(p: Unsubscribe) -> bytes:
    if not p.topics:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_pack_u16(_check_pid(p.packet_id))]
    for topic_filter in p.topics:
        if not topic_filter:
            raise ValueError("topic filter must not be empty")
        parts.append(_enc_str(topic_filter, "topic filter"))
    return _frame(0xA2, b"".join(parts))


def _const_encoder(frame: bytes) -> Callable[[PingReq | PingResp | Disconnect], bytes]:
    return lambda p: frame


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Connect: _e_connect,
    ConnAck: _e_connack,
    Publish: _e_publish,
    PubAck: _ack_encoder(0x40),
    PubRec: _ack_encoder(0x50),
    PubRel: _ack_encoder(0x62),
    PubComp: _ack_encoder(0x70),
    Subscribe: _e_subscribe,
    SubAck: _e_suback,
    Unsubscribe: _e_unsubscribe,
    UnsubAck: _ack_encoder(0xB0),
    PingReq: _const_encoder(b"\xc0\x00"),
    PingResp: _const_encoder(b"\xd0\x00"),
    Disconnect: _const_encoder(b"\xe0\x00"),
}


def encode(packet: Packet) -> bytes:
    """Encode any packet (either direction) to wire bytes.

    Raises ValueError if the packet cannot be represented or would be rejected by a conforming peer
    (bad QoS or packet id, over-long or invalid strings, wildcard in a topic name, ...), TypeError if
    ``packet`` is not a packet object.
    """
    try:
        enc = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {packet!r}") from None
    return enc(packet)


# --------------------------------------------------------------------------------------------- decoding

# Helpers take (buf, start, end) and return (value, new_offset); ``end`` bounds the current packet.


def _err(reason: str, message: str | None = None) -> MQTTProtocolError:
    return MQTTProtocolError(reason, message)


def _d_str(buf: bytes, i: int, end: int) -> tuple[str, int]:
    if i + 2 > end:
        raise _err("truncated", "string length runs past the end of the packet")
    j = i + 2 + (buf[i] << 8 | buf[i + 1])
    if j > end:
        raise _err("truncated", "string runs past the end of the packet")
    try:
        s = buf[i + 2 : j].decode("utf-8")
    except UnicodeDecodeError:
        raise _err("bad-utf8", "malformed UTF-8 string") from None
    if "\x00" in s:
        raise _err("bad-utf8", "string contains U+0000")
    return s, j


def _d_bin(buf: bytes, i: int, end: int) -> tuple[bytes, int]:
    if i + 2 > end:
        raise _err("truncated", "binary length runs past the end of the packet")
    j = i + 2 + (buf[i] << 8 | buf[i + 1])
    if j > end:
        raise _err("truncated", "binary data runs past the end of the packet")
    return buf[i + 2 : j], j


def _d_topic_name(buf: bytes, i: int, end: int) -> tuple[str, int]:
    topic, i = _d_str(buf, i, end)
    if not topic:
        raise _err("empty-topic", "topic name is empty")
    if "+" in topic or "#" in topic:
        raise _err("wildcard-in-topic", f"wildcard in topic name {topic!r}")
    return topic, i


def _d_pid(buf: bytes, i: int, end: int) -> int:
    if i + 2 > end:
        raise _err("truncated", "missing packet identifier")
    pid = buf[i] << 8 | buf[i + 1]
    if not pid:
        raise _err("zero-packet-id", "packet identifier must not be 0")
    return pid


def _d_connect(buf: bytes, i: int, end: int, b0: int) -> Connect:
    name, i = _d_str(buf, i, end)
    if name != "MQTT" and name != "MQIsdp":
        raise _err("bad-protocol-name", f"unknown protocol name {name!r}")
    if i >= end:
        raise _err("truncated", "missing protocol level")
    level = buf[i]
    i += 1
    if (name, level) not in SUPPORTED_PROTOCOLS:
        # Unsupported level: the rest of the body may follow another layout (e.g. MQTT 5 properties), so
        # only the version-independent fields are read; the server must answer CONNACK 0x01.
        if i + 3 <= end:
            keep_alive = buf[i + 1] << 8 | buf[i + 2]
            return Connect("", (buf[i] & 0x02) != 0, keep_alive, None, None, None, name, level)
        return Connect("", False, 0, None, None, None, name, level)
    if i + 3 > end:
        raise _err("truncated", "missing connect flags / keep alive")
    flags = buf[i]
    keep_alive = buf[i + 1] << 8 | buf[i + 2]
    i += 3
    if flags & 0x01:
        raise _err("reserved-flags", "CONNECT reserved flag is set")
    client_id, i = _d_str(buf, i, end)
    will = None
    if flags & 0x04:
        will_qos = (flags >> 3) & 3
        if will_qos == 3:
            raise _err("bad-qos", "will QoS 3")
        will_topic, i = _d_topic_name(buf, i, end)
        will_payload, i = _d_bin(buf, i, end)
        will = Will(will_topic, will_payload, will_qos, (flags & 0x20) != 0)
    elif flags & 0x38:
        raise _err("bad-will-flags", "will QoS/retain set without the will flag")
    username = password = None
    if flags & 0x80:
        username, i = _d_str(buf, i, end)
    if flags & 0x40:
        if not flags & 0x80:
            raise _err("password-without-username", "password flag set without username flag")
        password, i = _d_bin(buf, i, end)
    if i != end:
        raise _err("trailing-bytes", "extra bytes after CONNECT payload")
    return Connect(client_id, (flags & 0x02) != 0, keep_alive, username, password, will, name, level)


def _d_connack(buf: bytes, i: int, end: int, b0: int) -> ConnAck:
    if end - i != 2:
        raise _err("bad-remaining-length", "CONNACK remaining length must be 2")
    ack_flags = buf[i]
    code = buf[i + 1]
    if ack_flags & 0xFE:
        raise _err("reserved-flags", "CONNACK reserved acknowledge flags are set")
    if code > 5:
        raise _err("bad-return-code", f"reserved CONNACK return code {code}")
    if ack_flags and code:
        raise _err("bad-connack", "session present set on a refused connection")
    return ConnAck(ack_flags == 1, code)


def _d_publish(buf: bytes, i: int, end: int, b0: int) -> Publish:
    # Inlined _d_topic_name/_d_str: this is the hot path.
    if i + 2 > end:
        raise _err("truncated", "topic length runs past the end of the packet")
    j = i + 2 + (buf[i] << 8 | buf[i + 1])
    if j > end:
        raise _err("truncated", "topic runs past the end of the packet")
    try:
        topic = buf[i + 2 : j].decode("utf-8")
    except UnicodeDecodeError:
        raise _err("bad-utf8", "malformed UTF-8 topic name") from None
    if not topic:
        raise _err("empty-topic", "topic name is empty")
    if "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise _err("bad-utf8", "topic name contains U+0000")
        raise _err("wildcard-in-topic", f"wildcard in topic name {topic!r}")
    qos = (b0 >> 1) & 3
    if qos:
        if j + 2 > end:
            raise _err("truncated", "missing packet identifier")
        pid = buf[j] << 8 | buf[j + 1]
        if not pid:
            raise _err("zero-packet-id", "packet identifier must not be 0")
        return Publish(topic, buf[j + 2 : end], qos, (b0 & 1) != 0, (b0 & 8) != 0, pid)
    return Publish(topic, buf[j:end], 0, (b0 & 1) != 0, False, None)


def _pid_decoder(cls: type[PubAck | PubRec | PubRel | PubComp | UnsubAck]) -> Callable[..., Packet]:
    def dec(buf: bytes, i: int, end: int, b0: int) -> Packet:
        if end - i != 2:
            raise _err("bad-remaining-length", f"{cls.__name__.upper()} remaining length must be 2")
        pid = buf[i] << 8 | buf[i + 1]
        if not pid:
            raise _err("zero-packet-id", "packet identifier must not be 0")
        return cls(pid)

    return dec


def _d_subscribe(buf: bytes, i: int, end: int, b0: int) -> Subscribe:
    pid = _d_pid(buf, i, end)
    i += 2
    if i == end:
        raise _err("empty-subscribe", "SUBSCRIBE without topic filters")
    topics = []
    while i < end:
        topic_filter, i = _d_str(buf, i, end)
        if not topic_filter:
            raise _err("empty-topic-filter", "topic filter is empty")
        if i >= end:
            raise _err("truncated", "missing requested QoS")
        options = buf[i]
        i += 1
        if options & 0xFC:
            raise _err("reserved-flags", "SUBSCRIBE reserved option bits are set")
        if options == 3:
            raise _err("bad-qos", "requested QoS 3")
        topics.append((topic_filter, options))
    return Subscribe(pid, topics)


def _d_suback(buf: bytes, i: int, end: int, b0: int) -> SubAck:
    pid = _d_pid(buf, i, end)
    codes = buf[i + 2 : end]
    if not codes:
        raise _err("empty-suback", "SUBACK without return codes")
    if codes.translate(None, _SUBACK_CODES):
        raise _err("bad-return-code", "invalid SUBACK return code")
    return SubAck(pid, list(codes))


def _d_unsubscribe(buf: bytes, i: int, end: int, b0: int) -> Unsubscribe:
    pid = _d_pid(buf, i, end)
    i += 2
    if i == end:
        raise _err("empty-unsubscribe", "UNSUBSCRIBE without topic filters")
    topics = []
    while i < end:
        topic_filter, i = _d_str(buf, i, end)
        if not topic_filter:
            raise _err("empty-topic-filter", "topic filter is empty")
        topics.append(topic_filter)
    return Unsubscribe(pid, topics)


def _empty_decoder(cls: type[PingReq | PingResp | Disconnect]) -> Callable[..., Packet]:
    def dec(buf: bytes, i: int, end: int, b0: int) -> Packet:
        if end != i:
            raise _err("bad-remaining-length", f"{cls.__name__.upper()} remaining length must be 0")
        return cls()

    return dec


_DecodeFn = Callable[[bytes, int, int, int], Packet]


def _d_reserved(buf: bytes, i: int, end: int, b0: int) -> Packet:
    # Unreachable in practice: the first-byte table rejects packet types 0 and 15 before dispatch.
    raise _err("bad-packet-type", f"reserved packet type {b0 >> 4}")


_DECODERS: tuple[_DecodeFn, ...] = (
    _d_reserved,
    _d_connect,
    _d_connack,
    _d_publish,
    _pid_decoder(PubAck),
    _pid_decoder(PubRec),
    _pid_decoder(PubRel),
    _pid_decoder(PubComp),
    _d_subscribe,
    _d_suback,
    _d_unsubscribe,
    _pid_decoder(UnsubAck),
    _empty_decoder(PingReq),
    _empty_decoder(PingResp),
    _empty_decoder(Disconnect),
    _d_reserved,
)

_CLIENT_SENDS = frozenset(
    {CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT}
)
_SERVER_SENDS = frozenset({CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP})


def _first_byte_table(accepted: frozenset[int]) -> tuple[str | None, ...]:
    """Map every possible first byte to None (acceptable) or the error reason."""
    table: list[str | None] = []
    for b0 in range(256):
        ptype, flags = b0 >> 4, b0 & 0x0F
        if ptype in (0, 15):
            table.append("bad-packet-type")
        elif ptype not in accepted:
            table.append("unexpected-packet")
        elif ptype == PUBLISH:
            qos = (flags >> 1) & 3
            table.append("bad-qos" if qos == 3 else "bad-dup" if qos == 0 and flags & 8 else None)
        elif ptype in (PUBREL, SUBSCRIBE, UNSUBSCRIBE):
            table.append(None if flags == 0b0010 else "reserved-flags")
        else:
            table.append(None if flags == 0 else "reserved-flags")
    return tuple(table)


_SERVER_TABLE = _first_byte_table(_CLIENT_SENDS)
_CLIENT_TABLE = _first_byte_table(_SERVER_SENDS)


def _first_byte_error(b0: int, reason: str) -> MQTTProtocolError:
    return MQTTProtocolError(reason, f"invalid fixed header byte 0x{b0:02x} ({reason})")


def _parse_rl(view: bytes | bytearray, pos: int, n: int, max_size: int) -> tuple[int, int] | None:
    """Parse the remaining length of the packet starting at ``view[pos]``.

    Returns ``(header_length, remaining_length)``, or None if more bytes are needed.  Raises as soon as
    the bytes seen so far prove the length field invalid or the packet too large.
    """
    value = 0
    shift = 0
    i = pos + 1
    while i < n:
        b = view[i]
        i += 1
        value |= (b & 0x7F) << shift
        if i - pos + value > max_size:  # lower bound of the total size is already too big
            raise PacketTooLarge(
                "packet-too-large", f"packet of at least {i - pos + value} bytes exceeds limit {max_size}"
            )
        if b < 0x80:
            return i - pos, value
        shift += 7
        if shift == 28:
            raise _err("bad-remaining-length", "remaining length longer than 4 bytes")
    return None


class Decoder:
    """Incremental MQTT packet decoder.

    ``server_side=True`` accepts only packets a client may send, ``False`` only packets a server may
    send.  ``max_packet_size`` bounds a whole packet (fixed header included).  After an error every
    further :meth:`feed` raises again.
    """

    __slots__ = ("_buf", "_error", "_hl", "_max", "_need", "_table")

    def __init__(self, *, server_side: bool = True, max_packet_size: int = 65536) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self._max = max_packet_size
        self._table = _SERVER_TABLE if server_side else _CLIENT_TABLE
        self._buf = bytearray()  # bytes of one incomplete packet (never more than max_packet_size)
        self._need = 0  # total size of the buffered packet once its fixed header is complete, else 0
        self._hl = 0  # fixed-header length of the buffered packet (valid when _need)
        self._error: MQTTProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Number of bytes held for an incomplete packet."""
        return len(self._buf)

    @property
    def max_packet_size(self) -> int:
        return self._max

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Consume ``data`` and return every packet completed by it (possibly none)."""
        if self._error is not None:
            err = self._error
            raise type(err)(err.reason, f"decoder already failed: {err.message}")
        if type(data) is not bytes:
            data = bytes(data)
        out: list[Packet] = []
        try:
            self._feed(data, out)
        except MQTTProtocolError as exc:
            exc.packets = out
            self._error = exc
            self._buf = bytearray()
            self._need = 0
            raise
        return out

    def _feed(self, data: bytes, out: list[Packet]) -> None:
        n = len(data)
        pos = 0
        buf = self._buf
        max_size = self._max
        decoders = _DECODERS
        if buf:
            # Complete the packet left over from the previous feed.  Its first byte was already checked.
            need = self._need
            while not need:
                if pos >= n:
                    return
                buf.append(data[pos])
                pos += 1
                header = _parse_rl(buf, 0, len(buf), max_size)
                if header is not None:
                    self._hl = header[0]
                    need = header[0] + header[1]
            take = need - len(buf)
            if take > n - pos:
                buf += data[pos:]
                self._need = need
                return
            buf += data[pos : pos + take]
            pos += take
            packet = bytes(buf)
            buf.clear()
            self._need = 0
            b0 = packet[0]
            out.append(decoders[b0 >> 4](packet, self._hl, need, b0))
        table = self._table
        while pos < n:
            b0 = data[pos]
            reason = table[b0]
            if reason is not None:
                raise _first_byte_error(b0, reason)
            if pos + 1 < n and data[pos + 1] < 0x80:
                start = pos + 2
                end = start + data[pos + 1]
                if end - pos > max_size:
                    raise PacketTooLarge(
                        "packet-too-large", f"packet of {end - pos} bytes exceeds limit {max_size}"
                    )
            else:
                header = _parse_rl(data, pos, n, max_size)
                if header is None:
                    buf += data[pos:]
                    break
                start = pos + header[0]
                end = start + header[1]
            if end > n:
                buf += data[pos:]
                self._need = end - pos
                self._hl = start - pos
                break
            out.append(decoders[b0 >> 4](data, start, end, b0))
            pos = end
