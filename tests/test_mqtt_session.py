"""The sans-I/O MQTT session on its own: packets in, bytes and events out, no socket or event loop.

Input packets are decoded from hand-built frames (tests/mqttraw.py, written from the specification),
output bytes are decoded with a client-side decoder, so both directions go through real bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import mqttraw
from meterhub.core.auth import gateway_principal
from meterhub.mqtt import codec
from meterhub.mqtt.session import PAUSE_HELD, PAUSE_INBOUND, Limits, Session
from meterhub.transport import Principal

GW = "gw1"
PREFIX = f"gateway_id/{GW}/"


class Handle:
    """Stands for the application's work on one message (an asyncio future in the server)."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished


def gateway() -> Principal:
    return gateway_principal(GW, "vendor-user", 7)


def subscriber() -> Principal:
    return Principal(client_id="link1", username="u", kind="openhub", subscribe_exact=frozenset({"hub/t"}))


def new_session(principal: Principal | None = None, clean: bool = True, **limits: Any) -> Session:
    principal = principal or gateway()
    s = Session(principal.client_id, principal, clean, Limits(**limits), Counter())
    s.attach(object(), principal, False)
    assert out(s) == [codec.ConnAck(False, 0)]
    return s


def packets(*frames: bytes) -> list[Any]:
    return codec.Decoder(server_side=True).feed(b"".join(frames))


def feed(s: Session, *frames: bytes) -> list[Any]:
    """Give the session the frames; returns the events it raised (for Publish, acknowledges at once)."""
    events = []
    for packet in packets(*frames):
        event = s.receive(packet)
        if event is not None:
            events.append(event)
    return events


def out(s: Session) -> list[Any]:
    data = s.data_to_send()
    return codec.Decoder(server_side=False).feed(data) if data else []


def subscribe(s: Session, topic_filter: str = PREFIX + "#", qos: int = 2) -> None:
    feed(s, mqttraw.subscribe(1, topic_filter, qos))
    assert out(s) == [codec.SubAck(1, [qos])]


# --- inbound -------------------------------------------------------------------------------------


def test_inbound_qos1_is_an_event_and_acknowledged_when_the_application_is_done() -> None:
    s = new_session()
    [event] = feed(s, mqttraw.publish(PREFIX + "properties/report", b"r1", 1, 10))
    assert (event.topic, event.payload, event.qos, event.packet_id) == (
        PREFIX + "properties/report",
        b"r1",
        1,
        10,
    )
    assert out(s) == []  # nothing until the application says
    assert s.inbound_result(event, None) is None
    assert out(s) == [codec.PubAck(10)]
    assert s.stats["publish.in"] == 1


def test_inbound_acks_go_in_arrival_order_whatever_order_the_work_finishes() -> None:
    s = new_session()
    e1, e2, e3 = feed(s, *(mqttraw.publish(PREFIX + "x", b"%d" % i, 1, i) for i in (1, 2, 3)))
    h1, h2 = Handle(), Handle()
    assert s.inbound_result(e1, h1) is h1  # wait on the head
    assert s.inbound_result(e2, h2) is None  # someone waits on the head already
    assert s.inbound_result(e3, None) is None
    h2.finished = True
    assert out(s) == []
    h1.finished = True
    assert s.ack_ready() is None
    assert out(s) == [codec.PubAck(1), codec.PubAck(2), codec.PubAck(3)]


def test_inbound_qos2_handshake_and_duplicate() -> None:
    s = new_session()
    [event] = feed(s, mqttraw.publish(PREFIX + "x", b"once", 2, 5))
    s.inbound_result(event, None)
    assert out(s) == [codec.PubRec(5)]
    # the same packet again (the client did not get the PUBREC): no second delivery, PUBREC again
    dup = bytearray(mqttraw.publish(PREFIX + "x", b"once", 2, 5))
    dup[0] |= 0x08
    assert feed(s, bytes(dup)) == []
    assert out(s) == [codec.PubRec(5)]
    assert s.stats["publish.in_duplicate_qos2"] == 1
    feed(s, mqttraw.frame(0x62, b"\x00\x05"))  # PUBREL
    assert out(s) == [codec.PubComp(5)]
    assert s.inbound_qos2 == set()
    [again] = feed(s, mqttraw.publish(PREFIX + "x", b"new", 2, 5))  # the id is free again
    assert again.payload == b"new"


def test_publish_outside_the_clients_topics_is_acknowledged_and_dropped() -> None:
    s = new_session()
    assert feed(s, mqttraw.publish("gateway_id/other/x", b"no", 1, 3)) == []
    assert out(s) == [codec.PubAck(3)]
    assert s.stats["rejected.publish_acl"] == 1


def test_pingreq_and_disconnect() -> None:
    s = new_session()
    assert feed(s, mqttraw.PINGREQ) == []
    assert out(s) == [codec.PingResp()]
    [event] = feed(s, mqttraw.DISCONNECT)
    assert type(event) is codec.Disconnect


# --- outbound ------------------------------------------------------------------------------------


def test_outbound_qos1_and_qos2() -> None:
    s = new_session()
    subscribe(s)
    assert s.send(PREFIX + "commands", b"c1", 1)
    [p1] = out(s)
    assert (p1.topic, p1.payload, p1.qos, p1.packet_id, p1.dup) == (PREFIX + "commands", b"c1", 1, 1, False)
    feed(s, mqttraw.puback(1))
    assert s.inflight == {}
    assert s.send(PREFIX + "commands", b"c2", 2)
    [p2] = out(s)
    assert (p2.qos, p2.packet_id) == (2, 2)
    feed(s, mqttraw.frame(0x50, b"\x00\x02"))  # PUBREC
    assert out(s) == [codec.PubRel(2)]
    assert s.inflight[2][3] == 1
    feed(s, mqttraw.frame(0x70, b"\x00\x02"))  # PUBCOMP
    assert s.inflight == {}
    assert not s.send("gateway_id/gw1-not/x", b"", 1)  # no subscription matches
    assert s.stats["publish.out_unsubscribed"] == 1


def test_granted_qos_caps_the_delivery() -> None:
    s = new_session()
    subscribe(s, PREFIX + "#", 0)
    s.send(PREFIX + "a", b"x", 1)
    [p] = out(s)
    assert (p.qos, p.packet_id) == (0, None)
    assert s.inflight == {}


def test_inflight_window_then_queue() -> None:
    s = new_session(max_inflight=2)
    subscribe(s)
    for i in range(5):
        s.send(PREFIX + "a", b"%d" % i, 1)
    assert [p.payload for p in out(s)] == [b"0", b"1"]
    assert [m[1] for m in s.queue] == [b"2", b"3", b"4"]
    feed(s, mqttraw.puback(1))
    assert [p.payload for p in out(s)] == [b"2"]
    assert len(s.inflight) == 2


def test_not_writable_queues_and_writable_sends() -> None:
    s = new_session()
    subscribe(s)
    s.set_writable(False)
    s.send(PREFIX + "a", b"later", 1)
    assert out(s) == []
    s.set_writable(True)
    assert [p.payload for p in out(s)] == [b"later"]


def test_dup_resend_on_reconnect_and_session_present() -> None:
    s = new_session(clean=False, max_inflight=2)
    subscribe(s)
    for i in range(3):
        s.send(PREFIX + "a", b"%d" % i, 2)
    out(s)
    feed(s, mqttraw.frame(0x50, b"\x00\x01"))  # PUBREC for 1: it now awaits PUBCOMP
    out(s)
    s.detach(100.0)
    assert s.disconnected_at == 100.0 and s.connection is None
    s.send(PREFIX + "a", b"3", 1)  # queued while offline
    s.send(PREFIX + "a", b"q0", 0)  # QoS 0 is not kept for an offline client
    assert s.stats["publish.out_dropped_qos0_offline"] == 1
    s.attach(object(), gateway(), True)
    s.resume()
    got = out(s)
    assert got[0] == codec.ConnAck(True, 0)
    assert got[1] == codec.PubRel(1)
    assert (got[2].packet_id, got[2].dup, got[2].payload) == (2, True, b"1")
    assert got[3:] == []  # the window is full: the queue waits
    feed(s, mqttraw.frame(0x70, b"\x00\x01"))  # PUBCOMP 1
    [p] = out(s)
    assert (p.payload, p.dup, p.packet_id) == (b"2", False, 3)


def test_offline_queue_drops_the_oldest_counted() -> None:
    s = new_session(clean=False, max_queued=3)
    subscribe(s)
    s.detach(1.0)
    for i in range(5):
        s.send(PREFIX + "a", b"%d" % i, 1)
    assert [m[1] for m in s.queue] == [b"2", b"3", b"4"]
    assert s.stats["publish.out_dropped_queue_full"] == 2


def test_a_connected_subscriber_that_cannot_keep_up_loses_the_oldest() -> None:
    s = new_session(subscriber(), max_queued=3, max_inflight=1)
    subscribe(s, "hub/t", 1)
    for i in range(6):
        s.send("hub/t", b"%d" % i, 1)
    assert [m[1] for m in s.queue] == [b"3", b"4", b"5"]
    assert s.stats["publish.out_dropped_queue_full"] == 2
    assert s.held is None  # nothing of its own to slow down


# --- per-client back-pressure --------------------------------------------------------------------


def test_a_connected_gateway_is_never_dropped_its_requests_wait_instead() -> None:
    s = new_session(max_queued=4, max_inflight=2)
    subscribe(s)
    for i in range(6):  # 2 in flight + 4 queued: the bound
        assert s.send(PREFIX + "a", b"%d" % i, 1)
    out(s)
    assert s.held is not None and s.stats["flow.held"] == 1
    assert s.send(PREFIX + "a", b"6", 1)  # past the bound: still kept
    assert s.send(PREFIX + "a", b"q0", 0)  # QoS 0 past it: dropped, counted
    assert len(s.queue) == 5 and s.stats["publish.out_dropped_queue_full"] == 1
    # Its requests wait; its PINGREQ and PUBACKs do not.
    assert feed(s, mqttraw.publish(PREFIX + "r", b"req", 1, 40), mqttraw.PINGREQ) == []
    assert out(s) == [codec.PingResp()]
    assert s.next_released() is None
    feed(s, mqttraw.puback(1))  # queue 5 -> 4: still more than half of max_queued
    out(s)
    assert s.next_released() is None
    feed(s, mqttraw.puback(2), mqttraw.puback(3))  # queue down to 2 = half
    out(s)
    event = s.next_released()
    assert (event.payload, event.packet_id) == (b"req", 40)
    s.inbound_result(event, None)
    assert out(s) == [codec.PubAck(40)]
    assert s.next_released() is None and s.held is None
    assert [m[1] for m in s.queue] + [p[1] for p in s.inflight.values()] == [b"5", b"6", b"3", b"4"]


def test_pending_inbound_bound_pauses_reading_and_holds_the_rest() -> None:
    s = new_session(max_pending_inbound=2)
    handles = [Handle(), Handle()]
    e1, e2 = feed(s, *(mqttraw.publish(PREFIX + "x", b"%d" % i, 1, i) for i in (1, 2)))
    s.inbound_result(e1, handles[0])
    s.inbound_result(e2, handles[1])
    assert s.wants_pause & PAUSE_INBOUND
    assert feed(s, mqttraw.publish(PREFIX + "x", b"3", 1, 3)) == []  # held
    assert s.next_released() is None
    for h in handles:
        h.finished = True
    s.ack_ready()
    assert out(s) == [codec.PubAck(1), codec.PubAck(2)]
    assert not s.wants_pause & PAUSE_INBOUND
    event = s.next_released()
    assert event.payload == b"3"


def test_held_bytes_past_the_bound_ask_not_to_be_read() -> None:
    s = new_session(max_queued=1, max_inflight=1, max_held_inbound=1000)
    subscribe(s)
    s.send(PREFIX + "a", b"0", 1)
    s.send(PREFIX + "a", b"1", 1)  # queued: at the bound
    out(s)
    feed(s, *(mqttraw.publish(PREFIX + "x", b"y" * 200, 1, i) for i in range(1, 4)))
    assert not s.wants_pause & PAUSE_HELD
    feed(s, mqttraw.publish(PREFIX + "x", b"y" * 200, 1, 4))
    assert s.wants_pause & PAUSE_HELD and s.held_full_since is not None
    feed(s, mqttraw.puback(1))  # the queue empties: released, and reading may go on
    released = []
    while (event := s.next_released()) is not None:
        released.append(event.packet_id)
        s.inbound_result(event, None)
    assert released == [1, 2, 3, 4]
    assert not s.wants_pause & PAUSE_HELD


# --- subscriptions -------------------------------------------------------------------------------


def test_subscription_bound_length_and_acl() -> None:
    s = new_session(max_subscriptions=2, max_topic_length=40)
    frame = mqttraw.frame(
        0x82,
        b"\x00\x09"
        + b"".join(
            len(f).to_bytes(2, "big") + f.encode() + b"\x01"
            for f in (PREFIX + "a", PREFIX + "b", PREFIX + "c", PREFIX + "a", "gateway_id/x/#")
        ),
    )
    feed(s, frame)
    assert out(s) == [codec.SubAck(9, [1, 1, 0x80, 1, 0x80])]
    feed(s, mqttraw.subscribe(10, PREFIX + "z" * 40, 1))
    assert out(s) == [codec.SubAck(10, [0x80])]
    assert sorted(s.subscriptions) == [PREFIX + "a", PREFIX + "b"]
    assert s.stats["rejected.subscribe_limit"] == 1 and s.stats["rejected.subscribe_acl"] == 2


# --- state as plain data -------------------------------------------------------------------------


def test_state_round_trips_through_json_and_resumes_identically() -> None:
    s = new_session(clean=False, max_inflight=2)
    subscribe(s)
    subscribe(s, PREFIX + "commands", 1)
    for i in range(4):
        s.send(PREFIX + "commands", b"\x00\xff%d" % i, 2 if i == 0 else 1)
    out(s)
    feed(s, mqttraw.frame(0x50, b"\x00\x01"))  # PUBREC: stage 1
    [event] = feed(s, mqttraw.publish(PREFIX + "x", b"q2", 2, 77))
    s.inbound_result(event, None)
    out(s)
    s.detach(5.0)
    data = json.loads(json.dumps(s.to_dict()))
    assert data["inflight"][0][:2] == [1, PREFIX + "commands"] and data["inflight"][0][4] == 1
    assert data["inbound_qos2"] == [77] and data["next_pid"] == 3 and len(data["queue"]) == 2
    copy = Session.from_dict(data, gateway(), Limits(max_inflight=2), Counter())
    assert copy.to_dict() == s.to_dict()
    for one in (s, copy):
        one.attach(object(), gateway(), True)
        one.resume()
    assert s.data_to_send() == copy.data_to_send()
    # the copy goes on where the original stopped: a duplicate of the QoS 2 message is not redelivered
    assert copy.receive(packets(mqttraw.publish(PREFIX + "x", b"q2", 2, 77))[0]) is None
