"""Per-client flow control over loopback: what meterhub owes a connected gateway is never dropped.

A gateway flushing a backlog with a large in-flight window must get every PUBACK *and* every answer;
its outbound queue filling up slows that gateway down (its requests wait unread), not the others.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

import mqttraw
from conftest import RunningHub, close_paho, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry


def _report(cid: str, value: int) -> bytes:
    return json.dumps(
        {
            "t": int(time.time()),
            "request_id": str(uuid.uuid4()),
            "param": {"cid": cid, "id": "5", "value": value},
        }
    ).encode()


def _sync(cid: str) -> bytes:
    return json.dumps(
        {
            "t": int(time.time()),
            "request_id": str(uuid.uuid4()),
            "param": {"cid": cid, "product_id": "pid-meter"},
        }
    ).encode()


class Counting:
    """A paho gateway that counts its PUBACKs and the answers it gets, per topic."""

    def __init__(self, port: int, gw: str, username: str, inflight: int) -> None:
        self.gw = gw
        self.pubacks = 0
        self.answers: dict[str, int] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=gw, protocol=mqtt.MQTTv311)
        c.username_pw_set(username, gateway_password(gw, username))
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)
        c.on_connect = lambda *_a: self.connected.set()
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.c = c
        c.connect("127.0.0.1", port, keepalive=60)
        c.loop_start()
        assert self.connected.wait(5)
        c.subscribe(f"gateway_id/{gw}/#", 1)
        assert self.subscribed.wait(5)

    def _on_publish(self, *_a: Any) -> None:
        with self.lock:
            self.pubacks += 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.answers[msg.topic] = self.answers.get(msg.topic, 0) + 1

    def answered(self, kind: str) -> int:
        with self.lock:
            return self.answers.get(f"gateway_id/{self.gw}/{kind}/response", 0)

    def close(self) -> None:
        close_paho(self.c)


def test_a_10000_report_burst_gets_every_puback_and_every_answer(hub_factory) -> None:
    hub: RunningHub = hub_factory("protocol")
    vendor = registry.add_vendor(hub.engine, "burst")
    burst = Counting(hub.port, "gw-burst", vendor.username, inflight=10_000)
    bystander = Counting(hub.port, "gw-bystander", vendor.username, inflight=20)
    try:
        burst.c.publish("gateway_id/gw-burst/devices/sync", _sync("m-burst"), 1)
        bystander.c.publish("gateway_id/gw-bystander/devices/sync", _sync("m-by"), 1)
        wait_for(lambda: burst.answered("devices/sync") == 1 and bystander.answered("devices/sync") == 1)
        base = burst.pubacks
        n = 10_000
        for i in range(n):
            burst.c.publish("gateway_id/gw-burst/properties/report", _report("m-burst", i), 1)
        # Meanwhile a bystander's reports are answered one after the other.
        by_sent = 0
        while burst.answered("properties/report") < n and by_sent < 200:
            bystander.c.publish("gateway_id/gw-bystander/properties/report", _report("m-by", by_sent), 1)
            by_sent += 1
            wait_for(lambda s=by_sent: bystander.answered("properties/report") == s, timeout=20)
        wait_for(lambda: burst.answered("properties/report") >= n, timeout=120)
        wait_for(lambda: burst.pubacks - base >= n, timeout=10)
        time.sleep(0.3)
        assert burst.pubacks - base == n
        assert burst.answered("properties/report") == n
        assert by_sent > 0 and bystander.answered("properties/report") == by_sent
        stats = hub.stats
        assert stats["publish.out_dropped_queue_full"] == 0
        assert stats["flow.held"] >= 1  # the burst was slowed down, not dropped
        assert hub.hub.handler.stats["report.code.0"] == n + by_sent
    finally:
        burst.close()
        bystander.close()


def test_requests_wait_while_answers_are_not_taken_and_nothing_is_dropped(hub_factory) -> None:
    """A gateway that sends 300 requests but takes none of its 32 in-flight answers: at most
    ``max_queued`` answers wait, its further requests are held unprocessed (and not acknowledged),
    yet its PINGREQs are answered; once it acknowledges, every request is answered exactly once."""
    hub = hub_factory("echo", max_queued=50, max_inflight=8)
    v = registry.add_vendor(hub.engine, "holder")
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect("gwH", v.username, gateway_password("gwH", v.username)))
    assert raw.read_packet()[0] == 0x20
    raw.send(mqttraw.subscribe(1, "gateway_id/gwH/#", 1))
    assert raw.read_packet()[0] == 0x90
    n = 300
    raw.send(b"".join(mqttraw.publish("gateway_id/gwH/echo", b"%d" % i, 1, i + 1) for i in range(n)))
    mqtt_server = hub.hub.mqtt
    wait_for(lambda: hub.run(lambda: len(mqtt_server.sessions["gwH"].queue or ())) >= 50)
    time.sleep(0.3)

    def sizes() -> tuple[int, int]:
        session = mqtt_server.sessions["gwH"]
        return len(session.queue or ()), len(getattr(session, "held", None) or ())

    queued, held = hub.run(sizes)
    assert 50 <= queued <= 50 + 8  # max_queued, + what was in processing
    assert held > 0 and queued + held + 8 <= n
    raw.send(mqttraw.PINGREQ)
    # Read everything, acknowledging every answer as it comes.
    answers: list[bytes] = []
    pubacks: set[int] = set()
    pong = 0
    deadline = time.monotonic() + 30
    while len(answers) < n or len(pubacks) < n:
        assert time.monotonic() < deadline, (len(answers), len(pubacks))
        first, body = raw.read_packet()
        kind = first & 0xF0
        if kind == 0x30:
            tlen = int.from_bytes(body[:2], "big")
            pid = int.from_bytes(body[2 + tlen : 4 + tlen], "big")
            answers.append(body[4 + tlen :])
            raw.send(mqttraw.puback(pid))
        elif kind == 0x40:
            pubacks.add(int.from_bytes(body[:2], "big"))
        elif kind == 0xD0:
            pong += 1
    assert pong == 1
    assert sorted(answers, key=int) == [b"%d" % i for i in range(n)]
    assert pubacks == set(range(1, n + 1))
    assert hub.stats["publish.out_dropped_queue_full"] == 0
    raw.close()


def test_a_gateway_that_never_takes_its_answers_is_bounded_then_disconnected(hub_factory) -> None:
    """Requests keep coming, answers are never acknowledged: what is held back stops at
    ``max_held_inbound`` (the socket is no longer read), and the client is disconnected as a slow
    client after ``slow_client_timeout``; nothing was dropped while it was connected."""
    hub = hub_factory("echo", max_queued=5, max_inflight=1, max_held_inbound=4000, slow_client_timeout=1.0)
    v = registry.add_vendor(hub.engine, "never-acks")
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect("gwN", v.username, gateway_password("gwN", v.username)))
    assert raw.read_packet()[0] == 0x20
    raw.send(mqttraw.subscribe(1, "gateway_id/gwN/#", 1))
    assert raw.read_packet()[0] == 0x90
    batch = 10  # packets per write, so that the server reads them in separate reads
    per_packet = 96 + 100 + len("gateway_id/gwN/echo")  # what one costs held back
    for b in range(20):
        raw.send(
            b"".join(
                mqttraw.publish("gateway_id/gwN/echo", b"p" * 100, 1, b * batch + i + 1) for i in range(batch)
            )
        )
        time.sleep(0.02)
    wait_for(lambda: hub.stats["flow.held_full"] == 1)
    time.sleep(0.2)
    mqtt_server = hub.hub.mqtt
    held_bytes = hub.run(lambda: mqtt_server.sessions["gwN"].held_bytes)
    # past the bound by at most what one read brought (in the stream, not read, is the rest)
    assert 4000 < held_bytes <= 4000 + 5 * batch * per_packet < 200 * per_packet
    wait_for(lambda: hub.stats["closed.slow_client"] == 1, timeout=5)
    assert hub.stats["publish.out_dropped_queue_full"] == 0
    assert raw.closed_within(2) is not None
