"""Hot-path micro-benchmark: server CPU per QoS 1 round trip inside one process, without sockets.

Drives :class:`meterhub.mqtt.server.MQTTConnection` (and its sans-I/O session) through a stand-in
transport that only counts bytes: each read carries the PUBACKs for the echoes in flight and
``--window`` new QoS 1 publishes, which the echo handler answers (PUBLISH QoS 1 + PUBACK). CPU time
(``time.process_time``) per round trip, best of ``--repeat`` runs: stable on a shared machine, unlike
wall-clock loopback figures. Compares code versions, not servers.

    .venv/bin/python bench/mqtt_hotpath.py           # ~10 s
    .venv/bin/python bench/mqtt_hotpath.py --smoke   # ~1 s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mqttraw
from meterhub.core.auth import gateway_principal
from meterhub.mqtt import server as srv
from meterhub.tools.echo import EchoHandler
from meterhub.transport import AuthResult


class _Auth:
    async def authenticate(self, cid: str, username: Any, password: Any, peer: str) -> AuthResult:
        return AuthResult(0, gateway_principal(cid, username, 1))


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def run(window: int, reads: int, repeat: int) -> float:
    handler = EchoHandler()
    server = srv.MQTTServer(_Auth(), handler, srv.Limits())
    server.loop = asyncio.get_running_loop()
    handler.southbound = server
    conn = srv.MQTTConnection(server)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.data_received(mqttraw.connect("gw1", "u", "x"))
    await asyncio.sleep(0.01)
    conn.data_received(mqttraw.subscribe(1, "gateway_id/gw1/#", 1))
    publishes = b"".join(mqttraw.publish("gateway_id/gw1/req", b"x" * 64, 1, i + 1) for i in range(window))
    conn.data_received(publishes)
    session = server.sessions["gw1"]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(reads):
            acks = b"".join(mqttraw.puback(pid) for pid in list(session.inflight))
            conn.data_received(acks + publishes)
        best = min(best, (time.process_time() - t0) / (reads * window))
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--reads", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.reads, args.repeat = 100, 3
    us = asyncio.run(run(args.window, args.reads, args.repeat))
    print(f"{us:.2f} µs server CPU per QoS 1 round trip (in-process, best of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
