"""Tests for the sans-I/O MQTT 3.1.1 codec (meterhub.mqtt.codec)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterhub.mqtt import codec
from meterhub.mqtt.codec import (
    SUPPORTED_PROTOCOLS,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PacketTooLarge,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
    encode_publish,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------- helpers


def decode_all(data: bytes, *, server_side: bool = True, max_packet_size: int = 65536) -> list[Packet]:
    """Decode ``data`` that must consist of complete packets only."""
    decoder = Decoder(server_side=server_side, max_packet_size=max_packet_size)
    packets = decoder.feed(data)
    assert decoder.buffered == 0
    return packets


def decode_one(data: bytes, *, server_side: bool = True, max_packet_size: int = 65536) -> Packet:
    packets = decode_all(data, server_side=server_side, max_packet_size=max_packet_size)
    assert len(packets) == 1
    return packets[0]


def reason_of(data: bytes, *, server_side: bool = True, max_packet_size: int = 65536) -> str:
    decoder = Decoder(server_side=server_side, max_packet_size=max_packet_size)
    with pytest.raises(MQTTProtocolError) as excinfo:
        decoder.feed(data)
    return excinfo.value.reason


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def mqtt_str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u16(len(raw)) + raw


def frame(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first, len(body))) + body


def connect_body(
    flags: int = 0x02,
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    keep_alive: int = 60,
    client_id: bytes = b"abc",
    rest: bytes = b"",
) -> bytes:
    return mqtt_str(name) + bytes((level, flags)) + u16(keep_alive) + mqtt_str(client_id) + rest


# --------------------------------------------------------------------------------------------- round trips

CLIENT_PACKETS: list[Packet] = [
    Connect("abc", True, 60),
    Connect("", True, 0),
    Connect("client-\u00e9\u4e2d\U0001f600", False, 65535),
    Connect("c", True, 30, username="user"),
    Connect("c", True, 30, username="", password=b""),
    Connect("c", False, 30, username="user", password=b"\x00\xffsecret"),
    Connect("c", True, 10, will=Will("will/topic", b"\x00\x01\xfe\xff", 0, False)),
    Connect("c", True, 10, will=Will("w", b"", 1, True)),
    Connect("c", True, 10, "u", b"p", Will("w/\u00fc", b"bye", 2, False)),
    Connect("legacy", True, 60, protocol_name="MQIsdp", protocol_level=3),
    Publish("a/b", b"hello"),
    Publish("a/b", b"", 0, True),
    Publish("a", b"\x00" * 10, 1, False, False, 1),
    Publish("a/b/c", b"x", 1, True, True, 65535),
    Publish("\u00fcber/\u6e29\u5ea6", b"{}", 2, False, True, 4242),
    Publish("/", b"p", 2, True, False, 7),
    PubAck(1),
    PubAck(65535),
    PubRec(1),
    PubRec(65535),
    PubRel(1),
    PubRel(65535),
    PubComp(1),
    PubComp(65535),
    Subscribe(1, [("a/+/c", 0)]),
    Subscribe(65535, [("#", 2), ("a/b", 1), ("+/+", 0), ("\u00e9", 2)]),
    Unsubscribe(1, ["a/#"]),
    Unsubscribe(65535, ["a", "b/+", "#"]),
    PingReq(),
    Disconnect(),
]

SERVER_PACKETS: list[Packet] = [
    ConnAck(False, 0),
    ConnAck(True, 0),
    *(ConnAck(False, code) for code in range(1, 6)),
    Publish("a/b", b"hello"),
    Publish("a/b", b"x" * 200, 1, True, True, 65535),
    Publish("t", b"", 2, False, False, 1),
    PubAck(1),
    PubRec(65535),
    PubRel(2),
    PubComp(3),
    SubAck(1, [0]),
    SubAck(65535, [0, 1, 2, 0x80]),
    UnsubAck(1),
    UnsubAck(65535),
    PingResp(),
]


@pytest.mark.parametrize("packet", CLIENT_PACKETS, ids=repr)
def test_round_trip_client_packets(packet: Packet) -> None:
    data = encode(packet)
    assert decode_one(data, server_side=True) == packet
    assert encode(decode_one(data)) == data


@pytest.mark.parametrize("packet", SERVER_PACKETS, ids=repr)
def test_round_trip_server_packets(packet: Packet) -> None:
    data = encode(packet)
    assert decode_one(data, server_side=False) == packet
    assert encode(decode_one(data, server_side=False)) == data


def test_decoded_field_types() -> None:
    pub = decode_one(encode(Publish("a", b"p", 1, True, True, 5)))
    assert isinstance(pub, Publish)
    assert type(pub.payload) is bytes
    assert pub.retain is True and pub.dup is True
    conn = decode_one(encode(Connect("c", True, 1, "u", b"pw", Will("w", b"x", 1, True))))
    assert isinstance(conn, Connect)
    assert conn.clean_session is True
    assert type(conn.password) is bytes
    assert conn.will is not None and conn.will.retain is True and type(conn.will.payload) is bytes


def test_password_not_in_repr() -> None:
    assert "hunter2" not in repr(Connect("c", True, 1, "u", b"hunter2"))


def test_packet_type_constants() -> None:
    assert (codec.CONNECT, codec.PUBLISH, codec.SUBSCRIBE, codec.DISCONNECT) == (1, 3, 8, 14)
    for packet in CLIENT_PACKETS + SERVER_PACKETS:
        assert encode(packet)[0] >> 4 == type(packet).packet_type
        assert isinstance(packet, Packet)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("remaining_length", "header"),
    [
        (127, b"\x30\x7f"),
        (128, b"\x30\x80\x01"),
        (16383, b"\x30\xff\x7f"),
        (16384, b"\x30\x80\x80\x01"),
        (2097151, b"\x30\xff\xff\x7f"),
        (2097152, b"\x30\x80\x80\x80\x01"),
    ],
)
def test_remaining_length_boundaries(remaining_length: int, header: bytes) -> None:
    payload = b"\xa5" * (remaining_length - 3)  # topic "t": 2-byte length + 1 byte
    data = encode_publish("t", payload, 0, None)
    assert data.startswith(header + b"\x00\x01t")
    assert len(data) == len(header) + remaining_length
    assert data == encode(Publish("t", payload))
    packet = decode_one(data, max_packet_size=len(data))
    assert packet == Publish("t", payload)
    # Incremental feeding of a big packet across chunk boundaries.
    decoder = Decoder(max_packet_size=len(data))
    out: list[Packet] = []
    for i in range(0, len(data), 65536):
        out += decoder.feed(data[i : i + 65536])
    assert out == [Publish("t", payload)]
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=len(data) - 1).feed(data[: len(header)])


def test_encode_remaining_length_limits() -> None:
    assert codec._encode_rl(0) == b"\x00"
    assert codec._encode_rl(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(ValueError):
        codec._encode_rl(268_435_456)


def test_five_byte_remaining_length_rejected() -> None:
    assert reason_of(b"\x30\xff\xff\xff\xff\x01", max_packet_size=2**31) == "bad-remaining-length"
    # With a normal limit the announced size is already too large after 3 bytes.
    assert reason_of(b"\x30\xff\xff\xff\xff\x01") == "packet-too-large"


def test_non_minimal_remaining_length_is_accepted() -> None:
    assert decode_all(b"\xc0\x80\x00") == [PingReq()]
    assert decode_all(b"\x40\x82\x80\x00\x00\x07") == [PubAck(7)]


# --------------------------------------------------------------------------------------------- known frames


def test_known_frames_simple() -> None:
    assert encode(PingReq()) == b"\xc0\x00"
    assert encode(PingResp()) == b"\xd0\x00"
    assert encode(Disconnect()) == b"\xe0\x00"
    assert encode(ConnAck(False, 0)) == b"\x20\x02\x00\x00"
    assert encode(ConnAck(True, 0)) == b"\x20\x02\x01\x00"
    assert encode(PubAck(10)) == b"\x40\x02\x00\x0a"
    assert encode(PubRec(10)) == b"\x50\x02\x00\x0a"
    assert encode(PubRel(10)) == b"\x62\x02\x00\x0a"
    assert encode(PubComp(10)) == b"\x70\x02\x00\x0a"
    assert encode(UnsubAck(10)) == b"\xb0\x02\x00\x0a"
    assert decode_all(b"\xc0\x00\xe0\x00") == [PingReq(), Disconnect()]


def test_known_connect_from_paho() -> None:
    # paho-mqtt 2.x, MQTTv311, client_id="abc", clean session, keepalive 60.
    data = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"
    assert encode(Connect("abc", True, 60)) == data
    assert decode_one(data) == Connect("abc", True, 60)


def test_known_connect_spec_flags_example() -> None:
    # Spec 3.1.2.10 example variable header: flags 0xCE (username, password, will QoS 1, will, clean).
    body = (
        b"\x00\x04MQTT\x04\xce\x00\x0a"
        + b"\x00\x03cid"
        + b"\x00\x01w"
        + b"\x00\x02\x00\xff"
        + b"\x00\x01u"
        + b"\x00\x01p"
    )
    data = b"\x10\x1c" + body
    packet = Connect("cid", True, 10, "u", b"p", Will("w", b"\x00\xff", 1, False))
    assert encode(packet) == data
    assert decode_one(data) == packet


def test_known_connect_mqtt31() -> None:
    data = b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03abc"
    packet = Connect("abc", True, 60, protocol_name="MQIsdp", protocol_level=3)
    assert decode_one(data) == packet
    assert encode(packet) == data


def test_known_publish_qos1() -> None:
    # Spec 3.3.2.3 example: topic "a/b", packet identifier 10.
    data = b"\x32\x09\x00\x03a/b\x00\x0ahi"
    assert encode_publish("a/b", b"hi", 1, 10) == data
    assert encode(Publish("a/b", b"hi", 1, packet_id=10)) == data
    assert decode_one(data) == Publish("a/b", b"hi", 1, False, False, 10)
    assert decode_one(b"\x3b\x09\x00\x03a/b\x00\x0ahi") == Publish("a/b", b"hi", 1, True, True, 10)


def test_known_subscribe_suback_unsubscribe() -> None:
    sub = b"\x82\x0e\x00\x0a\x00\x03a/b\x01\x00\x03c/d\x02"
    assert encode(Subscribe(10, [("a/b", 1), ("c/d", 2)])) == sub
    assert decode_one(sub) == Subscribe(10, [("a/b", 1), ("c/d", 2)])
    suback = b"\x90\x05\x00\x0a\x00\x02\x80"
    assert encode(SubAck(10, [0, 2, 0x80])) == suback
    assert decode_one(suback, server_side=False) == SubAck(10, [0, 2, 0x80])
    unsub = b"\xa2\x0c\x00\x0a\x00\x03a/b\x00\x03c/d"
    assert encode(Unsubscribe(10, ["a/b", "c/d"])) == unsub
    assert decode_one(unsub) == Unsubscribe(10, ["a/b", "c/d"])


@pytest.mark.parametrize(
    "args",
    [
        ("a/b", b"", 0, None, False, False),
        ("a/b", b"x" * 300, 0, None, True, False),
        ("a/b", b"x", 1, 1, False, True),
        ("\u00e9/b", b"x" * 20000, 2, 65535, True, True),
    ],
)
def test_encode_publish_matches_encode(args: tuple[str, bytes, int, int | None, bool, bool]) -> None:
    topic, payload, qos, pid, retain, dup = args
    data = encode_publish(topic, payload, qos, pid, retain, dup)
    assert data == encode(Publish(topic, payload, qos, retain, dup, pid))
    assert decode_one(data) == Publish(topic, payload, qos, retain, dup, pid)


def test_encode_publish_accepts_bytes_like_payload() -> None:
    expected = encode_publish("t", b"abc", 1, 3)
    assert encode_publish("t", bytearray(b"abc"), 1, 3) == expected
    assert encode_publish("t", memoryview(b"abc"), 1, 3) == expected


# --------------------------------------------------------------------------------------------- encoder errors


@pytest.mark.parametrize(
    "packet",
    [
        Publish("", b""),
        Publish("a/+", b""),
        Publish("a/#", b""),
        Publish("a\x00b", b""),
        Publish("\ud800", b""),
        Publish("x" * 65536, b""),
        Publish("a", b"", 3, packet_id=1),
        Publish("a", b"", -1),
        Publish("a", b"", 0, packet_id=1),
        Publish("a", b"", 0, dup=True),
        Publish("a", b"", 1),
        Publish("a", b"", 1, packet_id=0),
        Publish("a", b"", 2, packet_id=65536),
        PubAck(0),
        PubRec(65536),
        PubRel(-1),
        PubComp(0),
        UnsubAck(0),
        Connect("x" * 65536, True, 0),
        Connect("c", True, 65536),
        Connect("c", True, -1),
        Connect("c", True, 1.5),  # type: ignore[arg-type]
        Connect("c", True, 1, protocol_level=-1),
        Connect("c\x00", True, 0),
        Connect("c", True, 0, password=b"p"),
        Connect("c", True, 0, username="u" * 70000),
        Connect("c", True, 0, "u", b"p" * 65536),
        Connect("c", True, 0, will=Will("w", b"p", 3, False)),
        Connect("c", True, 0, will=Will("w/#", b"p", 0, False)),
        Connect("c", True, 0, will=Will("", b"p", 0, False)),
        Connect("c", True, 0, will=Will("w", b"p" * 65536, 0, False)),
        Connect("c", True, 0, protocol_level=256),
        ConnAck(False, 6),
        ConnAck(True, 1),
        Subscribe(1, []),
        Subscribe(0, [("a", 0)]),
        Subscribe(1, [("a", 3)]),
        Subscribe(1, [("", 0)]),
        SubAck(1, []),
        SubAck(1, [3]),
        SubAck(0, [0]),
        Unsubscribe(1, []),
        Unsubscribe(1, [""]),
        Unsubscribe(70000, ["a"]),
    ],
    ids=repr,
)
def test_encode_rejects_unrepresentable(packet: Packet) -> None:
    with pytest.raises(ValueError):
        encode(packet)


@pytest.mark.parametrize(
    "args",
    [
        ("", b"", 0, None),
        ("a+", b"", 0, None),
        ("#", b"", 1, 1),
        ("a\x00", b"", 0, None),
        ("\udcff", b"", 0, None),
        ("x" * 65536, b"", 0, None),
        ("a", b"", 3, 1),
        ("a", b"", 0, 1),
        ("a", b"", 1, None),
        ("a", b"", 1, 0),
        ("a", b"", 2, 65536),
    ],
)
def test_encode_publish_rejects_invalid(args: tuple[str, bytes, int, int | None]) -> None:
    with pytest.raises(ValueError):
        encode_publish(*args)


def test_encode_publish_rejects_dup_on_qos0() -> None:
    with pytest.raises(ValueError):
        encode_publish("a", b"", 0, None, dup=True)


def test_encode_rejects_non_packets() -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- incremental


def _client_stream() -> tuple[bytes, list[Packet]]:
    packets = CLIENT_PACKETS * 3 + [Publish("big", bytes(range(256)) * 40, 1, packet_id=9)]
    return b"".join(encode(p) for p in packets), packets


def test_feed_one_byte_at_a_time() -> None:
    data, packets = _client_stream()
    decoder = Decoder()
    out: list[Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
        assert decoder.buffered <= decoder.max_packet_size
    assert out == packets
    assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_feed_random_chunks(seed: int) -> None:
    data, packets = _client_stream()
    rng = random.Random(seed)
    decoder = Decoder()
    out: list[Packet] = []
    pos = 0
    while pos < len(data):
        size = rng.choice([0, 1, 2, 3, 5, 17, 100, 1000, 5000])
        out += decoder.feed(data[pos : pos + size])
        pos += size
    assert out == packets
    assert decoder.buffered == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    data, packets = _client_stream()
    half = len(data) // 2
    decoder = Decoder()
    out = decoder.feed(bytearray(data[:half]))
    out += decoder.feed(memoryview(data)[half:])
    assert out == packets


def test_many_packets_in_one_chunk_with_partial_tail() -> None:
    tail = encode(Publish("a/b", b"tail", 1, packet_id=3))
    data = encode(PingReq()) * 50_000 + encode(PubAck(1)) * 10_000 + tail[:5]
    decoder = Decoder()
    out = decoder.feed(data)
    assert len(out) == 60_000
    assert out[0] == PingReq() and out[-1] == PubAck(1)
    assert decoder.buffered == 5
    assert decoder.feed(tail[5:]) == [Publish("a/b", b"tail", 1, packet_id=3)]
    assert decoder.buffered == 0


def test_empty_feed() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\x30")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1


def test_partial_header_is_buffered() -> None:
    decoder = Decoder(max_packet_size=1_000_000)
    data = encode_publish("t", b"z" * 200_000, 0, None)
    assert decoder.feed(data[:1]) == []
    assert decoder.feed(data[1:3]) == []
    assert decoder.buffered == 3
    assert decoder.feed(data[3:]) == [Publish("t", b"z" * 200_000)]


# --------------------------------------------------------------------------------------------- packet size


def test_packet_too_large_from_header_alone() -> None:
    decoder = Decoder(max_packet_size=1000)
    with pytest.raises(PacketTooLarge) as excinfo:
        decoder.feed(b"\x30\xe6\x07")  # remaining length 998 -> 1001 bytes in total
    assert excinfo.value.reason == "packet-too-large"
    assert isinstance(excinfo.value, MQTTProtocolError)
    assert decoder.buffered == 0


def test_packet_too_large_huge_announcement_default_limit() -> None:
    decoder = Decoder()
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"\x30\xff\xff\xff\x7f")
    assert decoder.buffered == 0


def test_packet_too_large_header_fed_byte_by_byte() -> None:
    decoder = Decoder(max_packet_size=1000)
    decoder.feed(b"\x30")
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"\xe6")
        decoder.feed(b"\x07")
    assert decoder.buffered == 0


def test_packet_too_large_detected_from_partial_length() -> None:
    # After two length bytes the packet is already known to be >= 16386 bytes.
    decoder = Decoder(max_packet_size=1000)
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"\x30\xff\xff")


def test_packet_too_large_with_one_byte_length() -> None:
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=10).feed(b"\x30\x09")


def test_packet_exactly_max_size_is_accepted() -> None:
    data = encode_publish("t", b"p" * 1000, 0, None)
    assert decode_one(data, max_packet_size=len(data)) == Publish("t", b"p" * 1000)
    with pytest.raises(PacketTooLarge):
        Decoder(max_packet_size=len(data) - 1).feed(data)


def test_too_large_packet_after_valid_ones() -> None:
    decoder = Decoder(max_packet_size=100)
    with pytest.raises(PacketTooLarge) as excinfo:
        decoder.feed(b"\xc0\x00" + b"\x30\x7f")
    assert excinfo.value.packets == [PingReq()]


def test_invalid_max_packet_size() -> None:
    with pytest.raises(ValueError):
        Decoder(max_packet_size=1)


# --------------------------------------------------------------------------------------------- error state


def test_errors_are_sticky() -> None:
    decoder = Decoder()
    with pytest.raises(MQTTProtocolError) as first:
        decoder.feed(b"\x00\x00")
    for _ in range(3):
        with pytest.raises(MQTTProtocolError) as again:
            decoder.feed(b"\xc0\x00")
        assert again.value.reason == first.value.reason == "bad-packet-type"
    decoder = Decoder(max_packet_size=10)
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"\x30\x7f")
    with pytest.raises(PacketTooLarge):
        decoder.feed(b"")


def test_error_keeps_preceding_packets() -> None:
    decoder = Decoder()
    with pytest.raises(MQTTProtocolError) as excinfo:
        decoder.feed(encode(PubAck(1)) + encode(PingReq()) + b"\x40\x02\x00\x00")
    assert excinfo.value.reason == "zero-packet-id"
    assert excinfo.value.packets == [PubAck(1), PingReq()]
    assert str(excinfo.value)


def test_error_in_pending_packet() -> None:
    decoder = Decoder()
    decoder.feed(b"\x40\x02\x00")
    with pytest.raises(MQTTProtocolError) as excinfo:
        decoder.feed(b"\x00\xc0\x00")
    assert excinfo.value.reason == "zero-packet-id"
    assert decoder.buffered == 0


# --------------------------------------------------------------------------------------------- validation

PUB = 0x30

SERVER_SIDE_ERRORS: list[tuple[str, bytes, str]] = [
    # packet types / direction
    ("type-0", b"\x00\x00", "bad-packet-type"),
    ("type-15", b"\xf0\x00", "bad-packet-type"),
    ("connack-to-server", b"\x20\x02\x00\x00", "unexpected-packet"),
    ("suback-to-server", b"\x90\x03\x00\x01\x00", "unexpected-packet"),
    ("unsuback-to-server", b"\xb0\x02\x00\x01", "unexpected-packet"),
    ("pingresp-to-server", b"\xd0\x00", "unexpected-packet"),
    # fixed-header flags
    ("connect-flags", b"\x11" + bytes([len(connect_body())]) + connect_body(), "reserved-flags"),
    ("puback-flags", b"\x41\x02\x00\x01", "reserved-flags"),
    ("pubrec-flags", b"\x52\x02\x00\x01", "reserved-flags"),
    ("pubrel-flags-0", b"\x60\x02\x00\x01", "reserved-flags"),
    ("pubrel-flags-3", b"\x63\x02\x00\x01", "reserved-flags"),
    ("pubcomp-flags", b"\x78\x02\x00\x01", "reserved-flags"),
    ("subscribe-flags", b"\x80\x06\x00\x01\x00\x01a\x00", "reserved-flags"),
    ("unsubscribe-flags", b"\xa0\x05\x00\x01\x00\x01a", "reserved-flags"),
    ("pingreq-flags", b"\xc1\x00", "reserved-flags"),
    ("disconnect-flags", b"\xe2\x00", "reserved-flags"),
    # PUBLISH
    ("publish-qos3", b"\x36\x05\x00\x01a\x00\x01", "bad-qos"),
    ("publish-qos3-retain", b"\x37\x03\x00\x01a", "bad-qos"),
    ("publish-dup-qos0", b"\x38\x03\x00\x01a", "bad-dup"),
    ("publish-qos1-zero-pid", b"\x32\x05\x00\x01a\x00\x00", "zero-packet-id"),
    ("publish-qos2-zero-pid", b"\x34\x05\x00\x01a\x00\x00", "zero-packet-id"),
    ("publish-empty-topic", b"\x30\x02\x00\x00", "empty-topic"),
    ("publish-plus", b"\x30\x05\x00\x03a/+", "wildcard-in-topic"),
    ("publish-hash", b"\x30\x05\x00\x03a/#", "wildcard-in-topic"),
    ("publish-plus-inside", b"\x30\x05\x00\x03a+b", "wildcard-in-topic"),
    ("publish-invalid-utf8", b"\x30\x04\x00\x02\xff\xfe", "bad-utf8"),
    ("publish-surrogate", b"\x30\x05\x00\x03\xed\xa0\x80", "bad-utf8"),
    ("publish-overlong", b"\x30\x04\x00\x02\xc0\xaf", "bad-utf8"),
    ("publish-truncated-utf8", b"\x30\x03\x00\x01\xc3", "bad-utf8"),
    ("publish-nul", b"\x30\x05\x00\x03a\x00b", "bad-utf8"),
    ("publish-no-topic-length", b"\x30\x01\x00", "truncated"),
    ("publish-empty-body", b"\x30\x00", "truncated"),
    ("publish-topic-overrun", b"\x30\x04\x00\x05ab", "truncated"),
    ("publish-qos1-no-pid", b"\x32\x03\x00\x01a", "truncated"),
    ("publish-qos1-half-pid", b"\x32\x04\x00\x01a\x00", "truncated"),
    # acks
    ("puback-zero", b"\x40\x02\x00\x00", "zero-packet-id"),
    ("pubrec-zero", b"\x50\x02\x00\x00", "zero-packet-id"),
    ("pubrel-zero", b"\x62\x02\x00\x00", "zero-packet-id"),
    ("pubcomp-zero", b"\x70\x02\x00\x00", "zero-packet-id"),
    ("puback-short", b"\x40\x01\x00", "bad-remaining-length"),
    ("puback-long", b"\x40\x03\x00\x01\x00", "bad-remaining-length"),
    ("pubrel-empty", b"\x62\x00", "bad-remaining-length"),
    ("pingreq-body", b"\xc0\x01\x00", "bad-remaining-length"),
    ("disconnect-body", b"\xe0\x01\x00", "bad-remaining-length"),
    # remaining length
    ("rl-5-bytes", b"\x30\x80\x80\x80\x80\x01", "bad-remaining-length"),
    ("rl-4-continuations", b"\xc0\x80\x80\x80\x80", "bad-remaining-length"),
    # SUBSCRIBE
    ("subscribe-empty", b"\x82\x02\x00\x01", "empty-subscribe"),
    ("subscribe-zero-pid", b"\x82\x06\x00\x00\x00\x01a\x00", "zero-packet-id"),
    ("subscribe-no-pid", b"\x82\x00", "truncated"),
    ("subscribe-qos3", b"\x82\x06\x00\x01\x00\x01a\x03", "bad-qos"),
    ("subscribe-reserved-bits", b"\x82\x06\x00\x01\x00\x01a\x04", "reserved-flags"),
    ("subscribe-reserved-high-bit", b"\x82\x06\x00\x01\x00\x01a\x80", "reserved-flags"),
    ("subscribe-empty-filter", b"\x82\x05\x00\x01\x00\x00\x00", "empty-topic-filter"),
    ("subscribe-missing-qos", b"\x82\x05\x00\x01\x00\x01a", "truncated"),
    ("subscribe-second-missing-qos", b"\x82\x09\x00\x01\x00\x01a\x00\x00\x01b", "truncated"),
    ("subscribe-filter-overrun", b"\x82\x05\x00\x01\x00\x05a", "truncated"),
    ("subscribe-bad-utf8", b"\x82\x06\x00\x01\x00\x01\x80\x00", "bad-utf8"),
    ("subscribe-nul", b"\x82\x06\x00\x01\x00\x01\x00\x00", "bad-utf8"),
    # UNSUBSCRIBE
    ("unsubscribe-empty", b"\xa2\x02\x00\x01", "empty-unsubscribe"),
    ("unsubscribe-zero-pid", b"\xa2\x05\x00\x00\x00\x01a", "zero-packet-id"),
    ("unsubscribe-empty-filter", b"\xa2\x04\x00\x01\x00\x00", "empty-topic-filter"),
    ("unsubscribe-bad-utf8", b"\xa2\x05\x00\x01\x00\x01\xff", "bad-utf8"),
    ("unsubscribe-overrun", b"\xa2\x05\x00\x01\x00\x02a", "truncated"),
    ("unsubscribe-dangling-byte", b"\xa2\x06\x00\x01\x00\x01a\x00", "truncated"),
]


def _connect(body: bytes) -> bytes:
    return frame(0x10, body)


CONNECT_ERRORS: list[tuple[str, bytes, str]] = [
    ("bad-name", _connect(connect_body(name=b"MQTX")), "bad-protocol-name"),
    ("lowercase-name", _connect(connect_body(name=b"mqtt")), "bad-protocol-name"),
    ("empty-name", _connect(connect_body(name=b"")), "bad-protocol-name"),
    ("name-bad-utf8", _connect(connect_body(name=b"\xff\xfe")), "bad-utf8"),
    ("reserved-bit", _connect(connect_body(0x03)), "reserved-flags"),
    ("will-qos-no-will", _connect(connect_body(0x0A)), "bad-will-flags"),
    ("will-qos2-no-will", _connect(connect_body(0x12)), "bad-will-flags"),
    ("will-retain-no-will", _connect(connect_body(0x22)), "bad-will-flags"),
    ("will-qos3", _connect(connect_body(0x1E, rest=mqtt_str("w") + mqtt_str(b"x"))), "bad-qos"),
    (
        "will-topic-wildcard",
        _connect(connect_body(0x06, rest=mqtt_str("w/#") + mqtt_str(b"x"))),
        "wildcard-in-topic",
    ),
    ("will-topic-empty", _connect(connect_body(0x06, rest=mqtt_str("") + mqtt_str(b"x"))), "empty-topic"),
    ("will-missing-payload", _connect(connect_body(0x06, rest=mqtt_str("w"))), "truncated"),
    ("password-no-username", _connect(connect_body(0x42, rest=mqtt_str(b"pw"))), "password-without-username"),
    ("username-missing", _connect(connect_body(0x82)), "truncated"),
    ("password-missing", _connect(connect_body(0xC2, rest=mqtt_str("u"))), "truncated"),
    ("password-overrun", _connect(connect_body(0xC2, rest=mqtt_str("u") + b"\x00\x09pw")), "truncated"),
    ("trailing", _connect(connect_body() + b"\x00"), "trailing-bytes"),
    (
        "trailing-after-password",
        _connect(connect_body(0xC2, rest=mqtt_str("u") + mqtt_str(b"p") + b"!")),
        "trailing-bytes",
    ),
    ("client-id-nul", _connect(connect_body(client_id=b"a\x00")), "bad-utf8"),
    ("client-id-bad-utf8", _connect(connect_body(client_id=b"\xc3\x28")), "bad-utf8"),
    ("client-id-surrogate", _connect(connect_body(client_id=b"\xed\xb2\x80")), "bad-utf8"),
    ("username-bad-utf8", _connect(connect_body(0x82, rest=mqtt_str(b"\xff"))), "bad-utf8"),
    ("username-nul", _connect(connect_body(0x82, rest=mqtt_str(b"\x00"))), "bad-utf8"),
    ("no-client-id", _connect(mqtt_str(b"MQTT") + b"\x04\x02\x00\x3c"), "truncated"),
    ("no-keepalive", _connect(mqtt_str(b"MQTT") + b"\x04\x02\x00"), "truncated"),
    ("no-level", _connect(mqtt_str(b"MQTT")), "truncated"),
    ("empty", b"\x10\x00", "truncated"),
    ("name-overrun", b"\x10\x03\x00\x04M", "truncated"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in SERVER_SIDE_ERRORS], ids=[i for i, _, _ in SERVER_SIDE_ERRORS]
)
def test_server_side_validation(data: bytes, reason: str) -> None:
    assert reason_of(data, server_side=True) == reason


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in CONNECT_ERRORS], ids=[i for i, _, _ in CONNECT_ERRORS]
)
def test_connect_validation(data: bytes, reason: str) -> None:
    assert reason_of(data, server_side=True) == reason


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in SERVER_SIDE_ERRORS], ids=[i for i, _, _ in SERVER_SIDE_ERRORS]
)
def test_validation_is_independent_of_chunking(data: bytes, reason: str) -> None:
    decoder = Decoder()
    with pytest.raises(MQTTProtocolError) as excinfo:
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
        pytest.fail("no error raised")  # pragma: no cover
    assert excinfo.value.reason == reason


def test_connect_edge_cases_accepted() -> None:
    assert decode_one(_connect(connect_body(client_id=b""))) == Connect("", True, 60)
    assert decode_one(_connect(connect_body(0x00, client_id=b""))) == Connect("", False, 60)
    # Username without password; empty username and password.
    assert decode_one(_connect(connect_body(0x82, rest=mqtt_str("u")))) == Connect("abc", True, 60, "u")
    assert decode_one(_connect(connect_body(0xC2, rest=mqtt_str("") + mqtt_str(b"")))) == Connect(
        "abc", True, 60, "", b""
    )
    # BOM must not be stripped (MQTT-1.5.3-3).
    bom = decode_one(_connect(connect_body(client_id=b"\xef\xbb\xbfx")))
    assert isinstance(bom, Connect) and bom.client_id == "\ufeffx"
    # Control characters other than U+0000 are allowed by the codec.
    ctrl = decode_one(frame(PUB, mqtt_str("a\x01\x7f\u0085")))
    assert isinstance(ctrl, Publish) and ctrl.topic == "a\x01\x7f\u0085"


@pytest.mark.parametrize(
    ("name", "level"),
    [(b"MQTT", 5), (b"MQTT", 3), (b"MQTT", 0), (b"MQTT", 255), (b"MQIsdp", 4), (b"MQIsdp", 5)],
)
def test_unknown_protocol_level_is_returned_not_raised(name: bytes, level: int) -> None:
    packet = decode_one(_connect(connect_body(0x02, name=name, level=level, keep_alive=30)))
    assert isinstance(packet, Connect)
    assert packet.protocol_name == name.decode()
    assert packet.protocol_level == level
    assert (packet.protocol_name, packet.protocol_level) not in SUPPORTED_PROTOCOLS
    assert packet.keep_alive == 30 and packet.clean_session is True


def test_mqtt5_connect_yields_level_5() -> None:
    # MQTT 5 CONNECT with properties (session expiry) that 3.1.1 parsing could not handle.
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00\x00\x0e\x10\x00\x03abc"
    packet = decode_one(frame(0x10, body))
    assert isinstance(packet, Connect)
    assert packet.protocol_level == 5
    # Even a body cut right after the level byte is returned so the server can answer 0x01.
    assert decode_one(frame(0x10, b"\x00\x04MQTT\x05")) == Connect("", False, 0, protocol_level=5)


def test_supported_protocols() -> None:
    assert {("MQTT", 4), ("MQIsdp", 3)} == SUPPORTED_PROTOCOLS


CLIENT_SIDE_ERRORS: list[tuple[str, bytes, str]] = [
    ("connect-to-client", _connect(connect_body()), "unexpected-packet"),
    ("subscribe-to-client", b"\x82\x06\x00\x01\x00\x01a\x00", "unexpected-packet"),
    ("unsubscribe-to-client", b"\xa2\x05\x00\x01\x00\x01a", "unexpected-packet"),
    ("pingreq-to-client", b"\xc0\x00", "unexpected-packet"),
    ("disconnect-to-client", b"\xe0\x00", "unexpected-packet"),
    ("type-0", b"\x00\x00", "bad-packet-type"),
    ("type-15", b"\xff\x00", "bad-packet-type"),
    ("connack-flags", b"\x21\x02\x00\x00", "reserved-flags"),
    ("connack-ack-flags", b"\x20\x02\x02\x00", "reserved-flags"),
    ("connack-code", b"\x20\x02\x00\x06", "bad-return-code"),
    ("connack-session-on-refusal", b"\x20\x02\x01\x05", "bad-connack"),
    ("connack-short", b"\x20\x01\x00", "bad-remaining-length"),
    ("connack-long", b"\x20\x03\x00\x00\x00", "bad-remaining-length"),
    ("suback-empty", b"\x90\x02\x00\x01", "empty-suback"),
    ("suback-code-3", b"\x90\x03\x00\x01\x03", "bad-return-code"),
    ("suback-code-0x81", b"\x90\x04\x00\x01\x00\x81", "bad-return-code"),
    ("suback-zero-pid", b"\x90\x03\x00\x00\x00", "zero-packet-id"),
    ("suback-flags", b"\x92\x03\x00\x01\x00", "reserved-flags"),
    ("unsuback-zero-pid", b"\xb0\x02\x00\x00", "zero-packet-id"),
    ("unsuback-long", b"\xb0\x03\x00\x01\x00", "bad-remaining-length"),
    ("pingresp-body", b"\xd0\x01\x00", "bad-remaining-length"),
    ("pingresp-flags", b"\xd4\x00", "reserved-flags"),
    ("publish-wildcard", b"\x30\x03\x00\x01#", "wildcard-in-topic"),
    ("publish-qos3", b"\x36\x05\x00\x01a\x00\x01", "bad-qos"),
    ("puback-zero", b"\x40\x02\x00\x00", "zero-packet-id"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [(d, r) for _, d, r in CLIENT_SIDE_ERRORS], ids=[i for i, _, _ in CLIENT_SIDE_ERRORS]
)
def test_client_side_validation(data: bytes, reason: str) -> None:
    assert reason_of(data, server_side=False) == reason


def test_client_side_stream() -> None:
    data = b"".join(encode(p) for p in SERVER_PACKETS)
    decoder = Decoder(server_side=False)
    out: list[Packet] = []
    for i in range(0, len(data), 3):
        out += decoder.feed(data[i : i + 3])
    assert out == SERVER_PACKETS


# --------------------------------------------------------------------------------------------- hypothesis

topic_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1,
    max_size=30,
)
topic_filters = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30
)
utf8_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)
packet_ids = st.integers(1, 65535)
payloads = st.binary(max_size=300)
qos_values = st.integers(0, 2)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(qos_values)
    return Publish(
        draw(topic_names),
        draw(payloads),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(packet_ids) if qos else None,
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | utf8_text)
    password = draw(st.none() | st.binary(max_size=40)) if username is not None else None
    will = draw(st.none() | st.builds(Will, topic_names, st.binary(max_size=60), qos_values, st.booleans()))
    name, level = draw(st.sampled_from(sorted(SUPPORTED_PROTOCOLS)))
    return Connect(
        draw(utf8_text),
        draw(st.booleans()),
        draw(st.integers(0, 65535)),
        username,
        password,
        will,
        name,
        level,
    )


client_packets = st.one_of(
    connects(),
    publishes(),
    st.builds(PubAck, packet_ids),
    st.builds(PubRec, packet_ids),
    st.builds(PubRel, packet_ids),
    st.builds(PubComp, packet_ids),
    st.builds(Subscribe, packet_ids, st.lists(st.tuples(topic_filters, qos_values), min_size=1, max_size=5)),
    st.builds(Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=5)),
    st.just(PingReq()),
    st.just(Disconnect()),
)


@st.composite
def connacks(draw: st.DrawFn) -> ConnAck:
    code = draw(st.integers(0, 5))
    return ConnAck(draw(st.booleans()) if code == 0 else False, code)


server_packets = st.one_of(
    connacks(),
    publishes(),
    st.builds(PubAck, packet_ids),
    st.builds(PubRec, packet_ids),
    st.builds(PubRel, packet_ids),
    st.builds(PubComp, packet_ids),
    st.builds(SubAck, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=10)),
    st.builds(UnsubAck, packet_ids),
    st.just(PingResp()),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_decoder(
    chunks: list[bytes], *, server_side: bool = True, max_packet_size: int = 65536
) -> tuple[list[Packet], str | None]:
    """Feed chunks; return (packets, error reason).  Only MQTTProtocolError may escape the decoder."""
    decoder = Decoder(server_side=server_side, max_packet_size=max_packet_size)
    out: list[Packet] = []
    for chunk in chunks:
        try:
            out += decoder.feed(chunk)
        except MQTTProtocolError as exc:
            out += exc.packets
            assert decoder.buffered == 0
            with pytest.raises(MQTTProtocolError) as again:
                decoder.feed(b"\xc0\x00")
            assert again.value.reason == exc.reason
            assert type(again.value) is type(exc)
            return out, exc.reason
        assert decoder.buffered <= max_packet_size + 5
        assert decoder.buffered <= max_packet_size  # the implementation's stronger guarantee
    return out, None


@FUZZ
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=10),
    server_side=st.booleans(),
    max_packet_size=st.sampled_from([2, 5, 64, 200, 65536]),
)
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int], server_side: bool, max_packet_size: int) -> None:
    chunked = run_decoder(split(data, cuts), server_side=server_side, max_packet_size=max_packet_size)
    whole = run_decoder([data], server_side=server_side, max_packet_size=max_packet_size)
    assert chunked == whole


@FUZZ
@given(
    first=st.integers(0, 255),
    rest=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    server_side=st.booleans(),
)
def test_fuzz_bytes_with_plausible_header(
    first: int, rest: bytes, cuts: list[int], server_side: bool
) -> None:
    # A length byte matching the body makes random data reach the per-type body decoders far more often.
    data = bytes((first, min(len(rest), 127))) + rest
    chunked = run_decoder(split(data, cuts), server_side=server_side)
    assert chunked == run_decoder([data], server_side=server_side)


@FUZZ
@given(
    packets=st.lists(client_packets, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_fuzz_round_trip_client_stream(packets: list[Packet], cuts: list[int]) -> None:
    data = b"".join(encode(p) for p in packets)
    assert run_decoder(split(data, cuts), server_side=True) == (packets, None)


@FUZZ
@given(
    packets=st.lists(server_packets, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
def test_fuzz_round_trip_server_stream(packets: list[Packet], cuts: list[int]) -> None:
    data = b"".join(encode(p) for p in packets)
    assert run_decoder(split(data, cuts), server_side=False) == (packets, None)


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[bytes, bool]:
    server_side = draw(st.booleans())
    packets = draw(st.lists(client_packets if server_side else server_packets, min_size=1, max_size=5))
    data = bytearray(b"".join(encode(p) for p in packets))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "flip", "insert", "delete", "truncate"]))
        index = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "replace" and data:
            data[index] = draw(st.integers(0, 255))
        elif kind == "flip" and data:
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data.insert(index, draw(st.integers(0, 255)))
        elif kind == "delete" and data:
            del data[index]
        elif kind == "truncate":
            del data[index:]
    return bytes(data), server_side


@FUZZ
@given(stream=mutated_streams(), cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_fuzz_mutated_packets(stream: tuple[bytes, bool], cuts: list[int]) -> None:
    data, server_side = stream
    chunked = run_decoder(split(data, cuts), server_side=server_side)
    whole = run_decoder([data], server_side=server_side)
    assert chunked == whole
    for packet in whole[0]:
        # Whatever the decoder accepted must be representable again (the decoder is not laxer than encode).
        assert decode_one(encode(packet), server_side=server_side) == packet


@FUZZ
@given(
    stream=mutated_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_packet_size=st.integers(2, 400),
)
def test_fuzz_buffer_bounded(stream: tuple[bytes, bool], cuts: list[int], max_packet_size: int) -> None:
    data, server_side = stream
    decoder = Decoder(server_side=server_side, max_packet_size=max_packet_size)
    for chunk in split(data, cuts):
        try:
            decoder.feed(chunk)
        except MQTTProtocolError:
            break
        assert decoder.buffered <= max_packet_size + 5


@FUZZ
@given(
    announced=st.integers(1, 268_435_455),
    max_packet_size=st.integers(2, 1_000_000),
    first=st.sampled_from([0x30, 0x32, 0x82, 0xA2, 0x10]),
)
def test_fuzz_too_large_rejected_from_header(announced: int, max_packet_size: int, first: int) -> None:
    header = bytes((first,)) + codec._encode_rl(announced)
    decoder = Decoder(max_packet_size=max_packet_size)
    if len(header) + announced > max_packet_size:
        with pytest.raises(PacketTooLarge):
            decoder.feed(header)
    else:
        assert decoder.feed(header) == []
        assert decoder.buffered <= max_packet_size
