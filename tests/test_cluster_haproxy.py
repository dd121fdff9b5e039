"""Three `meterhub serve` nodes behind a real HAProxy (mode tcp, ``send-proxy-v2``), on a fresh
PostgreSQL database and a nats-server of the test's own; gateways connect through the balancer only.

- the nodes see the gateway's address (PROXY protocol v2), not the balancer's;
- kill -9 of a node: its devices go offline (``node-lost``) on the others within node_timeout + a few
  seconds, its gateways reconnect through HAProxy to the others, a report sent again is stored once;
- a rolling restart (SIGTERM, drain, start again, node after node) under load: every report answered
  0 is stored exactly once, no device is marked offline, every gateway is connected again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from conftest import drop_postgres, free_port, fresh_postgres_url, wait_for
from meterhub.api.security import create_token
from meterhub.core.auth import gateway_password
from meterhub.sdk import Gateway
from meterhub.storage import registry, schema
from meterhub.storage.database import migrate
from mqttraw import RawClient, connect, publish, subscribe
from test_cluster import _next_publish

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
NODE_TIMEOUT = 3.0
NAMES = ("a", "b", "c")


class Node:
    def __init__(self, name: str, mqtt_port: int, http_port: int) -> None:
        self.name = name
        self.mqtt_port = mqtt_port
        self.http_port = http_port
        self.base = f"http://127.0.0.1:{http_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None


class Balanced:
    """The cluster: nodes a, b, c on fixed ports (so the balancer's config stays), HAProxy in front."""

    def __init__(self, tmp: Path, db_url: str, bus_url: str) -> None:
        self.tmp = tmp
        self.db_url = db_url
        self.bus_url = bus_url
        self.engine = create_engine(db_url)
        migrate(self.engine)
        self.vendor = registry.add_vendor(self.engine, "acme")
        self.token, _ = create_token(self.engine, "ops", "admin")
        self.nodes = {n: Node(n, free_port(), free_port()) for n in NAMES}
        self.port = free_port()  # the balancer's MQTT port
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # --- processes -----------------------------------------------------------------------------

    def start(self, name: str) -> Node:
        node = self.nodes[name]
        self.starts += 1
        node.log = self.tmp / f"{name}-{self.starts}.log"
        env = {
            **os.environ,
            "METERHUB_DATABASE_URL": self.db_url,
            "METERHUB_NODE_TIMEOUT": str(NODE_TIMEOUT),
            "METERHUB_HEARTBEAT_INTERVAL": "0.5",
            "METERHUB_MQTT_HOST": "127.0.0.1",
            "METERHUB_PRESENCE_TIMEOUT": "600",
            "METERHUB_PROXY_PROTOCOL": "true",
            "METERHUB_DRAIN_TIMEOUT": "10",
            "METERHUB_DRAIN_GRACE": "5",
        }
        node.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterhub",
                "serve",
                "--data-dir",
                str(self.tmp / name),
                "--mqtt-port",
                str(node.mqtt_port),
                "--http-port",
                str(node.http_port),
                "--bus-url",
                self.bus_url,
                "--node-id",
                name,
                "--log-level",
                "INFO",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=node.log.open("wb"),
        )
        proc, log = node.proc, node.log

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{node.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, interval=0.1)
        return node

    def start_haproxy(self) -> None:
        servers = "\n".join(
            f"  server {n.name} 127.0.0.1:{n.mqtt_port} send-proxy-v2 check check-send-proxy "
            "inter 300ms fall 1 rise 1"
            for n in self.nodes.values()
        )
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(
            f"""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout check 1s
  retries 3
  option redispatch
frontend mqtt
  bind 127.0.0.1:{self.port}
  default_backend nodes
backend nodes
  balance leastconn
{servers}
"""
        )
        self.haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "haproxy.log").open("wb"),
        )
        haproxy = self.haproxy

        def listening() -> bool:
            assert haproxy.poll() is None, (self.tmp / "haproxy.log").read_text()
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            return False

        wait_for(listening, timeout=10)
        time.sleep(1.0)  # a few health checks: every node up

    def sigterm(self, name: str) -> int:
        proc = self.nodes[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        return proc.wait(30)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.proc is None:
                continue
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)
        if self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
        self.engine.dispose()

    # --- looking --------------------------------------------------------------------------------

    def api(self, name: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.nodes[name].base, headers={"Authorization": f"Bearer {self.token}"}, timeout=20
        )

    def gateway_rows(self, gws: list[str]) -> dict[str, Any]:
        g = schema.gateways
        with self.engine.connect() as conn:
            rows = conn.execute(select(g).where(g.c.gateway_id.in_(gws))).all()
        return {r.gateway_id: r for r in rows}

    def presence_causes(self, cids: list[str]) -> list[tuple[str, bool, str]]:
        p = schema.presence
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(p.c.cid, p.c.online, p.c.cause).where(p.c.cid.in_(cids)).order_by(p.c.id)
            ).all()
        return [(r.cid, bool(r.online), r.cause) for r in rows]

    def stored(self, gws: list[str]) -> dict[tuple[str, str], int]:
        """Rows per (gateway, request_id) in the reports table."""
        r = schema.reports
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(r.c.gateway_id, r.c.request_id, func.count())
                .where(r.c.gateway_id.in_(gws))
                .group_by(r.c.gateway_id, r.c.request_id)
            ).all()
        return {(gw, rid): int(n) for gw, rid, n in rows}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> Iterator[Balanced]:
    url = fresh_postgres_url()
    c = Balanced(tmp_path_factory.mktemp("balanced"), url, nats_url)
    try:
        for name in NAMES:
            c.start(name)
        c.start_haproxy()
        yield c
    finally:
        c.close()
        drop_postgres(url)


# --- a fleet of SDK gateways (reconnecting, resending unanswered reports) on its own event loop ----


class _Recording(Gateway):
    """The SDK's gateway, recording the answer to each report (request_id -> code)."""

    def __init__(self, *args: Any, answers: dict[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers = answers

    def _on_report_response(self, payload: bytes) -> None:
        decoded = self._decode_response(payload)
        if decoded is not None and decoded[0] in self._pending:
            self.answers[decoded[0]] = decoded[1]
        super()._on_report_response(payload)


class Fleet:
    def __init__(self, port: int, username: str, count: int, prefix: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.answers: dict[str, int] = {}
        self.sent: dict[str, list[str]] = {}
        self.gateways = [
            _Recording(
                "127.0.0.1",  # the balancer
                port,
                f"{prefix}-{i:03d}",
                username,
                answers=self.answers,
                keepalive=10,
                status_interval=30,
                response_timeout=120,
                reconnect_base=0.2,
                reconnect_cap=1.0,
            )
            for i in range(count)
        ]
        self.producing = False
        self.producer: Any = None

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def ids(self) -> list[str]:
        return [gw.gateway_id for gw in self.gateways]

    @staticmethod
    def meter(gw: Gateway) -> str:
        return f"{gw.gateway_id}-m1"

    async def _start(self) -> None:
        sem = asyncio.Semaphore(20)

        async def one(gw: Gateway) -> None:
            async with sem:
                await gw.start(timeout=60)
                assert await gw.sync(self.meter(gw), "sim-meter", timeout=60) == 0

        await asyncio.gather(*(one(gw) for gw in self.gateways))

    def start(self) -> None:
        self.call(self._start())

    async def _produce(self, interval: float) -> None:
        value = 1000
        while self.producing:
            for gw in self.gateways:
                value += 1
                rid = gw.report_nowait(self.meter(gw), "power_current", value)
                self.sent.setdefault(gw.gateway_id, []).append(rid)
            await asyncio.sleep(interval)

    def produce(self, interval: float) -> None:
        self.producing = True
        self.producer = asyncio.run_coroutine_threadsafe(self._produce(interval), self.loop)

    def stop_producing(self) -> None:
        self.producing = False
        self.producer.result(10)

    async def _idle(self, timeout: float) -> None:
        await asyncio.gather(*(gw.wait_idle(timeout) for gw in self.gateways))

    def wait_idle(self, timeout: float = 60) -> None:
        self.call(self._idle(timeout), timeout + 10)

    def connected(self) -> int:
        return sum(1 for gw in self.gateways if gw.connected)

    def close(self) -> None:
        async def _close() -> None:
            await asyncio.gather(*(gw.close(flush_timeout=0) for gw in self.gateways))

        with contextlib.suppress(Exception):
            self.call(_close(), 30)
        with contextlib.suppress(Exception):
            self.call(self.loop.shutdown_default_executor(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def _check_stored_once(cluster: Balanced, fleet: Fleet) -> int:
    """Every report sent was answered 0 and is stored exactly once; returns how many."""
    sent = [(gw, rid) for gw, rids in fleet.sent.items() for rid in rids]
    assert sent
    codes = {fleet.answers.get(rid) for _, rid in sent}
    assert codes == {0}, {c: sum(1 for _, r in sent if fleet.answers.get(r) == c) for c in codes}
    stored = cluster.stored(fleet.ids)
    twice = {k: n for k, n in stored.items() if n != 1}
    assert not twice, f"stored more than once: {list(twice.items())[:5]}"
    missing = [k for k in sent if k not in stored]
    assert not missing, f"answered 0 but not stored: {missing[:5]}"
    assert len(stored) == len(sent)
    return len(sent)


def _owners(cluster: Balanced, gws: list[str]) -> dict[str, str | None]:
    return {gw: r.owner_node for gw, r in cluster.gateway_rows(gws).items() if r.connected}


# --- the tests ----------------------------------------------------------------------------------


def test_nodes_see_the_gateways_address_through_the_balancer(cluster: Balanced) -> None:
    user = cluster.vendor.username
    gw, m = "gw-addr", "gw-addr-m1"
    raw = RawClient(cluster.port, source="127.0.0.2")  # HAProxy listens on 127.0.0.1
    raw.send(connect(gw, user, gateway_password(gw, user)))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert raw.read_packet()[0] == 0x90
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
    raw.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
    assert _next_publish(raw)[0] == f"gateway_id/{gw}/devices/sync/response"
    wait_for(lambda: _owners(cluster, [gw]).get(gw) in NAMES, timeout=5)
    owner = _owners(cluster, [gw])[gw]
    row = cluster.gateway_rows([gw])[gw]
    assert row.client_address.startswith("127.0.0.2:"), row.client_address
    with cluster.api(owner) as api:  # type: ignore[arg-type]
        card = api.get(f"/api/v1/gateways/{gw}/conformance").json()
        assert card["client_address"] == row.client_address
        metrics = api.get("/metrics").text
    assert 'meterhub_mqtt_events_total{event="proxy_protocol.accepted"}' in metrics
    # the balancer's health checks come with a LOCAL header (check-send-proxy)
    assert 'meterhub_mqtt_events_total{event="proxy_protocol.local"}' in metrics
    raw.close()


def test_kill_9_devices_offline_gateways_back_through_the_balancer(cluster: Balanced) -> None:
    user = cluster.vendor.username
    fleet = Fleet(cluster.port, user, 24, "gk")
    victim = "a"
    try:
        fleet.start()
        owners = _owners(cluster, fleet.ids)
        counts = {n: sum(1 for o in owners.values() if o == n) for n in NAMES}
        assert sum(counts.values()) == 24 and all(counts.values()), counts  # leastconn spreads them
        victim = max(counts, key=lambda n: counts[n])
        lost = [gw for gw, o in owners.items() if o == victim]
        # a report answered 0 by the victim, sent again later by a raw gateway that moved
        gw, m = "gw-again", "gw-again-m1"
        raw = RawClient(cluster.nodes[victim].mqtt_port)
        raw.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")  # LOCAL: straight to the victim
        raw.send(connect(gw, user, gateway_password(gw, user)))
        assert raw.read_packet() == (0x20, b"\x00\x00")
        raw.send(subscribe(1, f"gateway_id/{gw}/#"))
        assert raw.read_packet()[0] == 0x90
        sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
        raw.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
        assert _next_publish(raw)[0] == f"gateway_id/{gw}/devices/sync/response"
        report = {
            "t": int(time.time()),
            "request_id": "r-kill",
            "param": {"cid": m, "id": "5", "value": 2_301_234},
        }
        raw.send(publish(f"gateway_id/{gw}/properties/report", json.dumps(report).encode(), 1, 3))
        topic, answer = _next_publish(raw)
        assert topic.endswith("/properties/report/response") and answer["param"]["code"] == 0

        fleet.produce(0.5)
        time.sleep(1.0)
        proc = cluster.nodes[victim].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        killed = time.monotonic()
        raw.close()

        def offline() -> bool:  # the raw gateway does not come back by itself: its meter is lost
            return (m, False, "node-lost") in cluster.presence_causes([m])

        wait_for(offline, timeout=NODE_TIMEOUT + 6, interval=0.1)
        took = time.monotonic() - killed
        print(f"node-lost recorded {took:.2f}s after kill -9 (node_timeout {NODE_TIMEOUT:g}s)")
        # every gateway of the victim is connected again, through HAProxy, to another node
        wait_for(
            lambda: (
                len(_owners(cluster, lost)) == len(lost)
                and all(o in NAMES and o != victim for o in _owners(cluster, lost).values())
            ),
            timeout=NODE_TIMEOUT + 10,
            interval=0.2,
        )
        wait_for(lambda: fleet.connected() == 24, timeout=10)
        assert set(_owners(cluster, fleet.ids).values()) <= set(NAMES) - {victim}

        # the moved gateway sends its report again through the balancer: answered 0, stored once
        again = RawClient(cluster.port, source="127.0.0.2")
        again.send(connect(gw, user, gateway_password(gw, user)))
        assert again.read_packet() == (0x20, b"\x00\x00")
        again.send(subscribe(1, f"gateway_id/{gw}/#"))
        assert again.read_packet()[0] == 0x90
        again.send(publish(f"gateway_id/{gw}/properties/report", json.dumps(report).encode(), 1, 4))
        topic, answer = _next_publish(again)
        assert (answer["request_id"], answer["param"]["code"]) == ("r-kill", 0)
        assert cluster.stored([gw]) == {(gw, "r-kill"): 1}
        again.close()

        time.sleep(1.0)
        fleet.stop_producing()
        fleet.wait_idle(60)
        n = _check_stored_once(cluster, fleet)
        print(f"{n} reports answered 0, each stored once; victim {victim} held {len(lost)} gateways")
    finally:
        fleet.close()
        if cluster.nodes[victim].proc.poll() is not None:  # type: ignore[union-attr]
            cluster.start(victim)  # back for the next test
        time.sleep(1.0)


def test_rolling_restart_under_load_loses_nothing(cluster: Balanced) -> None:
    user = cluster.vendor.username
    count = 200
    fleet = Fleet(cluster.port, user, count, "gr")
    try:
        started = time.monotonic()
        fleet.start()
        print(f"{count} gateways connected and synced in {time.monotonic() - started:.1f}s")
        fleet.produce(1.0)
        time.sleep(2.0)
        order = list(NAMES)
        random.shuffle(order)
        # a gateway straight on the first node that will not come back: node-drain after the grace
        gw, m = "gw-gone", "gw-gone-m1"
        raw = RawClient(cluster.nodes[order[0]].mqtt_port)
        raw.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00" + connect(gw, user, gateway_password(gw, user)))
        assert raw.read_packet() == (0x20, b"\x00\x00")
        raw.send(subscribe(1, f"gateway_id/{gw}/#"))
        assert raw.read_packet()[0] == 0x90
        sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
        raw.send(publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
        assert _next_publish(raw)[0].endswith("/devices/sync/response")
        report = {
            "t": int(time.time()),
            "request_id": "r1",
            "param": {"cid": m, "id": "5", "value": 2_301_234},
        }
        raw.send(publish(f"gateway_id/{gw}/properties/report", json.dumps(report).encode(), 1, 3))
        assert _next_publish(raw)[1]["param"]["code"] == 0
        for name in order:
            t0 = time.monotonic()
            assert cluster.sigterm(name) == 0, cluster.nodes[name].log.read_text()[-3000:]  # type: ignore[union-attr]
            stopped = time.monotonic() - t0
            cluster.start(name)
            time.sleep(1.0)  # HAProxy's checks see it up again
            print(f"node {name}: drained and stopped in {stopped:.1f}s, restarted")
            if name == order[0]:
                assert raw.closed_within(1.0) is not None
                assert cluster.presence_causes([m]) == [(m, True, "report"), (m, False, "node-drain")]
                row = cluster.gateway_rows([gw])[gw]
                assert (row.connected, row.owner_node) == (False, name)
                raw.close()
        time.sleep(2.0)
        fleet.stop_producing()
        fleet.wait_idle(60)
        n = _check_stored_once(cluster, fleet)
        wait_for(lambda: fleet.connected() == count, timeout=20)
        owners = _owners(cluster, fleet.ids)
        assert len(owners) == count and set(owners.values()) <= set(NAMES)
        meters = [Fleet.meter(gw) for gw in fleet.gateways]
        causes = cluster.presence_causes(meters)
        offline = [c for c in causes if not c[1]]
        assert not offline, f"{len(offline)} offline transitions, e.g. {offline[:5]}"
        reconnects = sum(gw.stats.reconnects for gw in fleet.gateways)
        resent = sum(gw.stats.resent for gw in fleet.gateways)
        print(f"{n} reports answered 0 and stored once; {reconnects} reconnections, {resent} resent")
        assert reconnects >= count  # every gateway was moved at least once by a drain
    finally:
        fleet.close()
