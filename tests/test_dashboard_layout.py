"""Layout of every dashboard page at a laptop (1280 px) and a phone (390 px) width, in Debian's Chromium
(as test_dashboard.py): nothing ends beyond the window, no box hides its content sideways (a table
that needs a sideways scroll is a defect: narrow screens get stacked rows instead), and no chart's
legend runs over the text below it. Full-page screenshots go to test-artifacts/layout-*.png;
``METERHUB_UPDATE_SCREENSHOT=1`` also copies those docs/dashboard.md shows to docs/img/layout/."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Browser, expect

from conftest import Client, RunningHub
from test_dashboard import ARTIFACTS, ROOT, TZ, Dashboard, seed_meter
from test_dashboard import browser as browser  # the module-scoped Chromium fixture
from test_pm_dashboard import build_site

DOCS_LAYOUT = ROOT / "docs" / "img" / "layout"
DOCS_PAGES = {"overview", "device", "alarms"}  # the ones docs/dashboard.md shows

#: Elements that end beyond the window, or hide part of their content behind a sideways scroll or a
#: clip. Charts (uPlot draws on canvases of its own width) are left out; the skip link is off-screen
#: on purpose until focused.
OVERFLOW_JS = """() => {
  const found = [];
  const vw = document.documentElement.clientWidth;
  for (const el of document.querySelectorAll("body *")) {
    if (el.closest(".uplot, .skip-link, .visually-hidden, script, style")) continue;
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden") continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const cls = typeof el.className === "string" ? el.className.trim().split(/\\s+/).join(".") : "";
    const name = el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + (cls ? "." + cls : "");
    if (r.right > vw + 1) found.push(`${name} ends at ${Math.round(r.right)} > ${vw}`);
    if (el.scrollWidth > el.clientWidth + 1 && ["hidden", "auto", "scroll", "clip"].includes(style.overflowX)
        && el.clientWidth > 0) {
      found.push(`${name} hides ${el.scrollWidth - el.clientWidth}px sideways`);
    }
  }
  if (document.documentElement.scrollWidth > vw + 1) found.push("the page scrolls sideways");
  return [...new Set(found)].slice(0, 30);
}"""

#: Chart boxes whose drawing or legend runs out of the box, over the caption or notes under it.
CHART_OVERLAP_JS = """() => {
  const found = [];
  for (const box of document.querySelectorAll(".chart-box")) {
    const b = box.getBoundingClientRect();
    const root = box.querySelector(".uplot");
    if (!root) continue;
    const u = root.getBoundingClientRect();
    const id = box.id || "chart";
    if (u.bottom > b.bottom + 1) found.push(`${id}: ends ${Math.round(u.bottom - b.bottom)}px below its box`);
    let next = box.nextElementSibling;
    while (next && next.getBoundingClientRect().height === 0) next = next.nextElementSibling;
    if (next) {
      const legend = root.querySelector(".u-legend");
      const l = (legend || root).getBoundingClientRect();
      const n = next.getBoundingClientRect();
      const what = next.className || next.tagName;
      if (l.bottom > n.top + 1) found.push(`${id}: legend over ${what} by ${Math.round(l.bottom - n.top)}px`);
    }
  }
  return found;
}"""


@pytest.fixture
def dash(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client], browser: Browser
) -> Iterator[Dashboard]:
    d = Dashboard(hub_factory("protocol", timezone=TZ), clients, browser)
    yield d
    d.close()


@pytest.mark.parametrize("width", [1280, 390])
def test_no_page_cuts_off_or_hides_content_sideways(dash: Dashboard, width: int) -> None:
    gw, page = dash.gw, dash.page
    now = time.time()
    immediate = {"kind": "tune", "label": "*", "raise_after": 0, "clear_after": 0}
    admin = httpx.Client(base_url=dash.base, headers={"Authorization": f"Bearer {dash.admin_token}"})
    assert admin.post("/api/v1/alarm-rules", json=immediate).status_code == 201
    rule = {"kind": "above", "label": "feeder_hot", "code": "temp_current", "value": 70, "level": "serious"}
    assert admin.post("/api/v1/alarm-rules", json=rule).status_code == 201
    gw.sync("m1", device_name="Main distribution board", install_location="Plant room, level 1")
    seed_meter(gw, "m1", now)
    gw.report("m1", [(19, 0b1101, time.time())])  # faults: the alarms tables have rows
    ids = build_site(dash)
    admin.close()
    page.set_viewport_size({"width": width, "height": 900})
    dash.sign_in(dash.admin_token)
    expect(page.locator("#topbar")).to_be_visible()
    unit = ids["units"][0]["id"]
    site = ids["site"]["id"]
    problems = {}
    pages = (
        ("overview", "/", "#tile-power-value"),
        ("device", "/devices/m1", "#chart-energy-day .uplot"),
        ("devices", "/devices", 'tr[data-cid="m1"]'),
        ("gateways", "/gateways", 'tr[data-gateway="gw-plant-1"]'),
        ("gateway", "/gateways/gw-plant-1", "#conformance-card"),
        ("alarms", "/alarms", "table.alarm-table tbody tr"),
        ("alarm-rules", "/alarm-rules", "table tbody tr"),
        ("sites", "/sites", "table tbody tr"),
        ("site", f"/sites/{site}", "#site-silent"),
        ("unit", f"/units/{unit}", "#bill-preview"),
    )
    for name, route, ready in pages:
        dash.go(route)
        expect(page.locator(ready).first).to_be_visible()
        page.wait_for_timeout(600)  # charts and late tables drawn
        path = dash.shot(f"layout-{name}-{width}", full_page=True)
        if os.environ.get("METERHUB_UPDATE_SCREENSHOT") and name in DOCS_PAGES:
            DOCS_LAYOUT.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_LAYOUT / path.name)
        found = page.evaluate(OVERFLOW_JS) + page.evaluate(CHART_OVERLAP_JS)
        if found:
            problems[route] = found
    assert problems == {}, problems
    # The alarms page as the window changes: stacked rows on a phone, columns on a laptop, and back.
    dash.go("/alarms")
    wrap = page.locator("table.alarm-table").locator("xpath=..")
    expect(wrap).to_have_class("table-wrap stacked" if width == 390 else "table-wrap")
    page.set_viewport_size({"width": 1280 if width == 390 else 390, "height": 900})
    expect(wrap).to_have_class("table-wrap" if width == 390 else "table-wrap stacked")
    expect(page.locator("table.alarm-table td[data-label=State]").first).to_contain_text("Active")
    assert page.evaluate(OVERFLOW_JS) == []
    assert (ARTIFACTS / f"layout-unit-{width}.png").exists()
    dash.check_console()
