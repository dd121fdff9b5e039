"""The conformance report card flags each misbehaviour and passes a well-behaved gateway."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

import mqttraw
from conftest import RunningHub, drop_postgres, wait_for
from meterhub.api.security import create_token
from meterhub.core.auth import gateway_password
from meterhub.core.conformance import report_card
from meterhub.storage import registry
from test_protocol_e2e import answer_commands


@pytest.fixture
def hub(hub_factory) -> RunningHub:
    return hub_factory("protocol", http_port=0, conformance_status_interval=1.0)


@pytest.fixture
def vendor(hub: RunningHub) -> registry.Vendor:
    return registry.add_vendor(hub.engine, "conf")


def envelope(param: Any) -> str:
    return json.dumps({"t": int(time.time()), "request_id": str(uuid.uuid4()), "param": param})


def card_of(hub: RunningHub, gw: str) -> dict[str, Any]:
    return hub.call(report_card(hub.hub, gw))


def stored(hub: RunningHub, gw: str) -> dict[str, Any]:
    """The gateway's stored conformance record (this node's latest flushed first)."""
    record, _ = hub.call(hub.hub.conformance.read(gw))
    return record or {}


def verdicts(hub: RunningHub, gw: str) -> dict[str, str]:
    card = card_of(hub, gw)
    return {f["rule"]: f["verdict"] for f in card["findings"]}


def good_gateway(hub: RunningHub, vendor: registry.Vendor, clients, gw: str, keepalive: int = 30) -> Any:
    c = clients(hub.port, gw, vendor.username, keepalive=keepalive)
    assert c.connect()[0] == 0
    for topic in ("commands", "devices/sync/response", "properties/report/response"):
        c.subscribe(f"gateway_id/{gw}/{topic}")
    c.publish(f"gateway_id/{gw}/devices/sync", envelope({"cid": f"{gw}-m1", "product_id": "p"}))
    assert json.loads(c.get().payload)["param"]["code"] == 0
    return c


def test_well_behaved_gateway_passes(hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    c = good_gateway(hub, vendor, clients, "gw-good")
    stop = threading.Event()
    for i in range(4):
        c.publish("gateway_id/gw-good/devices/status", envelope([{"cid": "gw-good-m1", "status": True}]))
        c.publish(
            "gateway_id/gw-good/properties/report",
            envelope({"cid": "gw-good-m1", "id": "5", "value": 2300000 + i}),
        )
        assert json.loads(c.get().payload)["param"]["code"] == 0
        time.sleep(0.25)
    answer_commands(c, stop=stop)
    result = hub.call(hub.hub.handler.send_command("gw-good-m1", "switch", True, timeout=5))
    stop.set()
    assert result.status == "ok"
    c.publish("gateway_id/gw-good/devices/status", envelope([{"cid": "gw-good-m1", "status": True}]))
    time.sleep(0.1)
    v = verdicts(hub, "gw-good")
    assert v == {rule: "pass" for rule in v}, v
    assert len(v) == 10 and "request-id-unique" in v


def test_each_misbehaviour_is_flagged(hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    # reports before sync, QoS 0, invalid values, foreign topics, no commands subscription, no status
    c = clients(hub.port, "gw-bad", vendor.username, keepalive=0)
    assert c.connect()[0] == 0
    c.subscribe("gateway_id/gw-bad/properties/report/response")
    c.publish(
        "gateway_id/gw-bad/properties/report", envelope({"cid": "never-synced", "id": "1", "value": True})
    )
    c.publish("gateway_id/gw-bad/devices/sync", envelope({"cid": "m", "product_id": "p"}))
    c.publish("gateway_id/gw-bad/properties/report", envelope({"cid": "m", "id": "5", "value": -1}), qos=0)
    c.publish("gateway_id/gw-other/properties/report", b"{}")
    c.publish("gateway_id/gw-bad/whatever", b"{}")
    wait_for(lambda: sum(stored(hub, "gw-bad").get("codes", {}).get("report", {}).values()) == 2)
    v = verdicts(hub, "gw-bad")
    assert v["sync-before-report"] == "fail"
    assert v["qos-1"] == "fail"
    assert v["valid-messages"] == "fail"
    assert v["topics"] == "fail"
    assert v["subscribes-downlink"] == "fail"
    assert v["status-every-minute"] == "unknown"
    assert v["answers-commands"] == "unknown"
    assert v["keep-alive"] == "warn"  # 0 disables dead-connection detection
    card = card_of(hub, "gw-bad")
    valid = next(f for f in card["findings"] if f["rule"] == "valid-messages")
    assert "1101" in valid["observed"] and "params range invalid" in valid["observed"]
    assert card["verdict"] == "fail"


def test_a_reused_request_id_is_its_own_rule(hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    """A gateway that restarts its request counter sends an old request_id with a new report: both
    are stored and answered 0, and the report card warns under its own rule (a redelivery of the same
    report does not count)."""
    c = good_gateway(hub, vendor, clients, "gw-counter")
    now = int(time.time())

    def send(request_id: str, value: int) -> int:
        doc = {
            "t": now,
            "request_id": request_id,
            "param": {"cid": "gw-counter-m1", "id": "5", "value": value},
        }
        c.publish("gateway_id/gw-counter/properties/report", json.dumps(doc))
        return json.loads(c.get().payload)["param"]["code"]

    assert [send("1", 2300000), send("1", 2300000), send("2", 2300001)] == [0, 0, 0]  # a redelivery
    v = verdicts(hub, "gw-counter")
    assert v["request-id-unique"] == "pass"
    assert [send("1", 2310000), send("2", 2310001)] == [0, 0]  # the counter restarted
    card = card_of(hub, "gw-counter")
    finding = next(f for f in card["findings"] if f["rule"] == "request-id-unique")
    assert finding["verdict"] == "warn"
    assert finding["observed"].startswith("2 of 5 reports reused a recent request_id")
    assert hub.run(lambda: hub.hub.handler.stats["report.request_id_reused"]) == 2


def test_status_gaps_and_unanswered_commands(hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    c = good_gateway(hub, vendor, clients, "gw-slow")
    c.publish("gateway_id/gw-slow/devices/status", envelope([{"cid": "gw-slow-m1", "status": True}]))
    result = hub.call(hub.hub.handler.send_command("gw-slow-m1", "switch", True, timeout=0.3))
    assert result.status == "timeout"
    time.sleep(1.7)  # longer than 1.5 x the expected 1 s interval
    c.publish("gateway_id/gw-slow/devices/status", envelope([{"cid": "gw-slow-m1", "status": True}]))
    wait_for(lambda: len(stored(hub, "gw-slow").get("status_times", ())) == 2)
    v = verdicts(hub, "gw-slow")
    assert v["status-every-minute"] == "fail"
    assert v["answers-commands"] == "fail"


def test_keepalive_expiry_and_reconnect_storm(hub: RunningHub, vendor: registry.Vendor) -> None:
    user = vendor.username
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect("gw-storm", user, gateway_password("gw-storm", user), keepalive=1))
    assert raw.read_packet()[0] == 0x20
    assert raw.closed_within(4) is not None
    for _ in range(4):
        r = mqttraw.RawClient(hub.port)
        r.send(mqttraw.connect("gw-storm", user, gateway_password("gw-storm", user), keepalive=1))
        assert r.read_packet()[0] == 0x20
        r.close()
    v = verdicts(hub, "gw-storm")
    assert v["keep-alive"] == "fail"
    assert v["reconnect-politely"] == "fail"


def test_report_card_api_and_cli(hub: RunningHub, vendor: registry.Vendor, clients) -> None:
    good_gateway(hub, vendor, clients, "gw-api")
    token, _ = create_token(hub.engine, "reader", "read")
    base = f"http://127.0.0.1:{hub.hub.http_port}"
    r = httpx.get(f"{base}/api/v1/gateways/gw-api/conformance", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    card = r.json()
    assert card["gateway_id"] == "gw-api" and card["connected"] is True
    assert {f["rule"] for f in card["findings"]} >= {"sync-before-report", "qos-1", "answers-commands"}
    assert all(f["expected"] and f["observed"] for f in card["findings"])
    r = httpx.get(f"{base}/api/v1/gateways/nobody/conformance", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 404
    from click.testing import CliRunner

    from meterhub.cli import main

    out = CliRunner().invoke(main, ["conformance", "gw-api", "--url", base, "--token", token])
    assert out.exit_code == 0, out.output
    assert "gateway gw-api (connected)" in out.output and "[PASS] Devices are synced" not in out.output
    assert "expected:" in out.output and "observed:" in out.output


def test_cli_exits_non_zero_when_a_rule_fails_also_with_json(
    hub: RunningHub, vendor: registry.Vendor
) -> None:
    """Scripts and CI pipelines of meter makers: a failing rule is exit code 1, text or --json."""
    from click.testing import CliRunner

    from meterhub.cli import main

    user = vendor.username
    for _ in range(5):  # a reconnect storm: "reconnect-politely" fails
        r = mqttraw.RawClient(hub.port)
        r.send(mqttraw.connect("gw-ci", user, gateway_password("gw-ci", user), keepalive=1))
        assert r.read_packet()[0] == 0x20
        r.close()
    assert verdicts(hub, "gw-ci")["reconnect-politely"] == "fail"
    token, _ = create_token(hub.engine, "ci", "read")
    conn = ["--url", f"http://127.0.0.1:{hub.hub.http_port}", "--token", token]
    text = CliRunner().invoke(main, ["conformance", "gw-ci", *conn])
    assert text.exit_code == 1 and "[FAIL]" in text.output
    as_json = CliRunner().invoke(main, ["conformance", "gw-ci", *conn, "--json"])
    assert as_json.exit_code == 1
    card = json.loads(as_json.output)
    assert card["gateway_id"] == "gw-ci" and card["verdict"] == "fail"


def test_the_record_is_stored_bounded_and_survives_a_restart(tmp_path: Any, clients) -> None:
    """The report card is built from the stored record: after a restart of the embedded server
    (SQLite; PostgreSQL in the PG pass) the violations seen before are still on it, and what the
    restarted server sees adds to them. A flush is one batch, never one write per message."""
    from test_session_store import Hubs

    hubs = Hubs(tmp_path)
    try:
        hub = hubs.start(http_port=0, conformance_status_interval=1.0, conformance_flush_interval=60.0)
        v = registry.add_vendor(hub.engine, "restart")
        c = clients(hub.port, "gw-rs", v.username)
        assert c.connect()[0] == 0
        c.subscribe("gateway_id/gw-rs/properties/report/response")
        for _ in range(3):  # QoS 0, for a device never synced: two violations, 3 times
            c.publish(
                "gateway_id/gw-rs/properties/report", envelope({"cid": "nope", "id": "1", "value": 1}), qos=0
            )
        wait_for(lambda: hub.run(lambda: sum(hub.hub.handler.record("gw-rs").codes["report"].values())) == 3)
        flushed = hub.stats["conformance.flushed"]
        assert card_of(hub, "gw-rs")["verdict"] == "fail"  # the card flushes this node's delta first
        assert hub.stats["conformance.flushed"] == flushed + 1  # one row for all of it
        c.close()
        hubs.stop(hub)

        again = hubs.start(http_port=0)
        card = card_of(again, "gw-rs")
        assert card is not None and card["connected"] is False
        found = {f["rule"]: f for f in card["findings"]}
        assert found["sync-before-report"]["observed"] == (
            "3 of 3 reports were for devices never synced (answered 2003)"
        )
        assert found["qos-1"]["verdict"] == "fail" and "QoS 0: 3" in found["qos-1"]["observed"]
        c2 = clients(again.port, "gw-rs", v.username)
        assert c2.connect()[0] == 0
        c2.publish("gateway_id/gw-rs/devices/sync", envelope({"cid": "m", "product_id": "p"}))
        card = card_of(again, "gw-rs")
        found = {f["rule"]: f for f in card["findings"]}
        assert card["connected"] is True
        assert "QoS 0: 3, QoS 1: 1" in found["qos-1"]["observed"]  # before and after the restart
        assert found["reconnect-politely"]["observed"].startswith("2 connects")
        # Bounded: a record keeps the newest 64 connects, however many there were.
        for _ in range(70):
            again.run(lambda: again.hub.mqtt.client_record("gw-rs").connects.append((time.time(), 5)))
        record = stored(again, "gw-rs")
        assert len(record["connects"]) == 64 and record["connects"][-1][1] == 5
        assert card_of(again, "never-seen") is None
    finally:
        for h in list(hubs.running):
            hubs.stop(h)
        if "database_url" in hubs.overrides:
            drop_postgres(hubs.overrides["database_url"])
