"""The edge protocol end to end: real MQTT clients, meterhub's server, real SQLite."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from conftest import Client, RunningHub, refuse_marked_reports, storage_held, wait_for
from meterhub.storage import registry, schema

GW = "gw-e2e"


class Gateway:
    """A gateway test double over a real paho client: publishes and collects the server's answers."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.gw = client.client_id

    def send(self, kind: str, payload: Any, qos: int = 1) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(f"gateway_id/{self.gw}/{kind}", data, qos)

    def ask(self, kind: str, payload: Any) -> dict[str, Any]:
        """Publish on ``kind`` and return the JSON answer from ``kind/response``."""
        self.send(kind, payload)
        msg = self.client.get(timeout=5)
        assert msg.topic == f"gateway_id/{self.gw}/{kind}/response", msg.topic
        return json.loads(msg.payload)

    def sync(self, cid: str, product_id: str = "pid-meter", **fields: Any) -> dict[str, Any]:
        return self.ask("devices/sync", envelope({"cid": cid, "product_id": product_id, **fields}))

    def report(self, cid: str, dp: str, value: Any, **kw: Any) -> dict[str, Any]:
        return self.ask("properties/report", envelope({"cid": cid, "id": dp, "value": value}, **kw))


def envelope(param: Any, t: Any = None, request_id: str | None = None) -> dict[str, Any]:
    return {
        "t": int(time.time()) if t is None else t,
        "request_id": request_id or str(uuid.uuid4()),
        "param": param,
    }


@pytest.fixture
def hub(hub_factory) -> RunningHub:
    return hub_factory("protocol", presence_timeout=180.0)


@pytest.fixture
def gateway_factory(hub: RunningHub, clients):
    vendor = registry.add_vendor(hub.engine, "meters-inc")

    def make(gw: str = GW, subscribe: bool = True) -> Gateway:
        c = clients(hub.port, gw, vendor.username)
        rc, _ = c.connect()
        assert rc == 0
        if subscribe:
            c.subscribe(f"gateway_id/{gw}/#", 1)
        return Gateway(c)

    return make


@pytest.fixture
def gw(gateway_factory) -> Gateway:
    return gateway_factory()


def rows(hub: RunningHub, sql: str, **params: Any) -> list[Any]:
    with hub.engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def service(hub: RunningHub) -> Any:
    return hub.hub.handler


# --- the document's own samples ------------------------------------------------------------------

SAMPLE_SYNC = b"""{
    "t":1627281234,
    "request_id":"cd0fd3c3-bd15-42f6-8bf9-d230a0a1b2",
    "param":{
        "cid":"92dda538fc2e636fd4b0c37f1234",
        "product_id":"",
        "vendor_code":"",
        "comm_type":"",
        "device_ip":"",
        "mac_address":"",
        "device_name":"",
        "device_desc":"",
        "install_location":"",
        "device_server_id":"",
        "product_sub_type":""
    }
}"""

SAMPLE_REPORT = b"""{
    "t":1627281234,
    "request_id":"cd0fd3c3-bd15-42f6-8bf9-d2301234",
    "param":{
        "cid":"ee1880aca61234",
        "id":"1",
        "value":"run"
    }
}"""

SAMPLE_STATUS = b"""{
  "t":1627212345,
  "request_id":"cd0fd3c3-bd15-42f6-8bf9-d2301234",
  "param": [{
    "cid": "92dda538fc2e636fd4b0c37f1234",
    "status":true
  },
  {
    "cid": "da538fc2ebffdb463692dfd1234 ",
    "status":false
  }
 ]
}"""


def _now_t(sample: bytes) -> bytes:
    return sample.replace(b"1627281234", str(int(time.time())).encode()).replace(
        b"1627212345", str(int(time.time())).encode()
    )


def test_document_samples(hub: RunningHub, gw: Gateway) -> None:
    # Verbatim, the samples' timestamps are from 2021: older than 30 days, so 1001 with the request id.
    answer = gw.ask("devices/sync", SAMPLE_SYNC)
    assert answer["param"] == {
        "cid": "92dda538fc2e636fd4b0c37f1234",
        "msg": "request time is invalid",
        "code": 1001,
    }
    assert answer["request_id"] == "cd0fd3c3-bd15-42f6-8bf9-d230a0a1b2"
    assert abs(answer["t"] - time.time()) < 5 and isinstance(answer["t"], int)
    # With a current timestamp the sync sample creates the device (empty product id -> default model).
    answer = gw.ask("devices/sync", _now_t(SAMPLE_SYNC))
    assert answer == {
        "t": answer["t"],
        "request_id": "cd0fd3c3-bd15-42f6-8bf9-d230a0a1b2",
        "param": {"cid": "92dda538fc2e636fd4b0c37f1234", "msg": "success", "code": 0},
    }
    dev = rows(hub, "select gateway_id, product_id, model, device_name from devices")
    assert dev == [(GW, "", "smart-meter", "")]
    # The report sample is for a device never synced: 2003.
    answer = gw.ask("properties/report", _now_t(SAMPLE_REPORT))
    assert answer["param"] == {"cid": "ee1880aca61234", "msg": "device not exist", "code": 2003}
    # Once synced, its value "run" is not a bool: 1103.
    assert gw.sync("ee1880aca61234")["param"]["code"] == 0
    answer = gw.ask("properties/report", _now_t(SAMPLE_REPORT).replace(b"d2301234", b"d2305678"))
    assert answer["param"] == {"cid": "ee1880aca61234", "msg": "params type is incorrect", "code": 1103}
    # The status sample: the known device goes online, the unknown one is counted.
    gw.send("devices/status", _now_t(SAMPLE_STATUS))
    wait_for(
        lambda: rows(hub, "select online from devices where cid='92dda538fc2e636fd4b0c37f1234'") == [(1,)]
    )
    assert hub.run(lambda: service(hub).stats["rejected.status_item"]) == 1


# --- reports, values and error codes -------------------------------------------------------------


def test_every_report_error_code(hub: RunningHub, gw: Gateway) -> None:
    assert gw.sync("m1")["param"]["code"] == 0
    now = int(time.time())

    def code(payload: Any) -> tuple[int, str, Any]:
        a = gw.ask("properties/report", payload)
        return a["param"]["code"], a["param"]["msg"], a["request_id"]

    assert code(envelope({"cid": "m1", "id": "5", "value": 2300000}))[:2] == (0, "success")
    assert code(envelope({"cid": "m1", "id": "5", "value": 1}, t=now - 31 * 86400))[:2] == (
        1001,
        "request time is invalid",
    )
    assert code(envelope({"cid": "m1", "id": "5", "value": 1}, t=now + 600))[0] == 1001
    assert code(envelope({"cid": "m1", "id": "5", "value": 1}, t="soon"))[0] == 1001
    assert code(envelope({"cid": "m1", "id": "5", "value": 1}, t=now * 1000))[0] == 0  # milliseconds
    assert code(envelope({}))[:2] == (1100, "params is empty")
    assert code({"t": now, "request_id": "no-param"}) == (1100, "params is empty", "no-param")
    assert code(envelope({"cid": "m1", "id": "5", "value": -1}))[:2] == (1101, "params range invalid")
    assert code(envelope({"cid": "m1", "id": "16", "value": "no_such_label"}))[0] == 1101
    assert code(envelope({"cid": "m1", "id": "5", "value": None}))[:2] == (1102, "params is null")
    assert code(envelope({"cid": "m1", "id": "5", "value": 1.5}))[:2] == (1103, "params type is incorrect")
    assert code(envelope({"cid": "m1", "id": "1", "value": "maybe"}))[0] == 1103
    assert code(envelope({"cid": "m1", "id": "99", "value": 1}))[:2] == (2002, "command or value not support")
    assert code(envelope({"cid": "ghost", "id": "1", "value": True}))[:2] == (2003, "device not exist")
    assert code(b"not json at all") == (1103, "params type is incorrect", None)
    assert code(b'{"t": 1, "request_id": "x", "param": ') == (1103, "params type is incorrect", None)
    stored = rows(hub, "select dp_id, value from reports order by id")
    assert stored == [("5", "2300000"), ("5", "1")]


def test_value_types_and_scaling_are_stored(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m2")
    cases = [
        ("1", "true", True),
        ("17", 0, False),
        ("5", "2301234", 2301234),
        ("10", -100, -100),
        ("16", "leak_pro_with_value", "leak_pro_with_value"),
        ("2", "BRK-7", "BRK-7"),
        ("19", 8193, ["short_circuit_alarm", "credit_alarm"]),
        ("20", "serious", "serious"),
    ]
    for dp, sent, _ in cases:
        assert gw.report("m2", dp, sent)["param"]["code"] == 0, dp
    latest = {r.dp_id: (json.loads(r.value), r.num) for r in rows(hub, "select * from latest_values")}
    for dp, _, expected in cases:
        assert latest[dp][0] == expected, dp
    assert latest["5"][1] == pytest.approx(230.1234)  # scale 4, volts
    assert latest["10"][1] == pytest.approx(-1.0)  # scale 2, degrees Celsius
    assert latest["1"][1] == 1.0 and latest["17"][1] == 0.0


def test_phase_encodings_store_the_same_fields(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m3")
    assert gw.report("m3", "30", "CIsAK8MACWo=")["param"]["code"] == 0
    assert gw.report("m3", "31", "088b002bc300096a")["param"]["code"] == 0
    assert (
        gw.report("m3", "32", {"voltage": "218.7", "current": "11.203", "power": "2410"})["param"]["code"]
        == 0
    )
    values = {r.dp_id: json.loads(r.value) for r in rows(hub, "select dp_id, value from latest_values")}
    expected = {"voltage": 218.7, "current": 11.203, "power": 2410.0, "electricity": None}
    assert values == {"30": expected, "31": expected, "32": expected}
    assert gw.report("m3", "30", "CIsAK8MA")["param"]["code"] == 1101  # 6 bytes, not 8


def test_fault_forms(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m4")
    for value in (8193, ["credit_alarm", "short_circuit_alarm"]):
        assert gw.report("m4", "19", value)["param"]["code"] == 0
        stored = json.loads(rows(hub, "select value from latest_values where dp_id='19'")[0][0])
        assert stored == ["short_circuit_alarm", "credit_alarm"]
    assert gw.report("m4", "19", "ov_cr")["param"]["code"] == 0
    assert gw.report("m4", "19", 1 << 14)["param"]["code"] == 1101
    assert gw.report("m4", "19", "not_a_fault")["param"]["code"] == 1101


def test_duplicate_request_id_is_stored_once_and_answered_again(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m5")
    payload = envelope({"cid": "m5", "id": "5", "value": 2300000}, request_id="dup-1")
    first = gw.ask("properties/report", payload)
    second = gw.ask("properties/report", payload)
    assert first["param"] == second["param"] == {"cid": "m5", "msg": "success", "code": 0}
    assert rows(hub, "select count(*) from reports where request_id='dup-1'") == [(1,)]
    bad = envelope({"cid": "m5", "id": "5", "value": -5}, request_id="dup-2")
    assert gw.ask("properties/report", bad)["param"]["code"] == 1101
    assert gw.ask("properties/report", bad)["param"]["code"] == 1101
    assert hub.run(lambda: service(hub).stats["report.duplicate"]) == 2


def test_strings_a_database_would_refuse_are_1101_on_every_database(
    hub: RunningHub, gw: Gateway, gateway_factory
) -> None:
    """NUL (PostgreSQL refuses it; SQLite stored it), other control characters and lone surrogates are
    refused by the validator with 1101, the same on SQLite and PostgreSQL: no storage error, storage
    stays healthy, other gateways still get in."""
    assert gw.sync("m-nul")["param"]["code"] == 0
    now = int(time.time())

    def ask_raw(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
        return gw.ask(kind, json.dumps(doc, ensure_ascii=True))  # lone surrogates as \udXXX escapes

    bad_rid = ask_raw(
        "properties/report", envelope({"cid": "m-nul", "id": "5", "value": 1}, request_id="r\x00")
    )
    assert (bad_rid["request_id"], bad_rid["param"]) == (
        None,
        {"cid": "m-nul", "msg": "params range invalid", "code": 1101},
    )
    for param in (
        {"cid": "m-nul\x00", "id": "5", "value": 1},
        {"cid": "m-nul", "id": "2", "value": "BRK\x00"},
        {"cid": "m-nul", "id": "2", "value": "BRK\ud800"},
        {"cid": "m-nul", "id": "39", "value": {"note": "\x00"}},
    ):
        answer = ask_raw("properties/report", envelope(param, request_id="r-bad"))
        assert (answer["request_id"], answer["param"]["code"]) == ("r-bad", 1101), (param, answer)
    answer = ask_raw("devices/sync", envelope({"cid": "m-nul", "product_id": "p", "device_name": "a\x00"}))
    assert answer["param"]["code"] == 1101
    digits = "9" * 60_000
    huge = f'{{"t":{now},"request_id":"r-60k","param":{{"cid":"m-nul","id":"5","value":{digits}}}}}'

    answer = gw.ask("properties/report", huge)
    assert (answer["request_id"], answer["param"]["code"]) == ("r-60k", 1101)
    assert gw.report("m-nul", "5", 2300000)["param"]["code"] == 0
    assert rows(hub, "select count(*) from reports where cid='m-nul'") == [(1,)]
    assert rows(hub, "select device_name from devices where cid='m-nul'") == [(None,)]
    assert (hub.hub.writer.healthy, hub.hub.writer.stats.failures) == (True, 0)
    other = gateway_factory("gw-other")  # CONNACK 0 (asserted by the factory)
    assert other.sync("m-other")["param"]["code"] == 0


def test_a_reused_request_id_with_other_content_is_a_new_report(hub: RunningHub, gw: Gateway) -> None:
    """Gateways that restart their request counter reuse request_ids: a report is a redelivery only
    when gateway, request_id **and content** match. Other content is stored (it used to be answered 0
    and dropped); a redelivery of either is answered 0 again and not stored twice."""
    gw.sync("m-re")
    svc = service(hub)
    now = int(time.time())
    first = envelope({"cid": "m-re", "id": "5", "value": 2300000}, t=now - 60, request_id="r-1")
    second = envelope({"cid": "m-re", "id": "5", "value": 2310000}, t=now, request_id="r-1")
    same_value_later = envelope({"cid": "m-re", "id": "5", "value": 2300000}, t=now + 1, request_id="r-1")
    for payload in (first, second, second, first, same_value_later):
        assert gw.ask("properties/report", payload)["param"] == {"cid": "m-re", "msg": "success", "code": 0}
    stored = rows(hub, "select request_id, value, t from reports where cid='m-re' order by t")
    assert stored == [
        ("r-1", "2300000", float(now - 60)),
        ("r-1", "2310000", float(now)),
        ("r-1", "2300000", float(now + 1)),
    ]
    assert hub.run(lambda: svc.stats["report.duplicate"]) == 1  # the second `second`, from memory
    # raw objects: the same content with keys in another order is the same report
    obj = {"cid": "m-re", "id": "39", "value": {"b": 1, "a": [1, 2]}}
    assert gw.ask("properties/report", envelope(obj, t=now, request_id="r-obj"))["param"]["code"] == 0
    obj["value"] = {"a": [1, 2], "b": 1}
    hub.run(svc._reports.clear)  # so the database has to recognise it
    assert gw.ask("properties/report", envelope(obj, t=now, request_id="r-obj"))["param"]["code"] == 0
    assert rows(hub, "select value from reports where request_id='r-obj'") == [('{"a":[1,2],"b":1}',)]


def test_the_answer_cache_is_bounded_in_age_and_the_database_decides_after(hub_factory, clients) -> None:
    hub = hub_factory("protocol", dedupe_max_age=0.5)
    vendor = registry.add_vendor(hub.engine, "aging")
    c = clients(hub.port, "gw-age", vendor.username)
    assert c.connect()[0] == 0
    c.subscribe("gateway_id/gw-age/#")
    g = Gateway(c)
    g.sync("m-age")
    svc = service(hub)
    payload = envelope({"cid": "m-age", "id": "5", "value": 2300000}, request_id="r-age")
    assert g.ask("properties/report", payload)["param"]["code"] == 0
    assert hub.run(lambda: svc._reports.get(("gw-age", "r-age"))) is not None
    time.sleep(0.6)
    assert g.report("m-age", "5", 2300001)["param"]["code"] == 0  # its answer pushes the old one out
    assert hub.run(lambda: (len(svc._reports), svc._reports.get(("gw-age", "r-age")))) == (1, None)
    assert g.ask("properties/report", payload)["param"]["code"] == 0  # the redelivery, forgotten...
    assert rows(hub, "select count(*) from reports where request_id='r-age'") == [(1,)]  # ...stored once
    assert hub.run(lambda: svc.stats["report.duplicate"]) == 0


def test_a_redelivery_to_another_node_of_the_cluster_is_stored_once(
    shared_postgres, hub_factory, clients
) -> None:
    """Two meterhub processes on one PostgreSQL database (nodes share a database only there): a
    report first sent to one and redelivered to the
    other (the gateway reconnected elsewhere) is stored once and answered 0 by both; the database's
    unique index on (gateway_id, request_id, digest) decides, not either node's memory."""
    one = hub_factory("protocol", database_url=shared_postgres)
    vendor = registry.add_vendor(one.engine, "cluster")

    def gateway_on(node: RunningHub) -> Gateway:
        c = clients(node.port, "gw-cl", vendor.username)
        assert c.connect()[0] == 0
        c.subscribe("gateway_id/gw-cl/#")
        return Gateway(c)

    g1 = gateway_on(one)
    assert g1.sync("m-cl")["param"]["code"] == 0
    payload = envelope({"cid": "m-cl", "id": "5", "value": 2300000}, request_id="r-cl")
    assert g1.ask("properties/report", payload)["param"]["code"] == 0
    g1.client.close()
    two = hub_factory("protocol", database_url=shared_postgres)  # loads the device synced through the first
    g2 = gateway_on(two)
    assert g2.ask("properties/report", payload)["param"]["code"] == 0
    other = envelope({"cid": "m-cl", "id": "5", "value": 2300001}, request_id="r-cl")
    assert g2.ask("properties/report", other)["param"]["code"] == 0  # reused id, other content
    assert rows(two, "select value from reports where request_id='r-cl' order by id") == [
        ("2300000",),
        ("2300001",),
    ]


def test_buffered_old_report_does_not_replace_latest(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m6")
    now = int(time.time())
    assert gw.report("m6", "5", 2300000, t=now)["param"]["code"] == 0
    assert gw.report("m6", "5", 2200000, t=now - 3600)["param"]["code"] == 0  # buffered while offline
    assert rows(hub, "select value, t from latest_values where dp_id='5'") == [("2300000", float(now))]
    assert rows(hub, "select count(*) from reports where cid='m6'") == [(2,)]


def test_storage_failure_answers_500(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("m7")
    with hub.engine.begin() as conn:
        conn.execute(text("DROP TABLE latest_values"))
    answer = gw.report("m7", "5", 2300000)
    assert answer["param"] == {"cid": "m7", "msg": "system error, please contact the admin", "code": 500}
    assert rows(hub, "select count(*) from reports where cid='m7'") == [(0,)]


def test_storage_outage_turns_new_gateways_away_until_it_is_over(
    hub: RunningHub, gateway_factory, clients
) -> None:
    """While storage cannot commit, a new gateway gets CONNACK 0x03 (server unavailable) instead of a
    connection whose reports would be lost; once the outage is over it gets in (test_storage_writer
    checks that this does not need a successful write first)."""
    writer = hub.hub.writer
    writer.retry_after = 3.0  # long enough for a loaded machine to connect within it
    gw = gateway_factory("gw-outage")
    gw.sync("m-out")
    # its persistent session is written 50 ms after the sync: let that happen now, or it may commit
    # right after the failed report and make storage healthy again before the next CONNECT
    hub.call(hub.hub.mqtt.store.flush())
    with hub.engine.begin() as conn:  # the fault: a table the report path writes to is gone
        conn.execute(text("DROP TABLE latest_values"))
    assert gw.report("m-out", "5", 2300000)["param"]["code"] == 500
    assert writer.healthy is False
    vendor = registry.list_vendors(hub.engine)[0]
    late = clients(hub.port, "gw-late", vendor.username)
    rc, _ = late.connect()
    assert rc.is_failure and str(rc) == "Server unavailable"  # paho's name for 3.1.1's 0x03
    with hub.engine.begin() as conn:  # repaired
        schema.latest.create(conn)
    time.sleep(writer.retry_after + 0.2)
    late = clients(hub.port, "gw-late", vendor.username)
    rc, _ = late.connect()
    assert rc == 0
    assert gw.report("m-out", "5", 2310000)["param"]["code"] == 0
    assert writer.healthy is True
    assert rows(hub, "select value from latest_values where cid='m-out'") == [("2310000",)]


@contextlib.contextmanager
def reports_held(engine: Any) -> Iterator[None]:
    """Block writes to the reports table until the block ends (so that what arrives meanwhile is
    committed as one batch): on PostgreSQL only that table is locked, so the writer cannot deadlock
    with the lock (conftest's ``storage_held`` locks every table, one after the other)."""
    if engine.dialect.name == "sqlite":
        with storage_held(engine):
            yield
        return
    with engine.connect() as conn, conn.begin():
        conn.execute(text("LOCK TABLE reports IN EXCLUSIVE MODE"))
        yield


def test_a_report_the_database_refuses_fails_alone_and_locks_nobody_out(
    hub: RunningHub, gateway_factory, clients
) -> None:
    """One report the database refuses is answered 500 and counted; its batch-mates (this gateway's
    and another's) are stored and answered 0; storage stays healthy, so new gateways still get
    CONNACK 0 (it used to mark storage unhealthy: 0x03 for every CONNECT for 5 s)."""
    refuse_marked_reports(hub.engine)
    writer, svc = hub.hub.writer, service(hub)
    a, b = gateway_factory("gw-a"), gateway_factory("gw-b")
    assert a.sync("m-a")["param"]["code"] == 0 and b.sync("m-b")["param"]["code"] == 0
    # alone in its batch
    answer = a.ask(
        "properties/report", envelope({"cid": "m-a", "id": "5", "value": 1}, request_id="poison-1")
    )
    assert (answer["request_id"], answer["param"]["code"]) == ("poison-1", 500)
    vendor = registry.list_vendors(hub.engine)[0]
    rc, _ = clients(hub.port, "gw-new-1", vendor.username).connect()
    assert rc == 0
    assert (writer.healthy, writer.admits_clients(), writer.stats.rows_refused) == (True, True, 1)
    # in a batch with honest reports of two gateways: they are held back until all are queued
    ids_a = ["a-1", "poison-2", "a-2", "a-3"]
    before = writer.stats.batches_split
    with reports_held(hub.engine):
        b.client.c.publish(
            "gateway_id/gw-b/properties/report",
            json.dumps(envelope({"cid": "m-b", "id": "5", "value": 7}, request_id="b-0")),
            1,
        )
        wait_for(lambda: writer.outstanding >= 1)
        for i, rid in enumerate(ids_a):
            payload = json.dumps(envelope({"cid": "m-a", "id": "5", "value": 100 + i}, request_id=rid))
            a.client.c.publish("gateway_id/gw-a/properties/report", payload, 1)
        b.client.c.publish(
            "gateway_id/gw-b/properties/report",
            json.dumps(envelope({"cid": "m-b", "id": "5", "value": 8}, request_id="b-1")),
            1,
        )
        wait_for(lambda: writer.outstanding >= 6)
    answers = {}
    for gw in (a, a, a, a, b, b):
        msg = json.loads(gw.client.get(timeout=10).payload)
        answers[msg["request_id"]] = msg["param"]["code"]
    assert answers == {"a-1": 0, "poison-2": 500, "a-2": 0, "a-3": 0, "b-0": 0, "b-1": 0}
    assert writer.stats.batches_split > before  # the refused report shared a batch and was isolated
    stored = {r[0] for r in rows(hub, "select request_id from reports")}
    assert stored == {"a-1", "a-2", "a-3", "b-0", "b-1"}
    assert (writer.healthy, writer.stats.rows_refused) == (True, 2)
    assert hub.run(lambda: svc.stats["report.code.500"]) == 2
    rc, _ = clients(hub.port, "gw-new-2", vendor.username).connect()
    assert rc == 0
    import httpx

    from meterhub.api.security import create_token

    token, _ = create_token(hub.engine, "metrics", "read")
    metrics = httpx.get(
        f"http://127.0.0.1:{hub.hub.http_port}/metrics", headers={"Authorization": f"Bearer {token}"}
    ).text
    assert "meterhub_storage_rows_refused_total 2.0" in metrics
    assert "meterhub_storage_healthy 1.0" in metrics


def test_last_seen_is_flushed_in_bounded_rounds_longest_waiting_first(hub: RunningHub, gw: Gateway) -> None:
    """The periodic last-seen flush writes at most ``limit`` devices per round (a fleet of 190,000
    meters made it one huge UPDATE that held every report's answer), oldest-dirty first."""
    svc = service(hub)
    for cid in ("ls-1", "ls-2", "ls-3"):
        gw.sync(cid)
    hub.run(lambda: svc._flush_seen(limit=None))
    wait_for(lambda: hub.hub.writer.depth == 0)
    marks = {"ls-1": 1000.0, "ls-2": 2000.0, "ls-3": 3000.0}

    def dirty_and_flush_two() -> None:
        svc._dirty_seen.clear()
        svc._dirty_seen.update(marks)
        svc._flush_seen(limit=2)

    hub.run(dirty_and_flush_two)

    def stored() -> dict[str, float]:
        found = rows(hub, "select cid, last_seen from devices where cid like 'ls-%'")
        return {cid: t for cid, t in found if t in marks.values()}

    wait_for(lambda: stored() == {"ls-1": 1000.0, "ls-2": 2000.0})
    assert hub.run(lambda: dict(svc._dirty_seen)) == {"ls-3": 3000.0}
    hub.run(lambda: svc._flush_seen(limit=2))
    wait_for(lambda: stored() == marks)


# --- sync ----------------------------------------------------------------------------------------


def test_sync_fields_and_rebinding(hub: RunningHub, gateway_factory) -> None:
    a = gateway_factory("gw-a")
    fields = {
        "vendor_code": "ACME",
        "comm_type": "mqtt",
        "device_ip": "10.0.0.7",
        "mac_address": "aa:bb",
        "device_name": "Flat 7",
        "device_desc": "kitchen",
        "install_location": "B1",
        "device_server_id": "srv1",
        "product_sub_type": "3ph",
    }
    assert a.sync("mx", "pid-x", **fields)["param"]["code"] == 0
    got = rows(hub, "select * from devices where cid='mx'")[0]._mapping
    for k, v in fields.items():
        assert got[k] == v
    assert got["gateway_id"] == "gw-a" and got["product_id"] == "pid-x"
    # a later sync without some fields keeps them
    assert a.sync("mx", "pid-x", device_name="Flat 7b")["param"]["code"] == 0
    got = rows(hub, "select device_name, install_location from devices where cid='mx'")
    assert got == [("Flat 7b", "B1")]
    b = gateway_factory("gw-b")
    assert b.sync("mx", "pid-x")["param"]["code"] == 0
    assert rows(hub, "select gateway_id from devices where cid='mx'") == [("gw-b",)]
    assert rows(hub, "select old_gateway_id, new_gateway_id from device_rebinds") == [("gw-a", "gw-b")]
    # the old gateway no longer owns it
    assert a.report("mx", "1", True)["param"]["code"] == 2003
    assert b.report("mx", "1", True)["param"]["code"] == 0


def test_unknown_product_without_default_model(hub_factory, clients) -> None:
    hub = hub_factory("protocol", default_model="")
    vendor = registry.add_vendor(hub.engine, "strict")
    c = clients(hub.port, "gw-s", vendor.username)
    c.connect()
    c.subscribe("gateway_id/gw-s/#")
    g = Gateway(c)
    assert g.sync("d1", "unknown-product")["param"] == {
        "cid": "d1",
        "msg": "params range invalid",
        "code": 1101,
    }
    registry.add_product(hub.engine, "known-product", "smart-meter")
    assert g.sync("d1", "known-product")["param"]["code"] == 0
    assert g.ask("devices/sync", envelope({"cid": "d2"}))["param"]["code"] == 1100


# --- presence ------------------------------------------------------------------------------------


def presence_log(hub: RunningHub, cid: str) -> list[tuple[int, str]]:
    return [
        (r.online, r.cause)
        for r in rows(hub, "select online, cause from presence where cid=:c order by id", c=cid)
    ]


def test_presence_transitions(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("p1")
    gw.sync("p2")
    gw.send(
        "devices/status",
        envelope(
            [
                {"cid": "p1", "status": True},
                {"cid": "p2", "status": False},
                {"cid": "nobody", "status": True},
                {"cid": "p2"},
            ]
        ),
    )
    wait_for(lambda: presence_log(hub, "p1") == [(1, "status")])
    assert presence_log(hub, "p2") == []  # was already offline
    gw.report("p2", "1", True)
    wait_for(lambda: presence_log(hub, "p2") == [(1, "report")])
    gw.send("devices/status", envelope([{"cid": "p1", "status": False}]))
    wait_for(lambda: presence_log(hub, "p1") == [(1, "status"), (0, "status")])
    gw.client.close()  # the gateway goes away: all its online devices go offline
    wait_for(lambda: presence_log(hub, "p2") == [(1, "report"), (0, "gateway-disconnect")])
    assert rows(hub, "select online from devices where cid in ('p1','p2')") == [(0,), (0,)]
    assert hub.run(lambda: service(hub).stats["rejected.status_item"]) == 2


def test_silence_marks_devices_offline(hub_factory, clients) -> None:
    hub = hub_factory("protocol", presence_timeout=0.6)
    vendor = registry.add_vendor(hub.engine, "quiet")
    c = clients(hub.port, "gw-q", vendor.username)
    c.connect()
    c.subscribe("gateway_id/gw-q/#")
    g = Gateway(c)
    g.sync("s1")
    g.report("s1", "1", True)
    assert presence_log(hub, "s1") == [(1, "report")]
    wait_for(lambda: presence_log(hub, "s1") == [(1, "report"), (0, "silence")], timeout=5)


def test_will_on_status_topic_marks_devices_offline(hub: RunningHub, clients) -> None:
    vendor = registry.add_vendor(hub.engine, "willing")
    will = json.dumps(envelope([{"cid": "w1", "status": False}])).encode()
    c = clients(hub.port, "gw-w", vendor.username, will=("gateway_id/gw-w/devices/status", will, 1))
    c.connect()
    c.subscribe("gateway_id/gw-w/#")
    g = Gateway(c)
    g.sync("w1")
    g.report("w1", "1", True)
    assert hub.run(lambda: service(hub).devices["w1"].online)
    c.c._sock.close()  # drop the socket without DISCONNECT: the will is published
    wait_for(lambda: presence_log(hub, "w1")[-1][0] == 0)


# --- commands ------------------------------------------------------------------------------------


def answer_commands(
    client: Client, code: int = 0, stop: threading.Event | None = None, delay: float = 0.0
) -> threading.Thread:
    """Answer every command the gateway receives, like a real gateway would."""

    def run() -> None:
        while stop is None or not stop.is_set():
            try:
                msg = client.get(timeout=0.2)
            except Exception:
                continue
            if not msg.topic.endswith("/commands"):
                continue
            cmd = json.loads(msg.payload)
            time.sleep(delay)
            reply = {
                "t": int(time.time()),
                "cid": cmd["cid"],
                "request_id": cmd["request_id"],
                "param": {"msg": "success" if code == 0 else "failed", "code": code},
            }
            client.publish(f"gateway_id/{client.client_id}/commands/response", json.dumps(reply))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def command_log(hub: RunningHub) -> list[dict[str, Any]]:
    with hub.engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(select(schema.commands).order_by(schema.commands.c.id))
        ]


def test_command_round_trip(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("c1")
    gw.report("c1", "1", False)
    received: list[Any] = []
    stop = threading.Event()
    orig_get = gw.client.get

    def spy_get(timeout: float = 5) -> Any:
        msg = orig_get(timeout)
        received.append(msg)
        return msg

    gw.client.get = spy_get  # type: ignore[method-assign]
    answer_commands(gw.client, stop=stop)
    result = hub.call(service(hub).send_command("c1", "switch", True, timeout=5))
    stop.set()
    assert (result.status, result.code) == ("ok", 0)
    cmd = json.loads(next(m.payload for m in received if m.topic.endswith("/commands")))
    assert cmd["cid"] == "c1" and cmd["param"] == {"id": "1", "value": True}
    assert cmd["request_id"] == result.request_id and isinstance(cmd["t"], int)
    log_row = command_log(hub)[-1]
    assert (log_row["status"], log_row["code"], log_row["dp_id"], log_row["late"]) == ("ok", 0, "1", False)


def test_command_failed_by_device(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("c2")
    gw.report("c2", "1", False)
    stop = threading.Event()
    answer_commands(gw.client, code=2002, stop=stop)
    result = hub.call(service(hub).send_command("c2", "6", 100000, timeout=5))
    stop.set()
    assert (result.status, result.code) == ("failed", 2002)


def test_command_timeout_then_late_answer(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("c3")
    gw.report("c3", "1", False)
    result = hub.call(service(hub).send_command("c3", "1", True, timeout=0.3))
    assert result.status == "timeout" and result.code is None
    cmd = json.loads(next(m for m in iter_messages(gw.client) if m.topic.endswith("/commands")).payload)
    late = {"t": int(time.time()), "cid": "c3", "request_id": cmd["request_id"], "param": {"msg": "success"}}
    gw.send("commands/response", late)  # no code: success, says the document
    wait_for(lambda: command_log(hub)[-1]["late"])
    row = command_log(hub)[-1]
    assert (row["status"], row["code"], row["msg"]) == ("timeout", 0, "success")
    assert row["answered_at"] is not None


def iter_messages(client: Client):
    while True:
        yield client.get(timeout=5)


def test_command_rejections(hub: RunningHub, gw: Gateway) -> None:
    gw.sync("c4")
    svc = service(hub)
    offline = hub.call(svc.send_command("c4", "1", True))
    assert (offline.status, offline.code) == ("rejected", 2001)
    gw.report("c4", "1", False)  # online now
    assert hub.call(svc.send_command("c4", "3", 5)).code == 2002  # power_current is report-only
    assert hub.call(svc.send_command("c4", "5", -1)).code == 1101
    assert hub.call(svc.send_command("c4", "1", "perhaps")).code == 1103
    assert hub.call(svc.send_command("c4", "999", 1)).code == 2002
    assert hub.call(svc.send_command("nobody", "1", True)).code == 2003
    statuses = [(r["status"], r["code"]) for r in command_log(hub)]
    assert statuses == [
        ("rejected", 2001),
        ("rejected", 2002),
        ("rejected", 1101),
        ("rejected", 1103),
        ("rejected", 2002),
        ("rejected", 2003),
    ]


def test_unknown_topic_and_bad_status_are_counted(hub: RunningHub, gw: Gateway) -> None:
    gw.send("something/else", b"{}")
    gw.send("devices/status", b"{{{")
    gw.send("commands/response", b"[]")
    svc = service(hub)
    wait_for(
        lambda: hub.run(
            lambda: (
                svc.stats["rejected.unknown_topic"] == 1
                and svc.stats["rejected.status"] == 1
                and svc.stats["rejected.command_response"] == 1
            )
        )
    )
