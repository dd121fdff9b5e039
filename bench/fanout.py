"""Open hub fan-out cost: the simulator's fleet through meterhub with and without open hub subscribers.

Set-up (before ``meterhub serve`` starts, on its database): one application (``store.create_app``),
``--users`` users (``store.add_user``), each bound (``store.bind``) to an equal share of the simulated
meters (meter ``i`` -> user ``i % users``, so every report goes to exactly one user), plus one more user
"everything" bound to every meter. Link credentials come from the server's HTTP API like an application
would get them (``OpenHubClient.project_login()``, ``.config(uid, link_id)``; AES-GCM, version "2.0").

Phases, each on a freshly started server with the same database contents, same simulator load
(``bench/fleet.py``'s ``run_load``: ``--processes`` processes running ``run_fleet``):

1. **cost**, 0 links: the users and bindings exist, no link is connected (``fanout.on_event`` returns
   at once);
2. **cost**, ``--users`` links: one subscriber per user -- real MQTT connections (a separate process,
   uvloop, ``meterhub.mqtt.codec``) that subscribe to their ``source_topic`` (QoS 1), acknowledge, and
   **decrypt and parse every message** (``crypto.decrypt``); undecryptable messages and messages for a
   meter not bound to that user are counted as errors;
   both at a steady load (``--interval``) and flat out (``--flat-interval``, ``--flat-pending``);
3. **stall**, report latency at a fixed moderate load (``--stall-interval``): (i) no link; (ii) one
   *reading* subscriber for user "everything" (the same fan-out work, as a control); (iii) one
   **stalled** subscriber for user "everything": a raw socket with ``SO_RCVBUF`` = 4 KiB set before
   connecting, CONNECT + SUBSCRIBE, then never read again. Its ESTABLISHED state is polled, so the table
   says whether (and after how long) the server dropped it (meterhub's slow-client rule: 60 s above
   the 256 KiB write buffer by default).

Server CPU is the meterhub process (all threads) over the window; the subscribers' CPU is shown apart.

    .venv/bin/python bench/fanout.py            # ~10 minutes
    .venv/bin/python bench/fanout.py --smoke    # under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
import fleet
from common import HOST, percentile, table

STALL_RCVBUF = 4096


# --------------------------------------------------------------------------------------- set-up


def meter_ids(gateways: int, meters: int, processes: int, prefix: str = "sim") -> list[str]:
    """The cids the simulator will sync: gateway ``{prefix}{process}-{n:03d}``, meter ``{gw}-m{k:03d}``."""
    cids = []
    for index, n in enumerate(s for s in fleet._slices(gateways, processes) if s > 0):
        for g in range(n):
            gw = f"{prefix}{index}-{g + 1:03d}"
            cids.extend(f"{gw}-m{m + 1:03d}" for m in range(meters))
    return cids


def populate(data_dir: str, users: int, cids: list[str]) -> dict[str, Any]:
    """Application, users, bindings (meter i -> user i % users; user "everything" -> every meter)."""
    from sqlalchemy import insert

    from meterhub.openhub import schema as oh
    from meterhub.openhub import store
    from meterhub.storage.database import create_db_engine

    engine = create_db_engine(f"sqlite:///{Path(data_dir, 'meterhub.db').resolve()}")
    try:
        app = store.create_app(engine, "fanout-bench")
        uids = [store.add_user(engine, f"user{k:03d}", f"pw-{k}") for k in range(users)]
        everything = store.add_user(engine, "everything", "pw-everything")
        now = time.time()
        rows = [{"uid": uids[i % users], "cid": cid, "created_at": now} for i, cid in enumerate(cids)]
        rows += [{"uid": everything, "cid": cid, "created_at": now} for cid in cids]
        with engine.begin() as conn:  # store.bind() one by one is 2 queries per binding
            conn.execute(insert(oh.bindings), rows)
    finally:
        engine.dispose()
    bound: dict[str, list[str]] = {}
    for i, cid in enumerate(cids):
        bound.setdefault(uids[i % users], []).append(cid)
    return {
        "access_id": app.access_id,
        "secret": app.secret,
        "uids": uids,
        "everything": everything,
        "bound": bound,
    }


def link_configs(http_port: int, world: dict[str, Any], uids: list[str]) -> list[dict[str, Any]]:
    from meterhub.openhub.client import OpenHubClient

    api = OpenHubClient(f"http://{HOST}:{http_port}", world["access_id"], world["secret"])
    api.project_login()
    out = []
    for uid in uids:
        cfg = api.config(uid, f"bench-{uid}")
        url = cfg["url"]
        if not url.startswith(f"tcp://{HOST}:"):
            raise RuntimeError(f"unexpected link url {url}")
        cfg["port"] = int(url.rsplit(":", 1)[1])
        cfg["uid"] = uid
        out.append(cfg)
    return out


# --------------------------------------------------------------------------------------- subscribers


class _Subscriber(common.RawSubscriber):
    """One open hub link: subscribes to its source topic, acknowledges, decrypts every message."""

    def __init__(
        self, cfg: dict[str, Any], allowed: set[str] | None, counts: Counter[str], buckets: Counter[int]
    ):
        from meterhub.openhub import crypto

        super().__init__(
            cfg["client_id"],
            [cfg["source_topic"]["device"]],
            username=cfg["username"],
            password=cfg["password"].encode(),
            keepalive=60,
        )
        self.crypto = crypto
        self.key = crypto.key_from_password(cfg["password"])
        self.allowed = allowed
        self.counts = counts
        self.buckets = buckets

    def on_publish(self, packet: Any, now: float, out: list[bytes]) -> None:
        counts = self.counts
        try:
            envelope = json.loads(packet.payload)
            data = json.loads(self.crypto.decrypt("2.0", self.key, envelope["data"], envelope["t"]))
        except Exception:
            counts["undecryptable"] += 1
            return
        protocol = envelope.get("protocol")
        counts[f"protocol{protocol}"] += 1
        if protocol == 4:
            self.buckets[int(now * 10)] += 1
            if self.allowed is not None and data.get("devId") not in self.allowed:
                counts["foreign_device"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.counts["connection_lost"] += 1
        super().connection_lost(exc)


async def _subscribers_main(
    configs: list[dict[str, Any]], bound: dict[str, list[str]], q: Any, stop: Any
) -> None:
    loop = asyncio.get_running_loop()
    counts: Counter[str] = Counter()
    buckets: Counter[int] = Counter()
    conns: list[_Subscriber] = []
    for cfg in configs:
        allowed = set(bound[cfg["uid"]]) if cfg["uid"] in bound else None
        _, sub = await loop.create_connection(
            lambda cfg=cfg, allowed=allowed: _Subscriber(cfg, allowed, counts, buckets), HOST, cfg["port"]
        )
        conns.append(sub)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in conns)), 30)
        q.put(("ready", len(conns)))
    except Exception as exc:
        q.put(("error", repr(exc)))
        return
    while not stop.is_set():
        await asyncio.sleep(0.05)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0.2)
    q.put(("result", dict(counts), {str(k): v for k, v in buckets.items()}, time.process_time()))


def _subscribers_process(
    configs: list[dict[str, Any]], bound: dict[str, list[str]], q: Any, stop: Any
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    common.raise_nofile()
    import uvloop

    uvloop.run(_subscribers_main(configs, bound, q, stop))


class Subscribers:
    """The links' subscribers in one child process (fork)."""

    def __init__(self, configs: list[dict[str, Any]], bound: dict[str, list[str]]) -> None:
        ctx = mp.get_context("fork")
        self.q = ctx.Queue()
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(
            target=_subscribers_process, args=(configs, bound, self.q, self.stop_event), daemon=True
        )
        self.proc.start()
        msg = self.q.get(timeout=60)
        if msg[0] != "ready":
            self.proc.join(5)
            raise RuntimeError(f"subscribers failed: {msg[1]}")
        self.connected = msg[1]

    def cpu(self) -> float:
        return common.cpu_seconds(self.proc.pid) if self.proc.is_alive() else 0.0

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        try:
            _, counts, buckets, _cpu = self.q.get(timeout=30)
        except queue.Empty:
            counts, buckets = {"no_result": 1}, {}
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
        return {"counts": counts, "buckets": buckets}


class StalledSubscriber:
    """Connected and subscribed, then never reads: a 4 KiB receive buffer set before connecting."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from meterhub.mqtt import codec

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
        self.sock.settimeout(10)
        self.sock.connect((HOST, cfg["port"]))
        self.local_port = self.sock.getsockname()[1]
        self.server_port = cfg["port"]
        self.sock.sendall(
            codec.encode(codec.Connect(cfg["client_id"], True, 0, cfg["username"], cfg["password"].encode()))
        )
        decoder = codec.Decoder(server_side=False)
        got: list[Any] = []
        while not any(type(p) is codec.SubAck for p in got):
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("stalled subscriber: connection closed during set-up")
            for p in decoder.feed(data):
                got.append(p)
                if type(p) is codec.ConnAck:
                    if p.return_code != 0:
                        raise ConnectionError(f"stalled subscriber: CONNACK {p.return_code}")
                    self.sock.sendall(codec.encode(codec.Subscribe(1, [(cfg["source_topic"]["device"], 1)])))
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.connected_at = time.monotonic()
        self.dropped_at: float | None = None

    def alive(self) -> bool:
        """Still ESTABLISHED (from /proc/net/tcp: our side of the connection)."""
        suffix_local = f":{self.local_port:04X}"
        suffix_remote = f":{self.server_port:04X}"
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split(None, 4)
                if parts[1].endswith(suffix_local) and parts[2].endswith(suffix_remote):
                    return parts[3] == "01"
        return False

    def poll(self) -> None:
        if self.dropped_at is None and not self.alive():
            self.dropped_at = time.monotonic()

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------- phases


def start_server(
    world_box: dict[str, Any], users: int, cids: list[str], settings_env: dict[str, str]
) -> fleet.System:
    def before_serve(cli: str, data_dir: str, env: dict[str, str]) -> None:
        world_box.update(populate(data_dir, users, cids))

    return fleet.start_meterhub_system(settings_env=settings_env, before_serve=before_serve)


def run_one(
    name: str,
    args: argparse.Namespace,
    *,
    interval: float,
    links: str,  # none | users | reader | stalled
    max_pending: int | None = None,
) -> dict[str, Any]:
    others = fleet.wait_for_quiet_machine(0 if args.smoke else args.max_wait)
    cids = meter_ids(args.gateways, args.meters, args.processes)
    world: dict[str, Any] = {}
    system = start_server(world, args.users, cids, {})
    http_port = system.http_port
    res: dict[str, Any] = {"name": name, "links": links, "others_before": others, "interval": interval}
    subs: Subscribers | None = None
    stalled: StalledSubscriber | None = None
    stall_samples: list[tuple[float, bool]] = []
    try:
        if links == "users":
            configs = link_configs(http_port, world, world["uids"])
            subs = Subscribers(configs, world["bound"])
        elif links == "reader":
            configs = link_configs(http_port, world, [world["everything"]])
            subs = Subscribers(configs, {})
        elif links == "stalled":
            stalled = StalledSubscriber(link_configs(http_port, world, [world["everything"]])[0])
            res["stall_rcvbuf"] = stalled.rcvbuf
        res["subscribers"] = subs.connected if subs else (1 if stalled else 0)
        spec = fleet.LoadSpec(
            port=system.port,
            username=system.username,
            gateways=args.gateways,
            meters=args.meters,
            interval=interval,
            processes=args.processes,
            warmup=max(args.warmup, interval + 2),
            duration=args.duration,
            max_pending=max_pending,
            start_timeout=args.start_timeout,
        )
        res["spec"] = {k: v for k, v in vars(spec).items() if k not in ("port", "username")}
        sub_cpu0 = subs.cpu() if subs else 0.0

        def at_window_end() -> None:
            res["subscriber_cpu"] = (subs.cpu() - sub_cpu0) if subs else 0.0

        if stalled is not None:
            import threading

            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    stalled.poll()
                    stall_samples.append((time.monotonic(), stalled.dropped_at is None))
                    done.wait(0.5)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        try:
            res.update(fleet.run_load(system, spec, on_window=at_window_end))
        finally:
            if stalled is not None:
                done.set()
                watcher.join(2)
    except fleet.LoadError as exc:
        res["failed"] = str(exc)
    finally:
        if subs is not None:
            got = subs.stop()
            res["subscriber_counts"] = got["counts"]
            if "t0" in res:
                res["delivered"] = fleet.in_window(got["buckets"], res["t0"], res["t1"])
        if stalled is not None:
            stalled.poll()
            res["stall_connected_at"] = stalled.connected_at
            res["stall_dropped_after"] = (
                None if stalled.dropped_at is None else stalled.dropped_at - stalled.connected_at
            )
            if "t0" in res:
                in_win = [alive for t, alive in stall_samples if res["t0"] <= t < res["t1"]]
                res["stall_alive_in_window"] = f"{sum(in_win)}/{len(in_win)} samples"
        metrics = scrape_mqtt_stats(system)
        res["mqtt_stats"] = metrics
        system.stop()
        if stalled is not None:
            stalled.close()
        res["rows"] = fleet.count_rows(system.db_path)
        system.cleanup()
    return res


def _create_token(cli: str, data_dir: Path) -> str:
    done = subprocess.run(
        [cli, "token", "create", f"bench-{time.time_ns()}", "--scope", "read", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        env=common.meterhub_env(),
        timeout=30,
    )
    return done.stdout.strip().split()[-1]


def scrape_mqtt_stats(system: fleet.System) -> dict[str, float]:
    """meterhub's MQTT counters (dropped for full queues, slow clients closed) from /metrics."""
    cli = str(common.VENV_BIN / "meterhub")
    assert system.server.data_dir is not None
    try:
        token = getattr(system.server, "token", None) or _create_token(cli, system.server.data_dir)
        import httpx

        text = httpx.get(
            f"http://{HOST}:{system.http_port}/metrics",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).text
    except Exception as exc:
        return {"error": repr(exc)}  # type: ignore[dict-item]
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("meterhub_mqtt_events_total{") and any(
            k in line for k in ("dropped", "slow", "closed", "paused")
        ):
            key = line.split('event="', 1)[1].split('"', 1)[0]
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


# --------------------------------------------------------------------------------------- output


def cost_row(r: dict[str, Any]) -> list[Any]:
    if "failed" in r:
        return [r["name"], "FAILED: " + r["failed"][:80]] + [""] * 11
    d = r["spec"]["duration"]
    n = r["window"]["acked"]
    cpu = r["server_cpu"]
    lat = r["latencies"]
    counts = r.get("subscriber_counts", {})
    return [
        r["name"],
        r.get("subscribers", 0),
        r["window"]["sent"] / d,
        n / d,
        100 * cpu / d,
        cpu / n * 1e6 if n else float("nan"),
        percentile(lat, 50) * 1e3,
        percentile(lat, 99) * 1e3,
        r.get("delivered", 0) / d if "delivered" in r else "",
        100 * r.get("subscriber_cpu", 0.0) / d if r.get("subscribers") else "",
        (counts.get("undecryptable", 0) + counts.get("foreign_device", 0)) if counts else "",
        " / ".join(f"{100 * c / d:.0f}" for c in r["generator_cpu"]),
        100 * r["other_cpu"] / d,
    ]


COST_HEADERS = [
    "run",
    "links",
    "offered reports/s",
    "reports/s",
    "server CPU %",
    "server CPU µs / report",
    "p50 ms",
    "p99 ms",
    "events delivered to links /s",
    "subscriber process CPU %",
    "undecryptable or foreign",
    "generator CPU % per process",
    "other load CPU %",
]


def stall_row(r: dict[str, Any]) -> list[Any]:
    if "failed" in r:
        return [r["name"], "FAILED: " + r["failed"][:80]] + [""] * 8
    d = r["spec"]["duration"]
    n = r["window"]["acked"]
    lat = r["latencies"]
    st = r.get("mqtt_stats", {})
    stalled = r["links"] == "stalled"
    dropped_after = r.get("stall_dropped_after")
    return [
        r["name"],
        n / d,
        percentile(lat, 50) * 1e3,
        percentile(lat, 99) * 1e3,
        percentile(lat, 99.9) * 1e3,
        r["server_cpu"] / n * 1e6 if n else float("nan"),
        (r.get("stall_alive_in_window", "") if stalled else ""),
        (("not dropped" if dropped_after is None else f"after {dropped_after:.0f} s") if stalled else ""),
        st.get("publish.out_dropped_queue_full", 0),
        100 * r["other_cpu"] / d,
    ]


STALL_HEADERS = [
    "run",
    "reports/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "server CPU µs / report",
    "stalled link connected in window",
    "server dropped the stalled link",
    "link messages dropped (queue full)",
    "other load CPU %",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--meters", type=int, default=10)
    ap.add_argument("--users", type=int, default=100, help="open hub users, one link each")
    ap.add_argument("--interval", type=float, default=10.0, help="steady load (s per tick)")
    ap.add_argument("--flat-interval", type=float, default=2.0, help="flat out (s per tick)")
    ap.add_argument("--flat-pending", type=int, default=16, help="flat out: SDK response window per gateway")
    ap.add_argument("--no-flat", action="store_true")
    ap.add_argument("--stall-interval", type=float, default=20.0, help="moderate load for the stall runs")
    ap.add_argument("--processes", type=int, default=3, help="simulator processes")
    ap.add_argument("--warmup", type=float, default=5.0, help="at least; always >= interval + 2 s")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--max-wait", type=float, default=600.0, help="wait this long for other benchmarks")
    ap.add_argument("--skip", default="", help="comma-separated: cost, stall")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.gateways, args.meters, args.users = 4, 5, 4
        args.interval, args.flat_interval, args.stall_interval = 0.5, 0.2, 0.5
        args.processes, args.warmup, args.duration, args.start_timeout = 2, 1.0, 2.0, 30.0
    signal.signal(signal.SIGTERM, fleet._terminate)  # so that the servers are stopped on the way out
    common.raise_nofile()
    info = common.machine_info()
    skip = {s for s in args.skip.split(",") if s}
    cost: list[dict[str, Any]] = []
    stall: list[dict[str, Any]] = []
    if "cost" not in skip:
        plan = [
            (f"steady @ {args.interval:g} s, 0 links", args.interval, "none", None),
            (f"steady @ {args.interval:g} s, {args.users} links", args.interval, "users", None),
        ]
        if not args.no_flat:
            plan += [
                (
                    f"flat out @ {args.flat_interval:g} s, 0 links",
                    args.flat_interval,
                    "none",
                    args.flat_pending,
                ),
                (
                    f"flat out @ {args.flat_interval:g} s, {args.users} links",
                    args.flat_interval,
                    "users",
                    args.flat_pending,
                ),
            ]
        for name, interval, links, pending in plan:
            print(f"== {name}", file=sys.stderr)
            r = run_one(name, args, interval=interval, links=links, max_pending=pending)
            cost.append(r)
            _say(r)
    if "stall" not in skip:
        plan2 = [
            (f"@ {args.stall_interval:g} s, no link", "none"),
            (f"@ {args.stall_interval:g} s, one reading link bound to every meter", "reader"),
            (f"@ {args.stall_interval:g} s, one STALLED link bound to every meter", "stalled"),
        ]
        for name, links in plan2:
            print(f"== {name}", file=sys.stderr)
            r = run_one(name, args, interval=args.stall_interval, links=links)
            stall.append(r)
            _say(r)
    print(
        f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; {info['date']}\n"
    )
    print(
        f"{args.gateways} gateways x {args.meters} meters, {args.processes} simulator processes, "
        f"{args.duration:g} s window"
    )
    problems: list[str] = []
    if cost:
        print()
        print(table(COST_HEADERS, [cost_row(r) for r in cost]))
    if stall:
        print()
        print(table(STALL_HEADERS, [stall_row(r) for r in stall]))
    for r in cost + stall:
        if "failed" in r:
            problems.append(f"{r['name']}: {r['failed']}")
            continue
        if not r["window"]["acked"]:
            problems.append(f"{r['name']}: no report answered in the window")
        if r["summary_errors"]:
            problems.append(f"{r['name']}: non-zero answers or timeouts {r['summary_errors']}")
        counts = r.get("subscriber_counts") or {}
        if r["links"] in ("users", "reader"):
            if not counts.get("protocol4"):
                problems.append(f"{r['name']}: the links received no report event")
            bad = counts.get("undecryptable", 0) + counts.get("foreign_device", 0)
            if bad:
                problems.append(f"{r['name']}: {bad} link messages undecryptable or for a foreign meter")
        if r["rows"] is not None and r["rows"] < r["summary"]["acked"]:
            problems.append(
                f"{r['name']}: {r['rows']} rows < {r['summary']['acked']} reports answered code 0"
            )
    if args.json:
        for r in cost + stall:
            lat = r.pop("latencies", [])
            r["latency_ms"] = {q: percentile(lat, q) * 1e3 for q in (50, 90, 99, 99.9)} if lat else {}
        print(
            "\nJSON: "
            + str(
                common.write_json(
                    "fanout", {"machine": info, "args": vars(args), "cost": cost, "stall": stall}
                )
            )
        )
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def _say(r: dict[str, Any]) -> None:
    if "failed" in r:
        print(f"  FAILED: {r['failed']}", file=sys.stderr)
        return
    d = r["spec"]["duration"]
    n = r["window"]["acked"]
    lat = r["latencies"]
    extra = ""
    if "delivered" in r:
        extra += f", delivered to links {r['delivered'] / d:,.0f}/s"
        extra += f", subscriber counts {r.get('subscriber_counts')}"
    if r["links"] == "stalled":
        extra += f", stalled link dropped after {r.get('stall_dropped_after')}, mqtt {r.get('mqtt_stats')}"
    print(
        f"  {n / d:,.0f} reports/s, {r['server_cpu'] / max(1, n) * 1e6:.0f} µs/report, "
        f"p50 {percentile(lat, 50) * 1e3:.1f} ms p99 {percentile(lat, 99) * 1e3:.1f} ms, "
        f"other {100 * r['other_cpu'] / d:.0f}%{extra}",
        file=sys.stderr,
    )
    if r.get("series"):
        worst = sorted(r["series"], key=lambda x: -x[2])[:5]
        print(f"  worst seconds (t, responses, p99 ms, max ms): {worst}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
