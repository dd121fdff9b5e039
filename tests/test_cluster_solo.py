"""The embedded default is a cluster of one: same behaviour as one process, and the cluster settings'
mistakes are refused with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from conftest import RunningHub, wait_for
from meterhub.storage import schema
from test_api import Api, GatewaySim


def test_a_single_node_is_a_cluster_of_one(hub_factory: Any, clients: Any, tmp_path: Path) -> None:
    hub: RunningHub = hub_factory("protocol", http_port=0, node_id="solo-1")
    api = Api(hub, clients)
    sim: GatewaySim = api.gateway("gw-solo")
    sim.sync("m1")
    sim.report("m1", "5", 2_301_234)
    status = api.read.get("/api/v1/cluster").json()
    assert (status["node_id"], status["bus"], status["held"]) == ("solo-1", "local", 1)
    assert [(n["node_id"], n["state"], n["gateways"], n["self"]) for n in status["nodes"]] == [
        ("solo-1", "alive", 1, True)
    ]
    assert api.anon.get("/api/v1/cluster").status_code == 401
    with hub.engine.connect() as conn:
        row = conn.execute(select(schema.gateways).where(schema.gateways.c.gateway_id == "gw-solo")).one()
    assert (row.owner_node, row.session_gen, row.connected) == ("solo-1", 1, True)
    sim.client.close()
    wait_for(lambda: api.read.get("/api/v1/cluster").json()["held"] == 0)
    assert api.read.get("/api/v1/cluster").json()["nodes"][0]["gateways"] == 0
    api.close()


def test_restart_of_the_single_node_resets_every_device(hub_factory: Any, clients: Any) -> None:
    first: RunningHub = hub_factory("protocol", http_port=0)
    api = Api(first, clients)
    sim = api.gateway("gw-r")
    sim.sync("m1")
    sim.report("m1", "5", 2_301_234)
    url = first.hub.settings.resolved_database_url
    first.hub.mqtt.accepting = False
    first.hub.lock.release()  # as the OS does when a process dies (an embedded database admits one server)
    # A new process on the same database, under another node id (the old one never said goodbye):
    # on the in-process bus there is no other node, so every device left online is reset.
    second: RunningHub = hub_factory("protocol", http_port=0, database_url=url, node_id="x")
    with second.engine.connect() as conn:
        p = schema.presence
        rows = conn.execute(select(p.c.online, p.c.cause).where(p.c.cid == "m1").order_by(p.c.id)).all()
    assert [(bool(r.online), r.cause) for r in rows] == [(True, "report"), (False, "server-restart")]
    api.close()


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterhub", "serve", "--data-dir", str(tmp_path), "--mqtt-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )


def test_cluster_settings_mistakes_are_refused(tmp_path: Path) -> None:
    r = _serve(tmp_path, "--bus-url", "nats://127.0.0.1:4222")
    assert r.returncode != 0
    assert "bus_url (cluster mode) needs a PostgreSQL database_url" in r.stderr
    r = _serve(tmp_path, METERHUB_HEARTBEAT_INTERVAL="20")
    assert r.returncode != 0
    assert "heartbeat_interval (20s) must be below node_timeout (15s)" in r.stderr
