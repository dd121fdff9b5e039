"""Burst benchmark: one gateway flushes a backlog with a huge in-flight window; bystanders' latency.

Set-up: ``meterhub serve`` (protocol handler, default settings, SQLite) on a free 127.0.0.1 port, product
``bench-meter`` registered. One "burst" gateway (paho, in-flight window = ``--reports``) syncs a meter
and publishes ``--reports`` reports at once, as a gateway does after an outage; ``--bystanders``
gateways each send one report at a time (closed loop) and time report -> response. The same bystander
loop runs first alone (baseline) for ``--baseline`` seconds, then during the burst. Checks that the
burst gateway got exactly as many PUBACKs and code-0 answers as it sent reports.

    .venv/bin/python bench/burst.py              # 10,000 reports, 4 bystanders, ~30 s
    .venv/bin/python bench/burst.py --smoke      # 1,000 reports, a few seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

import common
from common import percentile, table
from meterhub.core.auth import gateway_password


class Gateway:
    """A paho gateway: counts PUBACKs and answers, and times one request at a time."""

    def __init__(self, port: int, gw: str, username: str, inflight: int) -> None:
        self.gw = gw
        self.pubacks = 0
        self.answers = 0
        self.code0 = 0
        self.lock = threading.Lock()
        self.got = threading.Event()
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=gw, protocol=mqtt.MQTTv311)
        c.username_pw_set(username, gateway_password(gw, username))
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)
        c.on_subscribe = lambda *_a: ready.set()
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.connect(common.HOST, port, keepalive=60)
        c.loop_start()
        c.subscribe(f"gateway_id/{gw}/#", 1)
        if not ready.wait(10):
            raise RuntimeError(f"{gw}: no SUBACK")
        self.c = c

    def _on_publish(self, *_a: Any) -> None:
        with self.lock:
            self.pubacks += 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        code = json.loads(msg.payload).get("param", {}).get("code")
        with self.lock:
            self.answers += 1
            self.code0 += code == 0
        self.got.set()

    def send(self, kind: str, param: dict[str, Any]) -> None:
        body = {"t": int(time.time()), "request_id": str(uuid.uuid4()), "param": param}
        self.c.publish(f"gateway_id/{self.gw}/{kind}", json.dumps(body), 1)

    def ask(self, kind: str, param: dict[str, Any], timeout: float = 30) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.send(kind, param)
        if not self.got.wait(timeout):
            raise RuntimeError(f"{self.gw}: no answer within {timeout}s")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def bystander_loop(gws: list[Gateway], stop: threading.Event, out: list[float]) -> list[threading.Thread]:
    def run(g: Gateway) -> None:
        i = 0
        while not stop.is_set():
            out.append(g.ask("properties/report", {"cid": f"m-{g.gw}", "id": "5", "value": 2300000 + i}))
            i += 1

    threads = [threading.Thread(target=run, args=(g,), daemon=True) for g in gws]
    for t in threads:
        t.start()
    return threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=int, default=10_000)
    ap.add_argument("--bystanders", type=int, default=4)
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds of bystander load alone")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.reports, args.bystanders, args.baseline = 1000, 2, 1.0
    server = common.start_meterhub("protocol", before_serve=common.product_adder("bench-meter"))
    gws: list[Gateway] = []
    try:
        assert server.username is not None
        burst = Gateway(server.port, "gw-burst", server.username, args.reports)
        bys = [Gateway(server.port, f"gw-by{i}", server.username, 20) for i in range(args.bystanders)]
        gws = [burst, *bys]
        for g in gws:
            g.ask("devices/sync", {"cid": f"m-{g.gw}", "product_id": "bench-meter"})
        base_acks, base_answers = burst.pubacks, burst.answers

        def measure(seconds: float | None) -> tuple[list[float], float]:
            lat: list[float] = []
            stop = threading.Event()
            threads = bystander_loop(bys, stop, lat)
            t0 = time.monotonic()
            if seconds is None:
                for i in range(args.reports):
                    burst.send("properties/report", {"cid": "m-gw-burst", "id": "5", "value": i})
                deadline = t0 + 300
                while burst.answers - base_answers < args.reports and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                time.sleep(seconds)
            elapsed = time.monotonic() - t0
            stop.set()
            for t in threads:
                t.join(35)
            return sorted(lat), elapsed

        alone, _ = measure(args.baseline)
        during, burst_s = measure(None)
        time.sleep(0.5)
        acks, answers = burst.pubacks - base_acks, burst.answers - base_answers
        metrics = server.metrics()
        dropped = metrics.get('meterhub_mqtt_events_total{event="publish.out_dropped_queue_full"}', 0.0)
        held = metrics.get('meterhub_mqtt_events_total{event="flow.held"}', 0.0)
        rows = [
            ["bystanders alone", len(alone), *(1000 * percentile(alone, q) for q in (50, 99)), ""],
            [
                f"bystanders during a {args.reports:,}-report burst",
                len(during),
                *(1000 * percentile(during, q) for q in (50, 99)),
                f"{burst_s:.1f}",
            ],
        ]
        print(table(["phase", "round trips", "p50 ms", "p99 ms", "burst s"], rows))
        print(
            f"\nburst gateway: {args.reports:,} sent, {acks:,} PUBACKs, {answers:,} answers "
            f"({burst.code0 - 1:,} code 0); dropped from queues: {dropped:.0f}; times held back: {held:.0f}"
        )
        ok = acks == args.reports and answers == args.reports and dropped == 0
        return 0 if ok else 1
    finally:
        for g in gws:
            g.close()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
