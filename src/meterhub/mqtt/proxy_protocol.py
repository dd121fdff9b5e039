"""The PROXY protocol (HAProxy's ``send-proxy-v2``, also v1 text), sans-I/O.

A TCP load balancer in front of meterhub's MQTT listener prepends one header to each connection,
naming the client's address (the balancer's own address is what the socket shows). Feed the first
bytes of a connection to a :class:`ProxyHeaderReader`: it answers ``None`` (need more bytes), a
:class:`ProxyHeader` (its :attr:`~ProxyHeaderReader.rest` are the bytes after it, the start of the
MQTT stream), or raises :class:`ProxyProtocolError` with a short ``reason`` (for counters).

Version 2 (binary; https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt section 2.2):
12-byte signature, version/command byte, family/transport byte, 2-byte length, addresses, TLVs.
Version 1 (text): ``PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n``, at most 107 bytes.

Choices:
- ``LOCAL`` (v2 command 0: the balancer's own connection, e.g. a health check) and v1 ``UNKNOWN``
  are accepted with no address: the connection's own peer address stands.
- v2 with an ``UNSPEC`` or ``UNIX`` family is accepted the same way (no IP address to take).
- a v2 header longer than :data:`MAX_V2_LENGTH` bytes after its fixed part is refused (``too-long``):
  a connection nobody has authenticated yet is held to a small buffer. TLVs are checked for
  structure only (each one's length within the header) and kept as ``(type, value)`` pairs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "SIGNATURE_V2",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "parse",
]

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: Longest v1 line, CRLF included (the specification's bound).
MAX_V1_LENGTH = 107
#: Longest v2 address block + TLVs accepted (the 16-byte fixed part not counted).
MAX_V2_LENGTH = 2048
_ADDRESS_LENGTH = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX


class ProxyProtocolError(ValueError):
    """Not a valid PROXY protocol header; ``reason`` is a short stable name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the balancer said about the connection.

    ``source`` / ``destination`` are ``(address, port)`` for a proxied TCP connection over IPv4 or
    IPv6, else None (``LOCAL``, ``UNKNOWN``, UNIX sockets, unspecified family).
    """

    version: int
    local: bool
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def peer(self) -> str | None:
        """``address:port`` of the client (the format the MQTT server logs), or None."""
        if self.source is None:
            return None
        return f"{self.source[0]}:{self.source[1]}"


def parse(buf: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``buf`` and its length, or None if more bytes are needed."""
    if not buf:
        return None
    if buf[0] == SIGNATURE_V2[0]:
        n = min(len(buf), len(SIGNATURE_V2))
        if buf[:n] != SIGNATURE_V2[:n]:
            raise ProxyProtocolError("bad-signature")
        return _parse_v2(buf) if len(buf) >= 16 else None
    if buf[0] == _V1_PREFIX[0]:
        n = min(len(buf), len(_V1_PREFIX))
        if buf[:n] != _V1_PREFIX[:n]:
            raise ProxyProtocolError("bad-signature")
        return _parse_v1(buf)
    raise ProxyProtocolError("no-header", f"first byte 0x{buf[0]:02x}")


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    ver_cmd, fam = buf[12], buf[13]
    length = int.from_bytes(buf[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("bad-version", str(ver_cmd >> 4))
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyProtocolError("bad-command", str(command))
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyProtocolError("bad-family", f"0x{fam:02x}")
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError("too-long", str(length))
    end = 16 + length
    if len(buf) < end:
        return None
    body = buf[16:end]
    need = _ADDRESS_LENGTH.get(family, 0)
    if len(body) < need:
        raise ProxyProtocolError("short-address", f"{len(body)} < {need}")
    tlvs = _parse_tlvs(body[need:])
    if command == 0:
        return ProxyHeader(2, True, tlvs=tlvs), end
    if family == 1 and transport == 1:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        ports = body[8:12]
    elif family == 2 and transport == 1:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        ports = body[32:36]
    else:  # UNSPEC, UNIX, or a datagram: no TCP address to take
        return ProxyHeader(2, False, tlvs=tlvs), end
    sport, dport = int.from_bytes(ports[0:2], "big"), int.from_bytes(ports[2:4], "big")
    return ProxyHeader(2, False, (src, sport), (dst, dport), tlvs), end


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("bad-tlv", "truncated")
        size = int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + size > len(data):
            raise ProxyProtocolError("bad-tlv", "overruns the header")
        out.append((data[i], bytes(data[i + 3 : i + 3 + size])))
        i += 3 + size
    return tuple(out)


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | None:
    end = buf.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(buf) >= MAX_V1_LENGTH or b"\n" in buf[:MAX_V1_LENGTH]:
            raise ProxyProtocolError("bad-v1", "no CRLF within 107 bytes")
        return None
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("bad-v1", "not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, True), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("bad-v1", "expected PROXY TCP4|TCP6 src dst sport dport")
    kind = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = str(kind(parts[2])), str(kind(parts[3]))
    except ValueError:
        raise ProxyProtocolError("bad-v1", "bad address") from None
    sport, dport = _port(parts[4]), _port(parts[5])
    return ProxyHeader(1, False, (src, sport), (dst, dport)), end + 2


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError("bad-v1", "bad port")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("bad-v1", "bad port")
    return port


class ProxyHeaderReader:
    """Collects a connection's first bytes until its PROXY header is complete."""

    __slots__ = ("_buf", "header", "rest")

    def __init__(self) -> None:
        self._buf = b""
        self.header: ProxyHeader | None = None
        self.rest = b""  # bytes after the header (the start of the MQTT stream)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """The header once complete (then :attr:`rest`), None while more bytes are needed."""
        if self.header is not None:
            raise RuntimeError("header already read")
        buf = self._buf + data if self._buf else data
        found = parse(buf)
        if found is None:
            self._buf = bytes(buf)
            return None
        self.header, size = found
        self.rest = bytes(buf[size:])
        self._buf = b""
        return self.header


def encode_v2(
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    *,
    local: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header (for tests and tools): PROXY over TCP for the given addresses, or LOCAL."""
    tail = b"".join(bytes([t]) + len(v).to_bytes(2, "big") + v for t, v in tlvs)
    if local or source is None or destination is None:
        return SIGNATURE_V2 + b"\x20\x00" + len(tail).to_bytes(2, "big") + tail
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    fam = b"\x11" if src.version == 4 else b"\x21"
    body = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    body += tail
    return SIGNATURE_V2 + b"\x21" + fam + len(body).to_bytes(2, "big") + body


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line (for tests and tools); ``UNKNOWN`` without addresses."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    kind = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return f"PROXY {kind} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
