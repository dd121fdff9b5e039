"""Prepaid end to end: a real hub, a real MQTT client playing the gateway and its meter, the real API.

Credit runs out -> the switch-off command reaches the meter; a top-up -> switched on; a meter offline
at zero -> the command waits and goes out when it comes back; a command that times out is retried and
its state is visible; grace rules hold a meter on. Plus the grace rules themselves, pure.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import conftest
from conftest import Client, RunningHub
from meterhub.core.prepaid import grace_reason, parse_grace
from test_api import Api, GatewaySim
from test_pm_api import ok


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    """conftest.wait_for with room for a loaded machine: the prepaid service acts in rounds (at
    least every 5 s, sooner when woken by a report or a command); this is a deadline, not a timing."""
    return conftest.wait_for(predicate, timeout=timeout)


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]) -> Iterator[Api]:
    a = Api(hub_factory("protocol", timezone="UTC", command_timeout=1.0), clients)
    service = a.hub.hub.prepaid
    service.interval = 0.2
    service.retry_interval = 0.5
    yield a
    a.close()


def prepaid_meter(api: Api, cid: str, grace: dict[str, Any] | None = None) -> tuple[GatewaySim, int]:
    gw = api.gateway(f"gw-{cid}")
    gw.sync(cid)
    t0 = int(time.time()) - 60
    gw.report(cid, "44", 10_000, t=t0)  # 1.0000 kWh before the account exists
    site = ok(api.admin.post("/api/v1/sites", json={"name": f"S-{cid}", "timezone": "UTC"}), 201)
    b = ok(api.admin.post(f"/api/v1/sites/{site['id']}/buildings", json={"name": "B"}), 201)
    unit = ok(api.admin.post(f"/api/v1/buildings/{b['id']}/units", json={"name": "U"}), 201)
    tariff = ok(
        api.admin.post(
            f"/api/v1/sites/{site['id']}/tariffs",
            json={
                "name": "p",
                "versions": [{"effective_from": "2020-01-01", "kind": "flat", "rate": "0.50"}],
            },
        ),
        201,
    )
    ok(api.admin.patch(f"/api/v1/sites/{site['id']}", json={"tariff_id": tariff["id"]}))
    ok(api.admin.put(f"/api/v1/meters/{cid}/unit", json={"unit_id": unit["id"], "at": "2020-01-01"}))
    acct = ok(
        api.admin.put(
            f"/api/v1/meters/{cid}/prepaid",
            json={"mode": "currency", "balance": "1.00", "low_threshold": "0.50", "grace": grace},
        )
    )
    assert acct["charged_until"] == t0  # consumption counts from the latest reading
    return gw, t0


def account(api: Api, cid: str) -> dict[str, Any]:
    return ok(api.read.get(f"/api/v1/meters/{cid}/prepaid"))


def switch_commands(gw: GatewaySim) -> list[Any]:
    return [c["param"]["value"] for c in list(gw.commands) if c["param"]["id"] == "1"]


def test_credit_runs_out_the_meter_is_switched_off_and_a_top_up_switches_it_on(api: Api) -> None:
    gw, t0 = prepaid_meter(api, "pp1")
    gw.report("pp1", "44", 12_000, t=t0 + 1)  # +0.2 kWh x 0.50 = 0.10
    wait_for(lambda: account(api, "pp1")["balance"] == "0.90")
    gw.report("pp1", "44", 20_000, t=t0 + 2)  # +0.8 kWh = 0.40: 0.50, at the threshold
    acct = wait_for(lambda: (a := account(api, "pp1"))["low_credit"] and a)
    assert acct["balance"] == "0.50"
    alarms = ok(api.read.get("/api/v1/alarms", params={"cid": "pp1", "active": True}))["items"]
    assert [(x["kind"], x["label"]) for x in alarms] == [("threshold", "low_credit")]
    assert switch_commands(gw) == []  # low, but not out

    gw.report("pp1", "44", 30_000, t=t0 + 3)  # +1.0 kWh = 0.50: zero
    wait_for(lambda: switch_commands(gw) == [False])
    acct = wait_for(lambda: (a := account(api, "pp1"))["switch_state"] is False and a)
    assert (acct["balance"], acct["last_command_status"]) == ("0.00", "ok")

    top = ok(
        api.admin.post("/api/v1/meters/pp1/topups", json={"amount": "5.00", "reference": "receipt 17"}), 201
    )
    assert top["balance"] == "5.00"
    wait_for(lambda: switch_commands(gw) == [False, True])
    acct = wait_for(lambda: (a := account(api, "pp1"))["switch_state"] is True and a)
    assert acct["low_credit"] is False
    wait_for(lambda: not ok(api.read.get("/api/v1/alarms", params={"cid": "pp1", "active": True}))["items"])
    topups = ok(api.read.get("/api/v1/meters/pp1/topups"))
    assert [(t["amount"], t["reference"], t["actor"], Decimal(t["balance_after"])) for t in topups] == [
        ("5.00", "receipt 17", "admin", Decimal("5.00"))
    ]
    actions = [e["action"] for e in ok(api.read.get("/api/v1/audit", params={"limit": 100}))["items"]]
    for action in (
        "prepaid.configure",
        "prepaid.low_credit",
        "prepaid.switched_off",
        "prepaid.topup",
        "prepaid.switched_on",
    ):
        assert action in actions


def test_a_meter_offline_at_zero_is_switched_off_when_it_returns(api: Api) -> None:
    gw, _t0 = prepaid_meter(api, "pp2")
    gw.status([("pp2", False)])
    wait_for(lambda: not ok(api.read.get("/api/v1/meters/pp2"))["online"])
    # the balance is corrected to 0 while the meter is offline: nothing can be sent, and it says so
    ok(
        api.admin.put(
            "/api/v1/meters/pp2/prepaid", json={"mode": "currency", "balance": "0", "low_threshold": "0.50"}
        )
    )
    acct = wait_for(
        lambda: (a := account(api, "pp2"))["last_command_status"] == "waiting: meter offline" and a
    )
    assert acct["switch_wanted"] is False and acct["switch_state"] is None
    time.sleep(0.6)
    assert switch_commands(gw) == []
    gw.status([("pp2", True)])  # back: the switch-off goes out now
    wait_for(lambda: switch_commands(gw) == [False])
    wait_for(lambda: account(api, "pp2")["switch_state"] is False)


def test_a_command_without_answer_is_retried_and_visible(api: Api) -> None:
    gw, t0 = prepaid_meter(api, "pp3")
    gw.command_code = None  # the meter does not answer
    gw.report("pp3", "44", 30_000, t=t0 + 1)  # 2 kWh x 0.50 = 1.00: zero
    acct = wait_for(
        lambda: (
            (a := account(api, "pp3"))["last_command_status"]
            and a["last_command_status"].startswith("timeout")
            and a
        ),
        timeout=10,
    )
    assert acct["switch_state"] is None and acct["command_attempts"] >= 1
    audit = ok(api.read.get("/api/v1/audit", params={"limit": 100}))["items"]
    assert any(e["action"] == "prepaid.command_failed" and e["target"] == "pp3" for e in audit)
    gw.command_code = 0  # answers again: the next retry succeeds
    acct = wait_for(lambda: (a := account(api, "pp3"))["switch_state"] is False and a, timeout=10)
    assert acct["command_attempts"] >= 2 and acct["last_command_status"] == "ok"
    assert len(switch_commands(gw)) >= 2 and set(switch_commands(gw)) == {False}


def test_a_grace_rule_holds_the_meter_on_at_zero(api: Api) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    gw, t0 = prepaid_meter(api, "pp4", grace={"holidays": [today]})
    gw.report("pp4", "44", 40_000, t=t0 + 1)  # 3 kWh = 1.50: balance -0.50
    wait_for(lambda: account(api, "pp4")["balance"] == "-0.50")
    wait_for(
        lambda: any(e["action"] == "prepaid.switch_held" for e in ok(api.read.get("/api/v1/audit"))["items"])
    )
    time.sleep(0.6)
    assert switch_commands(gw) == []
    acct = account(api, "pp4")
    assert acct["switch_wanted"] is None and acct["last_command_status"] == "held on: public holiday"


def test_grace_rules() -> None:
    tz = ZoneInfo("Europe/Berlin")
    g = parse_grace(
        {"nights": {"from": "20:00", "to": "08:00"}, "weekends": True, "holidays": ["2026-12-25"]}
    )

    def at(*a: int) -> float:
        return dt.datetime(*a, tzinfo=tz).timestamp()

    assert grace_reason(g, at(2026, 12, 1, 19, 59), tz) is None  # a Tuesday evening
    assert grace_reason(g, at(2026, 12, 1, 20, 0), tz) == "night"
    assert grace_reason(g, at(2026, 12, 2, 7, 59), tz) == "night"
    assert grace_reason(g, at(2026, 12, 2, 8, 0), tz) is None
    assert grace_reason(g, at(2026, 12, 5, 12, 0), tz) == "weekend"
    assert grace_reason(g, at(2026, 12, 25, 12, 0), tz) == "public holiday"
    with pytest.raises(Exception, match="unknown rule"):
        parse_grace({"sundays": True})


def test_a_kwh_account_falls_by_the_kwh_used(api: Api) -> None:
    gw, t0 = prepaid_meter(api, "pp5")
    ok(
        api.admin.put(
            "/api/v1/meters/pp5/prepaid", json={"mode": "kwh", "balance": "1.5", "low_threshold": "0.2"}
        )
    )
    gw.report("pp5", "44", 13_333, t=t0 + 1)  # +0.3333 kWh
    acct = wait_for(lambda: (a := account(api, "pp5"))["balance"] == "1.1667" and a)
    assert (acct["unit"], acct["balance_exact"]) == ("kWh", "1.1667")
    # changing the mode needs a new balance, in the new unit
    r = api.admin.put("/api/v1/meters/pp5/prepaid", json={"mode": "currency"})
    assert r.status_code == 409 and "needs a new balance" in r.json()["error"]["message"]
