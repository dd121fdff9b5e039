"""Flood benchmark for per-client bounds: subscriptions and persistent sessions vs server memory.

Against ``meterhub serve --handler echo`` (fresh data dir, free 127.0.0.1 port): one gateway (after
a first SUBSCRIBE, to warm up) sends ``--packets`` SUBSCRIBE packets of ``--filters`` new filters each
under its own prefix; then ``--ids`` client ids of one vendor each connect with clean_session=0 and
leave (``max_persistent_sessions_per_vendor`` = ``--per-vendor``). Prints the server's RSS before and
after each flood, and the session count it reports on ``/metrics``.

    .venv/bin/python bench/limits_flood.py            # 100 x 500 filters, 3,000 ids, ~30 s
    .venv/bin/python bench/limits_flood.py --smoke
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common
import mqttraw
from common import table
from meterhub.core.auth import gateway_password


def _s(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _connect(port: int, cid: str, username: str, clean: bool) -> mqttraw.RawClient:
    raw = mqttraw.RawClient(port, timeout=30)
    raw.send(mqttraw.connect(cid, username, gateway_password(cid, username), clean=clean))
    first, _body = raw.read_packet()
    if first != 0x20:
        raise RuntimeError(f"{cid}: no CONNACK")
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=100)
    ap.add_argument("--filters", type=int, default=500)
    ap.add_argument("--ids", type=int, default=3000)
    ap.add_argument("--per-vendor", type=int, default=1000, help="max_persistent_sessions_per_vendor")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.packets, args.filters, args.ids, args.per_vendor = 10, 100, 200, 50
    env = {"METERHUB_MAX_PERSISTENT_SESSIONS_PER_VENDOR": str(args.per_vendor)}
    server = common.start_meterhub("echo", settings_env=env)
    rows = []
    try:
        assert server.username is not None
        mb = 1 / (1024 * 1024)
        raw = _connect(server.port, "gw-flood", server.username, True)
        raw.send(mqttraw.subscribe(1, "gateway_id/gw-flood/first", 1))
        raw.read_packet()
        time.sleep(0.5)
        rss0 = server.rss()
        prefix = "gateway_id/gw-flood/"
        refused = 0
        for p in range(args.packets):
            body = (p + 1).to_bytes(2, "big") + b"".join(
                _s(f"{prefix}flood/{p}/{i}") + b"\x01" for i in range(args.filters)
            )
            raw.send(mqttraw.frame(0x82, body))
            _first, codes = raw.read_packet()
            refused += codes[2:].count(0x80)
        time.sleep(0.5)
        rss1 = server.rss()
        rows.append(
            [
                "subscribe flood",
                f"{args.packets * args.filters:,} filters",
                f"{refused:,} refused",
                f"{rss0 * mb:.1f}",
                f"{rss1 * mb:.1f}",
            ]
        )
        for i in range(args.ids):
            c = _connect(server.port, f"gw-id{i}", server.username, False)
            c.send(mqttraw.DISCONNECT)
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        time.sleep(0.5)
        rss2 = server.rss()
        metrics = server.metrics()
        sessions = metrics.get("meterhub_mqtt_sessions", float("nan"))
        rows.append(
            [
                "persistent-session flood",
                f"{args.ids:,} client ids",
                f"{sessions:.0f} sessions kept",
                f"{rss1 * mb:.1f}",
                f"{rss2 * mb:.1f}",
            ]
        )
        raw.close()
        print(table(["flood", "offered", "result", "RSS before MB", "RSS after MB"], rows))
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
