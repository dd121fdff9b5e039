"""The echo application for the mosquitto comparison: one MQTT client that answers every request.

mosquitto cannot echo by itself, so this client subscribes to ``gateway_id/+/req`` (QoS 1) and
publishes each message it receives on ``<topic>/echo`` (QoS 1), which only the requesting client is
subscribed to. It is as lean as the load generator's client (uvloop, raw asyncio protocol,
``meterhub.mqtt.codec``), so that the comparison measures mosquitto's design (broker + external
application) rather than a slow client library. ``--shared`` uses a shared subscription
(``$share/echo/...``) so several echo processes can split the work.

``--protocol`` makes it the *ideal responder* of the edge protocol instead (bench/compare.py's relay):
it subscribes to ``gateway_id/+/devices/sync`` and ``gateway_id/+/properties/report`` and answers each
on ``<topic>/response`` with ``{"request_id": ..., "param": {"code": 0}}``, validating and storing
nothing: what a bare relay costs for the same traffic as meterhub's pipeline.

Runs until SIGTERM/SIGINT. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from common import RawSubscriber


class _Request(msgspec.Struct):
    request_id: str | None = None


_decode_request = msgspec.json.Decoder(_Request).decode


class EchoClient(RawSubscriber):
    def __init__(self, client_id: str, topic_filter: str) -> None:
        super().__init__(client_id, [topic_filter])
        self.echoed = 0

    def on_publish(self, packet: Any, now: float, out: list[bytes]) -> None:
        out.append(self.codec.encode_publish(packet.topic + "/echo", packet.payload, 1, self.next_pid()))
        self.echoed += 1


class ProtocolResponder(RawSubscriber):
    """Answers every sync and report with code 0 on ``<topic>/response``."""

    def __init__(self, client_id: str, filters: list[str]) -> None:
        super().__init__(client_id, filters)
        self.echoed = 0

    def on_publish(self, packet: Any, now: float, out: list[bytes]) -> None:
        rid = _decode_request(packet.payload).request_id
        body = msgspec.json.encode({"request_id": rid, "param": {"code": 0}})
        out.append(self.codec.encode_publish(packet.topic + "/response", body, 1, self.next_pid()))
        self.echoed += 1


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    share = "$share/echo/" if args.shared else ""
    client: Any
    if args.protocol:
        filters = [f"{share}gateway_id/+/devices/sync", f"{share}gateway_id/+/properties/report"]
        _, client = await loop.create_connection(
            lambda: ProtocolResponder(args.client_id, filters), "127.0.0.1", args.port
        )
    else:
        _, client = await loop.create_connection(
            lambda: EchoClient(args.client_id, f"{share}gateway_id/+/req"), "127.0.0.1", args.port
        )
    await asyncio.wait_for(client.ready, 10)
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
    ap.add_argument("--protocol", action="store_true", help="answer syncs and reports (code 0)")
    import uvloop

    uvloop.run(main(ap.parse_args()))
