"""CPU per report of each thread of ``meterhub serve`` (event loop, writer, pool) during one phase.

Starts the pipeline server (bench/pipeline.py's set-up), runs one phase of its ``GatewayDriver``
(100 gateways x 10 meters; ``flat`` or a fixed rate), and reads ``/proc/PID/task/*/stat`` (utime and
stime of every thread) and ``/proc/PID/task/*/status`` (context switches) over a window inside the
measured one. Threads are listed by id in start order (the first is the event loop, the next the
storage writer). Extra arguments ``NAME=VALUE`` go to the server's environment, e.g.
``METERHUB_COMMIT_LINGER=0``.

    .venv/bin/python bench/thread_cpu.py 1000            # 1,000 reports/s, 8 s
    .venv/bin/python bench/thread_cpu.py flat 8 METERHUB_COMMIT_LINGER=0
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common
import loadgen
import pipeline
from common import percentile
from transport import run_phase

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, tuple[float, float, int]]:
    """thread id -> (user s, system s, context switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        ctx = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
        out[int(tid)] = (int(f[11]) / TICK, int(f[12]) / TICK, ctx)
    return out


def main(argv: list[str]) -> int:
    rate = None if argv[0] == "flat" else float(argv[0])
    duration = float(argv[1]) if len(argv) > 1 else 8.0
    env = dict(a.split("=", 1) for a in argv[2:])
    common.raise_nofile()
    server = pipeline.start_pipeline_server(settings_env=env or None)
    snap: dict[str, Any] = {}
    try:
        params: dict[str, Any] = {"meters": 10, "window": 4, "mode": "flat"}
        if rate is not None:
            params = {"meters": 10, "mode": "rate", "rate": rate}
        spec = loadgen.FleetSpec(
            port=server.port,
            connections=100,
            processes=2,
            driver=pipeline.GatewayDriver,
            params=params,
            username=server.username,
            md5_password=True,
            prefix="gw",
            warmup=2.0,
            duration=duration,
        )

        def sample() -> None:  # a window inside the measured one (connect + sync + warm-up first)
            time.sleep(8.0)
            snap["a"], t0 = threads(server.main_pid), time.monotonic()
            time.sleep(duration - 3.0)
            snap["b"], snap["dt"] = threads(server.main_pid), time.monotonic() - t0

        sampler = threading.Thread(target=sample)
        sampler.start()
        res = run_phase(server, spec, result_timeout=90)
        sampler.join()
    finally:
        server.stop()
    m = res["metrics"]
    per_s = res["done"] / duration
    commits = m.get("meterhub_storage_batches_total", 0.0)
    print(
        f"{per_s:,.0f} reports/s, server CPU {1e6 * res['server_cpu'] / res['done']:.1f} µs/report, "
        f"{m.get('meterhub_storage_operations_total', 0.0) / max(1.0, commits):.2f} groups/commit, "
        f"p50 {percentile(res['latencies'], 50) * 1e3:.2f} ms, "
        f"p99 {percentile(res['latencies'], 99) * 1e3:.2f} ms, "
        f"other load {100 * res['other_cpu'] / duration:.0f}%"
    )
    scale = 1e6 / snap["dt"] / per_s
    for tid in sorted(snap["b"]):
        u1, s1, c1 = snap["b"][tid]
        u0, s0, c0 = snap["a"].get(tid, (0.0, 0.0, 0))
        user, system = (u1 - u0) * scale, (s1 - s0) * scale
        if user + system > 5:
            print(
                f"  thread {tid}: {user + system:6.1f} µs/report (user {user:.1f}, system {system:.1f}), "
                f"{(c1 - c0) * scale / 1e6:.2f} context switches/report"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or ["1000"]))
