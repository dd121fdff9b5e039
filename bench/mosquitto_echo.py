"""The echo application for the mosquitto comparison: one MQTT client that answers every request.

mosquitto cannot echo by itself, so this client subscribes to ``gateway_id/+/req`` (QoS 1) and
publishes each message it receives on ``<topic>/echo`` (QoS 1), which only the requesting client is
subscribed to. It is as lean as the load generator's client (uvloop, raw asyncio protocol,
``meterhub.mqtt.codec``), so that the comparison measures mosquitto's design (broker + external
application) rather than a slow client library. ``--shared`` uses a shared subscription
(``$share/echo/...``) so several echo processes can split the work.

Runs until SIGTERM/SIGINT. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from meterhub.mqtt import codec

_PUBACK = b"\x40\x02"


class EchoClient(asyncio.Protocol):
    def __init__(self, client_id: str, topic_filter: str, ready: asyncio.Future[None]) -> None:
        self.client_id = client_id
        self.topic_filter = topic_filter
        self.ready = ready
        self.decoder = codec.Decoder(server_side=False, max_packet_size=1 << 24)
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.echoed = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(codec.encode(codec.Connect(self.client_id, True, 0)))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        for p in self.decoder.feed(data):
            tp = type(p)
            if tp is codec.Publish:
                if p.qos:  # type: ignore[union-attr]
                    out.append(_PUBACK + p.packet_id.to_bytes(2, "big"))  # type: ignore[union-attr]
                self.pid = self.pid % 65535 + 1
                out.append(codec.encode_publish(p.topic + "/echo", p.payload, 1, self.pid))  # type: ignore[union-attr]
                self.echoed += 1
            elif tp is codec.ConnAck:
                if p.return_code != 0:  # type: ignore[union-attr]
                    raise SystemExit(f"CONNACK {p.return_code}")  # type: ignore[union-attr]
                out.append(codec.encode(codec.Subscribe(1, [(self.topic_filter, 1)])))
            elif tp is codec.SubAck and not self.ready.done():
                self.ready.set_result(None)
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    topic_filter = "$share/echo/gateway_id/+/req" if args.shared else "gateway_id/+/req"
    _, client = await loop.create_connection(
        lambda: EchoClient(args.client_id, topic_filter, ready), "127.0.0.1", args.port
    )
    await asyncio.wait_for(ready, 10)
    if args.ready_file:
        Path(args.ready_file).touch()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait(
        [asyncio.ensure_future(stop.wait()), client.closed], return_when=asyncio.FIRST_COMPLETED
    )
    print(f"echoed {client.echoed}", file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", default="echo-0")
    ap.add_argument("--shared", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--ready-file", default=None)
    import uvloop

    uvloop.run(main(ap.parse_args()))
