"""The shipped deploy/haproxy/haproxy.cfg, unmodified, started in front of two real `meterhub serve`
nodes (ports given through its environment variables): a gateway connects through it, a command
goes through its API frontend, a node that is not ready gets no gateways, and a killed node's gateway
reconnects through it to the survivor. Also: its MQTT backend sends a PROXY protocol v2 header."""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Client, drop_postgres, free_port, fresh_postgres_url, wait_for
from meterhub.core.auth import gateway_password
from test_api import GatewaySim
from test_cluster import Cluster
from test_cluster_failures import Nats

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

pytestmark = pytest.mark.skipif(
    not Path(HAPROXY).exists(), reason="haproxy is not installed (scripts/system-deps.sh installs it)"
)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Cluster]:
    """Nodes on a fresh PostgreSQL database and a nats-server of the test's own."""
    bus = Nats()
    bus.start()
    url = fresh_postgres_url()
    c = Cluster(tmp_path, url, bus.url)
    try:
        yield c
    finally:
        c.close()
        drop_postgres(url)
        bus.stop()


class Balancer:
    """HAProxy on the shipped configuration, every port a free loopback port."""

    def __init__(self, tmp: Path, nodes: list[tuple[int, int]], proxy_protocol: bool) -> None:
        self.mqtt_port, self.api_port, self.stats_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "MH_BIND": "127.0.0.1",
            "MH_MQTT_PORT": str(self.mqtt_port),
            "MH_API_PORT": str(self.api_port),
            "MH_STATS_PORT": str(self.stats_port),
            "MH_PROXY_PROTOCOL": "true" if proxy_protocol else "false",
            "MH_MAXCONN": "2000",
        }
        for i in range(3):
            # unused servers point at a closed loopback port: marked down by their health check
            mqtt, http = nodes[i] if i < len(nodes) else (free_port(), free_port())
            env[f"MH_NODE{i + 1}_HOST"] = "127.0.0.1"
            env[f"MH_NODE{i + 1}_MQTT"] = str(mqtt)
            env[f"MH_NODE{i + 1}_HTTP"] = str(http)
        self.log = tmp / "haproxy.log"
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(CONFIG)],
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def states(self, backend: str) -> dict[str, str]:
        """Server -> status (UP, DOWN, ...) from the stats page's CSV."""
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except httpx.HTTPError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            r["svname"]: r["status"].split()[0]
            for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextlib.contextmanager
def balancer(tmp: Path, nodes: list[tuple[int, int]], proxy_protocol: bool) -> Iterator[Balancer]:
    b = Balancer(tmp, nodes, proxy_protocol)
    try:
        yield b
    finally:
        b.close()


def _gateway(cluster: Cluster, port: int, gw: str) -> tuple[Client, GatewaySim]:
    c = Client(port, gw, cluster.vendor.username, gateway_password(gw, cluster.vendor.username))
    rc, _ = c.connect()
    assert rc == 0
    c.subscribe(f"gateway_id/{gw}/#", 1)
    return c, GatewaySim(c)


def test_shipped_haproxy_in_front_of_two_nodes(nodes: Cluster, tmp_path: Path) -> None:
    cluster = nodes
    a, b = cluster.start("ha-a"), cluster.start("ha-b")
    made: list[Client] = []
    with balancer(tmp_path, [(a.mqtt_port, a.http_port), (b.mqtt_port, b.http_port)], False) as lb:
        up = {"node1": "UP", "node2": "UP", "node3": "DOWN"}
        wait_for(lambda: lb.states("meterhub_mqtt") == up, timeout=20, interval=0.3)
        wait_for(lambda: lb.states("meterhub_api") == up, timeout=20, interval=0.3)
        try:
            gw, m = f"gw-{uuid.uuid4().hex[:6]}", f"m-{uuid.uuid4().hex[:6]}"
            c, sim = _gateway(cluster, lb.mqtt_port, gw)
            made.append(c)
            sim.sync(m)
            sim.report(m, "5", 2_301_234)  # answered 0 through the balancer
            row = cluster.gateway_row(gw)
            assert row.connected is True and row.owner_node in {"ha-a", "ha-b"}
            owner = a if row.owner_node == "ha-a" else b
            survivor = b if owner is a else a

            # A command through the balancer's API frontend, whichever node answers it.
            api = httpx.Client(
                base_url=f"http://127.0.0.1:{lb.api_port}",
                headers={"Authorization": f"Bearer {cluster.token}"},
                timeout=20,
            )
            with api:
                r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": True})
                assert r.status_code == 200 and r.json()["status"] == "ok", r.text

            # The owner dies: HAProxy marks it down; paho reconnects by itself through the balancer,
            # lands on the survivor, which claims the gateway (generation 2).
            owner.proc.send_signal(signal.SIGKILL)
            owner.proc.wait(10)
            down = "node1" if owner is a else "node2"
            wait_for(lambda: lb.states("meterhub_mqtt").get(down) == "DOWN", timeout=20, interval=0.3)
            wait_for(lambda: cluster.gateway_row(gw).owner_node == survivor.name, timeout=30, interval=0.2)
            c.subscribe(f"gateway_id/{gw}/#", 1)  # a clean session: subscribe again
            sim.report(m, "5", 2_301_300)
            row = cluster.gateway_row(gw)
            assert row.connected is True and row.session_gen == 2
        finally:
            for cl in made:
                with contextlib.suppress(Exception):
                    cl.close()


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ready" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_shipped_haproxy_sends_proxy_protocol_v2_to_the_nodes(tmp_path: Path) -> None:
    """With the default MH_PROXY_PROTOCOL=true, what a node's MQTT port receives first is a PROXY v2
    header (a plain listener stands in for a node that has METERHUB_PROXY_PROTOCOL=true)."""
    ready = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=ready.serve_forever, daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    try:
        node = (listener.getsockname()[1], ready.server_address[1])
        with balancer(tmp_path, [node], True) as lb:
            wait_for(lambda: lb.states("meterhub_mqtt").get("node1") == "UP", timeout=20, interval=0.3)
            client = socket.create_connection(("127.0.0.1", lb.mqtt_port), timeout=5)
            client.sendall(b"\x10\x00")  # anything: HAProxy connects to the server on the first bytes
            conn, _ = listener.accept()
            with conn, client:
                conn.settimeout(5)
                head = b""
                while len(head) < 16:
                    head += conn.recv(16 - len(head))
                assert head[:12] == PROXY_V2_SIGNATURE
                assert head[12] == 0x21  # version 2, PROXY command
                assert head[13] == 0x11  # TCP over IPv4
    finally:
        listener.close()
        ready.shutdown()
