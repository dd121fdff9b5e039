"""Property management over the real API: sites, units, meters, tenants, tariffs, bills (JSON, CSV,
HTML, and ``meterhub bill``), with readings sent by a real MQTT gateway client; and the 4xx answers."""

from __future__ import annotations

import csv
import datetime as dt
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import Client, RunningHub
from test_api import Api

UTC = dt.UTC


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]) -> Iterator[Api]:
    a = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    yield a
    a.close()


def ok(r: Any, status: int = 200) -> Any:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()


def err(r: Any, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]["message"]


def billing_window(now: float) -> tuple[str, float, float]:
    """A month (UTC) and a span [a, b) inside it that is entirely within the last 29 days (reports older
    than 30 days are refused by the protocol), the longest such span."""
    t = dt.datetime.fromtimestamp(now, UTC)
    this_start = dt.datetime(t.year, t.month, 1, tzinfo=UTC)
    prev_start = (this_start - dt.timedelta(days=1)).replace(day=1)
    oldest = now - 29 * 86400
    cur = (this_start.strftime("%Y-%m"), max(this_start.timestamp(), oldest), now - 120)
    prev = (prev_start.strftime("%Y-%m"), max(prev_start.timestamp(), oldest), this_start.timestamp())
    return max(cur, prev, key=lambda w: w[2] - w[1])


def setup_site(api: Api, tz: str = "UTC") -> dict[str, Any]:
    site = ok(
        api.admin.post("/api/v1/sites", json={"name": "Elm Court", "timezone": tz, "currency": "EUR"}), 201
    )
    b = ok(api.admin.post(f"/api/v1/sites/{site['id']}/buildings", json={"name": "A"}), 201)
    unit = ok(
        api.admin.post(f"/api/v1/buildings/{b['id']}/units", json={"name": "Flat 1", "label": "flat"}), 201
    )
    return {"site": site, "building": b, "unit": unit}


def test_a_tenant_moving_out_mid_month_is_billed_to_the_interpolated_reading(api: Api) -> None:
    month, a, b = billing_window(time.time())
    span = int(b - a)
    assert span > 3600
    t1, t2, t3 = int(a + span * 0.1), int(a + span * 0.5), int(a + span * 0.9)
    t3 += (t3 - t2) % 2  # so that the mid-point between t2 and t3 is a whole second
    move = (t2 + t3) // 2
    gw = api.gateway("gw-pm")
    gw.sync("m1", device_name="Meter in flat 1")
    # 1000 kWh, 1100 kWh, 1300 kWh: the move-out is half-way from t2 to t3, so the meter then read 1200
    for t, value in ((t1, 10_000_000), (t2, 11_000_000), (t3, 13_000_000)):
        gw.report("m1", "44", value, t=t)
    ids = setup_site(api)
    sid, uid = ids["site"]["id"], ids["unit"]["id"]
    tariff = ok(
        api.admin.post(
            f"/api/v1/sites/{sid}/tariffs",
            json={
                "name": "basic",
                "versions": [
                    {"effective_from": "2020-01-01", "kind": "flat", "rate": "0.30", "tax_rate": "0.19"}
                ],
            },
        ),
        201,
    )
    ok(api.admin.patch(f"/api/v1/sites/{sid}", json={"tariff_id": tariff["id"]}))
    ok(api.admin.put("/api/v1/meters/m1/unit", json={"unit_id": uid, "at": "2020-01-01"}))
    ok(api.admin.patch("/api/v1/meters/m1", json={"name": "Flat 1 main", "location": "hall cupboard"}))
    alice = ok(api.admin.post(f"/api/v1/sites/{sid}/tenants", json={"name": "Alice"}), 201)
    bob = ok(api.admin.post(f"/api/v1/sites/{sid}/tenants", json={"name": "Bob"}), 201)
    ok(
        api.admin.post(
            f"/api/v1/tenants/{alice['id']}/occupancies",
            json={"unit_id": uid, "move_in": "2020-01-01", "move_out": move},
        ),
        201,
    )
    ok(
        api.admin.post(f"/api/v1/tenants/{bob['id']}/occupancies", json={"unit_id": uid, "move_in": move}),
        201,
    )

    meter = ok(api.read.get("/api/v1/meters/m1"))
    assert (meter["name"], meter["location"], meter["unit_id"]) == ("Flat 1 main", "hall cupboard", uid)

    # Alice: 1000 (held: the first reading of the month) to 1200 (interpolated) = 200 kWh x 0.30 = 60.00,
    # tax 19 % = 11.40, total 71.40. Bob: 1200 to 1300 = 100 kWh: 30.00 + 5.70 = 35.70.
    bill = ok(api.read.get(f"/api/v1/tenants/{alice['id']}/bill", params={"month": month}))
    assert [(ln["kind"], ln["quantity"], ln["amount"]) for ln in bill["lines"]] == [
        ("energy", "200.0000", "60.00"),
        ("tax", "60.00", "11.40"),
    ]
    assert bill["total"] == "71.40"
    closing = bill["meters"][0]["closing"]
    assert (closing["kwh"], closing["source"], closing["t"]) == ("1200.0000", "interpolated", move)
    bill_b = ok(api.read.get(f"/api/v1/tenants/{bob['id']}/bill", params={"month": month}))
    assert bill_b["total"] == "35.70"
    assert bill_b["meters"][0]["opening"]["kwh"] == "1200.0000"

    r = api.read.get(f"/api/v1/sites/{sid}/bills", params={"month": month, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["tenant"], x["kind"], x["amount"]) for x in rows] == [
        ("Alice", "energy", "60.00"),
        ("Alice", "tax", "11.40"),
        ("Bob", "energy", "30.00"),
        ("Bob", "tax", "5.70"),
    ]
    page = api.read.get(
        f"/api/v1/units/{uid}/bill", params={"month": month, "tenant_id": alice["id"], "format": "html"}
    )
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "71.40 EUR" in page.text and "1200.0000 kWh" in page.text and "(interpolated)" in page.text

    # the CLI: meterhub bill --site "Elm Court" --month M --csv, against the running server
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meterhub",
            "bill",
            "--site",
            "Elm Court",
            "--month",
            month,
            "--csv",
            "--url",
            api.base,
            "--token",
            api.read_token,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == r.text.replace("\r\n", "\n")  # (text mode reads CRLF as LF)
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "meterhub",
            "bill",
            "--site",
            str(sid),
            "--month",
            month,
            "--url",
            api.base,
            "--token",
            api.read_token,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Alice" in table and "71.40" in table and "35.70" in table

    # every change is in the audit log, with who did it
    audit = ok(api.read.get("/api/v1/audit", params={"site_id": sid}))
    actions = [e["action"] for e in audit["items"]]
    assert {"site.create", "tariff.create", "meter.assign", "meter.rename", "occupancy.create"} <= set(
        actions
    )
    assert {e["actor"] for e in audit["items"]} == {"admin"}


def test_moving_a_meter_keeps_its_history(api: Api) -> None:
    gw = api.gateway("gw-move")
    gw.sync("m2")
    ids = setup_site(api)
    unit2 = ok(
        api.admin.post(
            f"/api/v1/buildings/{ids['building']['id']}/units", json={"name": "Shop", "label": "shop"}
        ),
        201,
    )
    ok(api.admin.put("/api/v1/meters/m2/unit", json={"unit_id": ids["unit"]["id"], "at": 1_000_000}))
    moved = ok(api.admin.put("/api/v1/meters/m2/unit", json={"unit_id": unit2["id"], "at": 2_000_000}))
    assert moved["unit_id"] == unit2["id"]
    assert [(h["unit_id"], h["from"], h["to"]) for h in moved["assignments"]] == [
        (ids["unit"]["id"], 1_000_000, 2_000_000),
        (unit2["id"], 2_000_000, None),
    ]
    # a move before the last one would rewrite history: refused
    msg = err(
        api.admin.put("/api/v1/meters/m2/unit", json={"unit_id": ids["unit"]["id"], "at": 1_500_000}), 409
    )
    assert "later than the meter's last move" in msg
    assert ok(api.read.get(f"/api/v1/sites/{ids['site']['id']}/meters"))[0]["cid"] == "m2"


def test_operator_mistakes_get_a_clear_4xx(api: Api) -> None:
    gw = api.gateway("gw-bad")
    gw.sync("m3")
    assert "site 999 does not exist" in err(api.read.get("/api/v1/sites/999"), 404)
    assert "site 999 does not exist" in err(
        api.admin.post("/api/v1/sites/999/tenants", json={"name": "x"}), 404
    )
    assert "not a known IANA time zone" in err(
        api.admin.post("/api/v1/sites", json={"name": "X", "timezone": "Mars/Olympus"}), 422
    )
    assert "3-letter" in err(api.admin.post("/api/v1/sites", json={"name": "X", "currency": "E1R"}), 422)
    ids = setup_site(api)
    sid, uid = ids["site"]["id"], ids["unit"]["id"]
    assert "already exists" in err(api.admin.post("/api/v1/sites", json={"name": "Elm Court"}), 409)
    assert "device 'nope' does not exist" in err(
        api.admin.put("/api/v1/meters/nope/unit", json={"unit_id": uid}), 404
    )
    t1 = ok(api.admin.post(f"/api/v1/sites/{sid}/tenants", json={"name": "T1"}), 201)
    t2 = ok(api.admin.post(f"/api/v1/sites/{sid}/tenants", json={"name": "T2"}), 201)
    ok(
        api.admin.post(
            f"/api/v1/tenants/{t1['id']}/occupancies",
            json={"unit_id": uid, "move_in": "2026-01-01", "move_out": "2026-06-01"},
        ),
        201,
    )
    msg = err(
        api.admin.post(
            f"/api/v1/tenants/{t2['id']}/occupancies", json={"unit_id": uid, "move_in": "2026-05-15"}
        ),
        409,
    )
    assert "occupied by tenant 'T1'" in msg and "may not overlap" in msg
    assert "move_out must be after move_in" in err(
        api.admin.post(
            f"/api/v1/tenants/{t2['id']}/occupancies",
            json={"unit_id": uid, "move_in": "2026-07-01", "move_out": "2026-06-01"},
        ),
        422,
    )
    assert "expected Unix seconds, YYYY-MM-DD" in err(
        api.admin.post(f"/api/v1/tenants/{t2['id']}/occupancies", json={"unit_id": uid, "move_in": "soon"}),
        422,
    )
    overlap = {
        "effective_from": "2026-01-01",
        "kind": "tou",
        "bands": {"day": "0.3", "night": "0.1"},
        "windows": [
            {"days": "all", "start": "00:00", "end": "08:00", "band": "night"},
            {"days": "all", "start": "07:00", "end": "24:00", "band": "day"},
        ],
    }
    msg = err(
        api.admin.post(f"/api/v1/sites/{sid}/tariffs", json={"name": "tou", "versions": [overlap]}), 422
    )
    assert msg == "tariff version 2026-01-01: windows overlap on mon between 07:00 and 08:00"
    gap = {**overlap, "windows": [{"days": "mon-fri", "start": "00:00", "end": "24:00", "band": "day"}]}
    msg = err(api.admin.post(f"/api/v1/sites/{sid}/tariffs", json={"name": "tou", "versions": [gap]}), 422)
    assert msg == "tariff version 2026-01-01: windows leave a gap on sat from 00:00 to 24:00"
    assert "has no tariff" in err(api.read.get(f"/api/v1/units/{uid}/bill", params={"month": "2026-02"}), 409)
    assert err(api.read.get(f"/api/v1/units/{uid}/bill", params={"month": "2026-13"}), 422)
    # prepaid: a meter in no unit, then a negative top-up
    assert "in no unit" in err(api.admin.put("/api/v1/meters/m3/prepaid", json={"mode": "currency"}), 409)
    ok(api.admin.put("/api/v1/meters/m3/unit", json={"unit_id": uid}))
    ok(api.admin.put("/api/v1/meters/m3/prepaid", json={"mode": "currency", "balance": "5"}))
    assert "must be greater than 0" in err(
        api.admin.post("/api/v1/meters/m3/topups", json={"amount": "-5"}), 422
    )
    assert "not a decimal number" in err(
        api.admin.post("/api/v1/meters/m3/topups", json={"amount": "lots"}), 422
    )
    assert err(api.admin.post("/api/v1/meters/m3/topups", json={"amount": 5.5}), 422)  # a float: not exact
    # read tokens may not change anything
    assert api.read.post("/api/v1/meters/m3/topups", json={"amount": "5"}).status_code == 403


def test_site_overview_power_energy_top_consumers_and_silent_meters(api: Api) -> None:
    now = int(time.time())
    gw = api.gateway("gw-ov")
    gw.sync("o1")
    gw.sync("o2")
    gw.report("o1", "44", 10_000_000, t=now - 600)
    gw.report("o1", "44", 10_020_000, t=now - 5)  # +2 kWh
    gw.report("o1", "3", 15_000_000, t=now - 5)  # 1500 W
    gw.report("o2", "44", 5_000_000, t=now - 3000)  # measured 50 minutes ago: silent
    ids = setup_site(api, "Europe/Berlin")
    b = ids["building"]["id"]
    u2 = ok(api.admin.post(f"/api/v1/buildings/{b}/units", json={"name": "Flat 2"}), 201)
    ok(api.admin.put("/api/v1/meters/o1/unit", json={"unit_id": ids["unit"]["id"], "at": "2020-01-01"}))
    ok(api.admin.put("/api/v1/meters/o2/unit", json={"unit_id": u2["id"], "at": "2020-01-01"}))
    o = ok(api.read.get(f"/api/v1/sites/{ids['site']['id']}/overview", params={"silent_minutes": 30}))
    assert o["power_w"] == 1500.0
    assert o["silent"] == ["o2"]
    top = o["top_consumers"][0]
    assert (top["cid"], top["kwh"]) == ("o1", 2.0)
    assert len(o["energy_per_day"]) == 14


def test_devices_alarms_energy_and_commands_filtered_by_site(api: Api) -> None:
    now = int(time.time())
    gw = api.gateway("gw-filter")
    gw.command_code = 0
    for cid in ("in-site", "elsewhere"):
        gw.sync(cid)
        gw.report(cid, "44", 10_000_000, t=now - 60)
        gw.report(cid, "44", 10_030_000, t=now - 2)  # +3 kWh
        gw.report(cid, "19", 4)  # a fault: an alarm on each
    ids = setup_site(api)
    sid = ids["site"]["id"]
    ok(api.admin.put("/api/v1/meters/in-site/unit", json={"unit_id": ids["unit"]["id"], "at": "2020-01-01"}))
    ok(api.admin.patch("/api/v1/meters/in-site", json={"name": "Kitchen", "location": "Ground floor"}))
    ok(api.admin.post("/api/v1/devices/in-site/commands", json={"dp": "switch", "value": True}))
    ok(api.admin.post("/api/v1/devices/elsewhere/commands", json={"dp": "switch", "value": True}))
    assert [m["cid"] for m in ok(api.read.get(f"/api/v1/sites/{sid}/meters", params={"q": "kitch"}))] == [
        "in-site"
    ]
    assert ok(api.read.get(f"/api/v1/sites/{sid}/meters", params={"q": "attic"})) == []
    alarms = wait_for_alarms(api, sid)
    assert {a["cid"] for a in alarms} == {"in-site"}
    cmds = ok(api.read.get(f"/api/v1/sites/{sid}/commands"))["items"]
    assert [(c["cid"], c["status"]) for c in cmds] == [("in-site", "ok")]
    e = ok(api.read.get(f"/api/v1/sites/{sid}/energy"))
    assert e["meters"] == [{"cid": "in-site", "total_kwh": 3.0}]
    assert sum(b["consumption_kwh"] or 0 for b in e["buckets"]) == 3.0


def wait_for_alarms(api: Api, sid: int) -> list:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        items = ok(api.read.get(f"/api/v1/sites/{sid}/alarms", params={"active": True}))["items"]
        if items:
            return items
        time.sleep(0.05)
    raise AssertionError("no alarm")


def test_the_vacant_part_of_a_unit_is_the_landlords_bill(api: Api) -> None:
    month, a, b = billing_window(time.time())
    span = int(b - a)
    t1, t2, t3 = int(a + span * 0.1), int(a + span * 0.5), int(a + span * 0.9)
    gw = api.gateway("gw-vac")
    gw.sync("v1")
    for t, value in ((t1, 1_000_000), (t2, 1_400_000), (t3, 1_500_000)):  # 100, 140, 150 kWh
        gw.report("v1", "44", value, t=t)
    ids = setup_site(api)
    sid, uid = ids["site"]["id"], ids["unit"]["id"]
    tariff = ok(
        api.admin.post(
            f"/api/v1/sites/{sid}/tariffs",
            json={
                "name": "f",
                "versions": [{"effective_from": "2020-01-01", "kind": "flat", "rate": "0.50"}],
            },
        ),
        201,
    )
    ok(api.admin.patch(f"/api/v1/units/{uid}", json={"tariff_id": tariff["id"]}))
    ok(api.admin.put("/api/v1/meters/v1/unit", json={"unit_id": uid, "at": "2020-01-01"}))
    t = ok(api.admin.post(f"/api/v1/sites/{sid}/tenants", json={"name": "Eve"}), 201)
    ok(
        api.admin.post(
            f"/api/v1/tenants/{t['id']}/occupancies",
            json={"unit_id": uid, "move_in": "2020-01-01", "move_out": t2},
        ),
        201,
    )
    bills = ok(api.read.get(f"/api/v1/sites/{sid}/bills", params={"month": month}))["bills"]
    # Eve: 100 -> 140 = 40 kWh x 0.50 = 20.00; then vacant: 140 -> 150 = 10 kWh = 5.00 (the landlord's)
    assert [((x["tenant"] or {}).get("name"), x["vacant"], x["kwh_total"], x["total"]) for x in bills] == [
        ("Eve", False, "40.0000", "20.00"),
        (None, True, "10.0000", "5.00"),
    ]
    r = api.read.get(f"/api/v1/sites/{sid}/bills", params={"month": month, "format": "csv"})
    assert [row["tenant"] for row in csv.DictReader(io.StringIO(r.text))] == ["Eve", "(vacant)"]
    assert (
        api.read.get(
            f"/api/v1/units/{uid}/bill", params={"month": month, "vacant": True, "tenant_id": t["id"]}
        ).status_code
        == 422
    )


def test_the_cli_sets_up_a_site_tariff_tenant_and_prepaid_meter(api: Api, tmp_path) -> None:
    gw = api.gateway("gw-cli")
    gw.sync("c1")

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "meterhub", *args, "--url", api.base, "--token", api.admin_token]
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    assert cli("site", "create", "Oak Row", "--timezone", "Europe/Berlin").stdout.startswith("site ")
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"effective_from": "2026-01-01", "kind": "tou", "bands": {"a": "0.1"},'
        ' "windows": [{"days": "all", "start": "00:00", "end": "23:00", "band": "a"}]}'
    )
    r = cli("tariff", "add", "tou", str(bad), "--site", "Oak Row", check=False)
    assert r.returncode != 0 and "windows leave a gap on mon from 23:00 to 24:00" in r.stderr
    good = tmp_path / "flat.json"
    good.write_text('[{"effective_from": "2020-01-01", "kind": "flat", "rate": "0.40"}]')
    assert "1 version(s)" in cli("tariff", "add", "flat", str(good), "--site", "Oak Row", "--default").stdout
    site = next(s for s in ok(api.read.get("/api/v1/sites")) if s["name"] == "Oak Row")
    assert site["tariff_id"] is not None
    b = ok(api.admin.post(f"/api/v1/sites/{site['id']}/buildings", json={"name": "Main"}), 201)
    unit = ok(api.admin.post(f"/api/v1/buildings/{b['id']}/units", json={"name": "Flat 9"}), 201)
    cli("meter", "move", "c1", "--unit", str(unit["id"]), "--at", "2020-01-01")
    cli("meter", "rename", "c1", "--name", "Flat 9", "--location", "stairwell")
    out = cli(
        "tenant",
        "add",
        "Frank",
        "--site",
        "Oak Row",
        "--unit",
        str(unit["id"]),
        "--move-in",
        "2020-01-01",
        "--json",
    )
    assert '"name": "Frank"' in out.stdout
    r = cli(
        "tenant",
        "add",
        "Gina",
        "--site",
        "Oak Row",
        "--unit",
        str(unit["id"]),
        "--move-in",
        "2021-01-01",
        check=False,
    )
    assert r.returncode != 0 and "occupied by tenant 'Frank'" in r.stderr
    ok(api.admin.put("/api/v1/meters/c1/prepaid", json={"balance": "2.00"}))
    assert "balance 12.00 EUR" in cli("topup", "c1", "10", "--reference", "cash").stdout
    assert cli("balance", "c1").stdout.startswith("c1: balance 12.00 EUR")
    r = cli("topup", "c1", "0", check=False)
    assert r.returncode != 0 and "must be greater than 0" in r.stderr
