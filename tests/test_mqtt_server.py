"""meterhub's MQTT server over loopback, with paho-mqtt, raw sockets and mosquitto clients."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import event

import mqttraw
from conftest import RunningHub, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry
from meterhub.tools.devcert import make_dev_cert


def connack_code(hub: RunningHub, frame: bytes) -> int:
    raw = mqttraw.RawClient(hub.port)
    try:
        raw.send(frame)
        first, body = raw.read_packet()
        assert first == 0x20 and len(body) == 2
        return body[1]
    finally:
        raw.close()


# --- CONNACK codes -------------------------------------------------------------------------------


def test_connack_codes_exact_bytes(echo_hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    good = gateway_password("gw1", user)
    assert connack_code(echo_hub, mqttraw.connect("gw1", user, good)) == 0x00
    assert connack_code(echo_hub, mqttraw.connect("gw1", user, good.upper())) == 0x00
    assert connack_code(echo_hub, mqttraw.connect("gw1", user, "0" * 32)) == 0x04
    assert connack_code(echo_hub, mqttraw.connect("gw1", "nobody", gateway_password("gw1", "nobody"))) == 0x04
    assert connack_code(echo_hub, mqttraw.connect("gw1")) == 0x04
    assert connack_code(echo_hub, mqttraw.connect("gw1", user, good, level=5)) == 0x01
    assert connack_code(echo_hub, mqttraw.connect("", user, gateway_password("", user))) == 0x02
    assert connack_code(echo_hub, mqttraw.connect("a/b", user, gateway_password("a/b", user))) == 0x02
    assert connack_code(echo_hub, mqttraw.connect("a+", user, gateway_password("a+", user))) == 0x02
    assert connack_code(echo_hub, mqttraw.connect("a\x01", user, gateway_password("a\x01", user))) == 0x02
    long_id = "x" * 129
    assert connack_code(echo_hub, mqttraw.connect(long_id, user, gateway_password(long_id, user))) == 0x02
    ok_id = "x" * 128
    assert connack_code(echo_hub, mqttraw.connect(ok_id, user, gateway_password(ok_id, user))) == 0x00
    # MQTT 3.1 is accepted
    assert (
        connack_code(
            echo_hub, mqttraw.connect("gw31", user, gateway_password("gw31", user), level=3, name=b"MQIsdp")
        )
        == 0x00
    )
    # keep-alive beyond the platform's limit: "heartbeat interval does not meet the platform requirements"
    assert (
        connack_code(echo_hub, mqttraw.connect("gwk", user, gateway_password("gwk", user), keepalive=7200))
        == 0x02
    )
    stats = echo_hub.stats
    assert stats["connack.4"] == 3 and stats["connack.1"] == 1 and stats["connack.2"] == 6


def test_not_authorized_cases(echo_hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    engine = echo_hub.engine

    def code(cid: str) -> int:
        return connack_code(echo_hub, mqttraw.connect(cid, user, gateway_password(cid, user)))

    registry.set_gateway(engine, "gw-off", enabled=False)
    assert code("gw-off") == 0x05
    registry.set_gateway(engine, "gw-off", enabled=True)
    assert code("gw-off") == 0x00

    registry.set_vendor(engine, "acme", allowlist_enabled=True)
    assert code("gw-new") == 0x05
    registry.set_gateway(engine, "gw-new", vendor="acme", allowed=True)
    assert code("gw-new") == 0x00

    other = registry.add_vendor(engine, "other")
    registry.set_gateway(engine, "gw-theirs", vendor="other")
    assert (
        connack_code(echo_hub, mqttraw.connect("gw-theirs", user, gateway_password("gw-theirs", user))) == 5
    )
    assert (
        connack_code(
            echo_hub,
            mqttraw.connect("gw-theirs", other.username, gateway_password("gw-theirs", other.username)),
        )
        == 0
    )

    registry.set_vendor(engine, "acme", enabled=False)
    registry.set_vendor(engine, "acme", allowlist_enabled=False)
    assert code("gw-any") == 0x05


def test_a_connect_storm_is_answered_in_batches_each_with_its_own_code(
    echo_hub: RunningHub, vendor: registry.Vendor
) -> None:
    """600 CONNECTs sent at once (good, wrong password, unknown vendor, disabled, another vendor's):
    every one gets its own code, and the database is asked far fewer than 600 times."""
    engine = echo_hub.engine
    user = vendor.username
    other = registry.add_vendor(engine, "storm-other")
    for i in range(0, 600, 50):
        registry.set_gateway(engine, f"storm-{i}", enabled=False)
    registry.set_gateway(engine, "storm-7", vendor="storm-other")
    expected: dict[str, int] = {}
    frames: dict[str, bytes] = {}
    for i in range(600):
        cid = f"storm-{i}"
        if i % 50 == 0 or i == 7:
            username, password, code = user, gateway_password(cid, user), 0x05
        elif i % 7 == 3:
            username, password, code = user, "0" * 32, 0x04
        elif i % 11 == 5:
            username, password, code = "mh_nobody", gateway_password(cid, "mh_nobody"), 0x04
        elif i % 13 == 1:
            username, password, code = other.username, gateway_password(cid, other.username), 0x00
        else:
            username, password, code = user, gateway_password(cid, user), 0x00
        expected[cid] = code
        frames[cid] = mqttraw.connect(cid, username, password)
    authenticator = echo_hub.hub.mqtt.authenticator
    lookups_before = authenticator.lookups

    def remote_database_latency(*_: Any) -> None:  # each query takes 20 ms, as over a network
        time.sleep(0.02)

    sockets = {cid: mqttraw.RawClient(echo_hub.port, timeout=20) for cid in frames}
    event.listen(engine, "before_cursor_execute", remote_database_latency)
    try:
        for cid, sock in sockets.items():
            sock.send(frames[cid])
        got = {}
        for cid, sock in sockets.items():
            kind, body = sock.read_packet()
            assert kind == 0x20
            got[cid] = body[1]
    finally:
        event.remove(engine, "before_cursor_execute", remote_database_latency)
        for sock in sockets.values():
            sock.close()
    assert got == expected
    assert sorted(set(expected.values())) == [0x00, 0x04, 0x05]
    # One lookup (two 20 ms queries) answers every CONNECT that arrived while the previous one ran;
    # without batching it would be 600 lookups (24 s, past the clients' 20 s timeout).
    lookups = authenticator.lookups - lookups_before
    assert 1 <= lookups <= 20, lookups


def test_paho_reason_codes(echo_hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    ok = clients(echo_hub.port, "gw-p1", vendor.username)
    rc, flags = ok.connect()
    assert rc == 0 and not flags.session_present
    bad = clients(echo_hub.port, "gw-p2", vendor.username, "bad")
    rc, _ = bad.connect()
    assert rc.is_failure and str(rc) == "Bad user name or password"


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
def test_mosquitto_clients(echo_hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    base = ["-h", "127.0.0.1", "-p", str(echo_hub.port), "-V", "mqttv311", "-u", user]
    res = subprocess.run(
        [
            "mosquitto_pub",
            *base,
            "-i",
            "gw-m1",
            "-P",
            "wrong",
            "-t",
            "gateway_id/gw-m1/x",
            "-m",
            "hi",
            "-q",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode != 0
    assert "bad user name or password" in (res.stderr + res.stdout).lower()

    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            *base,
            "-i",
            "gw-m1",
            "-P",
            gateway_password("gw-m1", user),
            "-t",
            "gateway_id/gw-m1/#",
            "-q",
            "1",
            "-C",
            "1",
            "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: echo_hub.run(
            lambda: (
                "gw-m1" in echo_hub.hub.mqtt.sessions
                and bool(echo_hub.hub.mqtt.sessions["gw-m1"].subscriptions)
            )
        )
    )
    assert echo_hub.run(lambda: echo_hub.hub.mqtt.publish("gw-m1", "gateway_id/gw-m1/commands", b"on", 1))
    out, err = sub.communicate(timeout=10)
    assert sub.returncode == 0, err
    assert out.strip() == "gateway_id/gw-m1/commands on"

    res = subprocess.run(
        [
            "mosquitto_pub",
            *base,
            "-i",
            "gw-m2",
            "-P",
            gateway_password("gw-m2", user),
            "-t",
            "gateway_id/gw-m2/properties/report",
            "-m",
            "{}",
            "-q",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 0, res.stderr
    received = echo_hub.run(lambda: list(echo_hub.hub.handler.received))
    assert ("gw-m2", "gateway_id/gw-m2/properties/report", b"{}") in received


# --- TLS -----------------------------------------------------------------------------------------


def test_tls_listener(hub_factory, tmp_path: Path, clients) -> None:
    paths = make_dev_cert(tmp_path / "tls", ["localhost", "127.0.0.1"])
    from conftest import free_port

    hub = hub_factory("echo", tls_port=free_port(), tls_cert=paths["cert"], tls_key=paths["key"])
    v = registry.add_vendor(hub.engine, "tlsvendor")
    c = clients(hub.hub.tls_port, "gw-tls", v.username, tls_ca=str(paths["ca"]))
    rc, _ = c.connect()
    assert rc == 0
    c.subscribe("gateway_id/gw-tls/#")
    c.publish("gateway_id/gw-tls/ping", b"over tls")
    msg = c.get()
    assert (msg.topic, msg.payload) == ("gateway_id/gw-tls/ping/echo", b"over tls")
    # A plain-text client on the TLS port gets no CONNACK.
    raw = mqttraw.RawClient(hub.hub.tls_port, timeout=2)
    raw.send(mqttraw.connect("gw-plain", v.username, gateway_password("gw-plain", v.username)))
    with pytest.raises((ConnectionError, TimeoutError, OSError)):
        first, _ = raw.read_packet()
        assert first != 0x20
    raw.close()


# --- isolation and QoS ---------------------------------------------------------------------------


def test_gateways_are_isolated(echo_hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    a = clients(echo_hub.port, "gwA", vendor.username)
    b = clients(echo_hub.port, "gwB", vendor.username)
    a.connect()
    b.connect()
    assert a.subscribe("gateway_id/gwB/#")[0].value == 0x80
    assert a.subscribe("#")[0].value == 0x80
    assert a.subscribe("gateway_id/+/commands")[0].value == 0x80
    assert a.subscribe("gateway_id/gwA/#")[0].value == 1
    b.subscribe("gateway_id/gwB/#")
    a.publish("gateway_id/gwB/properties/report", b"intrusion")
    a.publish("gateway_id/gwA/properties/report", b"mine")
    assert a.get().payload == b"mine"
    received = echo_hub.run(lambda: list(echo_hub.hub.handler.received))
    assert [r for r in received if r[2] == b"intrusion"] == []
    assert echo_hub.stats["rejected.publish_acl"] == 1
    assert echo_hub.stats["rejected.subscribe_acl"] == 3
    with pytest.raises(Exception):  # noqa: B017 - queue.Empty
        b.get(timeout=0.5)


def test_qos1_and_qos2_both_directions(echo_hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    c = clients(echo_hub.port, "gwQ", vendor.username)
    c.connect()
    c.subscribe("gateway_id/gwQ/#", qos=2)
    c.publish("gateway_id/gwQ/q2", b"two", qos=2)
    c.publish("gateway_id/gwQ/q1", b"one", qos=1)
    got = {c.get().topic: None for _ in range(2)}
    assert set(got) == {"gateway_id/gwQ/q2/echo", "gateway_id/gwQ/q1/echo"}
    received = echo_hub.run(lambda: [r for r in echo_hub.hub.handler.received if r[0] == "gwQ"])
    assert [r[2] for r in received] == [b"two", b"one"]  # QoS 2 delivered exactly once
    for qos in (0, 1, 2):
        assert echo_hub.run(
            lambda q=qos: echo_hub.hub.mqtt.publish("gwQ", f"gateway_id/gwQ/down{q}", b"x", q)
        )
        msg = c.get()
        assert (msg.topic, msg.qos) == (f"gateway_id/gwQ/down{qos}", qos)
    wait_for(lambda: echo_hub.run(lambda: not echo_hub.hub.mqtt.sessions["gwQ"].inflight))


def test_persistent_session_gets_queued_messages(
    echo_hub: RunningHub, vendor: registry.Vendor, clients
) -> None:
    c = clients(echo_hub.port, "gwP", vendor.username, clean_session=False)
    rc, flags = c.connect()
    assert rc == 0 and not flags.session_present
    c.subscribe("gateway_id/gwP/commands", qos=1)
    c.close()
    wait_for(lambda: not echo_hub.run(lambda: echo_hub.hub.mqtt.is_connected("gwP")))
    for i in range(5):
        assert echo_hub.run(
            lambda i=i: echo_hub.hub.mqtt.publish("gwP", "gateway_id/gwP/commands", f"cmd{i}".encode(), 1)
        )
    # a QoS 0 message to an offline client is not kept
    echo_hub.run(lambda: echo_hub.hub.mqtt.publish("gwP", "gateway_id/gwP/commands", b"lost", 0))
    c2 = clients(echo_hub.port, "gwP", vendor.username, clean_session=False)
    rc, flags = c2.connect()
    assert rc == 0 and flags.session_present
    assert [c2.get().payload for _ in range(5)] == [f"cmd{i}".encode() for i in range(5)]
    # clean_session=1 discards it
    c2.close()
    c3 = clients(echo_hub.port, "gwP", vendor.username, clean_session=True)
    rc, flags = c3.connect()
    assert rc == 0 and not flags.session_present


def test_unacknowledged_messages_are_retransmitted_with_dup(
    echo_hub: RunningHub, vendor: registry.Vendor
) -> None:
    user = vendor.username
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.connect("gwR", user, gateway_password("gwR", user), clean=False))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(mqttraw.subscribe(1, "gateway_id/gwR/commands", 1))
    assert raw.read_packet() == (0x90, b"\x00\x01\x01")
    echo_hub.run(lambda: echo_hub.hub.mqtt.publish("gwR", "gateway_id/gwR/commands", b"c1", 1))
    first, body = raw.read_packet()
    assert first == 0x32  # QoS 1, no DUP
    raw.close()  # never acknowledged
    wait_for(lambda: not echo_hub.run(lambda: echo_hub.hub.mqtt.is_connected("gwR")))
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.connect("gwR", user, gateway_password("gwR", user), clean=False))
    assert raw.read_packet() == (0x20, b"\x01\x00")  # session present
    first, body2 = raw.read_packet()
    assert first == 0x3A and body2 == body  # DUP flag set, same packet id and payload
    raw.send(mqttraw.puback(int.from_bytes(body2[2 + len("gateway_id/gwR/commands") :][:2], "big")))
    wait_for(lambda: echo_hub.run(lambda: not echo_hub.hub.mqtt.sessions["gwR"].inflight))
    raw.close()


# --- liveness ------------------------------------------------------------------------------------


def test_keepalive_expiry_closes_silent_client(echo_hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.connect("gwK", user, gateway_password("gwK", user), keepalive=1))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(mqttraw.PINGREQ)
    assert raw.read_packet() == (0xD0, b"")
    closed_after = raw.closed_within(5)
    assert closed_after is not None and 1.3 <= closed_after <= 2.5, closed_after
    assert echo_hub.stats["closed.keepalive"] == 1


def test_connect_timeout(hub_factory) -> None:
    hub = hub_factory("echo", connect_timeout=0.5)
    raw = mqttraw.RawClient(hub.port)
    closed_after = raw.closed_within(3)
    assert closed_after is not None and closed_after < 1.5
    assert hub.stats["closed.connect_timeout"] == 1


def test_connect_timeout_does_not_cut_off_an_authentication_in_progress(
    hub_factory,
) -> None:
    """connect_timeout is for the CONNECT to arrive; once it has, a slow authentication is answered
    (within auth_timeout) rather than the socket being closed under it."""
    hub = hub_factory("echo", connect_timeout=0.5)
    user = registry.add_vendor(hub.engine, "slowauth").username
    real = hub.hub.mqtt.authenticator

    class SlowAuthenticator:  # the authentication takes 1.5 s: three connect timeouts
        async def authenticate(self, *args: Any) -> Any:
            await asyncio.sleep(1.5)
            return await real.authenticate(*args)

    hub.hub.mqtt.authenticator = SlowAuthenticator()
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect("gw-slow", user, gateway_password("gw-slow", user)))
    started = time.monotonic()
    assert raw.read_packet() == (0x20, b"\x00\x00")
    assert time.monotonic() - started >= 1.4
    assert hub.stats["closed.connect_timeout"] == 0
    raw.close()


def test_will_message_goes_to_the_application(echo_hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(
        mqttraw.connect(
            "gwW", user, gateway_password("gwW", user), will=("gateway_id/gwW/devices/status", b"gone", 1)
        )
    )
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.close()  # no DISCONNECT: the will fires
    wait_for(
        lambda: echo_hub.run(
            lambda: ("gwW", "gateway_id/gwW/devices/status", b"gone") in list(echo_hub.hub.handler.received)
        )
    )
    # a will outside the gateway's own topics is not authorized
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.connect("gwW2", user, gateway_password("gwW2", user), will=("elsewhere", b"x", 0)))
    assert raw.read_packet() == (0x20, b"\x00\x05")
    raw.close()
    # a clean DISCONNECT discards the will
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(
        mqttraw.connect(
            "gwW3", user, gateway_password("gwW3", user), will=("gateway_id/gwW3/devices/status", b"gone3", 1)
        )
    )
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(mqttraw.DISCONNECT)
    assert raw.closed_within(2) is not None
    time.sleep(0.2)
    assert all(r[2] != b"gone3" for r in echo_hub.run(lambda: list(echo_hub.hub.handler.received)))


def test_takeover_needs_authentication(echo_hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    first = clients(echo_hub.port, "gwT", vendor.username, clean_session=False)
    first.connect()
    first.subscribe("gateway_id/gwT/#")
    # same client id, wrong password: refused, and the first connection and session are untouched
    intruder = clients(echo_hub.port, "gwT", vendor.username, "wrong", clean_session=True)
    rc, _ = intruder.connect()
    assert str(rc) == "Bad user name or password"
    assert echo_hub.run(lambda: echo_hub.hub.mqtt.is_connected("gwT"))
    first.publish("gateway_id/gwT/still", b"here")
    assert first.get().payload == b"here"
    assert echo_hub.run(lambda: list(echo_hub.hub.mqtt.sessions["gwT"].subscriptions)) == ["gateway_id/gwT/#"]
    # right password: takes over, the first connection is closed
    second = clients(echo_hub.port, "gwT", vendor.username, clean_session=False)
    rc, flags = second.connect()
    assert rc == 0 and flags.session_present
    first.disconnects.get(timeout=5)
    events = echo_hub.run(lambda: list(echo_hub.hub.handler.events))
    assert ("disconnected", "gwT", "takeover") in events
    assert echo_hub.stats["connections.taken_over"] == 1


# --- protection ----------------------------------------------------------------------------------


def test_malformed_and_oversized_packets_close_the_connection(
    echo_hub: RunningHub, vendor: registry.Vendor
) -> None:
    user = vendor.username
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(b"\xff\xff\xff\xff\xff")
    assert raw.closed_within(2) is not None
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.connect("gwBig", user, gateway_password("gwBig", user)))
    assert raw.read_packet()[0] == 0x20
    raw.send(mqttraw.publish("gateway_id/gwBig/x", b"\x00" * 70_000, qos=1)[:10])
    assert raw.closed_within(2) is not None
    raw = mqttraw.RawClient(echo_hub.port)
    raw.send(mqttraw.publish("gateway_id/x/y", b"before connect"))
    assert raw.closed_within(2) is not None
    stats = echo_hub.stats
    assert stats["protocol_error.packet-too-large"] == 1
    assert stats["protocol_error.not-connected"] == 1
    assert sum(v for k, v in stats.items() if k.startswith("protocol_error.")) == 3


def test_stalled_client_cannot_grow_server_memory(hub_factory) -> None:
    hub = hub_factory("echo", slow_client_timeout=1.5, max_queued=100, write_buffer_high=64 * 1024)
    v = registry.add_vendor(hub.engine, "stall")
    raw = mqttraw.RawClient(hub.port)
    raw.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    raw.send(mqttraw.connect("gwS", v.username, gateway_password("gwS", v.username)))
    assert raw.read_packet()[0] == 0x20
    raw.send(mqttraw.subscribe(1, "gateway_id/gwS/#", 0))
    assert raw.read_packet()[0] == 0x90
    payload = b"z" * 10_000
    mqtt_server = hub.hub.mqtt

    def flood() -> tuple[int, int]:
        for _ in range(5000):  # 50 MB offered to a client that never reads
            mqtt_server.publish("gwS", "gateway_id/gwS/flood", payload, 0)
        s = mqtt_server.sessions["gwS"]
        conn = s.connection
        held = conn.transport.get_write_buffer_size() + conn.out_size if conn else 0
        return len(s.queue or ()), held

    queued, buffered = hub.run(flood)
    assert queued <= 100
    # bound: the high-water mark + two coalesced writes (a quarter of it each) + one message
    assert buffered <= 1.5 * 64 * 1024 + 20_000
    assert hub.stats["publish.out_dropped_queue_full"] >= 4000
    wait_for(lambda: hub.stats["closed.slow_client"] == 1, timeout=6)
    raw.close()


@pytest.mark.parametrize("handler_delay", [0.05])
def test_inbound_acks_wait_for_the_application(hub_factory, handler_delay: float, clients) -> None:
    hub = hub_factory("echo")
    hub.hub.handler.ack_delay = handler_delay
    v = registry.add_vendor(hub.engine, "slowapp")
    c = clients(hub.port, "gwD", v.username)
    c.connect()
    started = time.monotonic()
    c.publish("gateway_id/gwD/x", b"1", qos=1)
    assert time.monotonic() - started >= handler_delay * 0.9
    assert isinstance(mqtt.MQTTv311, int)
