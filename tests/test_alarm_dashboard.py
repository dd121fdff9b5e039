"""The dashboard's alarm rules page: the rules form and the dead-letter list (Debian Chromium)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Browser, expect

from conftest import Client, RunningHub, free_port, wait_for
from test_dashboard import TZ, Dashboard
from test_dashboard import browser as browser  # the module-scoped Chromium fixture


@pytest.fixture
def dash(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client], browser: Browser
) -> Iterator[Dashboard]:
    hub = hub_factory("protocol", timezone=TZ, notify_backoff=0.2, notify_poll=0.1, notify_max_attempts=2)
    d = Dashboard(hub, clients, browser)
    yield d
    d.close()


def test_rules_form_and_dead_letters(dash: Dashboard) -> None:
    page = dash.page
    admin = httpx.Client(base_url=dash.base, headers={"Authorization": f"Bearer {dash.admin_token}"})
    dash.sign_in(dash.admin_token)
    expect(page.locator("#topbar")).to_be_visible()
    dash.go("/alarms")
    page.click("#alarm-rules-link")
    expect(page.locator("#rules-empty")).to_be_visible()
    expect(page.locator("#dead-empty")).to_have_text("Every notification was delivered.")

    # A mistake gets the API's message; then a valid rule is listed.
    page.select_option("#rule-kind", "above")
    page.fill("#rule-label", "hot")
    page.click("#rule-form button[type=submit]")
    expect(page.locator("#rule-status")).to_contain_text("needs the data point code")
    page.fill("#rule-code", "temp_current")
    page.fill("#rule-value", "60")
    page.select_option("#rule-level", "serious")
    page.fill("#rule-raise-after", "0")
    page.click("#rule-form button[type=submit]")
    expect(page.locator("#rule-status")).to_contain_text("added")
    row = page.locator("table.rule-table tbody tr", has_text="hot")
    expect(row).to_contain_text("temp_current > 60")
    expect(row).to_contain_text("serious")
    (stored,) = admin.get("/api/v1/alarm-rules").json()["items"]
    assert (stored["kind"], stored["code"], stored["value"], stored["level"]) == (
        "above",
        "temp_current",
        60,
        "serious",
    )

    # A webhook nobody answers: the rule's alarm becomes a dead letter shown on the page.
    r = admin.post(
        "/api/v1/notify/targets",
        json={
            "name": "nobody",
            "kind": "webhook",
            "config": {"url": f"http://127.0.0.1:{free_port()}/", "secret": "k"},
        },
    )
    assert r.status_code == 201
    dash.gw.sync("d1")
    dash.gw.report("d1", [(10, 6500, time.time())])  # 65 °C
    wait_for(lambda: len(admin.get("/api/v1/notify/dead").json()["items"]) == 1, timeout=10)
    dead = page.locator("table.dead-table tbody tr")
    expect(dead).to_have_count(1, timeout=8000)
    expect(dead).to_contain_text("hot on d1")
    expect(dead).to_contain_text("ConnectError")
    dash.shot("alarm-rules-page", full_page=True)
    dead.get_by_role("button", name="Send notification").click()
    wait_for(lambda: admin.get("/api/v1/notify/log").json()["items"][0]["attempts"] == 2, timeout=10)
    row.get_by_role("button", name="Delete rule hot").click()
    expect(page.locator("#rules-empty")).to_be_visible()
    admin.close()
    dash.check_console()
