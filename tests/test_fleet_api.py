"""The fleet over time (GET /api/v1/fleet/power, /fleet/energy, /fleet/silent): a real hub, a real paho
gateway reporting known values at known times, real HTTP; the sums asserted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from conftest import Client, RunningHub, wait_for
from meterhub.api.security import create_token
from meterhub.core import fleet
from test_api import Api, error_of


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]) -> Iterator[Api]:
    a = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    yield a
    a.close()


def test_fleet_power_energy_and_silent_meters(api: Api) -> None:
    now = time.time()
    if 3600 - now % 3600 < 90:  # the hour buckets below must not move during the test
        time.sleep(3600 - now % 3600 + 1)
        now = time.time()
    hour = now - now % 3600
    gw = api.gateway()
    for cid in ("m1", "m2", "m3"):
        gw.sync(cid)
    # Power (dp 3, W, scale 4): m1 1000 W and 3000 W in the first hour, 500 W in the second; m2 1500 W
    # in the second and a reading every 2 s (its usual interval).
    gw.report("m1", "3", 10_000_000, now - 90 * 60)
    gw.report("m1", "3", 30_000_000, now - 80 * 60)
    gw.report("m1", "3", 5_000_000, now - 10 * 60)
    for k in range(8):
        gw.report("m2", "3", 15_000_000, now - 30 * 60 + 2 * k)
    # Energy (dp 44, kWh, scale 4): m1 uses 1.5 kWh two hours ago, m2 0.25 kWh in the last full hour.
    gw.report("m1", "44", 1_000_000, hour - 2 * 3600 + 5 * 60)
    gw.report("m1", "44", 1_015_000, hour - 2 * 3600 + 50 * 60)
    gw.report("m2", "44", 500_000, hour - 3600 + 10 * 60)
    gw.report("m2", "44", 502_500, hour - 3600 + 40 * 60)
    gw.report("m3", "1", True)  # m3 reports once (online), then its gateway says it is offline
    gw.status([("m3", False)])
    wait_for(lambda: api.read.get("/api/v1/devices/m3").json()["presence"]["online"] is False, 5)

    power = api.read.get("/api/v1/fleet/power", params={"hours": 2, "buckets": 2})
    assert power.status_code == 200, power.text
    body = power.json()
    assert body["unit"] == "W" and body["interval"] == pytest.approx(3600, abs=1)
    got = [(b["power_w"], b["devices"]) for b in body["buckets"]]
    assert got == [(2000.0, 1), (2000.0, 2)]  # mean of m1 | m1 500 + m2 1500
    assert body["buckets"][0]["start"] == pytest.approx(body["from"])

    energy = api.read.get("/api/v1/fleet/energy", params={"period": "hour", "count": 3}).json()
    assert energy["period"] == "hour" and energy["unit"] == "kWh"
    assert [b["start"] for b in energy["buckets"]] == [hour - 2 * 3600, hour - 3600, hour]
    assert [b["consumption_kwh"] for b in energy["buckets"]] == [1.5, 0.25, None]
    assert energy["total_kwh"] == 1.75
    assert (energy["devices"], energy["devices_with_data"]) == (3, 2)
    days = api.read.get("/api/v1/fleet/energy", params={"period": "day", "count": 2}).json()
    assert len(days["buckets"]) == 2 and len(days["buckets"][-1]["period"]) == 10

    silent = api.read.get("/api/v1/fleet/silent").json()
    assert [(m["cid"], m["online"]) for m in silent["items"]] == [("m3", False)]  # m1, m2 just reported
    m3 = silent["items"][0]
    assert m3["offline_since"] is not None and m3["last_report"] <= m3["offline_since"] <= time.time()
    assert m3["silent_for"] >= 0
    # 100 s later: m2 (every 2 s) is silent, m1 (too few readings: 60 s assumed, 3 x 60 s) is not yet.
    later, total = fleet.silent_meters(api.hub.engine, time.time() + 100, 50)
    by_cid = {m["cid"]: m for m in later}
    assert set(by_cid) == {"m2", "m3"} and total == 2
    assert by_cid["m2"]["usual_interval"] == 2.0 and by_cid["m2"]["online"] is True
    assert 100 <= by_cid["m2"]["silent_for"] < 130
    later, _ = fleet.silent_meters(api.hub.engine, time.time() + 200, 50)
    assert [m["cid"] for m in later] == ["m1", "m2", "m3"]  # the longest silent first (last heard)

    # Bad input: a clear 422; a site-scoped token sees no fleet.
    assert error_of(api.read.get("/api/v1/fleet/power", params={"hours": 0}))[0] == 422
    assert error_of(api.read.get("/api/v1/fleet/energy", params={"period": "week"}))[0] == 422
    assert error_of(api.read.get("/api/v1/fleet/energy", params={"period": "hour", "count": 800}))[0] == 422
    site = api.admin.post("/api/v1/sites", json={"name": "Elm Row", "timezone": "Europe/Berlin"}).json()
    token, _ = create_token(api.hub.engine, "site-only", "read", sites=[site["id"]])
    r = api.anon.get("/api/v1/fleet/power", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
