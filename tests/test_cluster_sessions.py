"""State that follows a gateway between two nodes (in-process hubs on one PostgreSQL database and a
NATS server of the module's own): persistent sessions (the holder row is written before the CONNACK;
a message for a session that moved is delivered on the node holding it, never into the old node's
stale copy) and alarm state read on demand."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from conftest import Client, RunningHub, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry, schema
from mqttraw import RawClient, connect, puback, subscribe


@pytest.fixture
def nodes(shared_postgres: str, nats_url: str, hub_factory: Any) -> tuple[RunningHub, RunningHub]:
    common = {"database_url": shared_postgres, "bus_url": nats_url, "heartbeat_interval": 0.5}
    return hub_factory(node_id="a", **common), hub_factory(node_id="b", **common)


def row(hub: RunningHub, cid: str) -> tuple[str, bool, int] | None:
    t = schema.mqtt_sessions
    with hub.engine.connect() as conn:
        r = conn.execute(select(t.c.node, t.c.connected, t.c.gen).where(t.c.client_id == cid)).first()
    return None if r is None else (r.node, bool(r.connected), int(r.gen))


def persistent(hub: RunningHub, gw: str, user: str) -> tuple[RawClient, bytes]:
    raw = RawClient(hub.port)
    raw.send(connect(gw, user, gateway_password(gw, user), clean=False))
    first, body = raw.read_packet()
    assert first == 0x20
    return raw, body


def next_publish(raw: RawClient) -> tuple[str, bytes]:
    while True:
        first, body = raw.read_packet()
        if first & 0xF0 != 0x30:
            continue
        n = int.from_bytes(body[:2], "big")
        topic, rest = body[2 : 2 + n].decode(), body[2 + n :]
        if first & 0x06:
            raw.send(puback(int.from_bytes(rest[:2], "big")))
            rest = rest[2:]
        return topic, rest


def test_the_holder_row_is_written_before_the_connack(nodes: tuple[RunningHub, RunningHub]) -> None:
    """Before, the row was written 50 ms + a commit after the CONNACK: a CONNECT on another node in
    that window resumed an older copy (or none) instead of asking the holder for it."""
    a, b = nodes
    user = registry.add_vendor(a.engine, "holder").username
    gw = "gw-holder"
    on_a, body = persistent(a, gw, user)
    assert body == b"\x00\x00"
    assert row(a, gw) == ("a", True, 1)  # at once: the CONNACK came after the claim's commit
    on_a.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert on_a.read_packet()[0] == 0x90
    on_b, body = persistent(b, gw, user)  # straight after, on the other node
    assert body == b"\x01\x00"  # b asked a for the session: present, with a's subscription
    assert row(b, gw) == ("b", True, 2)
    assert on_a.closed_within(2.0) is not None
    assert b.run(lambda: dict(b.hub.mqtt.sessions[gw].subscriptions)) == {f"gateway_id/{gw}/#": 1}
    assert a.stats["sessions.handed_over"] == 1
    on_b.close()


def test_a_message_for_a_session_that_moved_is_delivered_on_the_new_node(
    nodes: tuple[RunningHub, RunningHub],
) -> None:
    """The gateway leaves a (its offline copy stays there), resumes on b; a message a produces for
    it afterwards (an answer completing late, say) goes to b, not into a's copy."""
    a, b = nodes
    user = registry.add_vendor(a.engine, "mover").username
    gw = "gw-mover"
    on_a, _ = persistent(a, gw, user)
    on_a.send(subscribe(1, f"gateway_id/{gw}/#"))
    assert on_a.read_packet()[0] == 0x90
    on_a.close()
    wait_for(lambda: row(a, gw) == ("a", False, 1))
    assert a.run(lambda: gw in a.hub.mqtt.sessions)  # a keeps its offline copy
    topic = f"gateway_id/{gw}/commands"
    assert a.run(lambda: a.hub.mqtt.publish(gw, topic, b"before-the-move", 1))  # queued into it
    wait_for(lambda: (r := row(a, gw)) is not None and r[2] == 1)
    on_b, body = persistent(b, gw, user)
    assert body == b"\x01\x00"
    assert next_publish(on_b) == (topic, b"before-the-move")  # a stored it at the hand-over
    assert not a.run(lambda: gw in a.hub.mqtt.sessions)  # a forgot its copy
    # a message a produces for it now goes to b
    assert a.run(lambda: a.hub.mqtt.publish(gw, topic, b"after-the-move", 1))
    assert next_publish(on_b) == (topic, b"after-the-move")
    assert a.stats["sessions.forwarded"] == 1
    # b gives it back to a: b forwards in turn, a delivers
    on_b.close()
    wait_for(lambda: row(b, gw) == ("b", False, 2))
    back, body = persistent(a, gw, user)
    assert body == b"\x01\x00"
    assert b.run(lambda: b.hub.mqtt.publish(gw, topic, b"back-on-a", 1))
    assert next_publish(back) == (topic, b"back-on-a")
    back.close()


def test_an_alarm_raised_on_one_node_is_cleared_when_its_device_reports_on_the_other(
    nodes: tuple[RunningHub, RunningHub],
) -> None:
    """b has none of the device's alarm state in memory (evicted, say) when the report comes: it
    reads it from the database first, so the alarm a raised is cleared, not raised again."""
    from test_api import GatewaySim

    a, b = nodes
    user = registry.add_vendor(a.engine, "alarming").username
    gw, m = "gw-alarm", "m-alarm"
    first = Client(a.port, gw, user, gateway_password(gw, user))
    assert first.connect()[0] == 0
    first.subscribe(f"gateway_id/{gw}/#", 1)
    on_a = GatewaySim(first)
    on_a.sync(m)
    on_a.report(m, "19", "fire_alarm")
    t = schema.alarms

    def stored() -> list[tuple[str, bool]]:
        with a.engine.connect() as conn:
            rows = conn.execute(select(t.c.label, t.c.cleared_at).where(t.c.cid == m).order_by(t.c.id)).all()
        return [(r.label, r.cleared_at is not None) for r in rows]

    wait_for(lambda: stored() == [("fire_alarm", False)])
    first.c.loop_stop()  # the gateway moves to b (a closes its old connection at b's claim)
    moved = Client(b.port, gw, user, gateway_password(gw, user))
    assert moved.connect()[0] == 0
    moved.subscribe(f"gateway_id/{gw}/#", 1)
    wait_for(lambda: b.run(lambda: gw in b.hub.cluster.held))
    monitor = b.hub.alarms
    # b reloads the gateway's devices (and their alarm state) after its claim: let that finish
    # before emptying b's memory, or it would put m's state back without a load on demand.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not b.run(lambda: m in monitor.devices):
        time.sleep(0.05)
    b.run(lambda: monitor.devices.clear())  # nothing of m in b's memory
    loaded = b.run(lambda: monitor.loaded)
    GatewaySim(moved).report(m, "19", 0)
    wait_for(lambda: stored() == [("fire_alarm", True)])
    assert b.run(lambda: monitor.loaded) == loaded + 1
    assert b.run(lambda: monitor.raised) == 0  # cleared, never raised again on b
    moved.close()
    first.c.disconnect()
