"""Alarms from real MQTT reports: fault labels raised and cleared one by one, thresholds, the API."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningHub, make_settings, wait_for
from test_api import Api

IMMEDIATE = {"kind": "tune", "label": "*", "hysteresis": 0, "raise_after": 0, "clear_after": 0}


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Any) -> Any:
    """A hub whose alarms are raised and cleared at once (no debouncing), as before rules existed."""
    a = Api(hub_factory("protocol"), clients)
    assert a.admin.post("/api/v1/alarm-rules", json=IMMEDIATE).status_code == 201
    yield a
    a.close()


def alarms(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.read.get("/api/v1/alarms", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_fault_bitmap_raises_two_alarms_then_clears_one(api: Api) -> None:
    gw = api.gateway()
    gw.sync("a1")
    t0 = int(time.time()) - 60
    gw.report("a1", "20", "serious", t=t0)
    gw.report("a1", "19", 5, t=t0 + 1)  # bits 0 and 2: short_circuit_alarm, overload_alarm
    wait_for(lambda: len(alarms(api, active=True)) == 2)
    raised = {a["label"]: a for a in alarms(api, active=True)}
    assert sorted(raised) == ["overload_alarm", "short_circuit_alarm"]
    for a in raised.values():
        assert (a["cid"], a["kind"], a["level"], a["active"], a["raised_at"]) == (
            "a1",
            "fault",
            "serious",
            True,
            t0 + 1,
        )
        assert a["cleared_at"] is None and a["acknowledged_at"] is None

    gw.report("a1", "19", ["overload_alarm"], t=t0 + 2)  # short circuit gone
    wait_for(lambda: len(alarms(api, active=True)) == 1)
    (still,) = alarms(api, active=True)
    (past,) = alarms(api, active=False)
    assert (still["label"], still["id"]) == ("overload_alarm", raised["overload_alarm"]["id"])
    assert (past["label"], past["cleared_at"], past["active"]) == ("short_circuit_alarm", t0 + 2, False)

    # A buffered, older report changes nothing; a new level is carried by the active alarm.
    gw.report("a1", "19", 0, t=t0)
    gw.report("a1", "20", "urgent", t=t0 + 3)
    wait_for(lambda: alarms(api, active=True)[0]["level"] == "urgent")
    assert [a["label"] for a in alarms(api, level="urgent")] == ["overload_alarm"]
    assert [a["label"] for a in alarms(api, level="serious")] == ["short_circuit_alarm"]
    assert len(alarms(api, cid="a1")) == 2 and alarms(api, cid="zz") == []

    # The device detail lists its active alarms; acknowledging needs admin, keeps the first ack.
    detail = api.read.get("/api/v1/devices/a1").json()
    assert [a["label"] for a in detail["alarms"]] == ["overload_alarm"]
    ack_path = f"/api/v1/alarms/{still['id']}/ack"
    assert api.read.post(ack_path).status_code == 403
    acked = api.admin.post(ack_path, json={"by": "operator-7"}).json()
    assert acked["acknowledged_by"] == "operator-7" and acked["active"] is True
    again = api.admin.post(ack_path).json()
    assert (again["acknowledged_by"], again["acknowledged_at"]) == ("operator-7", acked["acknowledged_at"])
    wait_for(lambda: alarms(api, active=True)[0]["acknowledged_by"] == "operator-7")
    assert api.admin.post(f"/api/v1/alarms/{past['id']}/ack").json()["acknowledged_by"] == "admin"
    assert api.admin.post("/api/v1/alarms/999/ack").status_code == 404
    assert api.read.get(f"/api/v1/alarms/{past['id']}").json()["label"] == "short_circuit_alarm"

    gw.report("a1", "19", 0, t=t0 + 4)  # all clear
    wait_for(lambda: alarms(api, active=True) == [])
    assert len(alarms(api, active=False)) == 2


def test_threshold_alarms(api: Api) -> None:
    gw = api.gateway()
    gw.sync("v1")
    t0 = int(time.time()) - 60
    gw.report("v1", "12", 2_500_000, t=t0)  # voltage_over 250 V
    gw.report("v1", "11", 2_000_000, t=t0)  # voltage_under 200 V
    gw.report("v1", "5", 2_300_000, t=t0 + 1)  # 230 V: fine
    gw.report("v1", "5", 2_600_000, t=t0 + 2)  # 260 V: over
    wait_for(lambda: len(alarms(api, active=True)) == 1)
    (over,) = alarms(api, active=True)
    assert (over["kind"], over["label"], over["level"], over["raised_at"]) == (
        "threshold",
        "overvoltage",
        "general",
        t0 + 2,
    )
    assert over["details"] == {
        "measure": "voltage_current",
        "value": 260.0,
        "limit_code": "voltage_over",
        "limit": 250.0,
        "rule": ">",
    }
    gw.report("v1", "5", 1_900_000, t=t0 + 3)  # 190 V: under, no longer over
    wait_for(lambda: [a["label"] for a in alarms(api, active=True)] == ["undervoltage"])
    gw.report("v1", "11", 0, t=t0 + 4)  # limit 0 = not set: cleared
    # Raising the limit above the measurement also raises: power 1200 W vs limit 1000 W.
    gw.report("v1", "3", 12_000_000, t=t0 + 4)
    gw.report("v1", "48", 10_000_000, t=t0 + 5)
    wait_for(lambda: [a["label"] for a in alarms(api, active=True)] == ["power_limit"])
    gw.report("v1", "48", 15_000_000, t=t0 + 6)
    wait_for(lambda: alarms(api, active=True) == [])
    assert sorted(a["label"] for a in alarms(api, active=False)) == [
        "overvoltage",
        "power_limit",
        "undervoltage",
    ]


def test_active_alarms_survive_a_restart(tmp_path: Path, clients: Any) -> None:
    settings = make_settings(tmp_path / "data")
    first = RunningHub(settings).start()
    try:
        api = Api(first, clients)
        assert api.admin.post("/api/v1/alarm-rules", json=IMMEDIATE).status_code == 201
        gw = api.gateway()
        gw.sync("r1")
        gw.report("r1", "19", "fire_alarm")
        wait_for(lambda: len(alarms(api, active=True)) == 1)
        gw.client.close()
        api.close()
    finally:
        first.stop()
    second = RunningHub(make_settings(tmp_path / "data")).start()
    try:
        monitor = second.hub.alarms
        # nothing is loaded at start (memory for the devices reporting here, not the fleet) ...
        assert second.run(lambda: len(monitor.devices)) == 0
        assert second.run(lambda: monitor.active_total) == 1  # the metric counts the stored ones
        # ... a device's state is read when it is needed
        (alarm,) = second.call(monitor.active_of("r1"))
        assert alarm.label == "fire_alarm"
        second.run(lambda: monitor.devices.clear())  # and on its first report (below)
        c = clients(second.port, "gw-api", api.vendor.username)
        assert c.connect()[0] == 0
        c.subscribe("gateway_id/gw-api/#", 1)
        from test_api import GatewaySim

        gw2 = GatewaySim(c)
        gw2.report("r1", "19", 0)
        wait_for(lambda: second.run(lambda: monitor.active_total) == 0)
        assert second.run(lambda: (monitor.loaded, monitor.cleared)) == (2, 1)
        assert second.run(lambda: monitor.next_id) == alarm.id + 1
    finally:
        second.stop()


def test_the_alarm_cache_is_bounded_and_keeps_devices_with_alarms(api: Api) -> None:
    """At most ``device_cache_max`` devices' alarm state in memory; a device whose alarm is on is
    not evicted (its debouncing lives in memory), the others are, and come back from the database."""
    monitor = api.hub.hub.alarms
    api.hub.run(lambda: setattr(monitor, "max_devices", 2))
    gw = api.gateway()
    for cid in ("b1", "b2", "b3", "b4"):
        gw.sync(cid)
    gw.report("b1", "19", "fire_alarm")
    wait_for(lambda: len(alarms(api, active=True)) == 1)
    for cid in ("b2", "b3", "b4"):
        gw.report(cid, "19", 0)
    wait_for(lambda: api.hub.run(lambda: monitor.loaded) == 4)
    kept = api.hub.run(lambda: list(monitor.devices))
    assert len(kept) == 2 and "b1" in kept and kept[-1] == "b4", kept
    assert api.hub.run(lambda: monitor.evicted) == 2
    gw.report("b2", "19", "fire_alarm")  # evicted: read again, then evaluated
    wait_for(lambda: len(alarms(api, active=True)) == 2)
    assert {a["cid"] for a in alarms(api, active=True)} == {"b1", "b2"}
