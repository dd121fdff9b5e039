"""Back-pressure benchmark: what a load far beyond what storage can take does to meterhub's memory.

``--gateways`` gateways (raw-codec load generator, ``--meters`` meters each) all send ``--window``
reports at once and then one more per answer (closed loop, so ``gateways x window`` reports are
always in flight: 400,000 with the defaults, far more than the storage commits in a second). The
same run is made twice on a fresh ``meterhub serve`` each: with back-pressure (``max_queued_writes``
at its default, 20,000) and without (``max_queued_writes`` = 10^9). For each: reports/s answered,
server CPU per report, peak server RSS, p50/p99 latency (from sending to the answer, so time spent
waiting in TCP buffers counts), times intake was paused, and a check that the ``reports`` table
holds exactly as many rows as code-0 answers were received.

    .venv/bin/python bench/backpressure.py            # ~3 minutes
    .venv/bin/python bench/backpressure.py --smoke    # under a minute (CI: bench/smoke.sh)
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

import common
import loadgen
from common import percentile, table
from pipeline import GatewayDriver, count_rows, start_pipeline_server
from transport import run_phase

PRESSURE = "meterhub_storage_pressure_episodes_total"
INTAKE_MS = 'meterhub_mqtt_events_total{event="flow.intake_paused_ms"}'


def stored_per_gateway(server: Any) -> list[int]:
    """Reports stored per gateway, sorted: how fairly the gateways were served."""
    db = sqlite3.connect(str(server.data_dir / "meterhub.db"))
    try:
        counts: dict[str, int] = {}
        for cid, n in db.execute("SELECT cid, count(*) FROM reports GROUP BY cid"):
            gw = cid.rsplit("-m", 1)[0]
            counts[gw] = counts.get(gw, 0) + n
    finally:
        db.close()
    return sorted(counts.values())


def run_one(label: str, max_queued_writes: int, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {label}: max_queued_writes={max_queued_writes}", file=sys.stderr)
    server = start_pipeline_server({"METERHUB_MAX_QUEUED_WRITES": str(max_queued_writes)})
    try:
        spec = loadgen.FleetSpec(
            port=server.port,
            username=server.username,
            driver=GatewayDriver,
            params={"meters": args.meters, "window": args.window, "mode": "flat"},
            connections=args.gateways,
            processes=args.processes,
            warmup=args.warmup,
            duration=args.duration,
            md5_password=True,
            prefix="gw",
        )
        res = run_phase(server, spec, sample_rss=True, result_timeout=300)
    finally:
        server.stop(cleanup=False)
    res["rows"] = count_rows(server)["reports"]
    res["per_gateway"] = stored_per_gateway(server)
    server.cleanup()
    res["label"], res["max_queued_writes"] = label, max_queued_writes
    peak = max([r for _, r in res["rss_samples"]] + [res["rss_after"]])
    res["rss_peak"] = peak
    print(
        f"  {res['done'] / args.duration:,.0f} reports/s, peak RSS {peak / 2**20:,.0f} MB, "
        f"paused {res['metrics'].get(PRESSURE, 0):.0f} times",
        file=sys.stderr,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--gateways", type=int, default=2000)
    ap.add_argument("--meters", type=int, default=10, help="meters per gateway")
    ap.add_argument("--window", type=int, default=200, help="reports in flight per gateway")
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--json", action="store_true", help="also write bench/results/backpressure-*.json")
    args = ap.parse_args(argv)
    runs = [("back-pressure on (default)", 20_000), ("back-pressure off", 10**9)]
    if args.smoke:
        args.gateways, args.meters, args.window = 20, 2, 50
        args.warmup, args.duration = 0.5, 3.0
        runs = [("back-pressure on (max_queued_writes 100)", 100)]
    common.raise_nofile()
    info = common.machine_info()
    results = [run_one(label, limit, args) for label, limit in runs]
    d = args.duration
    rows = []
    problems = []
    for r in results:
        rows.append(
            [
                r["label"],
                r["done"] / d,
                1e6 * r["server_cpu"] / max(1, r["done"]),
                r["rss_before"] / 2**20,
                r["rss_peak"] / 2**20,
                percentile(r["latencies"], 50) * 1e3,
                percentile(r["latencies"], 99) * 1e3,
                r["metrics"].get(PRESSURE, 0),
                r["metrics"].get(INTAKE_MS, 0) / 1e3,
                "{} / {} / {}".format(*(fair[int(q * (len(fair) - 1))] for q in (0, 0.5, 1)))
                if (fair := r["per_gateway"])
                else "",
                r["ok"],
                r["rows"],
                r["bad"],
            ]
        )
        if r["rows"] != r["ok"]:
            problems.append(f"{r['label']}: {r['ok']} answered 0 but {r['rows']} rows stored")
        if r["bad"] or r["connect_failed"]:
            problems.append(f"{r['label']}: {r['bad']} error answers, {r['connect_failed']} failed connects")
        fair = r["per_gateway"]
        if fair and fair[-1] > 2 * fair[len(fair) // 2]:
            problems.append(f"{r['label']}: unfair: stored per gateway {fair[0]} .. {fair[-1]}")
        if r["max_queued_writes"] < 10**9 and not r["metrics"].get(PRESSURE):
            problems.append(f"{r['label']}: the load never made intake pause")
    print(
        f"\n{args.gateways} gateways x {args.meters} meters, {args.window} reports in flight each "
        f"({args.gateways * args.window:,} in all), {args.processes} generator processes, "
        f"{d:g} s window; machine: {info['nproc']} CPUs, Python {info['python']}, {info['date']}\n"
    )
    print(
        table(
            [
                "run",
                "reports/s",
                "server CPU µs/report",
                "RSS MB before",
                "RSS MB peak",
                "p50 ms",
                "p99 ms",
                "intake pauses",
                "s paused",
                "stored per gateway min / median / max",
                "answered 0 (whole run)",
                "rows stored",
                "errors",
            ],
            rows,
        )
    )
    if args.json:
        for r in results:
            lat = r.pop("latencies", [])
            r["latency_ms"] = {q: percentile(lat, q) * 1e3 for q in (50, 90, 99, 99.9)} if lat else {}
        out = {"machine": info, "args": vars(args), "results": results}
        print(f"\nJSON: {common.write_json('backpressure', out)}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
