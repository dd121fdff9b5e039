"""Fleet benchmark: the meter simulator (``meterhub.tools.simulator.run_fleet``) against three systems.

The load is the real simulator -- SDK gateways (aiomqtt/paho), three-phase meter physics, typed reports
with end-to-end acknowledgement by ``properties/report/response`` -- split over ``--processes`` processes,
each running ``run_fleet`` for its slice of the gateways (gateway ids ``sim<process>-<n>``). Side by side,
same load, same run, each on a fresh server:

(a) **meterhub** embedded: ``meterhub serve`` (protocol handler, default settings: SQLite WAL,
    ``synchronous=FULL``, group commit), product ``sim-meter`` registered as ``smart-meter``;
(b) **mosquitto + worker**: our own mosquitto 2.0 on a free 127.0.0.1 port plus ``bench/worker_aiomqtt.py``
    (one aiomqtt process: JSON decode, ``meterhub.model`` validation, SQLite WAL ``synchronous=FULL`` with
    a commit per 50 ms or 1,000 messages, response code 0 after the commit) -- what a user would build;
(c) **mosquitto relay**: the same mosquitto delivering the same messages to a do-nothing subscriber (a
    lean raw-socket client, ``fleet.py sink``: it PUBACKs and counts reports, and answers the meters'
    ``devices/sync`` with code 0 so the simulator can start). The upper bound for moving the bytes.

mosquitto configuration (both b and c): ``allow_anonymous true`` and no password file, so the gateways'
md5(clientId + username) passwords are accepted unchecked; no ACL file (every topic open);
``max_inflight_messages 1000`` and ``max_queued_messages 1000000`` (the default 1,000 would drop the
worker's backlog under load); no persistence; ``set_tcp_nodelay true``.

Measured over a window after a warm-up (the window's times are shared by every process; CLOCK_MONOTONIC):

- reports/s: reports answered code 0 inside the window, counted by the simulator's gateways (``stats``);
  for (c) there are no responses: messages delivered to the subscriber inside the window instead;
- server CPU: ``utime + stime`` of the server's processes (/proc) at the window's start and end: meterhub;
  mosquitto + worker; for (c) mosquitto alone (the subscriber's CPU is shown next to it);
- latency p50/p99: the SDK's report -> response time (from handing the report to paho to reading the
  response) of responses received in the window; none for (c);
- server RSS (max over 1 s samples in the window; all server processes), connections held (ESTABLISHED
  sockets on the server's port, from /proc/net/tcp, minus the worker/subscriber);
- generator CPU per process (``time.process_time`` over the window) and the simulator's late ticks
  (a tick that started after the next one was due: the generator could not keep its schedule);
- other load CPU %: what the rest of the machine did in the window (/proc/stat), as in docs/benchmarks.md.

Choices (the benchmark's, documented in docs/benchmarks-fleet.md):

- ``drop_probability=0`` (the simulator's default drops a gateway now and then; not wanted here).
- The first tick's full report (every data point, ~50 per meter) is switched off (``Meter.full_report_due``
  is cleared in ``on_ready``), so the window sees the steady mix (~4 reports per meter per tick).
- "Flat out": a short interval and the SDK's response window (``max_pending``) set to ``--flat-pending``
  per gateway (the default 1,000 would put up to a million reports in flight and most of them would
  outlive the SDK's 30 s response timeout). For (c) ``max_pending`` is unlimited (no responses come).
- Warm-up >= one interval: each gateway starts ticking at a random point of its first interval.

Runs loopback-only, every phase bounded in time; servers are stopped by pid.

    .venv/bin/python bench/fleet.py                  # 1,000 x 10 steady + flat out, then large fleets
    .venv/bin/python bench/fleet.py --smoke          # a few seconds per system
    .venv/bin/python bench/fleet.py sink --port P    # the do-nothing subscriber (started by the script)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from common import HOST, Server, percentile, table

PRODUCT = "sim-meter"
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest file {log}
log_type error
log_type warning
set_tcp_nodelay true
max_inflight_messages 1000
max_queued_messages 1000000
max_connections -1
"""


# --------------------------------------------------------------------------------------- /proc helpers


def established(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is ``port`` (the server's side of its connections)."""
    suffix = f":{port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split(None, 4)
            if parts[3] == "01" and parts[1].endswith(suffix):
                n += 1
    return n


# --------------------------------------------------------------------------------------- systems


@dataclass
class System:
    """A system under test: ``server`` (its processes are the ones whose CPU counts) and helpers."""

    key: str  # meterhub | worker | relay
    label: str
    server: Server
    username: str
    aux: list[subprocess.Popen[Any]] = field(default_factory=list)  # not counted as server CPU (sink)
    stats_files: dict[str, Path] = field(default_factory=dict)
    extra_connections: int = 0  # connections on the port that are not gateways
    http_port: int | None = None
    db_path: Path | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def aux_cpu(self) -> float:
        return sum(common.cpu_seconds(p.pid) for p in self.aux if p.poll() is None)

    def stop(self) -> dict[str, Any]:
        """Stop everything (aux first, by pid) and return the helpers' stats files."""
        for p in self.aux:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.aux:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.server.stop(cleanup=False)
        out: dict[str, Any] = {}
        for name, path in self.stats_files.items():
            with contextlib.suppress(OSError, ValueError):
                out[name] = json.loads(path.read_text())
        return out

    def cleanup(self) -> None:
        self.server.cleanup()


def start_meterhub_system(
    settings_env: dict[str, str] | None = None, before_serve: Any = None, label: str = "(a) meterhub"
) -> System:
    """``meterhub serve`` (protocol handler, default settings) with the simulator's product registered."""
    env = {"METERHUB_HTTP_PORT": str(common.free_port())}  # 8080 may be taken
    env.update(settings_env or {})

    def prepare(cli: str, data_dir: str, env_: dict[str, str]) -> None:
        common.product_adder(PRODUCT)(cli, data_dir, env_)
        if before_serve is not None:
            before_serve(cli, data_dir, env_)

    server = common.start_meterhub("protocol", settings_env=env, before_serve=prepare)
    assert server.username is not None
    system = System("meterhub", label, server, server.username)
    system.db_path = (server.data_dir or Path(".")) / "meterhub.db"
    # bench/common.py may pass --http-port itself (it overrides the environment variable).
    system.http_port = getattr(server, "http_port", None) or int(env["METERHUB_HTTP_PORT"])
    try:
        common.wait_port(system.http_port, server.procs[0])
    except Exception:
        server.stop()
        raise
    return system


def _start_mosquitto(name: str) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-"))
    port = common.free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, log=workdir / "mosquitto.log"))
    broker = subprocess.Popen(
        [common.MOSQUITTO, "-c", str(conf)],
        stdout=open(workdir / "mosquitto.out", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    server = Server(name, port, [broker], None, workdir)
    try:
        common.wait_port(port, broker)
    except Exception:
        server.stop()
        raise
    return server


def _wait_ready(path: Path, proc: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (see {path.parent})")
        time.sleep(0.05)


def start_worker_system(batch_ms: float = 50.0, batch_max: int = 1000) -> System:
    """(b): mosquitto + ``bench/worker_aiomqtt.py``; both processes count as the server."""
    server = _start_mosquitto("mosquitto + aiomqtt worker")
    assert server.workdir is not None
    ready = server.workdir / "worker.ready"
    stats = server.workdir / "worker.json"
    db = server.workdir / "worker.db"
    worker = subprocess.Popen(
        [
            sys.executable,
            str(common.BENCH_DIR / "worker_aiomqtt.py"),
            "--port",
            str(server.port),
            "--db",
            str(db),
            "--batch-ms",
            str(batch_ms),
            "--batch-max",
            str(batch_max),
            "--ready-file",
            str(ready),
            "--stats-file",
            str(stats),
        ],
        stdout=open(server.workdir / "worker.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    server.procs.append(worker)
    try:
        _wait_ready(ready, worker, "worker_aiomqtt.py")
    except Exception:
        server.stop()
        raise
    system = System("worker", "(b) mosquitto + aiomqtt worker", server, "bench-vendor")
    system.stats_files["worker"] = stats
    system.extra_connections = 1
    system.db_path = db
    return system


def start_relay_system() -> System:
    """(c): mosquitto + the do-nothing subscriber (its CPU is reported apart from the broker's)."""
    server = _start_mosquitto("mosquitto relay")
    assert server.workdir is not None
    ready = server.workdir / "sink.ready"
    stats = server.workdir / "sink.json"
    sink = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "sink",
            "--port",
            str(server.port),
            "--ready-file",
            str(ready),
            "--stats-file",
            str(stats),
        ],
        stdout=open(server.workdir / "sink.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    system = System("relay", "(c) mosquitto relay -> do-nothing subscriber", server, "bench-vendor")
    system.aux.append(sink)
    system.stats_files["sink"] = stats
    system.extra_connections = 1
    try:
        _wait_ready(ready, sink, "the subscriber")
    except Exception:
        system.stop()
        system.cleanup()
        raise
    return system


STARTERS = {"meterhub": start_meterhub_system, "worker": start_worker_system, "relay": start_relay_system}


# --------------------------------------------------------------------------------------- the sink (c)


class _Sink(common.RawSubscriber):
    """Counts report messages per 0.1 s (CLOCK_MONOTONIC) and answers devices/sync with code 0."""

    def __init__(self) -> None:
        super().__init__("fleet-sink", ["gateway_id/+/properties/report", "gateway_id/+/devices/sync"])
        self.buckets: Counter[int] = Counter()
        self.counts: Counter[str] = Counter()

    def on_publish(self, packet: Any, now: float, out: list[bytes]) -> None:
        from meterhub.protocol.messages import encode_response

        topic: str = packet.topic
        if topic.endswith("/properties/report"):
            self.buckets[int(now * 10)] += 1
            self.counts["reports"] += 1
        elif topic.endswith("/devices/sync"):
            msg = json.loads(packet.payload)
            cid = (msg.get("param") or {}).get("cid")
            answer = encode_response(msg.get("request_id"), cid, 0, time.time())
            out.append(self.codec.encode_publish(topic + "/response", answer, 1, self.next_pid()))
            self.counts["syncs"] += 1


async def _sink_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    _, sink = await loop.create_connection(_Sink, HOST, args.port)
    await asyncio.wait_for(sink.ready, 10)
    Path(args.ready_file).touch()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait({asyncio.ensure_future(stop.wait()), sink.closed}, return_when=asyncio.FIRST_COMPLETED)
    Path(args.stats_file).write_text(
        json.dumps({"stats": dict(sink.counts), "buckets": {str(k): v for k, v in sink.buckets.items()}})
    )


def in_window(buckets: dict[str, int], t0: float, t1: float) -> int:
    """Messages counted in 0.1 s buckets that lie inside [t0, t1)."""
    lo, hi = int(t0 * 10), int(t1 * 10)
    return sum(v for k, v in buckets.items() if lo <= int(k) < hi)


# --------------------------------------------------------------------------------------- the load


@dataclass
class LoadSpec:
    port: int
    username: str
    gateways: int
    meters: int
    interval: float
    processes: int = 3
    warmup: float = 12.0
    duration: float = 30.0
    max_pending: int | None = None  # None: the SDK's default (1,000 per gateway)
    buffer_size: int = 10_000  # the SDK's store-and-forward buffer per gateway (its default)
    prefix: str = "sim"
    nodelay: bool = False  # set TCP_NODELAY on the gateways' sockets (diagnostic; the SDK does not)
    gc_freeze: bool = True  # gc.freeze() in the generator processes once the fleet is up
    start_timeout: float = 120.0
    seed: int = 1


def _slices(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _totals(fleet: Any) -> dict[str, int]:
    acked = errors = sent = dropped = pending = buffered = connected = 0
    for sim in fleet.gateways:
        st = sim.gw.stats
        acked += st.acked
        errors += sum(st.errors.values())
        sent += st.sent
        dropped += st.dropped
        pending += sim.gw.pending
        buffered += sim.gw.buffered
        connected += sim.gw.connected
    return {
        "acked": acked,
        "errors": errors,
        "sent": sent,
        "dropped": dropped,
        "pending": pending,
        "buffered": buffered,
        "connected": connected,
        "late_ticks": fleet.late_ticks,
    }


class _GenHealth:
    """The generator process's own stalls: garbage-collector pauses and event-loop lag."""

    def __init__(self) -> None:
        self.gc: list[tuple[float, float, int]] = []  # (monotonic end, seconds, generation)
        self._gc_start = 0.0
        self.lags: list[tuple[float, float]] = []  # (monotonic, seconds late) when > 20 ms
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc.append((time.monotonic(), time.perf_counter() - self._gc_start, info["generation"]))

    async def watch_lag(self, until: float) -> None:
        while (now := time.monotonic()) < until:
            await asyncio.sleep(0.005)
            late = time.monotonic() - now - 0.005
            if late > 0.02:
                self.lags.append((now, late))

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        gcs = [g for g in self.gc if t0 <= g[0] < t1]
        full = [d for _, d, gen in gcs if gen == 2]
        lags = [d for t, d in self.lags if t0 <= t < t1]
        return {
            "gc_seconds": sum(d for _, d, _ in gcs),
            "gc_full": len(full),
            "gc_full_max": max(full, default=0.0),
            "lag_over_20ms": len(lags),
            "lag_max": max(lags, default=0.0),
        }


async def _window(fleet: Any, t0: float, t1: float, out: dict[str, Any], health: _GenHealth) -> None:
    """Counters, latencies and this process's CPU over [t0, t1)."""
    lag = asyncio.ensure_future(health.watch_lag(t1))
    await _sleep_until(t0)
    for sim in fleet.gateways:
        sim.gw.stats.take_latencies()  # forget the warm-up's
    c0, a = time.process_time(), _totals(fleet)
    lat: list[float] = []
    series: list[tuple[float, int, float, float]] = []  # (seconds into the window, n, p99, max) per second
    while (now := time.monotonic()) < t1:
        await asyncio.sleep(min(1.0, t1 - now))
        fresh: list[float] = []
        for sim in fleet.gateways:
            fresh.extend(sim.gw.stats.take_latencies())
        fresh.sort()
        if fresh:
            series.append((round(time.monotonic() - t0, 1), len(fresh), percentile(fresh, 99), fresh[-1]))
        lat.extend(fresh)
    c1, b = time.process_time(), _totals(fleet)
    out["series"] = series
    out["window"] = {k: b[k] - a[k] for k in ("acked", "errors", "sent", "dropped", "late_ticks")}
    out["window"].update(pending=b["pending"], buffered=b["buffered"], connected=b["connected"])
    out["cpu"] = c1 - c0
    out["latencies"] = lat
    await lag
    out["health"] = health.summary(t0, t1)


async def _load_main(index: int, n: int, spec: LoadSpec, q: Any, ctl: dict[str, Any]) -> None:
    from meterhub.tools.simulator import run_fleet

    result: dict[str, Any] = {"gateways": n}
    keep: list[Any] = []
    started = time.monotonic()
    health = _GenHealth()

    async def on_ready(fleet: Any) -> None:
        for meter in fleet.meters.values():
            meter.full_report_due = False  # the steady mix from the first tick on (see the docstring)
        if spec.max_pending is not None:
            for sim in fleet.gateways:
                sim.gw.max_pending = spec.max_pending
        if spec.nodelay:  # diagnostic: the SDK leaves Nagle on (private attributes: not for production)
            for sim in fleet.gateways:
                client = sim.gw._client
                sock = client._client.socket() if client is not None else None
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        q.put(("ready", index, time.monotonic() - started))
        while not ctl["go"].is_set():
            await asyncio.sleep(0.02)
        t_start = ctl["t_start"].value
        t0 = t_start + spec.warmup
        if spec.gc_freeze:
            gc.freeze()  # the fleet's start-up heap: not traversed again by full collections
            gc.set_threshold(50_000, 20, 10)  # as meterhub serve does (meterhub.core.gcwatch)
        keep.append(asyncio.ensure_future(_window(fleet, t0, t0 + spec.duration, result, health)))
        await _sleep_until(t_start)

    try:
        summary = await run_fleet(
            HOST,
            spec.port,
            spec.username,
            gateways=n,
            meters=spec.meters,
            interval=spec.interval,
            duration=spec.warmup + spec.duration + 0.5,
            seed=f"{spec.seed}-{index}",
            gateway_prefix=f"{spec.prefix}{index}",
            on_ready=on_ready,
            start_timeout=spec.start_timeout,
            drop_probability=0.0,
            buffer_size=spec.buffer_size,
            progress=False,
        )
    except BaseException as exc:
        q.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    if keep:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(keep[0], 5)
    result["summary"] = {
        "sent": summary.sent,
        "acked": summary.acked,
        "errors": summary.errors,
        "dropped": summary.dropped,
        "buffered": summary.buffered,
        "reconnects": summary.reconnects,
        "local_errors": summary.local_errors,
    }
    q.put(("result", index, result))


def _load_process(index: int, n: int, spec: LoadSpec, q: Any, ctl: dict[str, Any]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    common.raise_nofile()
    import logging

    logging.basicConfig(level=logging.ERROR)  # the SDK logs each lost report at WARNING
    try:
        import uvloop

        uvloop.run(_load_main(index, n, spec, q, ctl))
    except ImportError:
        asyncio.run(_load_main(index, n, spec, q, ctl))


class LoadError(RuntimeError):
    pass


def run_load(
    system: System,
    spec: LoadSpec,
    *,
    on_window: Any = None,
    progress: bool = True,
    trace: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start the simulator processes, run one window, return everything measured."""
    ctx = mp.get_context("fork")  # the parent never runs an event loop, so fork is safe
    q = ctx.Queue()
    ctl = {"go": ctx.Event(), "t_start": ctx.Value("d", 0.0)}
    sizes = [s for s in _slices(spec.gateways, spec.processes) if s > 0]
    procs = [
        ctx.Process(target=_load_process, args=(i, n, spec, q, ctl), daemon=True) for i, n in enumerate(sizes)
    ]
    t_begin = time.monotonic()
    for p in procs:
        p.start()
    pids = [p.pid for p in procs]
    out: dict[str, Any] = {"processes": len(procs), "generator_pids": pids}

    rss_idle = system.server.rss_all()
    trace = {} if trace is None else trace
    start_series: list[tuple[float, int, float, float]] = trace.setdefault("start_series", [])
    cpu_begin = system.server.cpu()

    def sample_start() -> None:
        """During connect + sync: (seconds, connections held, server RSS MB, server CPU-s) every 2 s."""
        now = time.monotonic() - t_begin
        if not start_series or now - start_series[-1][0] >= 2:
            start_series.append(
                (
                    round(now, 1),
                    established(system.port) - system.extra_connections,
                    round(system.server.rss_all() / 2**20, 1),
                    round(system.server.cpu() - cpu_begin, 1),
                )
            )

    def get(timeout: float, tick: Any = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                if tick is not None:
                    tick()
                system.server.check_alive()
                if time.monotonic() > deadline:
                    raise LoadError("simulator processes did not answer in time") from None
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise LoadError(f"simulator process died (exit {dead[0].exitcode})") from None

    try:
        readies = []
        peak_conn = 0
        while len(readies) < len(procs):
            msg = get(spec.start_timeout + 120, sample_start)
            if msg[0] == "error":
                raise LoadError(f"simulator process {msg[1]}: {msg[2]}")
            readies.append(msg[2])
        out["start_seconds"] = time.monotonic() - t_begin
        rss_start = system.server.rss_all()
        t_start = time.monotonic() + 0.5
        ctl["t_start"].value = t_start
        ctl["go"].set()
        t0 = t_start + spec.warmup
        t1 = t0 + spec.duration
        rss: list[int] = []
        conns: list[int] = []
        last_print = 0.0
        while (now := time.monotonic()) < t0:
            time.sleep(min(0.5, t0 - now))
            if progress and now - last_print > 5:
                print(f"    warm-up ... {t0 - now:.0f} s", file=sys.stderr)
                last_print = now
        cpu0 = [common.cpu_seconds(pid) for pid in system.server.pids]
        aux0 = system.aux_cpu()
        busy0 = common.machine_busy_seconds()
        gen0 = sum(common.cpu_seconds(pid) for pid in pids)
        while (now := time.monotonic()) < t1:
            time.sleep(min(1.0, t1 - now))
            if time.monotonic() < t1 - 0.05:
                rss.append(system.server.rss_all())
                c = established(system.port)
                conns.append(c)
                peak_conn = max(peak_conn, c)
        cpu1 = [common.cpu_seconds(pid) for pid in system.server.pids]
        aux1 = system.aux_cpu()
        busy1 = common.machine_busy_seconds()
        gen1 = sum(common.cpu_seconds(pid) for pid in pids)
        if on_window is not None:
            on_window()
        results = []
        while len(results) < len(procs):
            msg = get(spec.warmup + spec.duration + 90)
            if msg[0] == "error":
                raise LoadError(f"simulator process {msg[1]}: {msg[2]}")
            if msg[0] == "result":
                results.append(msg[2])
    finally:
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    system.server.check_alive()
    lat: list[float] = []
    window: Counter[str] = Counter()
    summary: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        lat.extend(r.get("latencies", []))
        for k, v in r.get("window", {}).items():
            window[k] += v
        for k, v in r["summary"].items():
            if k == "errors":
                errors.update(v)
            else:
                summary[k] += v
    lat.sort()
    out.update(
        t0=t0,
        t1=t1,
        window=dict(window),
        summary=dict(summary),
        summary_errors=dict(errors),
        latencies=lat,
        series=_merge_series([r.get("series", []) for r in results]),
        generator_health=[r.get("health", {}) for r in results],
        generator_cpu=[r.get("cpu", 0.0) for r in results],
        generator_cpu_total=gen1 - gen0,
        server_cpu=sum(cpu1) - sum(cpu0),
        server_cpu_by_proc=[b - a for a, b in zip(cpu0, cpu1, strict=True)],
        aux_cpu=aux1 - aux0,
        rss_idle=rss_idle,
        rss_start=rss_start,
        rss_max=max(rss) if rss else system.server.rss_all(),
        connections=(max(conns) if conns else 0) - system.extra_connections,
        peak_connections=peak_conn - system.extra_connections,
        ready_seconds=readies,
    )
    out["other_cpu"] = max(
        0.0, (busy1 - busy0) - out["server_cpu"] - out["aux_cpu"] - out["generator_cpu_total"]
    )
    return out


def _merge_series(
    per_process: list[list[tuple[float, int, float, float]]],
) -> list[tuple[int, int, float, float]]:
    """Per second of the window: responses, worst p99 and max latency (ms) over the processes."""
    merged: dict[int, list[float]] = {}
    for series in per_process:
        for t, n, p99, mx in series:
            slot = merged.setdefault(round(t), [0, 0.0, 0.0])
            slot[0] += n
            slot[1] = max(slot[1], p99 * 1e3)
            slot[2] = max(slot[2], mx * 1e3)
    return [(t, int(v[0]), round(v[1], 1), round(v[2], 1)) for t, v in sorted(merged.items())]


# --------------------------------------------------------------------------------------- phases


def count_rows(path: Path | None, table_name: str = "reports") -> int | None:
    if path is None or not path.exists():
        return None
    db = sqlite3.connect(str(path))
    try:
        return int(db.execute(f"SELECT count(*) FROM {table_name}").fetchone()[0])
    finally:
        db.close()


def _ancestors() -> set[int]:
    """This process and every process above it (a CI runner's command line may name pytest too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def other_benchmarks() -> list[str]:
    """Other benchmark-like processes on the machine (not ours): loadgen, amqtt, meterhub serve, pytest."""
    mine = _ancestors()
    found = []
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit() or int(pid_s) in mine:
            continue
        try:
            cmd = Path(f"/proc/{pid_s}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (
            any(
                k in cmd
                for k in (
                    "loadgen",
                    "amqtt",
                    "meterhub serve",
                    "pytest",
                    "bench/transport.py",
                    "bench/pipeline.py",
                )
            )
            and "fleet.py" not in cmd
            and "fanout.py" not in cmd
        ):
            found.append(f"{pid_s}: {cmd[:120]}")
    return found


def wait_for_quiet_machine(max_wait: float, poll: float = 30.0) -> list[str]:
    """Wait (polling) while another benchmark runs; returns what was still running at the end."""
    deadline = time.monotonic() + max_wait
    while True:
        others = other_benchmarks()
        if not others or time.monotonic() >= deadline:
            return others
        print(f"  waiting: another benchmark is running ({others[0]})", file=sys.stderr)
        time.sleep(poll)


@dataclass
class Phase:
    name: str
    gateways: int
    meters: int
    interval: float
    flat: bool = False
    warmup: float | None = None


def run_phase(key: str, phase: Phase, args: argparse.Namespace, *, smoke: bool = False) -> dict[str, Any]:
    """One system, one phase, on a freshly started server."""
    others = wait_for_quiet_machine(0 if smoke else args.max_wait)
    system = STARTERS[key]()
    max_pending = None
    buffer_size = 10_000
    if phase.flat:
        max_pending, buffer_size = args.flat_pending, args.flat_buffer
    if key == "relay":
        max_pending = 1_000_000_000  # no responses ever come: never stop sending
    warmup = phase.warmup if phase.warmup is not None else max(args.warmup, phase.interval + 2)
    spec = LoadSpec(
        port=system.port,
        username=system.username,
        gateways=phase.gateways,
        meters=phase.meters,
        interval=phase.interval,
        processes=args.processes,
        warmup=warmup,
        duration=args.duration,
        max_pending=max_pending,
        buffer_size=buffer_size,
        start_timeout=args.start_timeout,
        nodelay=args.nodelay,
        gc_freeze=not args.no_gen_gc_freeze,
    )
    res: dict[str, Any] = {"system": key, "label": system.label, "phase": phase.name, "others_before": others}
    res["spec"] = {k: v for k, v in vars(spec).items() if k not in ("port", "username")}
    try:
        try:
            res.update(run_load(system, spec, trace=res))
        except LoadError as exc:
            res["failed"] = str(exc)
            res["server_errors"] = _log_errors(system)
            res["connections_at_failure"] = established(system.port) - system.extra_connections
            res["rss_at_failure"] = system.server.rss_all()
    finally:
        stats = system.stop()
        res["helper_stats"] = {k: v.get("stats") for k, v in stats.items()}
        if "t0" in res:
            if "sink" in stats:
                res["delivered"] = in_window(stats["sink"]["buckets"], res["t0"], res["t1"])
            if "worker" in stats:
                res["worker_committed"] = in_window(stats["worker"]["buckets"], res["t0"], res["t1"])
        res["rows"] = count_rows(system.db_path)
        res["log_tail"] = _log_tail(system)
        system.cleanup()
    return res


def _log_errors(system: System) -> dict[str, Any]:
    """How many error lines the server logged, and the most frequent ones (meterhub's console log)."""
    wd = system.server.workdir
    counts: Counter[str] = Counter()
    for name in ("meterhub.log", "mosquitto.log", "worker.log"):
        path = wd / name if wd is not None else None
        if path is None or not path.exists():
            continue
        with open(path, errors="replace") as f:
            for line in f:
                if "[error" in line or "[warning" in line or "Error:" in line:
                    key = re.sub(r"\s+\w+=\S+", "", line.split("]", 1)[-1]).strip()[:100]
                    counts[f"{name}: {key}"] += 1
    return dict(counts.most_common(8))


def _log_tail(system: System) -> str:
    wd = system.server.workdir
    if wd is None:
        return ""
    tails = []
    for name in ("meterhub.log", "mosquitto.log", "worker.log", "sink.log"):
        path = wd / name
        if path.exists():
            text = path.read_text(errors="replace").strip()
            if text:
                tails.append(f"[{name}] " + "\n".join(text.splitlines()[-5:]))
    return "\n".join(tails)[-2000:]


def done_per_s(r: dict[str, Any]) -> float:
    d = r["spec"]["duration"]
    if r["system"] == "relay":
        return r.get("delivered", 0) / d
    return r["window"].get("acked", 0) / d


def row(r: dict[str, Any]) -> list[Any]:
    d = r["spec"]["duration"]
    if "failed" in r:
        return [r["label"], r["phase"], "FAILED: " + r["failed"][:80]] + [""] * 14
    n = done_per_s(r) * d
    cpu = r["server_cpu"]
    lat = r["latencies"]
    relay = r["system"] == "relay"
    by_proc = " + ".join(f"{100 * c / d:.0f}" for c in r["server_cpu_by_proc"])
    if relay:
        by_proc += f" (subscriber {100 * r['aux_cpu'] / d:.0f})"
    gen = r["generator_cpu"]
    w = r["window"]
    return [
        r["label"],
        r["phase"],
        r["connections"],
        w.get("sent", 0) / d,
        n / d,
        100 * cpu / d,
        by_proc,
        cpu / n * 1e6 if n else float("nan"),
        n / cpu if cpu else float("nan"),
        float("nan") if relay else percentile(lat, 50) * 1e3,
        float("nan") if relay else percentile(lat, 99) * 1e3,
        r["rss_max"] / 2**20,
        " / ".join(f"{100 * c / d:.0f}" for c in gen),
        w.get("late_ticks", 0),
        100 * r["other_cpu"] / d,
        "n/a (no responses)" if relay else w.get("errors", 0),
    ]


HEADERS = [
    "system",
    "load",
    "gateways connected",
    "offered (sent) reports/s",
    "reports/s end to end",
    "server CPU %",
    "CPU % by process",
    "server CPU µs / report",
    "reports / server CPU-s",
    "p50 ms",
    "p99 ms",
    "server RSS MB",
    "generator CPU % per process",
    "late ticks",
    "other load CPU %",
    "errors / timeouts",
]


def ratios(results: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for phase in dict.fromkeys(r["phase"] for r in results):
        by = {r["system"]: r for r in results if r["phase"] == phase and "failed" not in r}
        a = by.get("meterhub")
        if a is None:
            continue

        def per_s(x: dict[str, Any]) -> float:
            return done_per_s(x)

        def per_cpu(x: dict[str, Any]) -> float:
            return (
                done_per_s(x) * x["spec"]["duration"] / x["server_cpu"] if x["server_cpu"] else float("nan")
            )

        for key, name in (("worker", "(a)/(b)"), ("relay", "(a)/(c)")):
            b = by.get(key)
            if b is None:
                continue
            out.append(
                [phase, name, per_s(a) / per_s(b) if per_s(b) else float("nan"), per_cpu(a) / per_cpu(b)]
            )
    return out


def checks(results: list[dict[str, Any]]) -> tuple[list[list[Any]], list[str]]:
    rows_, problems = [], []
    for r in results:
        if "failed" in r:
            problems.append(f"{r['label']} {r['phase']}: {r['failed']}")
            continue
        s = r["summary"]
        errs = r["summary_errors"]
        if r["system"] == "relay":
            hs = r["helper_stats"].get("sink") or {}
            rows_.append([r["label"], r["phase"], s["sent"], "", "", hs.get("reports", ""), s["dropped"]])
            if not hs.get("reports"):
                problems.append(f"{r['label']} {r['phase']}: the subscriber received no reports")
            continue
        rows_.append(
            [r["label"], r["phase"], s["sent"], s["acked"], dict(errs) or 0, r["rows"], s["dropped"]]
        )
        if not s["acked"]:
            problems.append(f"{r['label']} {r['phase']}: no report was answered")
        if r["rows"] is not None and r["rows"] < s["acked"]:
            problems.append(
                f"{r['label']} {r['phase']}: {r['rows']} rows stored < {s['acked']} answered code 0"
            )
    return rows_, problems


LARGE_HEADERS = [
    "system",
    "gateways",
    "connect + sync s",
    "connections held",
    "server RSS MB idle -> in window",
    "RSS growth KB / gateway (with its meters, under load)",
    "reports/s",
    "server CPU µs / report",
    "p50 ms",
    "p99 ms",
    "generator CPU % per process",
    "other load CPU %",
    "result",
]


def large_row(r: dict[str, Any]) -> list[Any]:
    g = r["spec"]["gateways"]
    if "failed" in r:
        series = r.get("start_series") or []
        peak = max((x[1] for x in series), default=0)
        errors = r.get("server_errors") or {}
        top = next(iter(errors.items()), None)
        why = f"; server log: {top[1]}x {top[0]!r}" if top else ""
        return [
            r["label"],
            g,
            "",
            f"peak {peak:,}",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "FAILED: " + r["failed"] + why,
        ]
    d = r["spec"]["duration"]
    n = done_per_s(r) * d
    relay = r["system"] == "relay"
    return [
        r["label"],
        g,
        r["start_seconds"],
        r["connections"],
        f"{r['rss_idle'] / 2**20:.0f} -> {r['rss_max'] / 2**20:.0f}",
        (r["rss_max"] - r["rss_idle"]) / g / 1024,
        n / d,
        r["server_cpu"] / n * 1e6 if n else float("nan"),
        float("nan") if relay else percentile(r["latencies"], 50) * 1e3,
        float("nan") if relay else percentile(r["latencies"], 99) * 1e3,
        " / ".join(f"{100 * c / d:.0f}" for c in r["generator_cpu"]),
        100 * r["other_cpu"] / d,
        "ok" if not r["window"].get("errors") else f"{r['window']['errors']} errors/timeouts",
    ]


def print_results(results: list[dict[str, Any]], info: dict[str, Any], title: str) -> None:
    print(f"\n### {title}\n")
    print(table(HEADERS, [row(r) for r in results]))
    rat = ratios(results)
    if rat:
        print()
        print(table(["load", "ratio", "reports/s", "reports per server CPU-s"], rat))


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "sink":
        ap = argparse.ArgumentParser(description="the do-nothing subscriber of (c)")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--ready-file", required=True)
        ap.add_argument("--stats-file", required=True)
        import uvloop

        uvloop.run(_sink_main(ap.parse_args(argv[1:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny numbers, a few seconds per system")
    ap.add_argument("--systems", default="meterhub,worker,relay", help="subset of meterhub,worker,relay")
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--meters", type=int, default=10, help="meters per gateway")
    ap.add_argument(
        "--intervals",
        default="40,10",
        help="steady loads: seconds per tick, comma-separated ('' for none); ~4 reports per meter per tick",
    )
    ap.add_argument("--flat-interval", type=float, default=4.0, help="flat out: seconds per tick")
    ap.add_argument(
        "--flat-pending", type=int, default=16, help="flat out: reports awaiting a response per gw"
    )
    ap.add_argument(
        "--flat-buffer",
        type=int,
        default=64,
        help="flat out: SDK buffer per gateway (reports the server cannot take are dropped at the gateway "
        "instead of piling up in the simulator's memory)",
    )
    ap.add_argument("--no-flat", action="store_true", help="skip the flat-out phase")
    ap.add_argument(
        "--large",
        default="5000,7500,10000",
        help="large fleets to try (gateways, comma-separated; '' skips); they stop at the first failure",
    )
    ap.add_argument("--large-interval", type=float, default=60.0, help="large fleets: seconds per tick")
    ap.add_argument("--large-systems", default=None, help="systems for the large fleets (default --systems)")
    ap.add_argument("--processes", type=int, default=3, help="simulator processes")
    ap.add_argument("--warmup", type=float, default=5.0, help="at least; always >= interval + 2 s")
    ap.add_argument("--duration", type=float, default=30.0, help="measurement window (s)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="connect + sync timeout (s)")
    ap.add_argument("--max-wait", type=float, default=600.0, help="wait this long for other benchmarks")
    ap.add_argument(
        "--nodelay",
        action="store_true",
        help="diagnostic: set TCP_NODELAY on the simulated gateways' sockets (the SDK leaves Nagle on)",
    )
    ap.add_argument(
        "--no-gen-gc-freeze",
        action="store_true",
        help="do not gc.freeze() the simulator processes' start-up heap (their full collections then "
        "pause them for tens of ms and show up in the measured latency)",
    )
    ap.add_argument("--json", action="store_true", help="also write bench/results/fleet-*.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.gateways, args.meters, args.intervals, args.flat_interval = 6, 2, "0.5", 0.2
        args.processes, args.warmup, args.duration = 2, 1.0, 2.0
        args.large, args.large_interval, args.large_systems = "12", 0.5, "meterhub"
        args.start_timeout = 30.0
    signal.signal(signal.SIGTERM, _terminate)  # so that the servers are stopped on the way out
    nofile = common.raise_nofile()
    info = common.machine_info()
    info["nofile"] = nofile
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in STARTERS:
            ap.error(f"unknown system {s!r}")
    out: dict[str, Any] = {"machine": info, "args": vars(args)}
    phases = [
        Phase(f"{args.gateways} x {args.meters} @ {iv:g} s", args.gateways, args.meters, iv)
        for iv in [float(x) for x in args.intervals.split(",") if x.strip()]
    ]
    if not args.no_flat:
        phases.append(
            Phase(
                f"{args.gateways} x {args.meters} flat out "
                f"(@ {args.flat_interval:g} s, window {args.flat_pending})",
                args.gateways,
                args.meters,
                args.flat_interval,
                flat=True,
                warmup=None if args.smoke else max(args.warmup, args.flat_interval + 8),
            )
        )
    results: list[dict[str, Any]] = []
    for phase in phases:
        for key in systems:
            print(f"== {phase.name}: {key}", file=sys.stderr)
            r = run_phase(key, phase, args, smoke=args.smoke)
            results.append(r)
            _say(r)
    large_results: list[dict[str, Any]] = []
    large_systems = [s for s in (args.large_systems or args.systems).split(",") if s]
    for key in large_systems:
        for n in [int(x) for x in args.large.split(",") if x.strip()]:
            phase = Phase(
                f"{n} x {args.meters} @ {args.large_interval:g} s", n, args.meters, args.large_interval
            )
            print(f"== large: {phase.name}: {key}", file=sys.stderr)
            r = run_phase(key, phase, args, smoke=args.smoke)
            large_results.append(r)
            _say(r)
            if "failed" in r:
                break
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}, open files limit {nofile}; {info['date']}"
    )
    print_results(results, info, f"{args.gateways} gateways x {args.meters} meters")
    if large_results:
        print(
            f"\n### large fleets ({args.meters} meters per gateway, a tick every {args.large_interval:g} s)\n"
        )
        print(table(LARGE_HEADERS, [large_row(r) for r in large_results]))
    check_rows, problems = checks(results + large_results)
    print()
    print(
        table(
            [
                "system",
                "load",
                "reports sent (whole run)",
                "answered 0",
                "other answers",
                "rows stored ((c): delivered)",
                "dropped (SDK buffer)",
            ],
            check_rows,
        )
    )
    out["results"] = results
    out["large"] = large_results
    if args.json:
        for r in results + large_results:
            lat = r.pop("latencies", [])
            r["latency_ms"] = {q: percentile(lat, q) * 1e3 for q in (50, 90, 99, 99.9)} if lat else {}
        print(f"\nJSON: {common.write_json('fleet', out)}")
    if not args.smoke:
        # Large-fleet failures are findings (where it stops), not errors of the script.
        problems = [
            p
            for p in problems
            if not any(p.startswith(r["label"]) and r["phase"] in p for r in large_results)
        ]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _say(r: dict[str, Any]) -> None:
    if "failed" in r:
        print(f"  FAILED: {r['failed']}", file=sys.stderr)
        if r.get("log_tail"):
            print("  " + r["log_tail"].replace("\n", "\n  "), file=sys.stderr)
        return
    d = r["spec"]["duration"]
    lat = r["latencies"]
    print(
        f"  {done_per_s(r):,.0f} reports/s, server CPU {100 * r['server_cpu'] / d:.0f}%, "
        f"{r['server_cpu'] / max(1, done_per_s(r) * d) * 1e6:.0f} µs/report, "
        f"p50 {percentile(lat, 50) * 1e3:.1f} ms p99 {percentile(lat, 99) * 1e3:.1f} ms, "
        f"gen CPU {[round(100 * c / d) for c in r['generator_cpu']]}%, "
        f"other {100 * r['other_cpu'] / d:.0f}%, "
        f"conns {r['connections']}, start {r['start_seconds']:.1f} s",
        file=sys.stderr,
    )
    if r.get("series"):
        worst = sorted(r["series"], key=lambda x: -x[2])[:5]
        print(f"  worst seconds (t, responses, p99 ms, max ms): {worst}", file=sys.stderr)
    for h in r.get("generator_health", []):
        if h:
            print(
                f"  generator: gc {h['gc_seconds'] * 1e3:.0f} ms ({h['gc_full']} full, max "
                f"{h['gc_full_max'] * 1e3:.0f} ms), loop lag > 20 ms {h['lag_over_20ms']}x, max "
                f"{h['lag_max'] * 1e3:.0f} ms",
                file=sys.stderr,
            )


if __name__ == "__main__":
    raise SystemExit(main())
