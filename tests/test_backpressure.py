"""Server-wide back-pressure: when storage falls behind, gateways stop being read (their reports wait
in TCP buffers) instead of piling up in meterhub's memory; nothing is lost and nobody is dropped.

Runs on SQLite and, in the PostgreSQL pass, on PostgreSQL (the storage is held with a lock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

import mqttraw
from conftest import Client, RunningHub, storage_held, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry

HIGH_WATER = 20


@pytest.fixture
def hub(hub_factory) -> RunningHub:
    return hub_factory("protocol", max_queued_writes=HIGH_WATER)


def report(gw: str, cid: str, n: int) -> tuple[str, bytes]:
    body = {"t": int(time.time()), "request_id": f"r-{n}", "param": {"cid": cid, "id": "5", "value": n}}
    return f"gateway_id/{gw}/properties/report", json.dumps(body).encode()


def state(hub: RunningHub) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        writer, mqtt = hub.hub.writer, hub.hub.mqtt
        return {
            "paused": mqtt.intake_paused,
            "pauses": mqtt.stats["flow.intake_paused"],
            "received": mqtt.stats["publish.in"],
            "outstanding": writer.outstanding,
        }

    return hub.run(read)


def history_count(hub: RunningHub, cid: str) -> int:
    from sqlalchemy import text

    with hub.engine.connect() as conn:
        return conn.execute(text("select count(*) from reports where cid = :c"), {"c": cid}).scalar_one()


def test_gateways_are_not_read_while_storage_is_behind_and_nothing_is_lost(hub: RunningHub, clients) -> None:
    vendor = registry.add_vendor(hub.engine, "meters-inc")
    gw: Client = clients(hub.port, "gw-bp", vendor.username)
    gw.c.max_inflight_messages_set(1000)  # paho's default of 20 would itself hold the load back
    assert gw.connect()[0] == 0
    gw.subscribe("gateway_id/gw-bp/#", 1)
    gw.publish(
        "gateway_id/gw-bp/devices/sync",
        json.dumps(
            {"t": int(time.time()), "request_id": "s", "param": {"cid": "m-bp", "product_id": "pid-meter"}}
        ),
    )
    assert json.loads(gw.get().payload)["param"]["code"] == 0

    with storage_held(hub.engine):
        for n in range(200):
            gw.c.publish(*report("gw-bp", "m-bp", 2_300_000 + n), qos=1)
        wait_for(lambda: state(hub)["paused"], timeout=10)
        time.sleep(0.3)  # let what was read before the pause reach the application
        before = state(hub)
        for n in range(200, 300):
            gw.c.publish(*report("gw-bp", "m-bp", 2_300_000 + n), qos=1)
        time.sleep(1.0)
        during = state(hub)
        # While paused not one more byte is read from the gateway, so what waits in memory is bounded
        # by the high-water mark plus what one read had already brought in.
        assert during["received"] == before["received"] < 300
        assert during["outstanding"] == before["outstanding"] <= HIGH_WATER + 200
        assert during["paused"] and during["pauses"] == 1

    answers: dict[str, int] = {}

    def all_answered() -> bool:
        while not gw.messages.empty():
            body = json.loads(gw.get().payload)
            answers[body["request_id"]] = body["param"]["code"]
        return len(answers) == 300

    wait_for(all_answered, timeout=60)
    assert set(answers.values()) == {0}
    assert history_count(hub, "m-bp") == 300
    after = state(hub)
    assert (after["paused"], after["outstanding"], after["received"]) == (False, 0, 301)
    assert gw.disconnects.empty()  # the gateway was held back, never dropped


def test_a_gateway_held_back_is_not_disconnected_for_its_silence(hub: RunningHub) -> None:
    """Keep-alive 1 s (the server closes a client silent for 1.5 s), held back for 3 s by a paused
    intake: the silence is the server's doing, so the connection survives and is answered after."""
    vendor = registry.add_vendor(hub.engine, "meters-inc")
    cid, user = f"gw-{uuid.uuid4().hex[:6]}", vendor.username
    with storage_held(hub.engine):
        hub.run(lambda: hub.hub.mqtt.set_intake_paused(True))
        raw = mqttraw.RawClient(hub.port)
        raw.send(mqttraw.connect(cid, user, gateway_password(cid, user), keepalive=1))
        assert raw.read_packet() == (0x20, b"\x00\x00")
        raw.send(mqttraw.PINGREQ)
        time.sleep(3.0)
        assert hub.stats["closed.keepalive"] == 0
        hub.run(lambda: hub.hub.mqtt.set_intake_paused(False))
    assert raw.read_packet() == (0xD0, b"")  # the PINGREQ sent while held back is answered now
    raw.send(mqttraw.PINGREQ)
    assert raw.read_packet() == (0xD0, b"")
    raw.close()
    assert hub.stats["closed.keepalive"] == 0


def test_a_max_queued_writes_below_one_is_refused_with_a_clear_error(tmp_path) -> None:
    """0 would pause at the first report, a negative bound never resume: refused at start."""
    done = subprocess.run(
        [sys.executable, "-m", "meterhub", "serve", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "METERHUB_MAX_QUEUED_WRITES": "0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "bad configuration" in done.stderr and "max_queued_writes" in done.stderr
    assert "greater than or equal to 1" in done.stderr


def test_syncs_in_flight_are_bounded_by_pausing_intake_and_all_are_answered(hub_factory, clients) -> None:
    """A reconnect storm's syncs wait in TCP buffers, not as tasks: over ``sync_high_water`` syncs in
    flight (here held by a blocked storage, whose own bound is far away) the gateways are not read;
    once the syncs are answered they are read again, and every sync is answered 0 and stored once."""
    hub = hub_factory("protocol")
    bound = 10
    hub.run(lambda: setattr(hub.hub.handler, "sync_high_water", bound))
    vendor = registry.add_vendor(hub.engine, "meters-inc")
    gw: Client = clients(hub.port, "gw-st", vendor.username)
    gw.c.max_inflight_messages_set(1000)
    assert gw.connect()[0] == 0
    gw.subscribe("gateway_id/gw-st/#", 1)

    def sync(n: int) -> tuple[str, bytes]:
        body = {"t": int(time.time()), "request_id": f"s-{n}", "param": {"cid": f"m-{n}", "product_id": "p"}}
        return "gateway_id/gw-st/devices/sync", json.dumps(body).encode()

    def flight() -> dict[str, Any]:
        h, mqtt = hub.hub.handler, hub.hub.mqtt
        return {
            "in_flight": h.syncs_in_flight,
            "paused": mqtt.intake_paused,
            "received": mqtt.stats["publish.in"],
        }

    gw.publish(*sync(999))  # connected and claimed (PostgreSQL: no claim in progress when the tables lock)
    assert json.loads(gw.get().payload)["param"]["code"] == 0
    with storage_held(hub.engine):
        for n in range(100):
            gw.c.publish(*sync(n), qos=1)
        wait_for(lambda: hub.run(flight)["paused"], timeout=10)
        time.sleep(0.3)  # let what was read before the pause reach the application
        before = hub.run(flight)
        for n in range(100, 200):
            gw.c.publish(*sync(n), qos=1)
        time.sleep(1.0)
        during = hub.run(flight)
        # paused: not one more sync is read, so what waits in memory is the bound plus one read
        assert during == before and bound < during["in_flight"] == during["received"] - 1 < 200
        assert hub.run(lambda: hub.hub.handler.stats["flow.sync_pressure"]) == 1

    answers: dict[str, int] = {}

    def all_answered() -> bool:
        while not gw.messages.empty():
            body = json.loads(gw.get().payload)
            answers[body["request_id"]] = body["param"]["code"]
        return len(answers) == 200

    wait_for(all_answered, timeout=60)
    assert set(answers.values()) == {0}
    from sqlalchemy import text

    with hub.engine.connect() as conn:
        assert conn.execute(text("select count(*) from devices where gateway_id='gw-st'")).scalar_one() == 201
    assert hub.run(flight) == {"in_flight": 0, "paused": False, "received": 201}
    assert gw.disconnects.empty()
