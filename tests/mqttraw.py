"""Hand-built MQTT 3.1.1 frames for tests that need exact bytes or misbehaving clients.

Independent of meterhub's codec on purpose: these bytes are written from the specification.
"""

from __future__ import annotations

import socket
import time


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varlen(len(body)) + body


def connect(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    level: int = 4,
    name: bytes = b"MQTT",
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes, int] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _s(client_id)
    if will is not None:
        flags |= 0x04 | (will[2] << 3)
        payload += _s(will[0]) + _s(will[1])
    if username is not None:
        flags |= 0x80
        payload += _s(username)
    if password is not None:
        flags |= 0x40
        payload += _s(password)
    return frame(0x10, _s(name) + bytes([level, flags]) + keepalive.to_bytes(2, "big") + payload)


def publish(topic: str, payload: bytes, qos: int = 0, pid: int = 1) -> bytes:
    body = _s(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return frame(0x30 | (qos << 1), body)


def subscribe(pid: int, topic_filter: str, qos: int = 1) -> bytes:
    return frame(0x82, pid.to_bytes(2, "big") + _s(topic_filter) + bytes([qos]))


def puback(pid: int) -> bytes:
    return b"\x40\x02" + pid.to_bytes(2, "big")


DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


class RawClient:
    def __init__(self, port: int, timeout: float = 5.0, source: str | None = None) -> None:
        """``source``: another loopback address to connect from (e.g. 127.0.0.2)."""
        addr = (source, 0) if source else None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=addr)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_packet(self) -> tuple[int, bytes]:
        first = self.recv_exact(1)[0]
        mult, length = 1, 0
        while True:
            b = self.recv_exact(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, self.recv_exact(length)

    def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closed the socket, or None if still open after ``seconds``."""
        start = time.monotonic()
        self.sock.settimeout(0.05)
        while time.monotonic() - start < seconds:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - start
            if not data:
                return time.monotonic() - start
        return None

    def close(self) -> None:
        self.sock.close()
