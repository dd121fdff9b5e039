"""CPU per report of the storage writer's commit, by batch size, in one process without sockets.

What a report costs the writer thread, separated from how many reports share a commit (the commit
policy decides that, and bench/compare.py measures it under load): ``GroupCommitWriter._commit_batch``
is called directly (no thread, no event loop running) on a fresh SQLite database with default settings
(WAL, ``synchronous=FULL``: every commit is fsync'd), with batches of ``--sizes`` report groups of the
pipeline's shape (history row + latest value + last-seen of 1,000 synced meters).

Two figures per size: CPU time per report (``time.process_time``, best of ``--repeat``: comparable
across code versions on a shared machine), and, with ``--callgrind``, instructions per report counted
by valgrind (the whole run under callgrind, minus a run with no batches: start-up cancels out).
Instruction counts do not move with the machine's load.

    .venv/bin/python bench/writer_cost.py                   # ~20 s
    .venv/bin/python bench/writer_cost.py --callgrind       # ~3 min (valgrind on the PATH)
    .venv/bin/python bench/writer_cost.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import table


def workload(db_dir: str, sizes: list[int], batches: int, repeat: int) -> list[tuple[int, float]]:
    """(size, best CPU seconds per report) for each batch size."""
    from meterhub.storage import schema
    from meterhub.storage.database import GroupCommitWriter, create_db_engine, migrate

    engine = create_db_engine(f"sqlite:///{db_dir}/meterhub.db")
    migrate(engine)
    loop = asyncio.new_event_loop()
    writer = GroupCommitWriter(engine, loop)
    meters = [f"gw-{i // 10:03d}-m{i % 10}" for i in range(1000)]
    sync = [
        (
            [
                (
                    "device",
                    {
                        "cid": cid,
                        "gateway_id": cid[:6],
                        "product_id": "bench-meter",
                        "model": "smart-meter",
                        "synced_at": 1.0,
                        "last_seen": 1.0,
                        "first_seen": 1.0,
                        "online": True,
                    },
                )
            ],
            None,
        )
        for cid in meters
    ]
    writer._commit_batch(sync)
    n = 0

    def group() -> tuple[list[tuple[str, Any]], None]:
        nonlocal n
        n += 1
        cid = meters[n % 1000]
        t = 1e9 + n
        stored = "2300000"
        digest = schema.report_digest(cid, "5", stored, t)
        ops: list[tuple[str, Any]] = [
            ("report", (cid[:6], f"r-{n}", cid, "5", stored, 230.0, t, t, digest)),
            ("latest", (cid, "5", stored, 230.0, t, t)),
            ("seen", {"cid": cid, "last_seen": t}),
        ]
        return ops, None

    out = []
    for size in sizes:
        if size == 0:  # the callgrind base run: start-up and the sync only
            continue
        best = float("inf")
        for _ in range(repeat):
            work = [[group() for _ in range(size)] for _ in range(batches)]
            c0 = time.process_time()
            for batch in work:
                writer._commit_batch(batch)
            best = min(best, (time.process_time() - c0) / (batches * size))
        out.append((size, best))
    drop = getattr(writer, "_drop_connection", None)  # absent before the writer kept its connection
    if drop is not None:
        drop(invalidate=False)
    engine.dispose()
    loop.close()
    return out


def callgrind_instructions(sizes: list[int], batches: int) -> int:
    """Instructions of a whole run of this script (``--inner``) under callgrind."""
    with tempfile.TemporaryDirectory(prefix="writer-cost-cg-") as tmp:
        out = Path(tmp) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
        cmd += ["--inner", "--sizes", ",".join(map(str, sizes)), "--batches", str(batches), "--repeat", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", proc.stderr)
        if m is None:
            raise RuntimeError(f"no instruction count from callgrind: {proc.stderr[-500:]}")
        return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,3,10,30,100", help="report groups per commit")
    ap.add_argument("--batches", type=int, default=200, help="commits per size and repetition")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--callgrind", action="store_true", help="also count instructions (valgrind)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.batches, args.repeat = "1,10", 20, 1
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="writer-cost-") as tmp:
        res = workload(tmp, sizes, args.batches, args.repeat)
    if args.inner:
        return 0
    rows = [[size, 1e6 * s, 1e6 * s * size] for size, s in res]
    headers = ["reports per commit", "writer CPU µs / report", "writer CPU µs / commit"]
    if args.callgrind:
        base = callgrind_instructions([0], args.batches)
        for row, size in zip(rows, sizes, strict=True):
            ins = callgrind_instructions([size], args.batches) - base
            row.append(ins / (args.batches * size) / 1e3)
        headers.append("k instructions / report (callgrind)")
    print(f"SQLite synchronous=FULL (WAL), {args.batches} commits per size, best of {args.repeat} (CPU)\n")
    print(table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
