"""Readiness (``GET /ready``) and what a node does when a part of the cluster fails: the test's own
nats-server is stopped under two real nodes and started again on the same port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import NATS_SERVER, Client, RunningHub, drop_postgres, free_port, fresh_postgres_url, wait_for
from test_cluster import Cluster


class Nats:
    """A nats-server of the test's own, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "nats-server exited"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            return False

        wait_for(listening, timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats() -> Iterator[Nats]:
    n = Nats()
    n.start()
    yield n
    n.stop()


@pytest.fixture
def cluster(tmp_path: Path, nats: Nats) -> Iterator[Cluster]:
    url = fresh_postgres_url()
    c = Cluster(tmp_path, url, nats.url)
    try:
        yield c
    finally:
        c.close()
        drop_postgres(url)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        with contextlib.suppress(Exception):
            c.close()


def _ready(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/ready", timeout=2)
    return r.status_code, r.json()


def test_ready_on_an_embedded_hub(hub_factory: Callable[..., RunningHub]) -> None:
    hub = hub_factory()
    code, body = _ready(f"http://127.0.0.1:{hub.hub.http_port}")
    assert code == 200, body
    assert body["ready"] is True and body["registered"] is True and body["bus_connected"] is True
    assert body["accepting"] is True and body["draining"] is False
    assert body["node_id"] == hub.hub.cluster.node_id
    assert 0 <= body["heartbeat_age"] < hub.settings.node_timeout


def test_ready_says_503_when_the_mqtt_listener_stops(hub_factory: Callable[..., RunningHub]) -> None:
    hub = hub_factory()
    assert hub.hub.mqtt is not None
    hub.call(hub.hub.mqtt.close())  # what a stopping (draining) node does first
    code, body = _ready(f"http://127.0.0.1:{hub.hub.http_port}")
    assert code == 503 and body["ready"] is False and body["accepting"] is False


def test_nats_restart_makes_nodes_unready_then_commands_work_again(
    cluster: Cluster, nats: Nats, clients: list[Client]
) -> None:
    a, b = cluster.start("fa"), cluster.start("fb")
    for node in (a, b):
        code, body = _ready(node.base)
        assert code == 200 and body["node_id"] == node.name and body["bus_connected"] is True
    gw, m = f"gw-{uuid.uuid4().hex[:6]}", f"m-{uuid.uuid4().hex[:6]}"
    sim = cluster.gateway(a, gw, clients)
    sim.sync(m)
    sim.report(m, "5", 2_301_234)
    with cluster.api(b) as api:
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": True, "timeout": 5})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text

        nats.stop()
        wait_for(lambda: _ready(a.base)[0] == 503 and _ready(b.base)[0] == 503, timeout=10, interval=0.1)
        code, body = _ready(b.base)
        assert body["bus_connected"] is False and body["registered"] is True  # PostgreSQL still fine
        live = httpx.get(f"{b.base}/live", timeout=2)
        assert live.status_code == 200 and live.json() == {"alive": True, "node_id": "fb"}
        # Meanwhile the gateway on a still reports through a (no bus needed for that).
        sim.report(m, "5", 2_301_300)

        nats.start()  # same port: nats-py reconnects by itself
        wait_for(lambda: _ready(a.base)[0] == 200 and _ready(b.base)[0] == 200, timeout=20, interval=0.2)
        # The routed command works again (the subscriptions came back with the connection).
        deadline = time.monotonic() + 15
        while True:
            r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": False, "timeout": 3})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
