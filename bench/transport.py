"""Transport benchmark: MQTT QoS 1 request/response echo on three servers, one load generator.

Servers (each started fresh by this script on a free 127.0.0.1 port, stopped by pid at the end):

* ``meterhub``  - ``meterhub serve --handler echo`` (in-process echo handler, gateway auth, ACLs);
* ``mosquitto`` - our own ``mosquitto`` (temp config) + ``bench/mosquitto_echo.py``, an external echo
  client; both processes are counted as "the server";
* ``amqtt``     - amqtt 0.12.1 with the in-process echo plugin ``bench/amqtt_echo.py``, run from its own
  virtualenv ``bench/.venv-amqtt`` (create it with ``bench/setup-amqtt.sh``; skipped if missing).

Every client publishes QoS 1 on ``gateway_id/{cid}/req`` and is subscribed (QoS 1) to
``gateway_id/{cid}/req/echo``; a round trip ends when the echo arrives.

Phases per server: idle connections (RSS per connection), flat out (closed loop, ``--window`` requests
in flight per connection), fixed rate (latency), overload "flood" (publishers keep ``--flood-window``
un-PUBACKed messages each), overload "stall" (consumers stop reading). Every phase is bounded in time.

    .venv/bin/python bench/transport.py            # full run, ~12 minutes
    .venv/bin/python bench/transport.py --smoke    # a few seconds per server
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import common
import loadgen
from common import Server, percentile, table


def _sleep_sampling(until: float, server: Server, samples: list[tuple[float, int]] | None) -> None:
    while True:
        now = time.monotonic()
        if now >= until:
            return
        if samples is not None:
            samples.append((now, server.rss_all()))
            time.sleep(min(0.5, until - now))
        else:
            time.sleep(until - now)


def run_phase(
    server: Server, spec: loadgen.FleetSpec, *, sample_rss: bool = False, result_timeout: float = 120
) -> dict[str, Any]:
    """Run one load phase; server CPU is read at the start and end of the measurement window."""
    fleet = loadgen.Fleet(spec)
    try:
        fleet.start()
        if fleet.failed:
            print(f"  warning: {fleet.failed} connections failed: {fleet.failures[:2]}", file=sys.stderr)
        samples: list[tuple[float, int]] | None = [] if sample_rss else None
        rss_before = server.rss_all()
        metrics_before = server.metrics()
        t_start = fleet.go()
        t0 = t_start + spec.warmup
        t1 = t0 + spec.duration
        _sleep_sampling(t0, server, samples)
        cpu0 = [common.cpu_seconds(pid) for pid in server.pids]
        busy0 = common.machine_busy_seconds()
        _sleep_sampling(t1, server, samples)
        cpu1 = [common.cpu_seconds(pid) for pid in server.pids]
        busy1 = common.machine_busy_seconds()
        res = loadgen.merge(fleet.results(spec.warmup + spec.duration + result_timeout))
        rss_after = server.rss_all()
        metrics_after = server.metrics()
    finally:
        fleet.close()
    server.check_alive()
    res["connected"] = fleet.connected
    res["connect_failed"] = fleet.failed
    res["server_cpu"] = sum(cpu1) - sum(cpu0)
    res["server_cpu_by_proc"] = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    # Everything else the machine did in the window (other users' processes): shows a noisy run.
    res["other_cpu"] = max(0.0, (busy1 - busy0) - res["server_cpu"] - res.get("cpu", 0.0))
    res["rss_before"] = rss_before
    res["rss_after"] = rss_after
    res["rss_samples"] = [(round(t - t_start, 2), r) for t, r in (samples or [])]
    # meterhub's own counters over the whole phase (warm-up and drain included)
    res["metrics"] = {
        k: v - metrics_before.get(k, 0.0)
        for k, v in metrics_after.items()
        if k.endswith("_total") or "_total{" in k
    }
    return res


def idle_phase(server: Server, connections: int, processes: int, settle: float) -> dict[str, Any]:
    """RSS of the server before and after ``connections`` idle (connected + subscribed) clients."""
    time.sleep(settle)
    before = server.rss()
    spec = loadgen.FleetSpec(
        port=server.port,
        connections=connections,
        processes=processes,
        driver=loadgen.Idle,
        username=server.username,
        md5_password=server.username is not None,
        prefix="idle",
        connect_concurrency=32,
    )
    fleet = loadgen.Fleet(spec)
    started = time.monotonic()
    try:
        fleet.start(timeout=600)
        connect_seconds = time.monotonic() - started
        time.sleep(settle)
        after = server.rss()
        cpu0 = server.cpu()
        time.sleep(settle)
        idle_cpu = (server.cpu() - cpu0) / settle
    finally:
        fleet.close()
    server.check_alive()
    n = fleet.connected
    return {
        "connections": n,
        "failed": fleet.failed,
        "failures": fleet.failures[:3],
        "rss_before": before,
        "rss_after": after,
        "bytes_per_connection": (after - before) / n if n else float("nan"),
        "connect_seconds": connect_seconds,
        "idle_cpu_fraction": idle_cpu,
    }


def wait_quiet(server: Server, timeout: float = 60.0) -> float:
    """Wait until the server uses under 5% CPU over 0.5 s (e.g. done closing the last phase's clients)."""
    deadline = time.monotonic() + timeout
    while True:
        c0 = server.cpu()
        time.sleep(0.5)
        busy = (server.cpu() - c0) / 0.5
        if busy < 0.05 or time.monotonic() > deadline:
            return busy


def bench_server(name: str, start: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Each group of phases gets a fresh server, so one phase's leftovers cannot slow the next."""
    print(f"== {name}", file=sys.stderr)
    out: dict[str, Any] = {"server": name}

    def fresh() -> Server:
        server: Server = start()
        out["server_name"] = server.name
        out["notes"] = server.notes
        return server

    def spec(server: Server, driver: Any, params: dict[str, Any], prefix: str, **kw: Any) -> Any:
        values: dict[str, Any] = {
            "port": server.port,
            "username": server.username,
            "md5_password": server.username is not None,
            "processes": args.processes,
            "connections": args.connections,
            "warmup": args.warmup,
            "duration": args.duration,
        }
        values.update(kw)
        return loadgen.FleetSpec(
            driver=driver, params=dict(params, payload=args.payload), prefix=prefix, **values
        )

    if args.idle_connections:
        server = fresh()
        try:
            out["idle"] = idle_phase(server, args.idle_connections, args.idle_processes, args.settle)
        finally:
            server.stop()
        print(f"  idle: {_kb(out['idle']['bytes_per_connection']):.2f} KB/connection", file=sys.stderr)
    server = fresh()
    try:
        out["flat"] = r = run_phase(
            server, spec(server, loadgen.EchoClosedLoop, {"window": args.window}, "flat")
        )
        print(f"  flat: {r['done'] / args.duration:,.0f} round trips/s", file=sys.stderr)
        out["quiet_before_rate"] = wait_quiet(server)
        out["rate"] = r = run_phase(server, spec(server, loadgen.EchoRate, {"rate": args.rate}, "rate"))
        print(f"  rate: p99 {percentile(r['latencies'], 99) * 1e3:.2f} ms", file=sys.stderr)
    finally:
        server.stop()
    server = fresh()
    try:
        params = {"window": args.flood_window, "drain": args.drain}
        out["flood"] = r = run_phase(
            server,
            spec(server, loadgen.EchoFlood, params, "flood"),
            sample_rss=True,
            result_timeout=args.drain + 60,
        )
        print(f"  flood: {r['acks_in_window'] / args.duration:,.0f} acks/s", file=sys.stderr)
    finally:
        server.stop()
    server = fresh()
    try:
        params = {"burst": args.stall_burst, "drain": args.drain}
        out["stall"] = r = run_phase(
            server,
            spec(server, loadgen.EchoStall, params, "stall", warmup=0.0, duration=args.stall_seconds),
            sample_rss=True,
            result_timeout=args.drain + 60,
        )
        print(f"  stall: {r['echoes']:,} of {r['sent']:,} delivered", file=sys.stderr)
    finally:
        server.stop()
    return out


def _drops(phase: dict[str, Any]) -> Any:
    """Outbound messages meterhub dropped (queue full), from its /metrics; n/a for other servers."""
    m = phase.get("metrics")
    if not m:
        return "n/a"
    return int(sum(v for k, v in m.items() if "out_dropped" in k))


def _kb(n: float) -> float:
    return n / 1024


def _mb(n: float) -> float:
    return n / 1024 / 1024


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    d = args.duration
    lines = []
    rows = []
    for r in results:
        flat, rate = r["flat"], r["rate"]
        rt = flat["done"] / d
        cpu_rt = flat["server_cpu"] / flat["done"] if flat["done"] else float("nan")
        idle = r.get("idle", {})
        rows.append(
            [
                r["server_name"],
                rt,
                100 * flat["server_cpu"] / d,
                " + ".join(f"{100 * c / d:.0f}" for c in flat["server_cpu_by_proc"]),
                cpu_rt * 1e6,
                1 / cpu_rt if cpu_rt == cpu_rt else float("nan"),
                100 * flat["cpu_max"] / d,
                100 * flat.get("other_cpu", float("nan")) / d,
                percentile(flat["latencies"], 50) * 1e3,
                percentile(flat["latencies"], 99) * 1e3,
                percentile(rate["latencies"], 50) * 1e3,
                percentile(rate["latencies"], 99) * 1e3,
                rate["done"] / d,
                _kb(idle.get("bytes_per_connection", float("nan"))),
                idle.get("connections", 0),
            ]
        )
    lines.append(
        f"Flat out: {args.connections} connections x {args.window} request(s) in flight, QoS 1, "
        f"{args.payload}-byte payload, {args.processes} generator processes, {d:g} s window after "
        f"{args.warmup:g} s warm-up. Fixed rate: {args.rate:g} req/s. Idle: {args.idle_connections} "
        "connections (connected + subscribed)."
    )
    lines.append("")
    lines.append(
        table(
            [
                "server",
                "round trips/s",
                "server CPU %",
                "CPU % by process",
                "server CPU µs / round trip",
                "round trips / server CPU-s",
                "generator CPU % (busiest proc)",
                "other load CPU %",
                "flat p50 ms",
                "flat p99 ms",
                f"p50 ms @{args.rate:g}/s",
                f"p99 ms @{args.rate:g}/s",
                "achieved req/s",
                "KB / idle conn",
                "idle conns",
            ],
            rows,
        )
    )
    lines.append("")
    rows = []
    for r in results:
        f = r["flood"]
        rss = [x for _, x in f["rss_samples"]] or [f["rss_after"]]
        rows.append(
            [
                r["server_name"],
                f["acks_in_window"] / d,
                f["done"] / d,
                percentile(f["latencies"], 50) * 1e3,
                percentile(f["latencies"], 99) * 1e3,
                _mb(f["rss_before"]),
                _mb(max(rss)),
                _mb(rss[-1]),
                f["sent"] - f["echoes"],
                _drops(f),
                f["lost_connections"],
            ]
        )
    lines.append(
        f"Overload, flood: {args.connections} connections each keep {args.flood_window} QoS 1 publishes "
        f"un-PUBACKed (refilled on every PUBACK, whatever the echoes do) for {d:g} s; echoes are read and "
        f"acknowledged at once. RSS sampled every 0.5 s (all server processes)."
    )
    lines.append("")
    lines.append(
        table(
            [
                "server",
                "PUBACKs/s",
                "echoes/s",
                "echo p50 ms",
                "echo p99 ms",
                "RSS before MB",
                "RSS peak MB",
                "RSS end MB",
                "echoes never delivered",
                "drops counted by server",
                "connections lost",
            ],
            rows,
        )
    )
    lines.append("")
    rows = []
    for r in results:
        s = r["stall"]
        rss = [x for _, x in s["rss_samples"]] or [s["rss_after"]]
        rows.append(
            [
                r["server_name"],
                s["sent"],
                s["acks"],
                s["echoes"],
                _mb(s["rss_before"]),
                _mb(max(rss)),
                _mb(s["rss_after"]),
                _drops(s),
                s["lost_connections"],
            ]
        )
    lines.append(
        f"Overload, stalled consumers: {args.connections} connections stop reading their sockets, each "
        f"publishes {args.stall_burst} QoS 1 requests at once, and resume reading after "
        f"{args.stall_seconds:g} s."
    )
    lines.append("")
    lines.append(
        table(
            [
                "server",
                "published",
                "PUBACKed",
                "echoes delivered",
                "RSS before MB",
                "RSS peak MB",
                "RSS after MB",
                "drops counted by server",
                "connections lost",
            ],
            rows,
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="meterhub,mosquitto,amqtt", help="comma-separated subset")
    ap.add_argument("--smoke", action="store_true", help="tiny numbers, a few seconds per server")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--window", type=int, default=1, help="requests in flight per connection (flat out)")
    ap.add_argument("--payload", type=int, default=64, help="payload bytes (>= 8)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--idle-connections", type=int, default=10_000)
    ap.add_argument("--idle-processes", type=int, default=4)
    ap.add_argument("--flood-window", type=int, default=200)
    ap.add_argument("--stall-burst", type=int, default=2000)
    ap.add_argument("--stall-seconds", type=float, default=10.0)
    ap.add_argument("--drain", type=float, default=30.0, help="most seconds to wait for stragglers")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before memory readings")
    ap.add_argument("--mosquitto-echo-procs", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="also write bench/results/transport-*.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.connections = min(args.connections, 20)
        args.warmup, args.duration, args.rate = 0.5, 1.5, 200.0
        args.idle_connections, args.idle_processes = min(args.idle_connections, 200), 2
        args.flood_window, args.stall_burst, args.stall_seconds = 20, 100, 1.0
        args.drain, args.settle = 3.0, 0.5
    nofile = common.raise_nofile()
    need = args.idle_connections // max(1, args.idle_processes) + 100
    if args.idle_connections + 100 > nofile or need > nofile:
        ap.error(f"open-files limit {nofile} is too low for {args.idle_connections} idle connections")
    starters = {
        "meterhub": lambda: common.start_meterhub("echo"),
        "mosquitto": lambda: common.start_mosquitto_echo(args.mosquitto_echo_procs),
        "amqtt": common.start_amqtt,
    }
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in starters]
    if unknown:
        ap.error(f"unknown server(s): {unknown}")
    if "amqtt" in wanted and not common.amqtt_available():
        print("amqtt skipped: bench/.venv-amqtt missing (run bench/setup-amqtt.sh)", file=sys.stderr)
        wanted.remove("amqtt")
    info = common.machine_info()
    results = [bench_server(name, starters[name], args) for name in wanted]
    text = report(results, args)
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; {info['date']}\n"
    )
    print(text)
    problems = [
        f"{r['server_name']}: {ph} had {r[ph]['connect_failed']} failed connections"
        for r in results
        for ph in ("flat", "rate", "flood", "stall")
        if r[ph]["connect_failed"]
    ]
    problems += [
        f"{r['server_name']}: flat phase did not drain" for r in results if not r["flat"].get("drained")
    ]
    if args.json:
        for r in results:
            for ph in ("flat", "rate", "flood", "stall"):
                lat = r[ph].pop("latencies")
                r[ph]["latency_ms"] = {q: percentile(lat, q) * 1e3 for q in (50, 90, 99, 99.9) if lat} | {
                    "count": len(lat)
                }
        path = common.write_json("transport", {"machine": info, "args": vars(args), "results": results})
        print(f"\nJSON: {path}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
