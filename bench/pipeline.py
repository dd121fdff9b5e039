"""Pipeline benchmark: the edge protocol end to end against ``meterhub serve`` (protocol handler).

What one report goes through: MQTT PUBLISH QoS 1 -> topic parse -> JSON decode -> product-model
validation -> durable SQLite group commit (history row + latest value; default ``synchronous=FULL``, WAL)
-> ``properties/report/response`` code 0 -> PUBACK of the report.

Set-up: a fresh data directory, ``meterhub vendor add bench``, ``meterhub product add bench-meter
--model smart-meter``, then ``meterhub serve`` on a free 127.0.0.1 port with default settings. Each of
``--gateways`` gateways connects (client id = gateway id, md5 password rule), subscribes to its two
response topics, and syncs ``--meters`` meters (every sync must be answered code 0). Reports alternate
between dp "5" (voltage_current, raw int 2300000) and dp "1" (switch, true/false) over the gateway's
meters; each report has a unique request_id and is done when its response (code 0) arrives.

Phases: echo reference (``meterhub serve --handler echo``, same connections and window: the ratio's
denominator), flat out (closed loop, ``--window`` reports in flight per gateway), then fixed rate at half
the flat-out rate (latency). At the end the server is stopped and the ``reports`` table must hold exactly
as many rows as code-0 responses were received.

    .venv/bin/python bench/pipeline.py            # ~1.5 minutes
    .venv/bin/python bench/pipeline.py --smoke    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from typing import Any

import msgspec

import common
import loadgen
from common import Server, percentile, table
from loadgen import Conn, Driver
from meterhub.protocol.messages import encode_report, encode_sync


class _Param(msgspec.Struct):
    code: int
    cid: str | None = None


class _Response(msgspec.Struct):
    request_id: str | None
    param: _Param


_decode_response = msgspec.json.Decoder(_Response).decode


class GatewayDriver(Driver):
    """Each connection is a gateway with ``meters`` meters; ``mode`` is ``flat`` or ``rate``."""

    def __init__(self, worker: int, params: dict[str, Any]) -> None:
        super().__init__(worker, params)
        self.meters = int(params["meters"])
        self.mode = params.get("mode", "flat")
        self.window = int(params.get("window", 1))
        self.latencies: list[float] = []
        self.done = 0  # code-0 responses inside the window
        self.ok = 0  # all code-0 report responses
        self.bad: dict[int, int] = {}  # non-zero codes
        self.unmatched = 0
        self.sent = 0
        self.acks = 0
        self.sync_pending: dict[str, asyncio.Future[int]] = {}

    def subscriptions(self, conn: Conn) -> list[str]:
        gw = conn.cid
        conn.extra = {}  # request_id -> send time
        return [f"gateway_id/{gw}/devices/sync/response", f"gateway_id/{gw}/properties/report/response"]

    async def prepare(self, conns: list[Conn]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        now = time.time()
        for conn in conns:
            topic = f"gateway_id/{conn.cid}/devices/sync"
            parts = []
            for j in range(self.meters):
                rid = f"sync-{conn.cid}-{j}-{now:.0f}"
                self.sync_pending[rid] = loop.create_future()
                payload = encode_sync(rid, f"{conn.cid}-m{j}", "bench-meter", now, device_name=f"meter {j}")
                parts.append(loadgen.codec.encode_publish(topic, payload, 1, conn.next_pid()))
            assert conn.transport is not None
            conn.transport.write(b"".join(parts))
        codes = await asyncio.wait_for(asyncio.gather(*self.sync_pending.values()), 120)
        bad = [c for c in codes if c != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} syncs answered with a non-zero code, e.g. {bad[0]}")
        return {"synced": len(codes)}

    def report(self, conn: Conn, t_sched: float) -> bytes:
        n = conn.sent
        conn.sent += 1
        self.sent += 1
        conn.outstanding += 1
        rid = f"{self.mode}-{n}"
        meter = f"{conn.cid}-m{(n >> 1) % self.meters}"
        if n & 1:
            payload = encode_report(rid, meter, "1", bool(n & 2), time.time())
        else:
            payload = encode_report(rid, meter, "5", 2300000, time.time())
        conn.extra[rid] = t_sched
        return loadgen.codec.encode_publish(conn.topic, payload, 1, conn.next_pid())

    def on_puback(self, conn: Conn, now: float, out: list[bytes]) -> None:
        self.acks += 1

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        resp = _decode_response(payload)
        rid = resp.request_id or ""
        if topic.endswith("sync/response"):
            fut = self.sync_pending.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(resp.param.code)
            return
        sent_at = conn.extra.pop(rid, None)
        if sent_at is None:
            self.unmatched += 1
            return
        conn.outstanding -= 1
        code = resp.param.code
        if code != 0:
            self.bad[code] = self.bad.get(code, 0) + 1
        else:
            self.ok += 1
            if self.t0 <= now < self.t1:
                self.done += 1
                self.latencies.append(now - sent_at)
        if self.mode == "flat" and now < self.t1:
            out.append(self.report(conn, now))

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        self.t0, self.t1 = t0, t1
        for conn in conns:
            conn.topic = f"gateway_id/{conn.cid}/properties/report"
        cpu_task = asyncio.ensure_future(loadgen.measure_cpu(t0, t1))
        await loadgen.sleep_until(t_start)
        if self.mode == "flat":
            for conn in conns:
                now = time.monotonic()
                assert conn.transport is not None
                conn.transport.write(b"".join(self.report(conn, now) for _ in range(self.window)))
        else:
            rate = float(self.params["rate"]) / int(self.params["processes"])
            offset = self.worker / int(self.params["processes"]) / rate
            n, k = len(conns), 0
            while (now := time.monotonic()) < t1:
                due = int((now - t_start - offset) * rate) + 1
                batch: dict[Conn, list[bytes]] = {}
                while k < due:
                    conn = conns[k % n]
                    batch.setdefault(conn, []).append(self.report(conn, now))
                    k += 1
                for conn, parts in batch.items():
                    assert conn.transport is not None
                    conn.transport.write(b"".join(parts))
                await loadgen.sleep_next(t_start + offset, rate, k)
        cpu = await cpu_task
        drained = await loadgen.drain(conns, 30)
        return {
            "done": self.done,
            "ok": self.ok,
            "bad": sum(self.bad.values()),
            "bad_codes": dict(self.bad),
            "unmatched": self.unmatched,
            "sent": self.sent,
            "acks": self.acks,
            "latencies": self.latencies,
            "cpu": cpu,
            "drained": drained,
        }


def run(server: Server, spec: loadgen.FleetSpec) -> dict[str, Any]:
    from transport import run_phase

    return run_phase(server, spec, result_timeout=90)


def start_pipeline_server(settings_env: dict[str, str] | None = None) -> Server:
    return common.start_meterhub(
        "protocol", settings_env=settings_env, before_serve=common.product_adder("bench-meter")
    )


def count_rows(server: Server) -> dict[str, int]:
    assert server.data_dir is not None
    db = sqlite3.connect(str(server.data_dir / "meterhub.db"))
    try:
        return {
            t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("reports", "latest_values", "devices")
        }
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--gateways", type=int, default=100)
    ap.add_argument("--meters", type=int, default=10, help="meters per gateway")
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--window", type=int, default=4, help="reports in flight per gateway (flat out)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=None, help="fixed rate (default: half the flat-out rate)")
    ap.add_argument("--no-echo", action="store_true", help="skip the echo reference run")
    ap.add_argument("--json", action="store_true", help="also write bench/results/pipeline-*.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.gateways, args.meters = min(args.gateways, 10), min(args.meters, 3)
        args.warmup, args.duration = 0.5, 1.5
    common.raise_nofile()
    info = common.machine_info()
    base: dict[str, Any] = {
        "connections": args.gateways,
        "processes": args.processes,
        "warmup": args.warmup,
        "duration": args.duration,
        "md5_password": True,
        "prefix": "gw",
    }
    out: dict[str, Any] = {"machine": info, "args": vars(args)}
    d = args.duration

    echo: dict[str, Any] | None = None
    if not args.no_echo:
        print("== echo reference (meterhub --handler echo)", file=sys.stderr)
        server = common.start_meterhub("echo")
        try:
            spec = loadgen.FleetSpec(
                port=server.port,
                username=server.username,
                driver=loadgen.EchoClosedLoop,
                params={"window": args.window, "payload": 100},
                **base,
            )
            echo = out["echo"] = run(server, spec)
        finally:
            server.stop()
        print(f"  echo: {echo['done'] / d:,.0f} round trips/s", file=sys.stderr)

    print("== pipeline (meterhub --handler protocol)", file=sys.stderr)
    server = start_pipeline_server()
    try:
        params = {"meters": args.meters, "window": args.window, "mode": "flat"}
        spec = loadgen.FleetSpec(
            port=server.port, username=server.username, driver=GatewayDriver, params=params, **base
        )
        flat = out["flat"] = run(server, spec)
        print(f"  flat: {flat['done'] / d:,.0f} reports/s", file=sys.stderr)
        rate = args.rate or max(10.0, round(flat["done"] / d / 2, -1))
        params = {"meters": args.meters, "mode": "rate", "rate": rate}
        spec = loadgen.FleetSpec(
            port=server.port, username=server.username, driver=GatewayDriver, params=params, **base
        )
        fixed = out["rate"] = run(server, spec)
        print(f"  rate {rate:g}/s: p99 {percentile(fixed['latencies'], 99) * 1e3:.2f} ms", file=sys.stderr)
    finally:
        server.stop(cleanup=False)
    rows = count_rows(server)
    expected = flat["ok"] + fixed["ok"]
    devices_expected = args.gateways * args.meters
    server.cleanup()

    table_rows = []
    if echo is not None:
        cpu = echo["server_cpu"] / echo["done"]
        table_rows.append(
            [
                "echo (transport only)",
                echo["done"] / d,
                100 * echo["server_cpu"] / d,
                cpu * 1e6,
                1 / cpu,
                100 * echo["cpu_max"] / d,
                100 * echo["other_cpu"] / d,
                percentile(echo["latencies"], 50) * 1e3,
                percentile(echo["latencies"], 99) * 1e3,
                "",
                "",
                "",
            ]
        )
    cpu = flat["server_cpu"] / flat["done"]
    table_rows.append(
        [
            "protocol: report -> SQLite -> response",
            flat["done"] / d,
            100 * flat["server_cpu"] / d,
            cpu * 1e6,
            1 / cpu,
            100 * flat["cpu_max"] / d,
            100 * flat["other_cpu"] / d,
            percentile(flat["latencies"], 50) * 1e3,
            percentile(flat["latencies"], 99) * 1e3,
            f"{rate:g}",
            percentile(fixed["latencies"], 50) * 1e3,
            percentile(fixed["latencies"], 99) * 1e3,
        ]
    )
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; {info['date']}\n"
    )
    print(
        f"{args.gateways} gateways x {args.meters} meters, {args.window} reports in flight per gateway, "
        f"{args.processes} generator processes, {d:g} s window after {args.warmup:g} s warm-up; SQLite "
        "synchronous=FULL (default settings).\n"
    )
    print(
        table(
            [
                "run",
                "per s",
                "server CPU %",
                "server CPU µs / op",
                "ops / server CPU-s",
                "generator CPU % (busiest proc)",
                "other load CPU %",
                "flat p50 ms",
                "flat p99 ms",
                "fixed rate /s",
                "p50 ms @rate",
                "p99 ms @rate",
            ],
            table_rows,
        )
    )
    ratio = (flat["done"] / echo["done"]) if echo else float("nan")
    checks = {
        "responses code 0 (flat + rate)": expected,
        "responses with another code": flat["bad"] + fixed["bad"],
        "responses matching no request": flat["unmatched"] + fixed["unmatched"],
        "rows in reports": rows["reports"],
        "rows in latest_values (expect devices x 2)": rows["latest_values"],
        "devices (expect gateways x meters)": rows["devices"],
        "ratio pipeline / echo reports per s": round(ratio, 3),
    }
    print()
    print(table(["check", "value"], [[k, v] for k, v in checks.items()]))
    storage_rows = []
    for name, phase in (("flat out", flat), (f"fixed {rate:g}/s", fixed)):
        m = phase.get("metrics", {})
        commits = m.get("meterhub_storage_batches_total", 0.0)
        groups = m.get("meterhub_storage_operations_total", 0.0)
        seconds = m.get("meterhub_storage_commit_seconds_total", 0.0)
        storage_rows.append(
            [
                name,
                int(commits),
                int(groups),
                groups / commits if commits else float("nan"),
                1e3 * seconds / commits if commits else float("nan"),
                1e6 * phase["server_cpu"] / phase["done"] if phase["done"] else float("nan"),
            ]
        )
    print()
    print("Group commits over each whole phase (warm-up and drain included), from meterhub's /metrics:\n")
    print(
        table(
            [
                "phase",
                "commits",
                "write groups",
                "groups / commit",
                "writer ms / commit (apply + commit, wall)",
                "server CPU µs / report",
            ],
            storage_rows,
        )
    )
    out["rows"] = rows
    out["checks"] = checks
    problems = []
    if rows["reports"] != expected:
        problems.append(
            f"reports table has {rows['reports']} rows, {expected} code-0 responses were received"
        )
    if flat["bad"] + fixed["bad"]:
        problems.append(f"non-zero response codes: {flat['bad_codes']} {fixed['bad_codes']}")
    if rows["devices"] != devices_expected:
        problems.append(f"{rows['devices']} devices, expected {devices_expected}")
    if rows["latest_values"] != devices_expected * 2:
        problems.append(f"{rows['latest_values']} latest values, expected {devices_expected * 2}")
    if not (flat["drained"] and fixed["drained"]):
        problems.append("some reports were never answered")
    if flat["connect_failed"] or fixed["connect_failed"]:
        problems.append("some gateways could not connect")
    if args.json:
        for k in ("echo", "flat", "rate"):
            if k in out:
                lat = out[k].pop("latencies")
                out[k]["latency_ms"] = {q: percentile(lat, q) * 1e3 for q in (50, 90, 99, 99.9) if lat}
        print(f"\nJSON: {common.write_json('pipeline', out)}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
