"""The PROXY protocol header parser (meterhub.mqtt.proxy_protocol): v2 binary, v1 text, fuzzed."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterhub.mqtt.proxy_protocol import (
    MAX_V2_LENGTH,
    SIGNATURE_V2,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)

CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # the MQTT stream that follows


def test_v2_ipv4_as_haproxy_sends_it() -> None:
    # captured layout: signature, 0x21 (v2 PROXY), 0x11 (INET/STREAM), length 12, addresses, ports
    raw = SIGNATURE_V2 + bytes.fromhex("2111000c 7f000002 7f000001 d431 555b".replace(" ", ""))
    header, size = parse(raw + CONNECT)  # type: ignore[misc]
    assert size == len(raw)
    assert header == ProxyHeader(2, False, ("127.0.0.2", 0xD431), ("127.0.0.1", 0x555B))
    assert header.peer == "127.0.0.2:54321"


def test_v2_ipv6_local_tlvs() -> None:
    h = encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 21883), tlvs=((0x05, b"uid-1"), (0x04, b"")))
    header, size = parse(h)  # type: ignore[misc]
    assert size == len(h)
    assert header.source == ("2001:db8::1", 40000) and header.destination == ("2001:db8::2", 21883)
    assert header.tlvs == ((0x05, b"uid-1"), (0x04, b""))
    assert header.peer == "2001:db8::1:40000"  # the server's usual host:port form (source_of splits it)
    local, size = parse(encode_v2(local=True) + CONNECT)  # type: ignore[misc]
    assert local == ProxyHeader(2, True) and local.peer is None and size == 16


def test_v2_unspec_and_unix_families_carry_no_address() -> None:
    unspec = SIGNATURE_V2 + b"\x21\x00\x00\x00"
    assert parse(unspec) == (ProxyHeader(2, False), 16)
    unix = SIGNATURE_V2 + b"\x21\x31" + (216).to_bytes(2, "big") + b"/tmp/a".ljust(216, b"\0")
    assert parse(unix) == (ProxyHeader(2, False), 16 + 216)


def test_v1_lines() -> None:
    line = b"PROXY TCP4 192.0.2.7 192.0.2.1 56324 21883\r\n"
    assert parse(line + CONNECT) == (
        ProxyHeader(1, False, ("192.0.2.7", 56324), ("192.0.2.1", 21883)),
        len(line),
    )
    assert parse(encode_v1(("::1", 1), ("::2", 2))) == (
        ProxyHeader(1, False, ("::1", 1), ("::2", 2)),
        len(encode_v1(("::1", 1), ("::2", 2))),
    )
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == (ProxyHeader(1, True), 35)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (CONNECT, "no-header"),  # a plain MQTT client on a PROXY-only port
        (b"GET / HTTP/1.1\r\n", "no-header"),
        (b"\r\n\r\n\x00\r\nQUIX", "bad-signature"),
        (b"PROXX", "bad-signature"),
        (SIGNATURE_V2 + b"\x11\x11\x00\x0c", "bad-version"),
        (SIGNATURE_V2 + b"\x22\x11\x00\x0c", "bad-command"),
        (SIGNATURE_V2 + b"\x21\x41\x00\x0c", "bad-family"),
        (SIGNATURE_V2 + b"\x21\x13\x00\x0c", "bad-family"),
        (SIGNATURE_V2 + b"\x21\x11" + (MAX_V2_LENGTH + 1).to_bytes(2, "big"), "too-long"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x04\x7f\x00\x00\x01", "short-address"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00", "bad-tlv"),
        (SIGNATURE_V2 + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05\x00", "bad-tlv"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad-v1"),
        (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "bad-v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad-v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad-v1"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad-v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad-v1"),
        (b"PROXY " + b"x" * 120, "bad-v1"),  # no CRLF within 107 bytes
        (b"PROXY TCP4 \xff\r\n", "bad-v1"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as err:
        parse(data)
    assert err.value.reason == reason


def test_incomplete_headers_need_more() -> None:
    h = encode_v2(("10.0.0.1", 1000), ("10.0.0.2", 21883), tlvs=((1, b"h2"),))
    for n in range(len(h)):
        assert parse(h[:n]) is None, n
    line = encode_v1(("10.0.0.1", 1000), ("10.0.0.2", 21883))
    for n in range(len(line)):
        assert parse(line[:n]) is None, n


def test_reader_collects_bytes_one_at_a_time_and_keeps_the_rest() -> None:
    h = encode_v2(("198.51.100.9", 65535), ("198.51.100.1", 21883))
    reader = ProxyHeaderReader()
    data = h + CONNECT
    got = None
    for i in range(len(h)):
        got = reader.feed(data[i : i + 1])
    assert got is not None and got.peer == "198.51.100.9:65535" and reader.rest == b""
    reader = ProxyHeaderReader()
    assert reader.feed(data[:5]) is None
    assert reader.feed(data[5:]) == ProxyHeader(2, False, ("198.51.100.9", 65535), ("198.51.100.1", 21883))
    assert reader.rest == CONNECT
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# --- fuzz ----------------------------------------------------------------------------------------

_ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
_port = st.integers(0, 65535)
_tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5).map(tuple)


@st.composite
def _headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    ip = draw(st.sampled_from([_ipv4, _ipv6]))
    src, dst = (draw(ip), draw(_port)), (draw(ip), draw(_port))
    kind = draw(st.sampled_from(["v2", "v2-local", "v1"]))
    if kind == "v1":
        return encode_v1(src, dst), ProxyHeader(1, False, src, dst)
    tlvs = draw(_tlvs)
    if kind == "v2-local":
        return encode_v2(local=True, tlvs=tlvs), ProxyHeader(2, True, tlvs=tlvs)
    return encode_v2(src, dst, tlvs=tlvs), ProxyHeader(2, False, src, dst, tlvs)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_give_a_header_more_or_a_protocol_error(data: bytes) -> None:
    try:
        found = parse(data)
    except ProxyProtocolError as exc:
        assert exc.reason
        return
    if found is not None:
        header, size = found
        assert 0 < size <= len(data) and isinstance(header, ProxyHeader)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 200))
def test_fuzz_random_bytes_after_the_signature(tail: bytes, cut: int) -> None:
    """Past the signature the parser meets arbitrary header fields: never anything but the 3 outcomes."""
    data = SIGNATURE_V2 + tail
    reader = ProxyHeaderReader()
    try:
        first = reader.feed(data[:cut])
        got = first if first is not None else reader.feed(data[cut:]) if cut < len(data) else None
    except ProxyProtocolError:
        return
    if got is not None:
        assert reader.rest == data[len(data) - len(reader.rest) :]


@settings(max_examples=300, deadline=None)
@given(_headers(), st.binary(max_size=50), st.lists(st.integers(1, 40), max_size=20))
def test_fuzz_valid_headers_in_any_pieces(
    item: tuple[bytes, ProxyHeader], after: bytes, cuts: list[int]
) -> None:
    raw, expected = item
    data = raw + after
    reader = ProxyHeaderReader()
    got = None
    i = 0
    for n in [*cuts, len(data)]:
        piece = data[i : i + n]
        i += n
        if not piece:
            continue
        got = reader.feed(piece)
        if got is not None:
            break
    assert got == expected
    assert reader.rest + data[i:] == after


@settings(max_examples=200, deadline=None)
@given(_headers(), st.integers(0, 2000), st.integers(0, 255))
def test_fuzz_one_corrupted_byte_never_crashes(item: tuple[bytes, ProxyHeader], pos: int, value: int) -> None:
    raw = bytearray(item[0])
    raw[pos % len(raw)] = value
    with contextlib.suppress(ProxyProtocolError):
        parse(bytes(raw))
