"""Alarms people can trust: hysteresis, minimum durations, the meter's fault and meterhub's threshold
as one alarm, repeat counts, and operators' rules -- all from hand-built report sequences over MQTT."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import RunningHub, wait_for
from test_api import Api


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Any) -> Any:
    a = Api(hub_factory("protocol"), clients)
    yield a
    a.close()


def alarms(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.read.get("/api/v1/alarms", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def rule(api: Api, **body: Any) -> dict[str, Any]:
    r = api.admin.post("/api/v1/alarm-rules", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_sag_debounced_merged_and_counted(api: Api) -> None:
    # undervoltage: 5 s before raising, 20 s before clearing, back above 200 + 5 V to stop asserting
    rule(api, kind="tune", label="undervoltage", hysteresis=5, raise_after=5, clear_after=20)
    gw = api.gateway()
    gw.sync("s1")
    t0 = int(time.time()) - 600
    gw.report("s1", "11", 2_000_000, t=t0)  # voltage_under 200 V
    gw.report("s1", "5", 2_300_000, t=t0 + 1)

    # A 2 s sag, reported by the meter's fault and by the voltage: too short, nothing raised.
    gw.report("s1", "5", 1_950_000, t=t0 + 10)
    gw.report("s1", "19", ["undervoltage_alarm"], t=t0 + 10)
    gw.report("s1", "5", 2_300_000, t=t0 + 12)
    gw.report("s1", "19", 0, t=t0 + 12)

    # A sag held for 6 s: one alarm (not two), both sources, raised at its start.
    gw.report("s1", "5", 1_950_000, t=t0 + 20)
    gw.report("s1", "19", ["undervoltage_alarm"], t=t0 + 20)
    gw.report("s1", "5", 1_940_000, t=t0 + 26)
    wait_for(lambda: len(alarms(api)) == 1)
    (a,) = alarms(api)
    assert (a["kind"], a["label"], a["raised_at"], a["count"], a["active"]) == (
        "threshold",
        "undervoltage",
        t0 + 20,
        1,
        True,
    )
    assert a["sources"] == ["meter", "meterhub"]
    assert a["details"]["fault"] == "undervoltage_alarm" and a["details"]["limit"] == 200.0

    # 201 V is within the hysteresis: meterhub still asserts it although the meter's fault is gone;
    # 210 V stops it; back under 200 V 4 s later: the open alarm counts a second time.
    gw.report("s1", "19", 0, t=t0 + 30)
    gw.report("s1", "5", 2_010_000, t=t0 + 30)
    gw.report("s1", "5", 2_100_000, t=t0 + 31)
    gw.report("s1", "5", 1_900_000, t=t0 + 35)
    wait_for(lambda: alarms(api)[0]["count"] == 2)
    # Gone at t0+40: still open 15 s later, cleared once 20 s have passed, at the time it ended.
    gw.report("s1", "5", 2_300_000, t=t0 + 40)
    gw.report("s1", "5", 2_300_000, t=t0 + 55)
    time.sleep(0.3)
    assert alarms(api)[0]["active"] is True
    gw.report("s1", "5", 2_300_000, t=t0 + 61)
    wait_for(lambda: alarms(api)[0]["active"] is False)
    (a,) = alarms(api)
    assert (a["count"], a["cleared_at"], a["last_raised_at"]) == (2, t0 + 40, t0 + 35)
    assert api.hub.run(lambda: api.hub.hub.alarms.repeats) == 1


def test_min_duration_finished_by_a_timer(api: Api) -> None:
    """A meter reports a fault once and then nothing: raised when raise_after has passed anyway."""
    rule(api, kind="tune", label="fire_alarm", raise_after=1.0, clear_after=1.0)
    gw = api.gateway()
    gw.sync("f1")
    gw.report("f1", "19", ["fire_alarm"], t=time.time())
    time.sleep(0.3)
    assert alarms(api) == []
    wait_for(lambda: len(alarms(api, active=True)) == 1, timeout=5)
    gw.report("f1", "19", 0, t=time.time())
    time.sleep(0.3)
    assert len(alarms(api, active=True)) == 1  # waits 1 s before clearing
    wait_for(lambda: alarms(api, active=True) == [], timeout=5)


def test_default_debouncing_ignores_a_blip(hub_factory: Callable[..., RunningHub], clients: Any) -> None:
    """Without any rule (the settings' defaults, 10 s / 30 s): a fault lasting 3 s is not an alarm."""
    api = Api(hub_factory("protocol", alarm_raise_after=10.0, alarm_clear_after=30.0), clients)
    gw = api.gateway()
    gw.sync("b1")
    t0 = int(time.time()) - 100
    gw.report("b1", "19", ["surge_alarm"], t=t0)
    gw.report("b1", "19", 0, t=t0 + 3)
    gw.report("b1", "19", ["magnetism_alarm"], t=t0 + 4)
    gw.report("b1", "19", ["magnetism_alarm"], t=t0 + 20)  # held 16 s >= 10 s default
    wait_for(lambda: len(alarms(api)) == 1)
    assert [a["label"] for a in alarms(api)] == ["magnetism_alarm"]
    api.close()


def test_operator_rules_above_rate_and_scope(api: Api) -> None:
    hot = rule(api, kind="above", code="temp_current", value=60, label="hot", level="serious", hysteresis=2)
    assert (hot["kind"], hot["level"], hot["site_id"], hot["product_id"]) == ("above", "serious", None, None)
    rule(api, kind="rate", code="temp_current", value=30, label="heating_fast", level="urgent")
    rule(api, kind="below", code="temp_current", value=5, label="frozen", product_id="other-model")
    rule(api, kind="tune", label="*", raise_after=0, clear_after=0)
    gw = api.gateway()
    gw.sync("o1")
    t0 = int(time.time()) - 6000
    gw.report("o1", "10", 2000, t=t0)  # 20 °C
    gw.report("o1", "10", 2500, t=t0 + 60)  # +5 °C/min: fine
    gw.report("o1", "10", 6100, t=t0 + 120)  # 61 °C: hot, and +36 °C/min
    wait_for(lambda: len(alarms(api, active=True)) == 2)
    got = {a["label"]: a for a in alarms(api, active=True)}
    hot_alarm = got["hot"]
    assert (hot_alarm["kind"], hot_alarm["level"], hot_alarm["details"]["value"]) == ("rule", "serious", 61.0)
    assert got["heating_fast"]["level"] == "urgent" and got["heating_fast"]["details"]["value"] == 36.0
    gw.report("o1", "10", 5900, t=t0 + 180)  # 59 °C: within the 2 °C hysteresis; rate 2/min
    wait_for(lambda: [a["label"] for a in alarms(api, active=True)] == ["hot"])
    gw.report("o1", "10", 100, t=t0 + 1200)  # 1 °C, slowly: "frozen" is for another model only
    wait_for(lambda: alarms(api, active=True) == [])
    assert {a["label"] for a in alarms(api)} == {"hot", "heating_fast"}
    assert len(api.read.get("/api/v1/alarm-rules").json()["items"]) == 4
    assert api.read.get("/api/v1/alarms", params={"kind": "rule"}).json()["total"] == 2


def test_rule_mistakes_are_4xx(api: Api) -> None:
    post = api.admin.post
    r = post("/api/v1/alarm-rules", json={"kind": "above", "label": "x", "value": 1})
    assert r.status_code == 422 and "code" in r.json()["error"]["message"]
    r = post("/api/v1/alarm-rules", json={"kind": "rate", "label": "x", "code": "temp_current", "value": 0})
    assert r.status_code == 422 and "above 0" in r.json()["error"]["message"]
    r = post("/api/v1/alarm-rules", json={"kind": "sideways", "label": "x"})
    assert r.status_code == 422
    r = post("/api/v1/alarm-rules", json={"kind": "tune", "label": "x", "site_id": 99})
    assert r.status_code == 404 and "site 99" in r.json()["error"]["message"]
    assert api.read.post("/api/v1/alarm-rules", json={"kind": "tune", "label": "x"}).status_code == 403
    created = rule(api, kind="tune", label="x", raise_after=3)
    r = api.admin.patch(f"/api/v1/alarm-rules/{created['id']}", json={"raise_after": 7})
    assert r.status_code == 200 and r.json()["raise_after"] == 7
    assert api.admin.delete(f"/api/v1/alarm-rules/{created['id']}").status_code == 204
    assert api.admin.get(f"/api/v1/alarm-rules/{created['id']}").status_code == 404


def test_the_cli_manages_rules_targets_and_the_log(api: Api) -> None:
    import subprocess
    import sys

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "meterhub", *args, "--url", api.base, "--token", api.admin_token]
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    rule_id = cli(
        "alarm-rule", "add", "above", "hot", "--code", "temp_current", "--value", "70"
    ).stdout.strip()
    assert rule_id.isdigit()
    r = cli("alarm-rule", "add", "above", "x", "--value", "1", check=False)
    assert r.returncode != 0 and "HTTP 422" in r.stderr and "code" in r.stderr
    listed = cli("alarm-rule", "list").stdout
    assert "hot" in listed and "temp_current" in listed
    target_id = cli(
        "notify", "add-webhook", "ops", "http://127.0.0.1:9/h", "--secret", "zq-secret"
    ).stdout.strip()
    assert "ops" in cli("notify", "targets").stdout
    shown = cli("notify", "targets", "--json").stdout
    assert '"secret": "***"' in shown and "zq-secret" not in shown
    assert cli("notify", "log", "--dead").stdout.startswith("id")
    cli("notify", "delete-target", target_id)
    cli("alarm-rule", "delete", rule_id)
    assert api.read.get("/api/v1/alarm-rules").json()["items"] == []
    r = cli("alarm-rule", "delete", rule_id, check=False)
    assert r.returncode != 0 and f"rule {rule_id} not found" in r.stderr
