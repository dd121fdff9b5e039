"""Where a reconnect storm's memory goes: tracemalloc in the meterhub server at its peak RSS.

Starts the pipeline server with ``-X tracemalloc`` (through a ``sitecustomize`` that also runs a
sampling thread: whenever RSS passes its previous peak by ``--step`` MB a snapshot is taken and the
top allocation sites, grouped by file and line, are written out), runs the storm of ``compare.py``
(new devices, then again), and prints the sites of the largest snapshot. tracemalloc slows the
server several times: compare the sizes, not the seconds.

    .venv/bin/python bench/storm_mem.py --storm 3000          # ~1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import common
import compare
import loadgen
import pipeline

SITE = textwrap.dedent(
    """
    import json, os, threading, time, tracemalloc
    _out = os.environ.get("STORM_MEM_OUT")
    if _out and "meterhub" in os.path.basename(__import__("sys").argv[0]):
        tracemalloc.start(int(os.environ.get("STORM_MEM_FRAMES", "1")))
        _step = float(os.environ.get("STORM_MEM_STEP", "20")) * 2**20

        def _rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        def _watch():
            best = tracemalloc.get_traced_memory()[0]
            while True:
                time.sleep(0.2)
                rss = _rss()
                if tracemalloc.get_traced_memory()[0] < best + _step:
                    continue
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)]
                )
                stats = snap.statistics("lineno")
                top = [
                    {"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                     "mb": s.size / 2**20, "count": s.count}
                    for s in stats[:40]
                ]
                traced = sum(s.size for s in stats)
                best = traced
                peak = tracemalloc.get_traced_memory()[1]
                with open(_out + ".tmp", "w") as f:
                    json.dump({"rss_mb": rss / 2**20, "traced_mb": traced / 2**20,
                               "traced_peak_mb": peak / 2**20, "top": top}, f)
                os.replace(_out + ".tmp", _out)

        threading.Thread(target=_watch, daemon=True, name="storm-mem").start()
    _stats = os.environ.get("STORM_MEM_STATS")
    if _stats and "meterhub" in os.path.basename(__import__("sys").argv[0]):
        import collections, gc, sys as _sys
        _step = float(os.environ.get("STORM_MEM_STEP", "20")) * 2**20

        def _rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        def _stat():
            best = _rss()
            while True:
                time.sleep(0.5)
                rss = _rss()
                if rss < best + _step:
                    continue
                best = rss
                with open("/proc/self/smaps_rollup") as f:
                    smaps = {l.split(":")[0]: l.split(":")[1].strip() for l in f if ":" in l and "kB" in l}
                import ctypes, tempfile
                with tempfile.TemporaryFile("w+") as tmp:  # _debugmallocstats writes to C's stderr
                    saved = os.dup(2)
                    os.dup2(tmp.fileno(), 2)
                    try:
                        _sys._debugmallocstats()
                    finally:
                        os.dup2(saved, 2)
                        os.close(saved)
                    tmp.seek(0)
                    tail = [l.strip() for l in tmp if l.startswith(("# arenas", "Total", "# bytes in"))]

                class _MI(ctypes.Structure):
                    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

                libc = ctypes.CDLL("libc.so.6")
                libc.mallinfo2.restype = _MI
                mi = libc.mallinfo2()
                tail.append({k: getattr(mi, k) // 2**20 for k in ("arena", "hblkhd", "uordblks", "fordblks")})
                objs = gc.get_objects()
                types = collections.Counter(type(o).__name__ for o in objs)
                probe = os.environ.get("STORM_MEM_PROBE")  # a type name: who holds one of them
                chain = []
                if probe:
                    obj = next((o for o in objs if type(o).__name__ == probe), None)
                    for _ in range(4):
                        if obj is None:
                            break
                        refs = [r for r in gc.get_referrers(obj)
                                if r is not objs and type(r).__name__ != "frame"]
                        chain.append([repr(r)[:160] for r in refs[:3]])
                        obj = refs[0] if refs else None
                del objs
                if os.environ.get("STORM_MEM_COLLECT"):  # how much of it is cyclic garbage
                    collected = gc.collect()
                    columns = sum(type(o).__name__ == "Column" for o in gc.get_objects())
                    chain.append({"gc_collected": collected, "rss_after_collect_mb": _rss() / 2**20,
                                  "Column_after": columns})
                with open(_stats + ".tmp", "w") as f:
                    json.dump({"rss_mb": rss / 2**20, "anon": smaps.get("Anonymous"), "pymalloc": tail,
                               "threads": threading.active_count(), "probe": chain,
                               "types": types.most_common(25)}, f)
                os.replace(_stats + ".tmp", _stats)
                best = _rss()

        threading.Thread(target=_stat, daemon=True, name="storm-stat").start()
    """
)


class IdleDriver(pipeline.GatewayDriver):
    """Connect (and subscribe, as gateways do), then nothing."""

    async def prepare(self, conns: list[loadgen.Conn]) -> dict[str, Any]:
        return {}

    async def run(self, conns: list[loadgen.Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        return {}


def idle(server: common.Server, n: int, processes: int, concurrency: int) -> None:
    """``n`` idle gateway connections: the server's RSS before and after, per connection."""
    spec = loadgen.FleetSpec(
        port=server.port,
        connections=n,
        processes=processes,
        driver=IdleDriver,
        params={"meters": 1, "mode": "flat"},
        username=server.username,
        md5_password=server.username is not None,
        prefix="idle",
        warmup=0.0,
        duration=0.0,
        connect_concurrency=concurrency,
        connect_timeout=300.0,
    )
    fleet = loadgen.Fleet(spec)
    time.sleep(1.0)
    before = server.rss_all()
    try:
        fleet.start(timeout=600)
        time.sleep(3.0)  # let the server settle (session stores, conformance flushes)
        after = server.rss_all()
        print(
            f"idle: {fleet.connected:,} connected (failed {fleet.failed}), RSS {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MB: {(after - before) / max(1, fleet.connected):,.0f} bytes per connection",
        )
    finally:
        fleet.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storm", type=int, default=3000, help="gateways")
    ap.add_argument("--meters", type=int, default=10)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--step", type=float, default=20.0, help="MB of RSS growth between snapshots")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-trace", action="store_true", help="no tracemalloc: peak RSS only")
    ap.add_argument("--idle", type=int, default=0, help="measure N idle connections instead of a storm")
    ap.add_argument("--concurrency", type=int, default=500, help="--idle: connects in flight per process")
    ap.add_argument("--env", action="append", default=[], help="K=V for the server (repeatable)")
    args = ap.parse_args(argv)
    common.raise_nofile()
    site = Path(tempfile.mkdtemp(prefix="storm-mem-"))
    (site / "sitecustomize.py").write_text(SITE)
    out = site / "peak.json"
    stats = site / "stats.json"
    env = {"PYTHONPATH": str(site)}
    env.update({"STORM_MEM_STATS": str(stats)} if args.no_trace else {"STORM_MEM_OUT": str(out)})
    env["STORM_MEM_STEP"] = str(args.step)
    env.update(kv.split("=", 1) for kv in args.env)
    server = pipeline.start_pipeline_server(env)
    try:
        if args.idle:
            idle(server, args.idle, args.processes, args.concurrency)
            if stats.exists():
                print(json.dumps(json.loads(stats.read_text())))
            return 0
        for label in ("storm (new)", "storm (again)"):
            r = compare.storm(server, "pipeline", label, args)
            if r["failed"] or r["synced"] != args.storm * args.meters:
                print(f"storm incomplete: {r}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    if args.no_trace:
        if stats.exists():
            print(json.dumps(json.loads(stats.read_text()), indent=1))
        return 0
    if not out.exists():
        print("no snapshot (RSS never grew by --step)", file=sys.stderr)
        return 1
    peak = json.loads(out.read_text())
    print(
        f"largest snapshot: RSS {peak['rss_mb']:.0f} MB, traced {peak['traced_mb']:.0f} MB "
        f"(traced peak so far {peak['traced_peak_mb']:.0f} MB)"
    )
    for s in peak["top"][: args.top]:
        print(f"{s['mb']:8.1f} MB {s['count']:9,}  {s['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
