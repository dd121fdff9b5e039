"""Persistent MQTT sessions stored in the database: they survive a restart (and, in test_cluster.py,
a move to another node), are bounded like the sessions in memory, and clean_session=1 deletes them."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
from sqlalchemy import create_engine, select

import mqttraw
from conftest import (
    TEST_DB,
    RunningHub,
    cli_add_vendor,
    drop_postgres,
    free_port,
    fresh_postgres_url,
    make_settings,
    wait_for,
)
from meterhub.core.auth import gateway_password
from meterhub.storage import registry, schema
from test_crash_safety import start_server


class Hubs:
    """Hubs started one after the other on the same data directory (and database)."""

    def __init__(self, tmp_path: Any) -> None:
        self.overrides: dict[str, Any] = {}
        if TEST_DB == "postgresql":
            self.overrides["database_url"] = fresh_postgres_url()
        self.data = tmp_path / "data"
        self.running: list[RunningHub] = []

    def start(self, handler: str = "protocol", **overrides: Any) -> RunningHub:
        self.overrides.update(overrides)
        hub = RunningHub(make_settings(self.data, **self.overrides), handler=handler).start()
        hub.hub.mqtt.limits.sweep_interval = 0.1  # type: ignore[union-attr]
        self.running.append(hub)
        return hub

    def stop(self, hub: RunningHub) -> None:
        self.running.remove(hub)
        hub.stop()


@pytest.fixture
def hubs(tmp_path: Any) -> Any:
    h = Hubs(tmp_path)
    yield h
    for hub in list(h.running):
        h.stop(hub)
    if "database_url" in h.overrides:
        drop_postgres(h.overrides["database_url"])


def stored(engine: Any) -> dict[str, dict[str, Any]]:
    t = schema.mqtt_sessions
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.client_id, t.c.connected, t.c.state)).all()
    return {r.client_id: {"connected": bool(r.connected), **json.loads(r.state)} for r in rows}


def connect_raw(port: int, gw: str, user: str, clean: bool) -> tuple[mqttraw.RawClient, bytes]:
    raw = mqttraw.RawClient(port)
    raw.send(mqttraw.connect(gw, user, gateway_password(gw, user), clean=clean))
    first, body = raw.read_packet()
    assert first == 0x20
    return raw, body


def split_publish(first: int, body: bytes) -> tuple[str, int | None, bytes]:
    n = int.from_bytes(body[:2], "big")
    topic, rest = body[2 : 2 + n].decode(), body[2 + n :]
    pid = None
    if first & 0x06:
        pid, rest = int.from_bytes(rest[:2], "big"), rest[2:]
    return topic, pid, rest


def test_a_persistent_session_and_its_queued_messages_survive_a_restart(hubs: Hubs) -> None:
    hub = hubs.start()
    v = registry.add_vendor(hub.engine, "persist")
    gw, user = "gw-restart", v.username
    raw, body = connect_raw(hub.port, gw, user, clean=False)
    assert body == b"\x00\x00"
    raw.send(mqttraw.subscribe(1, f"gateway_id/{gw}/#", 1))
    assert raw.read_packet() == (0x90, b"\x00\x01\x01")
    # A sync whose answer the gateway never acknowledges: in flight when it goes away.
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": "m-restart", "product_id": "p"}}
    raw.send(mqttraw.publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 7))
    packets = [raw.read_packet() for _ in range(2)]
    assert (0x40, b"\x00\x07") in packets
    answer = next(p for p in packets if p[0] & 0xF0 == 0x30)
    topic, pid, payload = split_publish(*answer)
    assert topic == f"gateway_id/{gw}/devices/sync/response" and json.loads(payload)["param"]["code"] == 0
    raw.close()
    wait_for(lambda: not hub.run(lambda: hub.hub.mqtt.is_connected(gw)))
    # While it is offline, a QoS 1 message is queued for it (and a QoS 0 one, which is not kept).
    mqtt = hub.hub.mqtt
    assert hub.run(lambda: mqtt.publish(gw, f"gateway_id/{gw}/commands", b"queued-while-offline", 1))
    hub.run(lambda: mqtt.publish(gw, f"gateway_id/{gw}/commands", b"qos0", 0))
    row = wait_for(lambda: (s := stored(hub.engine).get(gw)) and s["queue"] and s)
    assert row["connected"] is False and row["subscriptions"] == {f"gateway_id/{gw}/#": 1}
    assert [e[0] for e in row["inflight"]] == [pid]

    hubs.stop(hub)
    again = hubs.start()
    raw, body = connect_raw(again.port, gw, user, clean=False)
    assert body == b"\x01\x00"  # session present, from the database
    first, body2 = raw.read_packet()
    assert first == 0x3A and body2 == answer[1]  # the answer again: DUP, same packet id and payload
    raw.send(mqttraw.puback(pid))  # type: ignore[arg-type]
    first, body3 = raw.read_packet()
    topic, pid3, payload3 = split_publish(first, body3)
    assert (first & 0x06, topic, payload3) == (0x02, f"gateway_id/{gw}/commands", b"queued-while-offline")
    raw.send(mqttraw.puback(pid3))  # type: ignore[arg-type]
    assert again.stats["sessions.loaded"] == 1
    # Its subscription came back too: a new message reaches it at once.
    assert again.run(lambda: again.hub.mqtt.publish(gw, f"gateway_id/{gw}/commands", b"live", 1))
    topic, _, payload4 = split_publish(*raw.read_packet())
    assert payload4 == b"live"
    raw.close()


def test_clean_session_deletes_the_stored_session(hubs: Hubs) -> None:
    hub = hubs.start("echo")
    v = registry.add_vendor(hub.engine, "cleaner")
    gw = "gw-clean"
    raw, _ = connect_raw(hub.port, gw, v.username, clean=False)
    raw.send(mqttraw.subscribe(1, f"gateway_id/{gw}/#", 1))
    raw.read_packet()
    raw.send(mqttraw.DISCONNECT)
    raw.close()
    wait_for(lambda: gw in stored(hub.engine) and not stored(hub.engine)[gw]["connected"])
    raw, body = connect_raw(hub.port, gw, v.username, clean=True)
    assert body == b"\x00\x00"
    wait_for(lambda: gw not in stored(hub.engine))
    raw.close()
    # And after a restart there is nothing to resume.
    hubs.stop(hub)
    again = hubs.start()
    raw, body = connect_raw(again.port, gw, v.username, clean=False)
    assert body == b"\x00\x00"
    raw.close()


def test_stored_sessions_are_bounded_per_vendor_like_those_in_memory(hubs: Hubs) -> None:
    hub = hubs.start("echo", max_persistent_sessions_per_vendor=3)
    v = registry.add_vendor(hub.engine, "bounded")
    for i in range(8):
        raw, body = connect_raw(hub.port, f"gw-b{i}", v.username, clean=False)
        assert body == b"\x00\x00"
        raw.send(mqttraw.DISCONNECT)
        raw.close()
        wait_for(lambda i=i: not hub.run(lambda: hub.hub.mqtt.is_connected(f"gw-b{i}")))
    wait_for(lambda: sorted(stored(hub.engine)) == ["gw-b5", "gw-b6", "gw-b7"])
    assert hub.stats["sessions.forgotten_vendor_limit"] == 5
    # After a restart, sessions beyond the bound left in the table are purged, oldest first.
    hubs.stop(hub)
    again = hubs.start()
    for i in range(8, 10):
        raw, _ = connect_raw(again.port, f"gw-b{i}", v.username, clean=False)
        raw.send(mqttraw.DISCONNECT)
        raw.close()
    wait_for(lambda: len(stored(again.engine)) == 5)
    store = again.hub.mqtt.store
    removed = store.purge(time.time(), 3, 100)
    assert removed == 2
    assert sorted(stored(again.engine)) == ["gw-b7", "gw-b8", "gw-b9"]
    # An expired one is purged too.
    assert store.purge(time.time() + 8 * 24 * 3600, 3, 100) == 3
    assert stored(again.engine) == {}


def test_an_answer_owed_to_an_absent_gateway_survives_kill_9_once_stored(tmp_path: Any) -> None:
    """The guarantee in docs/decisions.md: once the session is in the table (within flush_delay plus
    one commit of the disconnect), a crash loses nothing of it."""
    data = tmp_path / "data"
    user = cli_add_vendor(data, "crash-sessions")
    port = free_port()
    proc = start_server(data, port)
    try:
        gw = "gw-kill"
        raw, body = connect_raw(port, gw, user, clean=False)
        assert body == b"\x00\x00"
        raw.send(mqttraw.subscribe(1, f"gateway_id/{gw}/#", 1))
        assert raw.read_packet() == (0x90, b"\x00\x01\x01")
        sync = {"t": int(time.time()), "request_id": "k1", "param": {"cid": "m-kill", "product_id": "p"}}
        raw.send(mqttraw.publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 9))
        packets = [raw.read_packet() for _ in range(2)]
        answer = next(p for p in packets if p[0] & 0xF0 == 0x30)
        _, pid, _ = split_publish(*answer)
        raw.close()
        engine = create_engine(f"sqlite:///{data / 'meterhub.db'}")
        try:
            wait_for(
                lambda: (s := stored(engine).get(gw)) is not None and not s["connected"] and s["inflight"]
            )
        finally:
            engine.dispose()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_server(data, port)
        raw, body = connect_raw(port, gw, user, clean=False)
        assert body == b"\x01\x00"
        first, body2 = raw.read_packet()
        assert first == 0x3A and body2 == answer[1]
        raw.send(mqttraw.puback(pid))  # type: ignore[arg-type]
        raw.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
