"""Cluster mode with real processes: 2-3 `meterhub serve` nodes on one fresh PostgreSQL database and a
NATS server of the test's own, gateways connecting straight to a node's MQTT port.

What the issue found with unmodified nodes, each checked here: a late node marked every device offline
(``server-restart``); a command through the other node's API got 409; the same client id connected to
two nodes at once with no takeover; a dead node's devices stayed online.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, update

from conftest import Client, drop_postgres, free_port, fresh_postgres_url, wait_for
from meterhub.api.security import create_token
from meterhub.core.auth import gateway_password
from meterhub.openhub import crypto
from meterhub.openhub import store as oh_store
from meterhub.openhub.client import OpenHubClient, decode_message
from meterhub.storage import registry, schema
from meterhub.storage.database import migrate
from mqttraw import RawClient, connect, puback, publish, subscribe
from test_api import GatewaySim

NODE_TIMEOUT = 3.0


class Node:
    """One `meterhub serve` subprocess."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], mqtt_port: int, http_port: int) -> None:
        self.name = name
        self.proc = proc
        self.mqtt_port = mqtt_port
        self.http_port = http_port
        self.base = f"http://127.0.0.1:{http_port}"
        self.log: Path | None = None


class Cluster:
    def __init__(self, tmp: Path, db_url: str, bus_url: str) -> None:
        self.tmp = tmp
        self.db_url = db_url
        self.bus_url = bus_url
        self.engine = create_engine(db_url)
        migrate(self.engine)
        self.vendor = registry.add_vendor(self.engine, "acme")
        self.token, _ = create_token(self.engine, "ops", "admin")
        self.nodes: list[Node] = []

    def start(self, name: str) -> Node:
        mqtt_port, http_port = free_port(), free_port()
        log = self.tmp / f"{name}.log"  # a file, not a pipe nobody reads (a full pipe blocks the node)
        env = {
            **os.environ,
            "METERHUB_DATABASE_URL": self.db_url,
            "METERHUB_NODE_TIMEOUT": str(NODE_TIMEOUT),
            "METERHUB_HEARTBEAT_INTERVAL": "0.5",
            "METERHUB_MQTT_HOST": "127.0.0.1",
            "METERHUB_PRESENCE_TIMEOUT": "600",
            "METERHUB_ALARM_RAISE_AFTER": "0",  # alarms at once: these tests are about ids and takeover
            "METERHUB_ALARM_CLEAR_AFTER": "0",
            "METERHUB_CONFORMANCE_FLUSH_INTERVAL": "0.5",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterhub",
                "serve",
                "--data-dir",
                str(self.tmp / name),
                "--mqtt-port",
                str(mqtt_port),
                "--http-port",
                str(http_port),
                "--bus-url",
                self.bus_url,
                "--node-id",
                name,
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        node = Node(name, proc, mqtt_port, http_port)
        node.log = log
        self.nodes.append(node)

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{node.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, interval=0.1)
        return node

    def api(self, node: Node, timeout: float = 20) -> httpx.Client:
        return httpx.Client(
            base_url=node.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout
        )

    def gateway(self, node: Node, gw: str, clients: list[Client]) -> GatewaySim:
        c = Client(node.mqtt_port, gw, self.vendor.username, gateway_password(gw, self.vendor.username))
        clients.append(c)
        rc, _ = c.connect()
        assert rc == 0
        c.subscribe(f"gateway_id/{gw}/#", 1)
        return GatewaySim(c)

    def device(self, cid: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(schema.devices).where(schema.devices.c.cid == cid)).first()

    def gateway_row(self, gw: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(schema.gateways).where(schema.gateways.c.gateway_id == gw)).one()

    def presence(self, cid: str) -> list[tuple[bool, str]]:
        p = schema.presence
        with self.engine.connect() as conn:
            rows = conn.execute(select(p.c.online, p.c.cause).where(p.c.cid == cid).order_by(p.c.id)).all()
        return [(bool(r.online), r.cause) for r in rows]

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        self.engine.dispose()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> Iterator[Cluster]:
    url = fresh_postgres_url()
    c = Cluster(tmp_path_factory.mktemp("cluster"), url, nats_url)
    try:
        yield c
    finally:
        c.close()
        drop_postgres(url)


@pytest.fixture(scope="module")
def two(cluster: Cluster) -> tuple[Node, Node]:
    """Nodes a and b, shared by the tests that do not kill a node."""
    return cluster.start("a"), cluster.start("b")


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        with contextlib.suppress(Exception):
            c.close()


def _next_publish(raw: RawClient) -> tuple[str, dict[str, Any]]:
    """The next PUBLISH the raw client receives (acknowledged), skipping other packets."""
    while True:
        first, body = raw.read_packet()
        if first & 0xF0 != 0x30:
            continue
        n = int.from_bytes(body[:2], "big")
        topic, rest = body[2 : 2 + n].decode(), body[2 + n :]
        if first & 0x06:
            raw.send(puback(int.from_bytes(rest[:2], "big")))
            rest = rest[2:]
        return topic, json.loads(rest)


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_late_node_leaves_presence_alone_and_serves_commands_for_the_other(
    cluster: Cluster, nats_url: str, clients: list[Client]
) -> None:
    a = cluster.start("late-a")
    gw, m = _uid("gw"), _uid("m")
    sim = cluster.gateway(a, gw, clients)
    sim.sync(m)
    sim.report(m, "5", 2_301_234)  # online (cause report)
    assert cluster.device(m).online is True
    b = cluster.start("late-b")  # the late node
    time.sleep(1.0)  # a few of b's heartbeats and sweeps
    assert cluster.device(m).online is True
    assert cluster.presence(m) == [(True, "report")]
    row = cluster.gateway_row(gw)
    assert (row.owner_node, row.session_gen, row.connected) == ("late-a", 1, True)

    with cluster.api(b) as api:
        status = api.get("/api/v1/cluster").json()
        assert status["node_id"] == "late-b" and status["bus"] == "nats"
        nodes = {n["node_id"]: n for n in status["nodes"]}
        assert nodes["late-a"]["state"] == "alive" and nodes["late-a"]["gateways"] == 1
        assert nodes["late-b"]["state"] == "alive" and nodes["late-b"]["self"] is True
        assert 0 <= nodes["late-a"]["heartbeat_age"] < NODE_TIMEOUT

        # A command through b's API reaches the gateway on a and comes back with a's answer.
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": True, "timeout": 5})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and r.json()["code"] == 0
        assert [c["cid"] for c in sim.commands] == [m]
        log = api.get(f"/api/v1/devices/{m}/commands").json()["items"]
        assert [(c["status"], c["code"]) for c in log] == [("ok", 0)]

        # wait: false answers 202 at once, as for a local device; the job is polled on this node.
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": False, "wait": False})
        assert r.status_code == 202, r.text
        poll = r.json()["poll"]
        wait_for(lambda: api.get(poll).json()["status"] == "ok", timeout=10)
        assert len(sim.commands) == 2

        # Same codes as a local command: a silent device times out (504), a bad value is refused (422).
        sim.command_code = None
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": False, "timeout": 1})
        assert r.status_code == 504, r.text
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": "nope"})
        assert r.status_code == 422, r.text

    out = subprocess.run(
        [sys.executable, "-m", "meterhub", "cluster", "status", "--url", b.base, "--token", cluster.token],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "this node: late-b (bus: nats" in out
    assert [line.split()[:2] for line in out.splitlines() if "late-a" in line] == [["late-a", "alive"]]

    # A node stopping touches only its own gateways: b goes, the meter on a stays online.
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(15) == 0
    assert cluster.device(m).online is True
    assert cluster.presence(m) == [(True, "report")]
    with cluster.api(a) as api:
        nodes = {n["node_id"]: n for n in api.get("/api/v1/cluster").json()["nodes"]}
    assert nodes["late-b"]["state"] == "stopped" and nodes["late-a"]["gateways"] == 1


def test_takeover_across_nodes(cluster: Cluster, two: tuple[Node, Node], clients: list[Client]) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    user = cluster.vendor.username
    # The old session: a raw client on node a with a will that would set the meter offline.
    will = (
        f"gateway_id/{gw}/devices/status",
        json.dumps({"t": 1, "request_id": "w", "param": [{"cid": m, "status": False}]}).encode(),
        1,
    )
    old = RawClient(a.mqtt_port)
    old.send(connect(gw, user, gateway_password(gw, user), will=will))
    assert old.read_packet() == (0x20, b"\x00\x00")
    old.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert old.read_packet()[0] == 0x90
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
    old.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
    assert _next_publish(old)[0] == f"gateway_id/{gw}/devices/sync/response"  # as a gateway waits
    status = {"t": int(time.time()), "request_id": "st", "param": [{"cid": m, "status": True}]}
    old.send(publish(f"gateway_id/{gw}/devices/status", json.dumps(status).encode(), 1, 3))
    wait_for(lambda: (row := cluster.device(m)) is not None and row.online, timeout=5)

    # A failed login with the same client id on node b leaves the live session alone.
    bad = RawClient(b.mqtt_port)
    bad.send(connect(gw, user, "wrong"))
    assert bad.read_packet() == (0x20, b"\x00\x04")
    bad.close()
    assert old.closed_within(0.5) is None

    # The real gateway again, on node b: the old connection on a is closed, without its will.
    new = Client(b.mqtt_port, gw, user, gateway_password(gw, user))
    clients.append(new)
    started = time.monotonic()
    rc, _ = new.connect()
    assert rc == 0
    closed = old.closed_within(3.0)
    assert closed is not None, "the old connection on node a was not closed"
    print(f"old connection closed {time.monotonic() - started:.3f}s after the new CONNECT")
    time.sleep(0.5)  # a will or an offline write would have landed by now
    assert cluster.device(m).online is True
    assert cluster.presence(m) == [(True, "status")]
    row = cluster.gateway_row(gw)
    assert (row.owner_node, row.session_gen, row.connected) == ("b", 2, True)
    with cluster.api(a) as api:  # node a closed the old session without publishing its will
        metrics = api.get("/metrics").text
    assert 'meterhub_mqtt_events_total{event="will.published"}' not in metrics
    assert 'meterhub_mqtt_events_total{event="connections.closed"}' in metrics
    assert 'meterhub_cluster_events_total{event="takeover.released"} 1.0' in metrics

    # Node b knows the device synced through a, and holds the gateway.
    new.subscribe(f"gateway_id/{gw}/#", 1)
    sim = GatewaySim(new)
    sim.report(m, "5", 2_300_000)
    # b took the stored presence over: the report is no new online transition.
    assert cluster.presence(m) == [(True, "status")]
    with cluster.api(b) as api:
        nodes = {n["node_id"]: n for n in api.get("/api/v1/cluster").json()["nodes"]}
        assert nodes["b"]["gateways"] >= 1
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": True, "timeout": 5})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    with cluster.api(a) as api:  # and through a, which no longer holds it
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": False, "timeout": 5})
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert len(sim.commands) == 2


def test_dashboard_streams_on_both_nodes_get_each_event_once(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    sim = cluster.gateway(a, gw, clients)
    sim.sync(m)
    time.sleep(0.5)  # b learns the device (remote sync refreshes its cache)
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {"a": [], "b": []}
    done = threading.Event()

    def listen(node: Node, events: list[tuple[str, dict[str, Any]]]) -> None:
        with (
            httpx.Client(base_url=node.base, timeout=10) as http,
            http.stream("GET", "/api/v1/stream", params={"cid": m, "token": cluster.token}) as s,
        ):
            kind = None
            for line in s.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind:
                    events.append((kind, json.loads(line[6:])))
                    if done.is_set() or len(events) >= 5:
                        return

    for node in (a, b):
        threading.Thread(target=listen, args=(node, seen[node.name]), daemon=True).start()
    wait_for(lambda: seen["a"] and seen["b"], timeout=10)
    sim.report(m, "5", 2_301_234)  # presence online + report, both produced on a
    wait_for(lambda: len(seen["a"]) >= 3 and len(seen["b"]) >= 3, timeout=5)
    time.sleep(0.5)  # a second copy of any event would have arrived
    done.set()
    for name, events in seen.items():  # the gateway's own node and the other one alike
        assert [k for k, _ in events] == ["hello", "presence", "report"], (name, events)
        assert events[1][1]["online"] is True and events[1][1]["cause"] == "report"
        report = events[2][1]
        assert (report["dp"], report["value"], report["scaled"]) == (5, 2_301_234, 230.1234)


def test_killed_node_devices_go_offline_node_lost_once(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    victim = cluster.start("victim")
    gw, m1, m2 = _uid("gw"), _uid("m"), _uid("m")
    sim = cluster.gateway(victim, gw, clients)
    for m in (m1, m2):
        sim.sync(m)
        sim.report(m, "5", 2_301_234)
    assert cluster.device(m1).online and cluster.device(m2).online
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(5)
    killed = time.monotonic()
    wait_for(lambda: not cluster.device(m1).online, timeout=NODE_TIMEOUT + 5, interval=0.1)
    print(f"offline {time.monotonic() - killed:.2f}s after kill -9 (node_timeout {NODE_TIMEOUT:g}s)")
    time.sleep(1.5)  # both survivors sweep every 0.5 s: a second sweep would add rows
    for m in (m1, m2):
        assert cluster.device(m).online is False
        assert cluster.presence(m) == [(True, "report"), (False, "node-lost")]
    row = cluster.gateway_row(gw)
    assert (row.owner_node, row.connected) == (None, False)
    with cluster.api(two[0]) as api:
        nodes = {n["node_id"]: n for n in api.get("/api/v1/cluster").json()["nodes"]}
    assert nodes["victim"]["state"] == "lost"
    assert nodes["a"]["state"] == nodes["b"]["state"] == "alive"


def test_open_hub_link_on_one_node_gets_events_from_the_other(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    sim = cluster.gateway(a, gw, clients)
    sim.sync(m)
    app = oh_store.create_app(cluster.engine, _uid("app"))
    uid = oh_store.add_user(cluster.engine, _uid("alice"), "pw")
    with cluster.api(a) as api:  # bound through node a: node b's fan-out must learn it too
        assert api.put(f"/api/v1/users/{uid}/devices/{m}").status_code == 204
    link = OpenHubClient(b.base, app.access_id, app.secret)
    link.project_login()
    cfg = link.config(uid, "link-1", "mqtt", "2.0")
    assert cfg["url"] == f"tcp://127.0.0.1:{b.mqtt_port}"
    got: queue.Queue[Any] = queue.Queue()
    sub = Client(b.mqtt_port, cfg["client_id"], cfg["username"], cfg["password"])
    clients.append(sub)
    assert sub.connect()[0] == 0
    sub.c.on_message = lambda _c, _u, msg: got.put(msg)
    sub.subscribe(cfg["source_topic"]["device"], 1)

    def links_on_b() -> int:
        with cluster.api(b) as api:
            return next(n["links"] for n in api.get("/api/v1/cluster").json()["nodes"] if n["self"])

    wait_for(lambda: links_on_b() == 1, timeout=5)
    time.sleep(0.3)  # the binding reload on b (mh.cache) runs in the background
    sim.report(m, "5", 2_301_234)  # on node a: presence online (protocol 20), then the report (4)
    key = crypto.key_from_password(cfg["password"])
    events = [decode_message(got.get(timeout=5).payload, key, "2.0") for _ in range(2)]
    assert [e["protocol"] for e in events] == [20, 4]
    assert events[0]["data"]["bizCode"] == "online" and events[0]["data"]["devId"] == m
    status = events[1]["data"]["status"][0]
    assert (events[1]["data"]["devId"], status["code"], status["value"]) == (m, "voltage_current", 2_301_234)
    with pytest.raises(queue.Empty):  # each event once
        got.get(timeout=0.5)


def test_a_node_closes_a_gateway_whose_stored_owner_changed(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    """The database is the truth: a takeover message that never arrived only delays the close until
    the holder's next heartbeat compares its gateways with their stored owners."""
    a, _ = two
    gw, m = _uid("gw"), _uid("m")
    user = cluster.vendor.username
    raw = RawClient(a.mqtt_port)
    raw.send(connect(gw, user, gateway_password(gw, user)))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert raw.read_packet()[0] == 0x90
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
    raw.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
    assert _next_publish(raw)[0] == f"gateway_id/{gw}/devices/sync/response"
    wait_for(lambda: cluster.gateway_row(gw).owner_node == "a", timeout=5)
    assert raw.closed_within(1.0) is None
    g = schema.gateways
    with cluster.engine.begin() as conn:  # as if node b had claimed it and its message were lost
        conn.execute(
            update(g).where(g.c.gateway_id == gw).values(owner_node="b", session_gen=g.c.session_gen + 1)
        )
    assert raw.closed_within(3.0) is not None
    time.sleep(0.3)
    row = cluster.gateway_row(gw)
    assert (row.owner_node, row.session_gen, row.connected) == ("b", 2, True)  # a recorded nothing


def test_a_node_paused_past_node_timeout_is_swept_then_its_gateways_come_back(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    sleeper = cluster.start("sleeper")
    gw, m = _uid("gw"), _uid("m")
    sim = cluster.gateway(sleeper, gw, clients)  # paho: reconnects by itself
    sim.sync(m)
    sim.report(m, "5", 2_301_234)
    sleeper.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not cluster.device(m).online, timeout=NODE_TIMEOUT + 5, interval=0.1)
    finally:
        sleeper.proc.send_signal(signal.SIGCONT)
    assert cluster.presence(m) == [(True, "report"), (False, "node-lost")]
    # Awake again, the node finds itself swept and closes its gateways; they reconnect and claim again.
    wait_for(lambda: cluster.gateway_row(gw).owner_node == "sleeper", timeout=10, interval=0.1)
    row = cluster.gateway_row(gw)
    assert row.session_gen == 2 and row.connected is True
    sim.client.subscribe(f"gateway_id/{gw}/#", 1)  # a clean session: subscribe again, as a gateway does
    sim.report(m, "5", 2_301_000)
    assert cluster.presence(m) == [(True, "report"), (False, "node-lost"), (True, "report")]
    with cluster.api(two[0]) as api:
        nodes = {n["node_id"]: n for n in api.get("/api/v1/cluster").json()["nodes"]}
    assert nodes["sleeper"]["state"] == "alive"


def test_alarms_raised_on_two_nodes_get_distinct_ids(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    """Each node's alarm monitor gives out ids: from blocks reserved in the database, never the same."""
    a, b = two
    sims = {}
    for node in (a, b):
        gw, m = _uid("gw"), _uid("m")
        sims[node.name] = (cluster.gateway(node, gw, clients), m)
        sims[node.name][0].sync(m)
    for _ in range(2):
        for sim, m in sims.values():
            sim.report(m, "19", 9)  # two fault labels: two alarms, code 0 = stored
            sim.report(m, "19", 0)  # cleared
    a_ = schema.alarms
    meters = {m for _, m in sims.values()}

    def alarm_rows() -> list[Any]:
        with cluster.engine.connect() as conn:
            return list(conn.execute(select(a_.c.id, a_.c.cid, a_.c.cleared_at)).all())

    def all_cleared() -> bool:  # alarms follow the stored report: the clear is written after its answer
        mine = [r for r in alarm_rows() if r.cid in meters]
        return len(mine) == 8 and all(r.cleared_at is not None for r in mine)

    wait_for(all_cleared, timeout=10, interval=0.1)
    rows = alarm_rows()
    assert len({r.id for r in rows}) == len(rows)


def test_id_blocks_never_overlap_and_skip_stored_ids(cluster: Cluster) -> None:
    from meterhub.cluster.ids import IdBlocks

    with cluster.engine.begin() as conn:  # a row numbered by a single node (the table's max id)
        conn.execute(
            schema.alarms.insert().values(id=50_000, cid="old", kind="fault", label="x", raised_at=1.0)
        )
    one, two_ = (IdBlocks(cluster.engine, "alarms", schema.alarms, size=10) for _ in range(2))
    one.reserve()
    two_.reserve()
    taken = [ids.take() for _ in range(25) for ids in (one, two_)]
    assert len(set(taken)) == 50 and min(taken) > 50_000


def test_alarms_raised_on_one_node_are_cleared_on_the_next(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    old = cluster.gateway(a, gw, clients)
    old.sync(m)
    old.report(m, "19", 9)  # two fault labels raised by node a's monitor
    a_ = schema.alarms

    def stored() -> list[Any]:
        with cluster.engine.connect() as conn:
            query = select(a_.c.label, a_.c.cleared_at).where(a_.c.cid == m).order_by(a_.c.id)
            return list(conn.execute(query).all())

    wait_for(lambda: len(stored()) == 2, timeout=10, interval=0.1)  # written after the report's answer
    old.client.c.loop_stop()  # this client stays quiet now (paho would reconnect and take it back)
    user = cluster.vendor.username
    new = Client(b.mqtt_port, gw, user, gateway_password(gw, user))
    clients.append(new)
    assert new.connect()[0] == 0
    new.subscribe(f"gateway_id/{gw}/#", 1)
    wait_for(lambda: cluster.gateway_row(gw).owner_node == "b", timeout=5)
    GatewaySim(new).report(m, "19", 0)  # all clear, reported through node b
    wait_for(lambda: all(r.cleared_at is not None for r in stored()), timeout=10, interval=0.1)
    assert [r.label for r in stored()] == ["short_circuit_alarm", "overvoltage"]  # ov_vol: overvoltage


def test_two_connects_at_once_on_two_nodes_leave_exactly_one(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    a, b = two
    user = cluster.vendor.username
    for _ in range(3):
        gw = _uid("gw")
        raws = {node.name: RawClient(node.mqtt_port) for node in (a, b)}
        frame = connect(gw, user, gateway_password(gw, user))
        for raw in raws.values():
            raw.send(frame)
        for raw in raws.values():
            assert raw.read_packet() == (0x20, b"\x00\x00")
        closed = {name: raw.closed_within(2.0 if name == "a" else 0.5) for name, raw in raws.items()}
        survivors = [name for name, t in closed.items() if t is None]
        assert len(survivors) == 1, closed
        row = cluster.gateway_row(gw)
        assert (row.owner_node, row.session_gen, row.connected) == (survivors[0], 2, True)
        assert raws[survivors[0]].closed_within(1.0) is None  # and it stays
        for raw in raws.values():
            raw.close()


def test_a_report_redelivered_through_another_node_is_stored_once(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    user = cluster.vendor.username
    first = cluster.gateway(a, gw, clients)
    first.sync(m)
    report = {
        "t": int(time.time()),
        "request_id": "r-once",
        "param": {"cid": m, "id": "5", "value": 2_301_234},
    }
    first.client.publish(f"gateway_id/{gw}/properties/report", json.dumps(report), 1)
    assert first.answers.get(timeout=5)["param"]["code"] == 0
    first.client.c.loop_stop()  # the gateway moves (it never saw the answer, say) and sends it again
    again = Client(b.mqtt_port, gw, user, gateway_password(gw, user))
    clients.append(again)
    assert again.connect()[0] == 0
    again.subscribe(f"gateway_id/{gw}/#", 1)
    sim = GatewaySim(again)
    sim.client.publish(f"gateway_id/{gw}/properties/report", json.dumps(report), 1)
    answer = sim.answers.get(timeout=5)
    assert (answer["request_id"], answer["param"]["code"]) == ("r-once", 0)
    r = schema.reports
    with cluster.engine.connect() as conn:
        rows = conn.execute(select(r.c.request_id).where(r.c.cid == m)).all()
    assert [x.request_id for x in rows] == ["r-once"]


def _sync_unacked(raw: RawClient, gw: str, m: str, rid: str, pid: int) -> tuple[int, bytes]:
    """Send a sync and read its answer without acknowledging it: (the answer's packet id, its body)."""
    sync = {"t": int(time.time()), "request_id": rid, "param": {"cid": m, "product_id": "p"}}
    raw.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, pid))
    while True:
        first, body = raw.read_packet()
        if first & 0xF0 == 0x30:
            n = int.from_bytes(body[:2], "big")
            assert body[2 : 2 + n].decode() == f"gateway_id/{gw}/devices/sync/response"
            return int.from_bytes(body[2 + n : 4 + n], "big"), body


def test_a_persistent_session_queued_on_one_node_is_delivered_on_the_other(
    cluster: Cluster, two: tuple[Node, Node]
) -> None:
    a, b = two
    gw, m = _uid("gw"), _uid("m")
    user, password = cluster.vendor.username, gateway_password(gw, cluster.vendor.username)
    on_a = RawClient(a.mqtt_port)
    on_a.send(connect(gw, user, password, clean=False))
    assert on_a.read_packet() == (0x20, b"\x00\x00")
    on_a.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert on_a.read_packet()[0] == 0x90
    pid, answer = _sync_unacked(on_a, gw, m, "s1", 2)  # owed by a when the gateway goes
    on_a.close()
    t = schema.mqtt_sessions
    with cluster.engine.connect() as conn:

        def stored_offline() -> bool:
            row = conn.execute(select(t.c.node, t.c.connected).where(t.c.client_id == gw)).first()
            conn.rollback()
            return row is not None and tuple(row) == ("a", False)

        wait_for(stored_offline, timeout=5)

    # The gateway comes back through the load balancer to node b: its session is there.
    on_b = RawClient(b.mqtt_port)
    on_b.send(connect(gw, user, password, clean=False))
    assert on_b.read_packet() == (0x20, b"\x01\x00")
    first, body = on_b.read_packet()
    assert first == 0x3A and body == answer  # a's answer again, DUP, same packet id
    on_b.send(puback(pid))
    # Still connected to b, the gateway is owed another answer when it connects to a (a takeover):
    # a asks b to close and store the session before answering the CONNECT.
    pid2, answer2 = _sync_unacked(on_b, gw, m, "s2", 3)
    with cluster.engine.connect() as conn:

        def held_by_b() -> Any:
            row = conn.execute(select(t.c.node, t.c.connected).where(t.c.client_id == gw)).first()
            conn.rollback()
            return row is not None and tuple(row) == ("b", True) and row

        before = held_by_b()  # recorded before b's CONNACK
        assert before, "b's CONNACK came before it recorded that it holds the session"
    back_on_a = RawClient(a.mqtt_port)
    back_on_a.send(connect(gw, user, password, clean=False))
    assert back_on_a.read_packet() == (0x20, b"\x01\x00")
    first, body = back_on_a.read_packet()
    if body != answer2:  # say what the nodes counted
        with cluster.api(a) as api_a, cluster.api(b) as api_b:
            seen = [
                (n, x) for n, c in (("a", api_a), ("b", api_b)) for x in c.get("/metrics").text.splitlines()
            ]
        pytest.fail(
            f"not b's session (row before: {before}): {[(n, x) for n, x in seen if 'sessions.' in x]}"
        )
    assert first == 0x3A
    back_on_a.send(puback(pid2))
    assert on_b.closed_within(3.0) is not None, "node b did not close the old connection"
    with cluster.api(b) as api:
        assert 'meterhub_mqtt_events_total{event="sessions.handed_over"} 1.0' in api.get("/metrics").text
    # The subscription moved with it: a command through b's API reaches the gateway on a.
    status = {"t": int(time.time()), "request_id": "st", "param": [{"cid": m, "status": True}]}
    back_on_a.send(publish(f"gateway_id/{gw}/devices/status", json.dumps(status).encode(), 1, 4))
    wait_for(lambda: (row := cluster.device(m)) is not None and row.online, timeout=5)
    with cluster.api(b) as api:
        r = api.post(f"/api/v1/devices/{m}/commands", json={"dp": "switch", "value": True, "wait": False})
        assert r.status_code == 202, r.text
    topic, cmd = _next_publish(back_on_a)
    while topic != f"gateway_id/{gw}/commands":  # the status answer may come first
        topic, cmd = _next_publish(back_on_a)
    assert cmd["cid"] == m
    # A clean_session=1 CONNECT through b discards the session: a, closing its connection for the
    # takeover, does not store its copy again.
    clean_on_b = RawClient(b.mqtt_port)
    clean_on_b.send(connect(gw, user, password, clean=True))
    assert clean_on_b.read_packet() == (0x20, b"\x00\x00")
    assert back_on_a.closed_within(3.0) is not None, "node a did not close the old connection"
    time.sleep(0.5)  # a's write of its copy would have landed by now
    with cluster.engine.connect() as conn:
        assert conn.execute(select(t.c.client_id).where(t.c.client_id == gw)).first() is None
    clean_on_b.close()


def test_the_conformance_record_follows_the_gateway_to_another_node(
    cluster: Cluster, two: tuple[Node, Node], clients: list[Client]
) -> None:
    """Issue item 5: violations recorded on node a are on the report card read through node b (the
    stored record), and after the gateway moves to b what b sees adds to what a saw."""
    a, b = two
    gw = _uid("gw")
    user = cluster.vendor.username

    def bad_report(client: Client) -> None:  # QoS 0, for a device never synced: two violations
        body = {
            "t": int(time.time()),
            "request_id": _uid("r"),
            "param": {"cid": "nope", "id": "1", "value": 1},
        }
        client.publish(f"gateway_id/{gw}/properties/report", json.dumps(body), 0)

    on_a = cluster.gateway(a, gw, clients)
    bad_report(on_a.client)
    assert on_a.answers.get(timeout=5)["param"]["code"] == 2003

    def card(node: Node) -> dict[str, Any]:
        with cluster.api(node) as api:
            r = api.get(f"/api/v1/gateways/{gw}/conformance")
        assert r.status_code in (200, 404), r.text
        return r.json() if r.status_code == 200 else {}

    def finding(c: dict[str, Any], rule: str) -> dict[str, Any]:
        return next((f for f in c.get("findings", ()) if f["rule"] == rule), {})

    seen = wait_for(
        lambda: finding(c := card(b), "sync-before-report").get("verdict") == "fail" and c, timeout=5
    )
    assert seen["connected"] is True and seen["client_address"].startswith("127.0.0.1:")
    assert finding(seen, "qos-1")["observed"].startswith("QoS 0: 1,")
    assert finding(seen, "subscribes-downlink")["verdict"] == "pass"  # the filters a stored

    on_a.client.c.loop_stop()  # the gateway moves to b (a closes its connection at b's claim)
    moved = Client(b.mqtt_port, gw, user, gateway_password(gw, user))
    clients.append(moved)
    assert moved.connect()[0] == 0
    moved.subscribe(f"gateway_id/{gw}/#", 1)
    sim = GatewaySim(moved)
    bad_report(sim.client)
    assert sim.answers.get(timeout=5)["param"]["code"] == 2003
    both = "2 of 2 reports were for devices never synced (answered 2003)"
    for node in (b, a):  # the same card through either node: what a and b saw, added up
        c = wait_for(
            lambda n=node: (c := card(n)) and finding(c, "sync-before-report")["observed"] == both and c
        )
        assert c["connected"] is True
        assert finding(c, "reconnect-politely")["observed"].startswith("2 connects")
    from click.testing import CliRunner

    from meterhub.cli import main

    out = CliRunner().invoke(main, ["conformance", gw, "--url", a.base, "--token", cluster.token])
    assert out.exit_code == 1 and f"gateway {gw} (connected)" in out.output, out.output
