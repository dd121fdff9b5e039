"""The property pages of the dashboard in a real browser (Debian's Chromium via Playwright, as in
test_dashboard.py): the sites page (power now, energy per day, top consumers, silent meters), the unit
page (tenant, readings, bill preview, prepaid balance, top-up form), bill downloads; a phone-sized
screen without sideways scrolling. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from conftest import Client, RunningHub
from meterhub.api.security import create_token
from test_dashboard import TZ, Dashboard
from test_dashboard import browser as browser  # the module-scoped Chromium fixture


@pytest.fixture
def dash(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client], browser: Browser
) -> Iterator[Dashboard]:
    d = Dashboard(hub_factory("protocol", timezone=TZ), clients, browser)
    yield d
    d.close()


def build_site(dash: Dashboard) -> dict:
    admin = httpx.Client(base_url=dash.base, headers={"Authorization": f"Bearer {dash.admin_token}"})
    now = time.time()
    dash.gw.sync("flat-1")
    dash.gw.sync("flat-2")
    dash.gw.report(
        "flat-1", [("44", 10_000_000, now - 600), ("3", 15_000_000, now - 5), ("44", 10_020_000, now - 5)]
    )
    dash.gw.report(
        "flat-2", [("44", 5_000_000, now - 3000), ("44", 5_010_000, now - 2400)]
    )  # silent for 40 min

    def ok(r, status=200):
        assert r.status_code == status, r.text
        return r.json()

    site = ok(admin.post("/api/v1/sites", json={"name": "Linden Yard", "timezone": TZ}), 201)
    b = ok(admin.post(f"/api/v1/sites/{site['id']}/buildings", json={"name": "North"}), 201)
    tariff = ok(
        admin.post(
            f"/api/v1/sites/{site['id']}/tariffs",
            json={
                "name": "flat",
                "versions": [
                    {"effective_from": "2020-01-01", "kind": "flat", "rate": "0.30", "tax_rate": "0.19"}
                ],
            },
        ),
        201,
    )
    ok(admin.patch(f"/api/v1/sites/{site['id']}", json={"tariff_id": tariff["id"]}))
    units = []
    for k, cid in enumerate(("flat-1", "flat-2")):
        u = ok(
            admin.post(f"/api/v1/buildings/{b['id']}/units", json={"name": f"Flat {k + 1}", "label": "flat"}),
            201,
        )
        ok(admin.put(f"/api/v1/meters/{cid}/unit", json={"unit_id": u["id"], "at": "2020-01-01"}))
        units.append(u)
    tenant = ok(admin.post(f"/api/v1/sites/{site['id']}/tenants", json={"name": "Dana Okafor"}), 201)
    ok(
        admin.post(
            f"/api/v1/tenants/{tenant['id']}/occupancies",
            json={"unit_id": units[0]["id"], "move_in": "2020-01-01"},
        ),
        201,
    )
    ok(admin.put("/api/v1/meters/flat-1/prepaid", json={"balance": "12.50", "low_threshold": "2"}))
    admin.close()
    return {"site": site, "units": units}


def test_sites_and_unit_pages_with_a_top_up(dash: Dashboard) -> None:
    ids = build_site(dash)
    page = dash.page
    dash.sign_in(dash.admin_token)
    expect(page.locator(".mainnav a[data-nav=sites]")).to_be_visible()
    page.click(".mainnav a[data-nav=sites]")
    page.click("text=Linden Yard")
    expect(page.locator("#site-power .tile-value")).to_have_text("1.50 kW")
    expect(page.locator("#site-silent .tile-value")).to_have_text("1")
    expect(page.locator("tr.silent")).to_contain_text("flat-2")
    expect(page.locator(".bars .bar")).to_have_count(14)
    expect(page.locator('#site-prepaid tr[data-prepaid="flat-1"]')).to_contain_text("12.50 EUR")
    dash.shot("pm-site-page", full_page=True)

    page.click("text=Flat 1")
    expect(page.locator("h1")).to_have_text("Flat 1")
    expect(page.locator(".page-head .sub")).to_contain_text("Tenant: Dana Okafor")
    expect(page.locator("#bill-preview")).to_contain_text("2.0000")  # kWh since the first reading
    expect(page.locator("#balance-flat-1")).to_have_text("12.50 EUR")
    page.fill("#amount-flat-1", "-3")
    page.click("#prepaid-flat-1 button[type=submit]")
    expect(page.locator("#prepaid-flat-1 [role=alert]")).to_contain_text("greater than 0")
    page.fill("#amount-flat-1", "7.50")
    page.fill("#reference-flat-1", "bank transfer 4411")
    page.click("#prepaid-flat-1 button[type=submit]")
    expect(page.locator("#balance-flat-1")).to_have_text("20.00 EUR")
    admin = httpx.Client(base_url=dash.base, headers={"Authorization": f"Bearer {dash.admin_token}"})
    tops = admin.get("/api/v1/meters/flat-1/topups").json()
    assert [(t["amount"], t["reference"], t["actor"]) for t in tops] == [
        ("7.50", "bank transfer 4411", "admin")
    ]
    # rename the meter from the page
    page.fill("#name-flat-1", "Flat 1 main meter")
    page.fill("#location-flat-1", "Hall cupboard")
    page.click("#meter-flat-1 button[type=submit]")
    expect(page.locator("#meter-flat-1 [role=status]")).to_have_text(
        "Saved: Flat 1 main meter, Hall cupboard."
    )
    info = admin.get("/api/v1/meters/flat-1").json()
    assert (info["name"], info["location"]) == ("Flat 1 main meter", "Hall cupboard")
    dash.shot("pm-unit-page", full_page=True)

    # the bill downloads: a CSV file
    with page.expect_download() as dl:
        page.click("#bill-preview button:has-text('CSV')")
    text = Path(dl.value.path()).read_text(encoding="utf-8")
    assert text.startswith("site,unit,tenant,month") and "Linden Yard" in text

    # a phone: nothing scrolls sideways
    page.set_viewport_size({"width": 390, "height": 844})
    dash.go(f"/sites/{ids['site']['id']}")
    expect(page.locator("#site-power .tile-value")).to_have_text("1.50 kW")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    dash.shot("pm-site-phone", full_page=True)
    dash.go(f"/units/{ids['units'][0]['id']}")
    expect(page.locator("#balance-flat-1")).to_have_text("20.00 EUR")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    dash.shot("pm-unit-phone", full_page=True)
    dash.check_console()


def test_a_site_scoped_sign_in_sees_only_its_site(dash: Dashboard) -> None:
    ids = build_site(dash)
    admin = httpx.Client(base_url=dash.base, headers={"Authorization": f"Bearer {dash.admin_token}"})
    assert admin.post("/api/v1/sites", json={"name": "Other Estate"}).status_code == 201
    admin.close()
    token, _ = create_token(dash.hub.engine, "linden-manager", "operate", [ids["site"]["id"]])
    page = dash.page
    dash.sign_in(token)
    expect(page).to_have_url(re.compile(r"#/sites$"))
    expect(page.locator("main table")).to_contain_text("Linden Yard")
    expect(page.locator("main")).not_to_contain_text("Other Estate")
    expect(page.locator(".mainnav a[data-nav=devices]")).to_be_hidden()
    expect(page.locator(".mainnav a[data-nav=sites]")).to_be_visible()
    page.click("text=Linden Yard")
    expect(page.locator("#site-power .tile-value")).to_have_text("1.50 kW")
    page.click("text=Flat 1")
    page.fill("#amount-flat-1", "1.00")
    page.click("#prepaid-flat-1 button[type=submit]")  # operate may top up
    expect(page.locator("#balance-flat-1")).to_have_text("13.50 EUR")
    dash.shot("pm-scoped-unit", full_page=True)
    dash.check_console()
