"""Bounded per-client state over loopback with raw frames: subscriptions, filter length, sessions."""

from __future__ import annotations

import mqttraw
from conftest import RunningHub, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry


def _s(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def subscribe_many(pid: int, filters: list[str], qos: int = 1) -> bytes:
    return mqttraw.frame(0x82, pid.to_bytes(2, "big") + b"".join(_s(f) + bytes([qos]) for f in filters))


def unsubscribe(pid: int, topic_filter: str) -> bytes:
    return mqttraw.frame(0xA2, pid.to_bytes(2, "big") + _s(topic_filter))


def connected(
    hub: RunningHub, cid: str, username: str, clean: bool = True
) -> tuple[mqttraw.RawClient, bytes]:
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect(cid, username, gateway_password(cid, username), clean=clean))
    first, body = raw.read_packet()
    assert first == 0x20
    return raw, body


def test_subscriptions_are_bounded_per_client_and_refusals_are_logged_once(hub_factory) -> None:
    hub = hub_factory("echo")
    v = registry.add_vendor(hub.engine, "subs")
    raw, body = connected(hub, "gwL", v.username)
    assert body == b"\x00\x00"
    prefix = "gateway_id/gwL/"
    for i in range(64):
        raw.send(mqttraw.subscribe(i + 1, f"{prefix}f{i}/+", 1))
        assert raw.read_packet() == (0x90, (i + 1).to_bytes(2, "big") + b"\x01")
    raw.send(mqttraw.subscribe(100, f"{prefix}f64/+", 1))  # number 65
    assert raw.read_packet() == (0x90, b"\x00\x64\x80")
    raw.send(mqttraw.subscribe(101, f"{prefix}f3/+", 0))  # an existing filter may change its QoS
    assert raw.read_packet() == (0x90, b"\x00\x65\x00")
    long_filter = prefix + "x" * (256 - len(prefix) + 1)
    raw.send(unsubscribe(102, f"{prefix}f0/+"))
    assert raw.read_packet()[0] == 0xB0
    raw.send(mqttraw.subscribe(103, long_filter, 1))  # over-long, even with room
    assert raw.read_packet() == (0x90, b"\x00\x67\x80")
    raw.send(mqttraw.subscribe(104, prefix + "x" * (256 - len(prefix)), 1))  # exactly the limit
    assert raw.read_packet() == (0x90, b"\x00\x68\x01")
    # A flood: 100 SUBSCRIBE packets of 300 new filters each under its own prefix.
    for p in range(100):
        raw.send(subscribe_many(200 + p, [f"{prefix}flood/{p}/{i}" for i in range(300)]))
        first, body = raw.read_packet()
        assert first == 0x90 and body == (200 + p).to_bytes(2, "big") + b"\x80" * 300
    mqtt_server = hub.hub.mqtt
    count, rejected, suppressed = hub.run(
        lambda: (
            len(mqtt_server.sessions["gwL"].subscriptions),
            mqtt_server.stats["rejected.subscribe_limit"],
            mqtt_server.limited_log.held_back("subscribe_limit"),
        )
    )
    assert count == 64
    assert rejected == 1 + 100 * 300
    assert suppressed == rejected - 1  # one log line in the interval, every refusal counted
    # Still served: a message on a kept subscription arrives.
    raw.send(mqttraw.publish(f"{prefix}f1", b"hi", 0))
    first, body = raw.read_packet()
    assert first & 0xF0 == 0x30 and body.endswith(b"hi")
    raw.close()


def test_persistent_sessions_are_bounded_per_vendor(hub_factory) -> None:
    hub = hub_factory("echo", max_persistent_sessions_per_vendor=5)
    a = registry.add_vendor(hub.engine, "many-ids")
    b = registry.add_vendor(hub.engine, "bystander")
    raw, _ = connected(hub, "gw-b0", b.username, clean=False)
    raw.send(mqttraw.DISCONNECT)
    raw.close()
    # One vendor username, 200 client ids, each leaving a persistent session behind.
    for i in range(200):
        raw, body = connected(hub, f"gw-a{i}", a.username, clean=False)
        assert body == b"\x00\x00"
        raw.send(mqttraw.DISCONNECT)
        raw.close()
        wait_for(lambda i=i: hub.run(lambda: f"gw-a{i}" not in hub.hub.mqtt.connected))
    mqtt_server = hub.hub.mqtt
    kept = hub.run(lambda: sorted(mqtt_server.sessions))
    assert kept == ["gw-a195", "gw-a196", "gw-a197", "gw-a198", "gw-a199", "gw-b0"]
    assert hub.stats["sessions.forgotten_vendor_limit"] == 195
    assert hub.run(lambda: mqtt_server.limited_log.held_back("session_forgotten_vendor")) == 194
    # The other vendor's session is untouched: it resumes.
    raw, body = connected(hub, "gw-b0", b.username, clean=False)
    assert body == b"\x01\x00"
    raw.close()
    # Five connected persistent sessions of the vendor push out its offline ones; a sixth is refused.
    held = []
    for i in range(5):
        raw, body = connected(hub, f"gw-live{i}", a.username, clean=False)
        assert body == b"\x00\x00"
        held.append(raw)
    raw, body = connected(hub, "gw-live5", a.username, clean=False)
    assert body == b"\x00\x03"
    raw.close()
    # A clean session is not a persistent one: still accepted.
    raw, body = connected(hub, "gw-clean", a.username, clean=True)
    assert body == b"\x00\x00"
    raw.close()
    assert hub.stats["sessions.refused_vendor_limit"] == 1
    assert hub.run(lambda: mqtt_server.persistent_count[f"gateway:{a.id}"]) == 5
    for r in held:
        r.close()


def test_persistent_sessions_are_bounded_in_total(hub_factory) -> None:
    hub = hub_factory("echo", max_persistent_sessions=6)
    vendors = [registry.add_vendor(hub.engine, name) for name in ("v1", "v2")]
    for i in range(4):
        for v in vendors:
            raw, body = connected(hub, f"{v.name}-{i}", v.username, clean=False)
            assert body == b"\x00\x00"
            raw.send(mqttraw.DISCONNECT)
            raw.close()
            wait_for(lambda c=f"{v.name}-{i}": hub.run(lambda: c not in hub.hub.mqtt.connected))
    mqtt_server = hub.hub.mqtt
    kept = hub.run(lambda: sorted(mqtt_server.sessions))
    assert kept == ["v1-1", "v1-2", "v1-3", "v2-1", "v2-2", "v2-3"]  # the two oldest forgotten
    assert hub.stats["sessions.forgotten_total_limit"] == 2
    assert hub.run(lambda: mqtt_server.persistent_total) == 6


def test_offline_persistent_sessions_expire_and_free_their_slot(hub_factory) -> None:
    hub = hub_factory("echo")
    mqtt_server = hub.hub.mqtt
    mqtt_server.limits.session_expiry = 0.5
    v = registry.add_vendor(hub.engine, "expiring")
    raw, _ = connected(hub, "gw-exp", v.username, clean=False)
    raw.send(mqttraw.DISCONNECT)
    raw.close()
    live, _ = connected(hub, "gw-live", v.username, clean=False)  # connected: never expires
    wait_for(lambda: hub.stats["sessions.expired"] == 1)
    assert hub.run(lambda: (sorted(mqtt_server.sessions), mqtt_server.persistent_total)) == (["gw-live"], 1)
    live.close()


def test_a_clients_connect_history_is_bounded_and_an_idle_session_keeps_no_ack_queue(hub_factory) -> None:
    """Per-connection memory: the connect history keeps the last 64 connects (a list, not a 630-byte
    deque), and once its acknowledgements are written a session keeps no acknowledgement queue."""
    hub = hub_factory("protocol")
    user = registry.add_vendor(hub.engine, "meters-inc").username
    for _ in range(70):
        raw, body = connected(hub, "gw-hist", user)
        assert body == b"\x00\x00"
        raw.close()
    raw, _ = connected(hub, "gw-hist", user)
    sync = b'{"t": 1700000000, "request_id": "s-1", "param": {"cid": "m-1", "product_id": "p"}}'
    raw.send(mqttraw.publish("gateway_id/gw-hist/devices/sync", sync, qos=1, pid=7))
    assert raw.read_packet() == (0x40, b"\x00\x07")  # not subscribed: the PUBACK only

    def state() -> tuple[int, list[int], object]:
        rec = hub.hub.mqtt.client_record("gw-hist")
        return (
            len(rec.connects),
            sorted({code for _, code in rec.connects}),
            hub.hub.mqtt.sessions["gw-hist"].acks,
        )

    wait_for(lambda: hub.run(state)[2] is None, timeout=5)
    assert hub.run(state) == (64, [0], None)
    raw.close()
