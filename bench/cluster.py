"""Cluster benchmark: what the bus and PostgreSQL cost per report, 1-3 nodes behind the shipped
HAProxy configuration, re-homing after kill -9 and a reconnect storm.

Set-up: a fresh PostgreSQL database on the local server (``METERHUB_BENCH_PG``, default
``postgresql+psycopg://postgres@127.0.0.1:5432``), a nats-server of its own on a free port, HAProxy
on ``deploy/haproxy/haproxy.cfg`` unmodified (ports through its environment variables;
``MH_PROXY_PROTOCOL=false`` until the nodes speak PROXY protocol), nodes = ``meterhub serve`` with
``--bus-url``. Load = bench/pipeline.py's gateway driver (bench/loadgen.py), open loop at a fixed
rate: QoS 1 reports, each done when its ``properties/report/response`` (code 0) arrives.

Phases:

1. ``embedded``: one ``meterhub serve`` on SQLite, no bus (the default), gateways straight to it.
2. ``cluster-1-direct``: one cluster node (PostgreSQL + NATS), gateways straight to it.
3. ``haproxy-N`` for N = 1, 2, 3: N nodes behind HAProxy, the same load.

CPU per report = CPU time of the meterhub processes in the measurement window / reports answered in
it (HAProxy's CPU is given separately). Then:

* ``rehome``: ``--rehome-gateways`` gateways connect through HAProxy to 3 nodes; the node holding the
  most is killed with SIGKILL; time until every one of its gateways is connected and owned by a
  survivor (gateways reconnect at once after a random 0-1 s delay). (Its devices are marked offline
  by the dead-node sweep ``node_timeout`` + at most one heartbeat later: tests/test_cluster.py.)
* ``storm`` (not in ``--smoke``): ``--storm-gateways`` gateways connect straight to one node, which
  is killed; time until all of them are re-homed through HAProxy on the 2 others.

    .venv/bin/python bench/cluster.py            # ~3 minutes
    .venv/bin/python bench/cluster.py --smoke    # ~30 s: small numbers, 2 nodes, no storm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

import common
import loadgen
from common import Server, percentile
from meterhub.core.auth import gateway_password
from pipeline import GatewayDriver, start_pipeline_server

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
PG = os.environ.get("METERHUB_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLI = str(common.VENV_BIN / "meterhub")
HOST = "127.0.0.1"
NODE_TIMEOUT = 5.0
HEARTBEAT = 1.0


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


class Rig:
    """PostgreSQL database, nats-server, nodes and HAProxy of one benchmark run."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="meterhub-bench-cluster-"))
        self.db_name = f"meterhub_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        self.db_url = f"{PG}/{self.db_name}"
        self.engine = create_engine(self.db_url)
        self.nats_port = common.free_port()
        self.nats = subprocess.Popen(
            [NATS, "-a", HOST, "-p", str(self.nats_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        common.wait_port(self.nats_port, self.nats)
        self.env = common.meterhub_env()
        self.env.update(
            METERHUB_DATABASE_URL=self.db_url,
            METERHUB_NODE_TIMEOUT=str(NODE_TIMEOUT),
            METERHUB_HEARTBEAT_INTERVAL=str(HEARTBEAT),
            METERHUB_PRESENCE_TIMEOUT="600",
        )
        data = str(self.workdir / "cli")

        def run(*a: str) -> str:
            cmd = [CLI, *a, "--data-dir", data]
            return subprocess.run(cmd, check=True, capture_output=True, text=True, env=self.env).stdout

        self.username = run("vendor", "add", "bench").strip()
        run("product", "add", "bench-meter", "--model", "smart-meter")
        self.token = json.loads(run("token", "create", "bench", "--scope", "read", "--json"))["token"]
        self.nodes: dict[str, tuple[subprocess.Popen[Any], int, int]] = {}
        self.haproxy: subprocess.Popen[Any] | None = None
        self.lb_port = 0
        self.maxconn = 8000  # HAProxy's (MH_MAXCONN): raised for a storm of more gateways

    def start_node(self, name: str) -> tuple[subprocess.Popen[Any], int, int]:
        mqtt, http = common.free_port(), common.free_port()
        cmd = [CLI, "serve", "--data-dir", str(self.workdir / name), "--mqtt-port", str(mqtt)]
        cmd += ["--http-port", str(http), "--bus-url", f"nats://{HOST}:{self.nats_port}", "--node-id", name]
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.nodes[name] = (proc, mqtt, http)  # before waiting: close() stops it whatever happens
        wait_http(f"http://{HOST}:{http}/ready", proc)
        return self.nodes[name]

    def start_haproxy(self) -> None:
        """The shipped configuration, in front of the running nodes (node1..3 in start order)."""
        self.stop_haproxy()
        self.lb_port = common.free_port()
        env = dict(os.environ, MH_BIND=HOST, MH_MQTT_PORT=str(self.lb_port), MH_MAXCONN=str(self.maxconn))
        env.update(MH_API_PORT=str(common.free_port()), MH_STATS_PORT=str(common.free_port()))
        env["MH_PROXY_PROTOCOL"] = "false"
        live = list(self.nodes.values())
        for i in range(3):
            _, mqtt, http = live[i] if i < len(live) else (None, common.free_port(), common.free_port())
            env.update({f"MH_NODE{i + 1}_HOST": HOST, f"MH_NODE{i + 1}_MQTT": str(mqtt)})
            env[f"MH_NODE{i + 1}_HTTP"] = str(http)
        log = (self.workdir / "haproxy.log").open("wb")
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log)
        common.wait_port(self.lb_port, self.haproxy)
        time.sleep(2.5)  # first health checks (inter 2s, every server starts as up after one)

    def stop_haproxy(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
        self.haproxy = None

    def stop_nodes(self) -> None:
        for proc, _, _ in self.nodes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in self.nodes.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.nodes.clear()

    def owners(self, gateways: list[str]) -> dict[str, int]:
        """Connected gateways of ``gateways`` per owner node."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT owner_node, count(*) FROM gateways WHERE connected AND gateway_id = ANY(:g)"
                    " GROUP BY owner_node"
                ),
                {"g": gateways},
            ).all()
        return {r[0]: r[1] for r in rows}

    def close(self) -> None:
        self.stop_haproxy()
        self.stop_nodes()
        self.nats.terminate()
        self.nats.wait(10)
        self.engine.dispose()
        admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- load phases -----------------------------------------------------------------------------------


def load_phase(
    name: str, server: Server, args: argparse.Namespace, prefix: str, extra_pids: list[int] | None = None
) -> dict[str, Any]:
    from transport import run_phase

    spec = loadgen.FleetSpec(
        port=server.port,
        connections=args.gateways,
        processes=1,
        driver=GatewayDriver,
        params={"meters": args.meters, "mode": "rate", "rate": args.rate},
        username=server.username,
        md5_password=True,
        prefix=prefix,
        warmup=args.warmup,
        duration=args.duration,
    )
    lb0 = sum(common.cpu_seconds(p) for p in extra_pids or [])
    res = run_phase(server, spec, result_timeout=90)
    lb1 = sum(common.cpu_seconds(p) for p in extra_pids or [])
    lat = sorted(res["latencies"])
    done = res["done"] or 1
    row = {
        "phase": name,
        "reports_per_s": res["done"] / args.duration,
        "cpu_us_per_report": res["server_cpu"] / done * 1e6,
        "haproxy_us_per_report": (lb1 - lb0) / done * 1e6 if extra_pids else None,
        "p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "bad": res["bad"],
        "other_cpu_s": res["other_cpu"],
    }
    print(f"  {name}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})}")
    return row


def embedded_phase(args: argparse.Namespace) -> dict[str, Any]:
    server = start_pipeline_server()
    try:
        return load_phase("embedded (SQLite, no bus)", server, args, "emb")
    finally:
        server.stop()


def cluster_phases(rig: Rig, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    proc, mqtt, http = rig.start_node("n1")
    direct = Server("n1", mqtt, [proc], rig.username, None, None, [], http, rig.token)
    rows.append(load_phase("1 cluster node, direct (PostgreSQL + NATS)", direct, args, "c1d"))
    for n in range(1, args.nodes + 1):
        while len(rig.nodes) < n:
            rig.start_node(f"n{len(rig.nodes) + 1}")
        rig.start_haproxy()
        assert rig.haproxy is not None
        procs = [p for p, _, _ in rig.nodes.values()]
        first = next(iter(rig.nodes.values()))
        lb = Server(f"haproxy-{n}", rig.lb_port, procs, rig.username, None, None, [], first[2], rig.token)
        rows.append(load_phase(f"{n} node(s) behind HAProxy", lb, args, f"lb{n}", [rig.haproxy.pid]))
    return rows


# --- re-homing -------------------------------------------------------------------------------------


def _connect_frame(client_id: str, username: str) -> bytes:
    def s(t: str) -> bytes:
        b = t.encode()
        return len(b).to_bytes(2, "big") + b

    var = s("MQTT") + bytes([4, 0xC2]) + (600).to_bytes(2, "big")  # user+password, clean, keepalive
    body = var + s(client_id) + s(username) + s(gateway_password(client_id, username))
    n, length = len(body), b""
    while True:
        n, digit = divmod(n, 128)
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    return b"\x10" + length + body


class Gateway:
    """A gateway that stays connected and reconnects (after 0-1 s) whenever its connection drops."""

    def __init__(self, gw: str, username: str, port: int) -> None:
        self.gw, self.frame, self.port = gw, _connect_frame(gw, username), port
        self.ports: list[int] = []  # when set: each reconnect to one of these, at random
        self.connected = asyncio.Event()
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            writer = None
            try:
                port = random.choice(self.ports) if self.ports else self.port
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(self.frame)
                ack = await asyncio.wait_for(reader.readexactly(4), 30)
                if ack[3] == 0:
                    self.connected.set()
                    await reader.read()  # until the connection drops
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                self.connected.clear()
                if writer is not None:
                    writer.close()
            if not self.stopping:
                await asyncio.sleep(random.random())


async def _rehome(
    rig: Rig, gateways: int, first_port: int, lb_port: int | list[int], victim: str | None
) -> dict[str, Any]:
    """``lb_port``: where gateways reconnect (HAProxy's port, or the surviving nodes' ports)."""
    ids = [f"rh-{uuid.uuid4().hex[:8]}" for _ in range(gateways)]
    gws = [Gateway(g, rig.username, first_port) for g in ids]
    tasks = []
    sem = asyncio.Semaphore(64)

    async def start(g: Gateway) -> None:
        async with sem:
            tasks.append(asyncio.ensure_future(g.run()))
            await asyncio.wait_for(g.connected.wait(), 60)

    t_start = time.monotonic()
    await asyncio.gather(*(start(g) for g in gws))
    t_connected = time.monotonic() - t_start
    for g in gws:
        if isinstance(lb_port, list):
            g.ports = lb_port  # straight to the survivors
        else:
            g.port = lb_port  # every reconnect goes through the balancer
    deadline = time.monotonic() + 30
    while True:
        owners = rig.owners(ids)
        if sum(v for k, v in owners.items() if k is not None) == gateways or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    victim = victim or max(owners, key=lambda k: owners[k])
    moved = owners.get(victim, 0)
    print(f"  connected {gateways} gateways, per node {owners}; killing {victim} ({moved} gateways)")
    proc = rig.nodes[victim][0]
    t_kill = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rehomed_at = None
    while time.monotonic() - t_kill < 120:
        owners = await asyncio.to_thread(rig.owners, ids)
        now = time.monotonic()
        held = sum(v for k, v in owners.items() if k is not None)  # freed by the sweep (NULL): not yet
        if rehomed_at is None and owners.get(victim, 0) == 0 and held == gateways:
            rehomed_at = now - t_kill
        if rehomed_at is not None:
            break
        await asyncio.sleep(0.05)
    for g in gws:
        g.stopping = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    del rig.nodes[victim]
    return {
        "gateways": gateways,
        "moved": moved,
        "rehomed_s": rehomed_at,
        "claims_per_s": round(moved / rehomed_at) if rehomed_at else None,
        "first_connect_s": round(t_connected, 1),
        "per_node_after": owners,
    }


def rehome_phase(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    while len(rig.nodes) < args.nodes:
        rig.start_node(f"n{len(rig.nodes) + 1}")
    rig.start_haproxy()
    res = asyncio.run(_rehome(rig, args.rehome_gateways, rig.lb_port, rig.lb_port, None))
    print(f"  rehome: {res}")
    return res


def storm_phase(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    rig.maxconn = max(rig.maxconn, args.storm_gateways + 500)  # 2 descriptors per connection
    rig.stop_haproxy()
    rig.stop_nodes()
    for i in (1, 2, 3):
        rig.start_node(f"s{i}")
    _, mqtt, _ = rig.nodes["s1"]
    if args.storm_direct:  # no balancer: HAProxy needs 2 descriptors per connection
        survivors: int | list[int] = [rig.nodes[n][1] for n in ("s2", "s3")]
    else:
        rig.start_haproxy()
        survivors = rig.lb_port
    res = asyncio.run(_rehome(rig, args.storm_gateways, mqtt, survivors, "s1"))
    print(f"  storm: {res}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small numbers, a few seconds per part")
    ap.add_argument("--gateways", type=int, default=20)
    ap.add_argument("--meters", type=int, default=10)
    ap.add_argument("--rate", type=float, default=400.0, help="reports per second, all gateways")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rehome-gateways", type=int, default=300)
    ap.add_argument("--storm-gateways", type=int, default=2000)
    ap.add_argument("--nodes", type=int, default=3, choices=(2, 3), help="most nodes behind HAProxy")
    ap.add_argument("--storm-only", action="store_true", help="only the storm phase (no load, no rehome)")
    ap.add_argument(
        "--storm-direct", action="store_true", help="storm: reconnect to the survivors, not via HAProxy"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.gateways, args.meters, args.rate, args.warmup, args.duration = 4, 2, 50.0, 0.5, 1.5
        args.rehome_gateways, args.storm_gateways, args.nodes = 20, 0, 2
    nofile = common.raise_nofile()
    print(f"cluster bench: {vars(args)}, open files limit {nofile}")
    if args.storm_only:
        rig = Rig()
        try:
            storm = storm_phase(rig, args)
        finally:
            rig.close()
        print(f"\nstorm: {storm}")
        return 0 if storm["rehomed_s"] is not None else 1
    rows = [embedded_phase(args)]
    rig = Rig()
    try:
        rows += cluster_phases(rig, args)
        rehome = rehome_phase(rig, args)
        storm = storm_phase(rig, args) if args.storm_gateways else {"rehomed_s": 0, "skipped": True}
    finally:
        rig.close()
    print()
    print(
        common.table(
            ["phase", "reports/s", "CPU µs/report (nodes)", "HAProxy µs/report", "p50 ms", "p99 ms", "bad"],
            [
                [
                    r["phase"],
                    r["reports_per_s"],
                    r["cpu_us_per_report"],
                    r["haproxy_us_per_report"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["bad"],
                ]
                for r in rows
            ],
        )
    )
    print(f"\nrehome after kill -9: {rehome}\nstorm: {storm}")
    failed = [r for r in rows if r["bad"] or not r["reports_per_s"]]
    if failed or rehome["rehomed_s"] is None or storm["rehomed_s"] is None:
        print("FAILED: a phase had refused reports, no reports, or gateways that were not re-homed")
        return 1
    if not args.smoke:
        common.write_json("cluster", {"args": vars(args), "rows": rows, "rehome": rehome, "storm": storm})
    return 0


if __name__ == "__main__":
    sys.exit(main())
