"""Side by side, interleaved: meterhub pipeline vs meterhub echo vs mosquitto + an ideal responder.

The table of issue #14, measured in one run. Each round starts three fresh servers:

* ``pipeline`` - ``meterhub serve`` (protocol handler): report -> validation -> fsync'd SQLite group
  commit -> ``properties/report/response`` code 0 (bench/pipeline.py's ``GatewayDriver``; every phase
  reconnects and re-syncs its gateways first, outside the measured window);
* ``echo``     - ``meterhub serve --handler echo`` (transport only, no validation, no storage);
* ``relay``    - our own mosquitto on a free loopback port + ``bench/mosquitto_echo.py --protocol`` (the
  ideal responder: answers every sync and report code 0, validates and stores nothing); both processes
  count as the server. It gets the same traffic as the pipeline (same driver, topics and payloads).

Then, for every load, each server in turn (the order rotates every round, so slow moments of a shared
machine do not always hit the same server): flat out (closed loop, ``--window`` in flight per gateway),
1,000/s and 3,000/s offered (open loop), 50% and 80% of *that server's own* flat-out rate in the same
round. Figures are medians over the rounds with the range (min-max); ratios are pipeline / relay of the
medians. Server CPU is utime+stime of the server's processes (all threads) over the measured window.

``--storm N`` adds, per round, a reconnect storm on the pipeline and the relay: N gateways connect at
once (no connect concurrency limit) and each syncs ``--meters`` meters; the figure is the time until every
sync is answered code 0, and the server's peak RSS (all its processes, sampled every 0.2 s). Twice per
server: the first storm registers the devices, the second (same gateways after they all dropped) is the
common case after an outage: syncs that change nothing.

At the end of each round the pipeline server is stopped and its ``reports`` table must hold exactly one
row per code-0 answer received (the durability check; a mismatch fails the run).

    .venv/bin/python bench/compare.py                 # 3 rounds, ~12 minutes
    .venv/bin/python bench/compare.py --rounds 5 --duration 30
    .venv/bin/python bench/compare.py --smoke         # seconds; part of bench/smoke.sh
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import common
import loadgen
import pipeline
from common import Server, percentile, table
from transport import run_phase

SERVERS = ("pipeline", "echo", "relay")
LOADS = ("flat", "1000/s", "3000/s", "50%", "80%")


def start(name: str) -> Server:
    if name == "pipeline":
        return pipeline.start_pipeline_server()
    if name == "echo":
        return common.start_meterhub("echo")
    return common.start_mosquitto_echo(protocol=True)


def phase(
    server: Server, name: str, load: str, rate: float | None, args: argparse.Namespace
) -> dict[str, Any]:
    """One measured phase of ``load`` (``rate`` None = flat out) against ``server``."""
    base: dict[str, Any] = {
        "port": server.port,
        "connections": args.gateways,
        "processes": args.processes,
        "warmup": args.warmup,
        "duration": args.duration,
        "username": server.username,
        "md5_password": server.username is not None,
        "prefix": "gw",
    }
    driver: Callable[[int, dict[str, Any]], loadgen.Driver]
    if name != "echo":  # the pipeline and the relay get the same edge-protocol traffic
        driver = pipeline.GatewayDriver
        params: dict[str, Any] = {"meters": args.meters, "window": args.window}
        params.update({"mode": "flat"} if rate is None else {"mode": "rate", "rate": rate})
    else:
        driver = loadgen.EchoClosedLoop if rate is None else loadgen.EchoRate
        params = {"payload": args.payload}
        params.update({"window": args.window} if rate is None else {"rate": rate})
    res = run_phase(server, loadgen.FleetSpec(driver=driver, params=params, **base), result_timeout=90)
    d = args.duration
    lat = res["latencies"]
    m = res.get("metrics", {})
    out = {
        "server": name,
        "load": load,
        "offered": rate,
        "per_s": res["done"] / d,
        "cpu_us": 1e6 * res["server_cpu"] / res["done"] if res["done"] else float("nan"),
        "cpu_pct": 100 * res["server_cpu"] / d,
        "p50_ms": percentile(lat, 50) * 1e3 if lat else float("nan"),
        "p99_ms": percentile(lat, 99) * 1e3 if lat else float("nan"),
        "gen_cpu_pct": 100 * res["cpu_max"] / d,
        "other_cpu_pct": 100 * res["other_cpu"] / d,
        "ok": res.get("ok", 0),
        "bad": res.get("bad", 0),
        "drained": res.get("drained", False),
        "connect_failed": res["connect_failed"],
        "commits": m.get("meterhub_storage_batches_total", 0.0),
        "groups": m.get("meterhub_storage_operations_total", 0.0),
    }
    print(
        f"  {name:8} {load:7} {out['per_s']:9,.0f}/s {out['cpu_us']:7.1f} µs/op "
        f"p50 {out['p50_ms']:6.2f} p99 {out['p99_ms']:7.2f} ms  server {out['cpu_pct']:4.0f}% "
        f"gen {out['gen_cpu_pct']:3.0f}% other {out['other_cpu_pct']:3.0f}%"
        + (
            f"  {out['groups'] / out['commits']:.1f} groups/commit"
            if name == "pipeline" and out["commits"]
            else ""
        ),
        file=sys.stderr,
    )
    return out


class StormDriver(pipeline.GatewayDriver):
    """Connect + sync every meter (``prepare``), then nothing."""

    async def run(self, conns: list[loadgen.Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        return {}


def storm(server: Server, name: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """``args.storm`` gateways at once, each syncing ``args.meters`` meters: seconds until all are
    answered, and the server's peak RSS meanwhile."""
    per_proc = -(-args.storm // args.processes)
    spec = loadgen.FleetSpec(
        port=server.port,
        connections=args.storm,
        processes=args.processes,
        driver=StormDriver,
        params={"meters": args.meters, "mode": "flat"},
        username=server.username,
        md5_password=server.username is not None,
        prefix="storm",
        warmup=0.0,
        duration=0.0,
        connect_concurrency=per_proc,
        connect_timeout=300.0,
    )
    fleet = loadgen.Fleet(spec)
    rss_before = server.rss_all()
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak.append(server.rss_all())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = server.cpu()
    started = time.monotonic()
    try:
        fleet.start(timeout=900)
        seconds = time.monotonic() - started
        cpu = server.cpu() - cpu0
        fleet.go(0.0)
        fleet.results(60)
    finally:
        stop.set()
        sampler.join()
        fleet.close()
    errors = [p["error"] for p in fleet.prepared if "error" in p]
    synced = sum(p.get("synced", 0) for p in fleet.prepared)
    out = {
        "server": name,
        "load": label,
        "seconds": seconds,
        "synced": synced,
        "connected": fleet.connected,
        "failed": fleet.failed + len(errors),
        "errors": (fleet.failures + errors)[:3],
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_mb": max(peak) / 2**20,
        "cpu_s": cpu,
    }
    print(
        f"  {name:8} {label:13} {seconds:6.1f} s, {synced:,} synced, {fleet.connected:,} connected, "
        f"peak RSS {out['rss_peak_mb']:.0f} MB (before {out['rss_before_mb']:.0f}), server CPU {cpu:.1f} s"
        + (f", FAILED {out['failed']}: {out['errors'][:1]}" if out["failed"] else ""),
        file=sys.stderr,
    )
    time.sleep(2)  # let the server see every disconnect before the next phase
    return out


def run_round(
    k: int, args: argparse.Namespace, storms: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    order = list(SERVERS[k % 3 :] + SERVERS[: k % 3])
    servers = {name: start(name) for name in SERVERS}
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    flat: dict[str, float] = {}
    try:
        for load in args.loads:
            for name in order:
                if load == "flat":
                    rate = None
                elif load.endswith("%"):
                    rate = max(10.0, round(flat.get(name, 0.0) * float(load[:-1]) / 100, -1))
                else:
                    rate = float(load.removesuffix("/s"))
                r = phase(servers[name], name, load, rate, args)
                if load == "flat":
                    flat[name] = r["per_s"]
                if r["bad"] or not r["drained"] or r["connect_failed"]:
                    text = f"round {k + 1} {name} {load}: bad {r['bad']}, drained {r['drained']}"
                    if name == "pipeline":
                        problems.append(text)
                    else:  # a reference that falls behind is a finding, not a failure of meterhub
                        print(f"NOTE: {text} (it fell behind the offered load)", file=sys.stderr)
                results.append(r)
        if args.storm:
            for label in ("storm (new)", "storm (again)"):
                for name in ("pipeline", "relay") if k % 2 == 0 else ("relay", "pipeline"):
                    r = storm(servers[name], name, label, args)
                    if r["failed"] or r["synced"] != args.storm * args.meters:
                        problems.append(f"round {k + 1} {name} {label}: {r['synced']} synced, {r['errors']}")
                    storms.append(r)
    finally:
        pipe = servers.pop("pipeline")
        pipe.stop(cleanup=False)
        for s in servers.values():
            s.stop()
    rows = pipeline.count_rows(pipe)["reports"]
    pipe.cleanup()
    answered = sum(r["ok"] for r in results if r["server"] == "pipeline")
    if rows != answered:
        problems.append(f"round {k + 1}: {rows} rows in reports, {answered} code-0 answers received")
    return results, problems


def _med(values: list[float]) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "-"
    fmt = (lambda x: f"{x:,.0f}") if max(v) >= 100 else (lambda x: f"{x:.2f}" if max(v) < 10 else f"{x:.1f}")
    m = statistics.median(v)
    return fmt(m) if len(v) == 1 else f"{fmt(m)} ({fmt(min(v))}-{fmt(max(v))})"


def summary(results: list[dict[str, Any]], loads: list[str]) -> str:
    def pick(server: str, load: str, key: str) -> list[float]:
        return [r[key] for r in results if r["server"] == server and r["load"] == load]

    def median(server: str, load: str, key: str) -> float:
        v = [x for x in pick(server, load, key) if x == x]
        return statistics.median(v) if v else float("nan")

    rows = []
    for load in loads:
        for name in SERVERS:
            offered = [x for x in pick(name, load, "offered") if x]
            rows.append(
                [
                    load,
                    name,
                    _med(offered) if offered else "flat out",
                    _med(pick(name, load, "per_s")),
                    _med(pick(name, load, "cpu_us")),
                    _med(pick(name, load, "cpu_pct")),
                    _med(pick(name, load, "p50_ms")),
                    _med(pick(name, load, "p99_ms")),
                    _med(pick(name, load, "gen_cpu_pct")),
                    _med(pick(name, load, "other_cpu_pct")),
                ]
            )
    main = table(
        [
            "load",
            "server",
            "offered /s",
            "done /s",
            "server CPU µs / op",
            "server CPU %",
            "p50 ms",
            "p99 ms",
            "generator CPU % (busiest)",
            "other load CPU %",
        ],
        rows,
    )
    ratio_rows = []
    for load in loads:
        p_cpu, r_cpu = median("pipeline", load, "cpu_us"), median("relay", load, "cpu_us")
        p_rate, r_rate = median("pipeline", load, "per_s"), median("relay", load, "per_s")
        ratio_rows.append(
            [
                load,
                p_cpu / r_cpu,
                r_cpu / p_cpu,
                p_rate / r_rate,
                median("pipeline", load, "p99_ms") / median("relay", load, "p99_ms"),
                median("pipeline", load, "groups") / max(1.0, median("pipeline", load, "commits")),
            ]
        )
    ratios = table(
        [
            "load",
            "CPU per op: pipeline / relay",
            "ops per CPU-s: pipeline / relay",
            "ops per s: pipeline / relay",
            "p99: pipeline / relay",
            "pipeline reports per commit",
        ],
        ratio_rows,
    )
    return main + "\n\nRatios of the medians:\n\n" + ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gateways", type=int, default=100)
    ap.add_argument("--meters", type=int, default=10, help="meters per gateway (pipeline)")
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--window", type=int, default=4, help="requests in flight per gateway (flat out)")
    ap.add_argument("--payload", type=int, default=100, help="echo/relay request bytes")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument(
        "--loads",
        default=",".join(LOADS),
        help="comma-separated subset of " + ",".join(LOADS).replace("%", "%%"),
    )
    ap.add_argument("--storm", type=int, default=0, help="reconnect storm of N gateways (0: none)")
    ap.add_argument("--json", action="store_true", help="also write bench/results/compare-*.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.gateways, args.meters = 1, 10, 3
        args.warmup, args.duration = 0.3, 1.0
        args.loads = "flat,1000/s,50%"
        args.storm = min(args.storm, 50)
    args.loads = [x for x in args.loads.split(",") if x]
    unknown = set(args.loads) - set(LOADS) - {x for x in args.loads if x.endswith(("%", "/s"))}
    if unknown:
        ap.error(f"unknown loads {sorted(unknown)}")
    common.raise_nofile()
    info = common.machine_info()
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    storms: list[dict[str, Any]] = []
    started = time.monotonic()
    for k in range(args.rounds):
        print(f"== round {k + 1}/{args.rounds}", file=sys.stderr)
        res, probs = run_round(k, args, storms)
        results += res
        problems += probs
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; {info['date']}; {time.monotonic() - started:.0f} s\n"
    )
    print(
        f"{args.rounds} interleaved rounds; {args.gateways} gateways ({args.meters} meters each for the "
        f"pipeline), {args.processes} generator processes, {args.window} in flight per gateway flat out, "
        f"{args.duration:g} s windows after {args.warmup:g} s warm-up. Median (min-max) over the rounds.\n"
    )
    print(summary(results, args.loads))
    if storms:
        print(
            f"\nReconnect storm: {args.storm:,} gateways x {args.meters} meters at once (median (min-max)):\n"
        )
        rows = []
        for label in ("storm (new)", "storm (again)"):
            for name in ("pipeline", "relay"):
                mine = [r for r in storms if r["server"] == name and r["load"] == label]
                rows.append(
                    [
                        label,
                        name,
                        _med([r["seconds"] for r in mine]),
                        _med([r["rss_peak_mb"] for r in mine]),
                        _med([r["rss_before_mb"] for r in mine]),
                        _med([r["cpu_s"] for r in mine]),
                    ]
                )
        print(
            table(["storm", "server", "all synced (s)", "peak RSS MB", "RSS before MB", "server CPU s"], rows)
        )
    if args.json:
        data = {"machine": info, "args": vars(args), "runs": results, "storms": storms}
        print(f"\nJSON: {common.write_json('compare', data)}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
