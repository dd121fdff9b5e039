"""The garbage collector: its pauses, for the metrics, and the server's tuning.

A full collection walks every container object and stops every connection meanwhile. Measured with
10,000 gateways x 10 meters reporting (docs/benchmarks-fleet.md): with CPython's default thresholds
the server spent 40 s of 3 minutes in 33 full collections (longest 4.7 s) and stopped answering.
:func:`tune_for_server` fixes that; :class:`GCWatch` (``meterhub_gc_*`` metrics) shows it.

One watcher per process (``gc.callbacks`` is process-wide); :func:`install` is idempotent.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GCWatch:
    __slots__ = ("_started", "collections", "max_seconds", "seconds")

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 2)
        took = time.perf_counter() - self._started
        self.collections[generation] += 1
        self.seconds[generation] += took
        if took > self.max_seconds[generation]:
            self.max_seconds[generation] = took


WATCH = GCWatch()


def install() -> GCWatch:
    """Start counting (once per process); returns the process's watcher."""
    if WATCH not in gc.callbacks:
        gc.callbacks.append(WATCH)
    return WATCH


#: Allocations between young-generation collections (CPython's default is 700). Under load the
#: default collects every few milliseconds, so objects that live for one report's round trip (the
#: future waiting for the commit, the queued write operations, outbound messages awaiting PUBACK)
#: survive two collections and reach the old generation, which then fills quickly and is walked
#: whole, again and again. At 50,000 they die young at a steady load.
YOUNG_THRESHOLD = 50_000

#: Container objects the server keeps alive per write group in flight (a report: its operations, the
#: future and callbacks waiting for the commit, the pending acknowledgement), rounded up.
OBJECTS_PER_WRITE = 25
YOUNG_THRESHOLD_MAX = 1_000_000


def young_threshold_for(max_queued_writes: int) -> int:
    """A young-generation threshold above what the back-pressure bound keeps alive.

    Overloaded, the server holds up to ``max_queued_writes`` write groups and reads in bursts;
    with a threshold below the objects those keep alive, every young collection walks the same
    waiting reports again (measured, 2,000 gateways x 200 reports in flight, bench/backpressure.py:
    threshold 50,000 -> 207 collections, 5.6 s; 500,000 -> 2 collections, 0.5 s; 30-50% more
    reports/s). At a steady load it made no difference (5,000 gateways x 10 meters, a tick a minute:
    98.7 vs 101 µs per report, p99 71 vs 84 ms). Capped at ``YOUNG_THRESHOLD_MAX``: a young
    collection walks everything young, so the longest pause grows with the threshold (~0.26 s here).
    """
    return min(YOUNG_THRESHOLD_MAX, max(YOUNG_THRESHOLD, OBJECTS_PER_WRITE * max_queued_writes))


def tune_for_server(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collector settings for a long-running server with a large, long-lived heap; call once the
    start-up work is done: what is alive then (code, models, the device registry) is frozen out of
    future collections (``gc.freeze``: reference counting still frees it)."""
    gc.set_threshold(young_threshold, 20, 10)
    gc.collect()
    gc.freeze()
