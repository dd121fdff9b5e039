"""The operator dashboard in a real browser: Debian's Chromium driven by Playwright, a real hub (MQTT +
HTTP), a real paho gateway that syncs a meter, reports values and answers commands like a gateway.

No browser is downloaded: Playwright drives ``/usr/bin/chromium`` (scripts/system-deps.sh installs it).
Without it these tests fail, they are not skipped. Screenshots of each page go to ``test-artifacts/``
(git-ignored); ``METERHUB_UPDATE_SCREENSHOT=1`` also copies the device page to docs/img/device-page.png.
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from conftest import Client, RunningHub, wait_for
from meterhub.api.security import create_token, revoke_token
from meterhub.protocol.messages import encode_report, encode_status, encode_sync
from meterhub.storage import registry
from meterhub.web.stream import Subscriber

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "img" / "device-page.png"
TZ = "Europe/Berlin"


# --- a gateway with meters, over a real paho client ----------------------------------------------


class Gateway:
    """Syncs meters, reports (pipelined: publish many, then wait for every answer), sends status, and
    answers commands from a thread like a real gateway: success, then the meter reports the new value."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.gw = client.client_id
        self.answers: dict[str, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        self._stop = threading.Event()
        client.c.on_message = self._on_message
        self._thread = threading.Thread(target=self._answer_commands, name="gateway-commands", daemon=True)
        self._thread.start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        payload = json.loads(msg.payload)
        if msg.topic.endswith("/commands"):
            self.commands.put(payload)
            return
        with self.cond:
            self.answers[payload.get("request_id")] = payload
            self.cond.notify_all()

    def _answer_commands(self) -> None:
        while not self._stop.is_set():
            try:
                cmd = self.commands.get(timeout=0.1)
            except queue.Empty:
                continue
            self.received.append(cmd)
            reply = {
                "t": int(time.time()),
                "cid": cmd["cid"],
                "request_id": cmd["request_id"],
                "param": {"msg": "success", "code": 0},
            }
            self.client.c.publish(f"gateway_id/{self.gw}/commands/response", json.dumps(reply), 1)
            # The meter applied it: it reports the new value, as a real one does.
            param = cmd["param"]
            report = encode_report(str(uuid.uuid4()), cmd["cid"], param["id"], param["value"], time.time())
            self.client.c.publish(f"gateway_id/{self.gw}/properties/report", report, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _send(self, kind: str, payload: bytes) -> str:
        rid = json.loads(payload)["request_id"]
        self.client.c.publish(f"gateway_id/{self.gw}/{kind}", payload, 1)
        return rid

    def _wait(self, rids: list[str], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(r in self.answers for r in rids):
                left = deadline - time.monotonic()
                assert left > 0, f"{sum(r not in self.answers for r in rids)} of {len(rids)} unanswered"
                self.cond.wait(left)
            codes = [self.answers[r]["param"]["code"] for r in rids]
        bad = [(r, c) for r, c in zip(rids, codes, strict=True) if c != 0]
        assert not bad, f"refused: {bad[:3]}"

    def sync(self, cid: str, **fields: str) -> None:
        payload = encode_sync(str(uuid.uuid4()), cid, "pid-meter", time.time(), **fields)
        self._wait([self._send("devices/sync", payload)])

    def report(self, cid: str, items: list[tuple[str | int, Any, float]]) -> None:
        """Report ``(dp, value, t)`` items (in order), then wait until each is answered with code 0."""
        rids = [
            self._send("properties/report", encode_report(str(uuid.uuid4()), cid, dp, v, t))
            for dp, v, t in items
        ]
        self._wait(rids)

    def status(self, items: list[tuple[str, bool]]) -> None:
        self._send("devices/status", encode_status(str(uuid.uuid4()), items, time.time()))

    def next_command(self, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.received:
                return self.received.pop(0)
            time.sleep(0.02)
        raise AssertionError("the gateway received no command")


def seed_meter(gw: Gateway, cid: str, now: float, *, power_w: float = 5040.6, seed: int = 7) -> None:
    """An hour of per-minute phase and temperature readings, 29 days of the energy total every 6 h, and
    the current value of the usual data points: what a meter that has been running would have sent."""
    rnd = random.Random(seed)
    items: list[tuple[str | int, Any, float]] = []
    total_kwh = 11_800.0
    for k in range(29 * 4, 0, -1):
        t = now - k * 6 * 3600
        hour = time.localtime(t).tm_hour
        total_kwh += (1.2 if 7 <= hour <= 20 else 0.5) * 6 * (0.8 + 0.4 * rnd.random())
        items.append((44, round(total_kwh * 10_000), t))
    for m in range(62, 0, -1):
        t = now - m * 60
        wave = math.sin(m / 9.0)
        for i, dp in enumerate((30, 31, 32)):
            voltage = 230.0 + 2.2 * math.sin(m / 11.0 + i * 2.1) + rnd.uniform(-0.4, 0.4)
            current = 6.0 + 1.5 * i + 2.0 * wave * (1 if i != 1 else -0.6) + rnd.uniform(-0.3, 0.3)
            phase = {
                "voltage": round(voltage, 1),
                "current": round(current, 3),
                "power": round(voltage * current * 0.97, 1),
            }
            items.append((dp, phase, t))
        items.append((10, round((38.0 + 2.5 * math.sin(m / 14.0) + rnd.uniform(-0.2, 0.2)) * 100), t))
    total_kwh += 0.8
    items += [
        (1, True, now),
        (2, "BRK-0042", now),
        (3, round(power_w * 10_000), now),
        (5, 2_304_000, now),
        (7, 226_000_000, now),
        (10, 3_862, now),
        (11, 2_070_000, now),
        (12, 2_530_000, now),
        (16, "leak_pro_with_value", now),
        (17, True, now),
        (19, 0, now),
        (20, "general", now),
        (30, {"voltage": 230.2, "current": 6.05, "power": 1351.0}, now),
        (31, {"voltage": 231.7, "current": 7.45, "power": 1674.4}, now),
        (32, {"voltage": 228.3, "current": 9.1, "power": 2015.2}, now),
        (34, 700_000, now),
        (40, 9_700, now),
        (41, 500_100, now),
        (44, round(total_kwh * 10_000), now),
        (48, 110_000_000, now),
    ]
    gw.report(cid, items)


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard tests drive Debian's Chromium. "
            "Install it with scripts/system-deps.sh (apt-get install chromium); never `playwright install`."
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Dashboard:
    """A hub with tokens, a gateway, and a browser page on the dashboard."""

    def __init__(self, hub: RunningHub, clients: Callable[..., Client], browser: Browser) -> None:
        self.hub = hub
        self.base = f"http://127.0.0.1:{hub.hub.http_port}"
        self.admin_token, _ = create_token(hub.engine, "admin", "admin")
        self.read_token, _ = create_token(hub.engine, "viewer", "read")
        vendor = registry.add_vendor(hub.engine, "meters-inc")
        c = clients(hub.port, "gw-plant-1", vendor.username)
        rc, _ = c.connect()
        assert rc == 0
        c.subscribe("gateway_id/gw-plant-1/#", 1)
        self.gw = Gateway(c)
        self.context = browser.new_context(
            viewport={"width": 1440, "height": 1000}, locale="en-US", timezone_id=TZ, device_scale_factor=1
        )
        self.context.set_default_timeout(8000)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        # The browser logs every non-2xx answer ("Failed to load resource"): expected (401, 409...).
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.problems.append(msg.text)

    def sign_in(self, token: str) -> None:
        page = self.page
        page.goto(self.base + "/")
        page.fill("#token", token)
        page.click("button[type=submit]")

    def go(self, route: str) -> None:
        self.page.evaluate("route => { window.location.hash = route; }", route)

    def shot(self, name: str, *, full_page: bool = False, clip: dict[str, float] | None = None) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page or clip is not None, clip=clip)
        return path

    def broker_count(self) -> int:
        def count() -> int:
            app = self.hub.hub.api.app
            broker = getattr(app.state, "web_stream", None)
            return 0 if broker is None else broker.count

        return self.hub.run(count)

    def check_console(self) -> None:
        assert self.problems == [], self.problems

    def close(self) -> None:
        self.gw.stop()
        self.context.close()


@pytest.fixture
def dash(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client], browser: Browser
) -> Iterator[Dashboard]:
    d = Dashboard(hub_factory("protocol", timezone=TZ), clients, browser)
    yield d
    d.close()


def text_of(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


# --- the device page ------------------------------------------------------------------------------


def test_device_page_is_live_and_sends_commands(dash: Dashboard) -> None:
    gw, page = dash.gw, dash.page
    gw.sync("m1", device_name="Main distribution board", install_location="Plant room, level 1")
    seed_meter(gw, "m1", time.time())
    dash.sign_in(dash.admin_token)
    expect(page.locator("#topbar")).to_be_visible()
    dash.go("/devices/m1")

    # Every data point with its scaled value and unit.
    voltage = page.locator('#dp-table tr[data-dp="5"] td.value')
    expect(voltage).to_have_text("230.4")  # the digits a reader needs: "230.4000" said nothing more
    expect(voltage).to_have_attribute("title", "230.4 V (raw 2304000, scale 4)")
    current = page.locator('#dp-table tr[data-dp="7"]')
    expect(current.locator("td.value")).to_have_text("22.60")  # 22,600 mA reads better as 22.60 A
    expect(current.locator("td.unit")).to_have_text("A")
    expect(current.locator("td.value")).to_have_attribute("title", "22,600 mA (raw 226000000, scale 4)")
    expect(page.locator('#dp-table tr[data-dp="5"] td.unit')).to_have_text("V")
    expect(page.locator('#dp-table tr[data-dp="10"] td.value')).to_have_text("38.6")
    expect(page.locator('#dp-table tr[data-dp="10"] td.value')).to_have_attribute(
        "title", "38.62 °C (raw 3862, scale 2)"
    )
    expect(page.locator('#dp-table tr[data-dp="10"] td.unit')).to_have_text("°C")
    expect(page.locator('#dp-table tr[data-dp="44"] td.unit')).to_have_text("kWh")
    expect(page.locator('#dp-table tr[data-dp="30"] td.value')).to_have_text("230.2 V · 6.05 A · 1,351 W")
    expect(page.locator('#dp-table tr[data-dp="44"] td.value')).to_have_text(re.compile(r"^1\d,\d{3}\.\d\d$"))
    expect(page.locator('#dp-table tr[data-dp="3"] td.value')).to_have_text("5,041")  # W: no decimals
    expect(page.locator('#dp-table tr[data-dp="40"] td.value')).to_have_text("0.97")  # no unit: <= 2
    expect(page.locator('#dp-table tr[data-dp="20"] td.value')).to_have_text("general")
    expect(page.locator('.tile[data-dp="3"] .tile-value')).to_have_text("5.04 kW")
    expect(page.locator('.tile[data-dp="7"] .tile-value')).to_have_text("22.60 A")
    # Charts from the history API (buckets) and energy bars from the energy API.
    for chart in ("voltage", "current", "power", "temperature"):
        expect(page.locator(f"#chart-{chart} .uplot")).to_be_visible()
        expect(page.locator(f"#chart-{chart} .chart-overlay")).to_be_hidden()
    for name in ("A", "B", "C"):  # the legend shows each phase's newest bucket from the history API
        expect(page.locator("#chart-voltage .u-legend")).to_contain_text(
            re.compile(rf"Phase {name}\s*2\d\d\.\d V")
        )
    expect(page.locator("#chart-temperature .u-legend")).to_contain_text(
        re.compile(r"Temperature\s*3\d\.\d °C")
    )
    expect(page.locator("#chart-energy-day .uplot")).to_be_visible()
    expect(page.locator("#chart-energy-day .chart-overlay")).to_be_hidden()
    expect(page.locator("#energy-month-total")).to_contain_text("kWh")

    # Live: a new voltage shows up without a reload.
    page.evaluate("window.__sameDocument = true")
    gw.report("m1", [(5, 2_312_345, time.time())])
    expect(voltage).to_have_text("231.2")
    expect(voltage).to_have_attribute("title", "231.2345 V (raw 2312345, scale 4)")
    expect(page.locator('.tile[data-dp="5"] .tile-value')).to_have_text("231.2 V")
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#live")).to_have_attribute("data-state", "on")
    page.wait_for_timeout(1500)  # let the highlight fade for the screenshot
    energy_panel = page.locator("section", has=page.locator("#energy-day-h")).bounding_box()
    assert energy_panel is not None
    bottom = energy_panel["y"] + energy_panel["height"] + 16
    dash.shot("device-page", clip={"x": 0, "y": 0, "width": 1440, "height": bottom})
    if os.environ.get("METERHUB_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "device-page.png", DOCS_SCREENSHOT)
    dash.shot("device-page-full", full_page=True)

    # The switch: the command reaches the meter, and the page shows the state the meter reports back.
    switch = page.locator("#cmd-switch")
    expect(switch).to_have_attribute("aria-checked", "true")
    switch.click()
    cmd = gw.next_command()
    assert cmd["cid"] == "m1" and cmd["param"] == {"id": "1", "value": False}
    expect(switch).to_have_attribute("aria-checked", "false")
    expect(page.locator("#cmd-status-1")).to_contain_text("the meter reports Off")
    expect(page.locator('.tile[data-dp="1"] .tile-value')).to_have_text("Off")

    # A setting in real units goes out as the raw integer (scale 4); out of range is refused here.
    page.click("#settings-group > summary")
    over = page.locator("#cmd-voltage_over")
    row = page.locator('.control-row[data-code="voltage_over"]')
    expect(row.locator(".current")).to_have_text("now 253.0 V")  # 2,530,000 at scale 4
    over.fill("-5")
    row.locator("button[type=submit]").click()
    status = page.locator("#cmd-status-12")
    expect(status).to_contain_text("Out of range: -5 V is below the minimum. Allowed: 0 to 100,000 V.")
    expect(status).to_contain_text("Not sent.")
    expect(over).to_have_attribute("aria-invalid", "true")
    over.fill("253.00001")
    row.locator("button[type=submit]").click()
    expect(status).to_contain_text("Too many decimals")
    page.wait_for_timeout(200)
    assert gw.received == [], gw.received
    over.fill("253.5")
    row.locator("button[type=submit]").click()
    assert gw.next_command()["param"] == {"id": "12", "value": 2_535_000}
    expect(status).to_contain_text("the meter reports 253.5 V")
    expect(page.locator('#dp-table tr[data-dp="12"] td.value')).to_have_text("253.5")
    expect(row.locator(".current")).to_have_text("now 253.5 V")

    # The meter goes offline (live), and the server's refusal (409, 2001) is shown clearly.
    gw.status([("m1", False)])
    expect(page.locator("#presence")).to_have_text("Offline")
    expect(page.locator("#command-offline")).to_be_visible()
    switch.click()
    expect(page.locator("#cmd-status-1")).to_have_text(
        "Not sent: the meter is offline (2001). Try again when it is back online."
    )
    assert gw.received == []
    dash.check_console()

    # Leaving the page closes its stream: the server drops the subscriber and its listener.
    assert dash.broker_count() == 1
    page.close()
    wait_for(lambda: dash.broker_count() == 0, timeout=5)
    listeners = dash.hub.run(lambda: list(dash.hub.hub.handler.listeners))
    assert not any(type(fn).__name__ == "StreamBroker" for fn in listeners)


def test_phone_layout_has_no_sideways_scroll(dash: Dashboard) -> None:
    gw, page = dash.gw, dash.page
    gw.sync("m1", device_name="Flat 4B")
    seed_meter(gw, "m1", time.time())
    page.set_viewport_size({"width": 390, "height": 844})
    dash.sign_in(dash.admin_token)
    dash.go("/devices/m1")
    expect(page.locator("#chart-voltage .uplot")).to_be_visible()
    expect(page.locator('#dp-table tr[data-dp="5"] td.value')).to_have_text("230.4")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # Keyboard: the switch is a real button reachable with Tab, with a visible focus ring.
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "cmd-switch":
            break
    assert page.evaluate("document.activeElement.id") == "cmd-switch", "the switch is not reachable with Tab"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    dash.shot("device-page-phone", full_page=True)
    dash.go("/alarms")
    expect(page.locator("#alarms-empty")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    dash.check_console()


# --- alarms ---------------------------------------------------------------------------------------


def test_meter_fault_appears_on_the_alarms_page(dash: Dashboard, tmp_path: Path) -> None:
    gw, page = dash.gw, dash.page
    now = time.time()
    immediate = {"kind": "tune", "label": "*", "raise_after": 0, "clear_after": 0}  # no debouncing here
    headers = {"Authorization": f"Bearer {dash.admin_token}"}
    assert httpx.post(dash.base + "/api/v1/alarm-rules", json=immediate, headers=headers).status_code == 201
    gw.sync("m7", device_name="Workshop")
    gw.report("m7", [(20, "serious", now), (19, 0, now)])
    dash.sign_in(dash.admin_token)
    expect(page.locator("#topbar")).to_be_visible()
    dash.go("/alarms")
    expect(page.locator("#alarms-empty")).to_have_text("No active alarms.")

    # The meter reports its fault bitmap: bit 2 = overload_alarm, bit 3 = ov_vol (the overvoltage alarm).
    gw.report("m7", [(19, 0b1100, time.time())])
    rows = page.locator("table.alarm-table tbody tr")
    expect(rows).to_have_count(2)  # live, no reload
    overload = page.locator("table.alarm-table tbody tr", has_text="Overload alarm")
    expect(overload).to_contain_text("serious")
    expect(overload).to_contain_text("m7")
    expect(overload).to_contain_text("Active")
    expect(page.locator("#nav-alarm-count")).to_have_text("2")

    page.select_option("#alarm-level", "urgent")
    expect(page.locator("#alarms-empty")).to_have_text("No active alarms of level urgent.")
    page.select_option("#alarm-level", "serious")
    expect(rows).to_have_count(2)

    overload.get_by_role("button", name="Acknowledge").click()
    expect(overload.locator("td.ack")).to_contain_text("admin,")
    dash.shot("alarms-page")

    # The fault clears: it moves to the past alarms.
    gw.report("m7", [(19, 0, time.time())])
    expect(page.locator("#alarms-empty")).to_be_visible()
    page.click("label[for=alarm-state-past]")
    expect(rows).to_have_count(2)
    expect(overload).to_contain_text("Cleared")

    # "Download CSV" saves the list as filtered (past alarms), with the session's token.
    with page.expect_download() as info:
        page.click("#alarms-csv")
    assert info.value.suggested_filename == "alarms.csv"
    saved = tmp_path / "alarms.csv"
    info.value.save_as(saved)
    with saved.open(newline="") as f:
        exported = list(csv.DictReader(f))
    assert sorted((r["cid"], r["label"], r["level"], r["state"]) for r in exported) == [
        ("m7", "overload_alarm", "serious", "cleared, acknowledged"),
        ("m7", "overvoltage", "serious", "cleared"),  # the meter's ov_vol merged into meterhub's
    ]
    assert all(r["cleared_at"] for r in exported)
    page.select_option("#alarm-level", "urgent")  # a filter the export follows: no alarm of that level
    expect(page.locator("#alarms-empty")).to_be_visible()
    with page.expect_download() as info:
        page.click("#alarms-csv")
    info.value.save_as(saved)
    assert saved.read_text().splitlines()[1:] == []
    dash.check_console()


# --- overview, gateways, tokens -------------------------------------------------------------------


def test_overview_gateways_and_tokens(dash: Dashboard) -> None:
    gw, page = dash.gw, dash.page
    now = time.time()
    gw.sync("m1", device_name="Main distribution board")
    gw.sync("m2", device_name="Cold store")
    gw.sync("m3", device_name="Spare feeder")  # synced, never reported: offline
    seed_meter(gw, "m1", now, power_w=1500)
    registry.set_gateway(dash.hub.engine, "gw-spare", vendor="meters-inc", allowed=True)  # never connected
    gw.report("m2", [(3, 22_505_000, now), (19, 1, now)])

    dash.sign_in("mh_not-a-token")
    expect(page.locator("#login-error")).to_have_text("This token was not accepted: unknown token.")
    page.fill("#token", dash.admin_token)
    page.click("button[type=submit]")
    expect(page.locator("#tile-gateways-value")).to_have_text("1 of 2")
    expect(page.locator("#tile-gateways-foot")).to_have_text("1 disconnected")
    expect(page.locator("#tile-devices-value")).to_have_text("2 of 3")
    expect(page.locator("#tile-devices-foot")).to_have_text("1 offline")
    expect(page.locator("#tile-power-value")).to_have_text("3.75 kW")  # 1500 W + 2250.5 W
    expect(page.locator("#tile-alarms-value")).to_have_text("1")
    expect(page.locator("#tile-alarms-foot")).to_have_text(
        "0 urgent · 0 serious · 0 general · 1 without level"
    )
    # Energy: what the energy API says for the gateway's devices.
    energy = httpx.get(
        f"{dash.base}/api/v1/energy",
        params={"gateway": "gw-plant-1", "period": "day"},
        headers={"Authorization": f"Bearer {dash.admin_token}"},
    ).json()
    month = energy["total_kwh"]
    expect(page.locator("#tile-energy-month-value")).to_have_text(
        f"{month:,.2f} kWh"  # kWh with 2 decimals below 10 MWh
    )
    expect(page.locator("#tile-energy-today-value")).not_to_have_text("—")
    # The fleet over time (GET /fleet/power, /fleet/energy) and the silent meters (GET /fleet/silent).
    expect(page.locator("#chart-fleet-power .u-legend")).to_contain_text("3.75 kW")  # newest 15 min
    expect(page.locator("#fleet-power-hint")).to_have_text("last 24 hours · 2 meters")
    expect(page.locator("#chart-fleet-energy .uplot")).to_be_visible()
    expect(page.locator("#fleet-energy-hint")).to_contain_text(
        re.compile(r"kWh in the last 48 hours, from 1 of 3 meters")
    )
    page.click("label[for=fleet-energy-day]")
    expect(page.locator("#fleet-energy-hint")).to_contain_text("in the last 14 days, from 1 of 3 meters")
    spare = page.locator('#ov-silent tr[data-silent="m3"]')
    expect(spare).to_contain_text("Spare feeder")
    expect(spare).to_contain_text("Offline")
    expect(spare).to_contain_text("never")
    expect(page.locator("#ov-silent tbody tr")).to_have_count(1)  # m1 and m2 report as usual
    # Live: a new power reading changes the total.
    gw.report("m1", [(3, 25_000_000, time.time())])
    expect(page.locator("#tile-power-value")).to_have_text("4.75 kW")
    dash.shot("overview-page")

    dash.go("/gateways")
    row = page.locator('tr[data-gateway="gw-plant-1"]')
    expect(row).to_contain_text("Connected")
    expect(row).to_contain_text("127.0.0.1:")
    expect(row).to_contain_text("2 / 3")
    verdict = row.locator("td[data-conformance] a")
    expect(verdict).to_have_text(re.compile(r"^(pass|warn|fail|unknown)$"))
    spare = page.locator('tr[data-gateway="gw-spare"]')
    expect(spare).to_contain_text("Disconnected")
    expect(spare.locator("td[data-conformance]")).to_have_text("not available")
    dash.shot("gateways-page")
    verdict.click()
    expect(page.locator("#conformance-card table tbody tr").first).to_be_visible()
    expect(page.locator("#conformance-card")).to_contain_text("Overall:")
    dash.shot("gateway-page")
    dash.go("/gateways/gw-spare")
    expect(page.locator("#conformance-missing")).to_contain_text("Conformance report: not available")

    # A read token sees everything, but the command panel is disabled with a note.
    page.click("#signout")
    page.fill("#token", dash.read_token)
    page.click("button[type=submit]")
    expect(page.locator("#who")).to_contain_text("viewer")
    dash.go("/devices/m1")
    expect(page.locator("#command-readonly")).to_be_visible()
    expect(page.locator("#command-panel")).to_have_attribute("disabled", "")
    expect(page.locator("#cmd-switch")).to_be_disabled()
    dash.go("/alarms")
    expect(page.locator("table.alarm-table tbody tr")).to_have_count(1)
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)

    # The token is revoked: the next call answers 401 and the page returns to the form, saying why.
    revoke_token(dash.hub.engine, "viewer")
    dash.go("/gateways")
    expect(page.locator("#login-error")).to_contain_text("this token was revoked")
    expect(page.locator("#topbar")).to_be_hidden()
    dash.shot("signed-out")
    dash.check_console()


# --- the stream and the page over plain HTTP --------------------------------------------------------


def test_stream_endpoint_and_page_headers(dash: Dashboard) -> None:
    gw = dash.gw
    gw.sync("m1")
    gw.report("m1", [(1, True, time.time())])
    base = dash.base
    with httpx.Client(base_url=base, timeout=5) as http:
        assert http.get("/api/v1/stream").status_code == 401
        assert (
            http.get("/api/v1/stream", params={"token": "mh_nope"}).json()["error"]["message"]
            == "unknown token"
        )
        r = http.get("/api/v1/stream", params={"token": dash.admin_token, "cid": "ghost"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, 2003)
        assert http.get("/ui/whoami").status_code == 401
        who = http.get("/ui/whoami", headers={"Authorization": f"Bearer {dash.read_token}"}).json()
        assert who == {"name": "viewer", "scope": "read"}

        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["referrer-policy"] == "no-referrer"
        assert '<script src="/static/app.js" type="module">' in page.text
        lib = http.get("/static/vendor/uPlot.iife.min.js")
        assert lib.status_code == 200 and "javascript" in lib.headers["content-type"]
        assert "uPlot" in lib.text[:200]
        assert http.get("/static/vendor/LICENSE").text.startswith("The MIT License")
        assert "/api/v1/stream" not in http.get("/openapi.json").json()["paths"]

        events: list[tuple[str, dict[str, Any]]] = []
        with http.stream("GET", "/api/v1/stream", params={"cid": "m1", "token": dash.read_token}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = s.iter_lines()
            kind = None
            for line in lines:
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind:
                    events.append((kind, json.loads(line[6:])))
                    if kind == "hello":
                        assert dash.broker_count() == 1
                        gw.report("m1", [(5, 2_301_234, time.time())])
                        gw.report("m1", [(19, 4, time.time())])
                    if len(events) == 3:
                        break
        kinds = [k for k, _ in events]
        assert kinds == ["hello", "report", "report"], events
        assert events[0][1]["token"] == {"name": "viewer", "scope": "read"}
        report = events[1][1]
        assert {k: report[k] for k in ("cid", "dp", "code", "value", "scaled", "display_unit")} == {
            "cid": "m1",
            "dp": 5,
            "code": "voltage_current",
            "value": 2_301_234,
            "scaled": 230.1234,
            "display_unit": "V",
        }
        assert events[2][1]["value"] == ["overload_alarm"] and events[2][1]["type"] == "fault"
    wait_for(lambda: dash.broker_count() == 0, timeout=5)


FORMAT_CASES = [
    # (function, arguments, expected): format.js, the one place that decides digits and units
    ("quantityText", [207, "V"], "207.0 V"),
    ("quantityText", [30000, "mA"], "30.00 A"),  # mA from 1000 on: A
    ("quantityText", [30, "mA"], "30 mA"),
    ("quantityText", [5040.6, "W"], "5,041 W"),
    ("quantityText", [5040.6, "W", {"compact": True}], "5.04 kW"),  # tiles and summaries
    ("quantityText", [2_500_000, "W", {"compact": True}], "2.50 MW"),
    ("quantityText", [12503.3482, "kWh"], "12,503.35 kWh"),
    ("quantityText", [12503.3482, "kWh", {"compact": True}], "12.50 MWh"),
    ("quantityText", [9999, "kWh", {"compact": True}], "9,999.00 kWh"),
    ("quantityText", [38.62, "°C"], "38.6 °C"),
    ("quantityText", [0.97, ""], "0.97"),  # no unit: up to 2 decimals, no trailing zeros
    ("quantityText", [50, ""], "50"),
    ("quantityText", [6.05, "A", {"decimals": 3}], "6.050 A"),  # a chart's own digits
    ("quantityText", [None, "V"], "— V"),
    (
        "dpQuantity",
        [{"scale": 4, "step": 1, "display_unit": "V"}, 2_070_000],
        ["207.0", "V", "207 V (raw 2070000, scale 4)"],
    ),
    (
        "dpQuantity",
        [{"scale": 4, "step": 1, "display_unit": "mA"}, 300_000_000],
        ["30.00", "A", "30,000 mA (raw 300000000, scale 4)"],
    ),
    (
        "dpQuantity",
        [{"scale": 4, "step": 1, "display_unit": "mA"}, 300_000],
        ["30", "mA", "30 mA (raw 300000, scale 4)"],
    ),
    (
        "dpQuantity",
        [{"scale": 1, "step": 10, "display_unit": "V"}, 2070],
        ["207", "V", "207 V (raw 2070, scale 1)"],
    ),
    ("dpQuantity", [{"scale": 0, "step": 1, "display_unit": None}, 12], ["12", "", "12 (raw 12, scale 0)"]),
    (
        "dpQuantity",
        [{"scale": 4, "step": 1, "display_unit": "W"}, 50_406_000, {"compact": True}],
        ["5.04", "kW", "5,040.6 W (raw 50406000, scale 4)"],
    ),
]


def test_one_formatting_function_for_values(dash: Dashboard) -> None:
    """format.js in Chromium: the digits the resolution and unit justify, friendlier units, raw in
    the title (the dashboard's pages all format values through it)."""
    page = dash.page
    page.goto(dash.base + "/")
    got = page.evaluate(
        """async (cases) => {
          const m = await import("/static/js/format.js");
          return cases.map(([fn, args]) => {
            const r = m[fn](...args);
            return typeof r === "string" ? r : [r.text, r.unit, r.title];
          });
        }""",
        [[fn, args] for fn, args, _ in FORMAT_CASES],
    )
    assert got == [expected for _, _, expected in FORMAT_CASES]


def test_a_slow_client_loses_its_oldest_events_not_the_listener() -> None:
    sub = Subscriber("m1", None, size=3)
    for i in range(5):
        sub.offer(("report", {"i": i}))  # never blocks, never raises
    assert sub.dropped == 2
    assert [sub.queue.get_nowait()[1]["i"] for _ in range(3)] == [2, 3, 4]


def test_device_page_downloads_its_history_as_csv(dash: Dashboard, tmp_path: Path) -> None:
    """The device page's "Download CSV" button saves the reports with the session's token."""
    gw, page = dash.gw, dash.page
    gw.sync("m-csv", device_name="Export board")
    seed_meter(gw, "m-csv", time.time())
    dash.sign_in(dash.read_token)
    expect(page.locator("#topbar")).to_be_visible()
    dash.go("/devices/m-csv")
    expect(page.locator("#history-csv")).to_be_visible()
    with page.expect_download() as info:
        page.click("#history-csv")
    download = info.value
    assert download.suggested_filename == "m-csv-history.csv"
    saved = tmp_path / "export.csv"
    download.save_as(saved)
    lines = saved.read_text().splitlines()
    assert lines[0] == "t,time,dp_id,code,value,unit,raw,received_at"
    voltage = next(line.split(",") for line in lines[1:] if ",voltage_current," in line)
    assert voltage[4:7] == ["230.4", "V", "2304000"]
    dash.check_console()


def test_the_overviews_updated_time_moves_with_its_live_tiles(dash: Dashboard) -> None:
    gw, page = dash.gw, dash.page
    gw.sync("m-live", device_name="Live feeder")
    gw.report("m-live", [(3, 10_000_000, time.time())])
    dash.sign_in(dash.read_token)
    expect(page.locator("#overview-updated")).to_contain_text("Updated")
    first = text_of(page, "#overview-updated")
    time.sleep(2.2)  # the stamp has a resolution of a second
    gw.report("m-live", [(3, 20_000_000, time.time())])  # the power tile changes live
    expect(page.locator("#overview-updated")).not_to_have_text(first, timeout=5000)
    dash.check_console()


def test_measured_values_are_calibration_apart_from_settings_and_confirmed(dash: Dashboard) -> None:
    """Actual voltage, total electricity, frequency are read-write in the document but measurements:
    grouped as calibration, apart from the limits, and sent only after a confirmation."""
    gw, page = dash.gw, dash.page
    gw.sync("m-cal", device_name="Calibration board")
    seed_meter(gw, "m-cal", time.time())
    dash.sign_in(dash.admin_token)
    dash.go("/devices/m-cal")
    settings, calibration = page.locator("#settings-group"), page.locator("#calibration-group")
    expect(calibration.locator("summary")).to_contain_text("Calibration")
    for code in ("voltage_current", "electric_total", "supply_frequency"):
        expect(calibration.locator(f'.control-row[data-code="{code}"]')).to_have_count(1)
        expect(settings.locator(f'.control-row[data-code="{code}"]')).to_have_count(0)
    for code in ("voltage_under", "voltage_over", "power_limit"):
        expect(settings.locator(f'.control-row[data-code="{code}"]')).to_have_count(1)
    calibration.locator("summary").click()
    row = calibration.locator('.control-row[data-code="voltage_current"]')
    row.locator("input").fill("231")
    page.once("dialog", lambda d: d.dismiss())
    row.locator("button[type=submit]").click()
    expect(page.locator("#cmd-status-5")).to_contain_text("calibration cancelled")
    page.wait_for_timeout(200)
    assert gw.received == [], gw.received
    messages: list[str] = []
    page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
    row.locator("button[type=submit]").click()
    assert gw.next_command()["param"] == {"id": "5", "value": 2_310_000}
    assert "overwrite the meter's measured value" in messages[0]
    dash.check_console()


def test_backfilled_demo_history_fills_the_pages(dash: Dashboard) -> None:
    """The demo's backfill (tools/backfill.py) on a real hub: a week of charts and energy bars for a
    meter at once, and the past alarms marked simulated, with their measured value in real units."""
    from meterhub.tools.backfill import backfill
    from meterhub.tools.simulator import Fleet

    gw, page = dash.gw, dash.page
    gw.sync("sim-gw-001-m001", device_name="Flat 1 meter")
    fleet = Fleet("127.0.0.1", dash.hub.port, "unused", gateways=1, meters=2, seed=3)  # never started
    done = dash.hub.call(backfill(dash.hub.hub, fleet))
    assert (done.created, done.reports, done.alarms) == (True, 2 * 672 * 9, 6)
    dash.sign_in(dash.read_token)
    expect(page.locator("#topbar")).to_be_visible()
    dash.go("/alarms")
    page.click("label[for=alarm-state-past]")
    rows = page.locator("table.alarm-table tbody tr")
    expect(rows).to_have_count(6, timeout=15_000)  # a loaded CI machine: the list is one API call
    expect(page.locator("table.alarm-table .badge", has_text="simulated")).to_have_count(6)
    sag = rows.filter(has_text="Undervoltage").first
    expect(sag).to_contain_text(re.compile(r"Voltage current 20\d\.\d V < limit 207\.0 V"))
    expect(sag).to_contain_text("Cleared")

    dash.go("/devices/sim-gw-001-m001")
    page.click("label[for=range-week]")
    expect(page.locator("#chart-voltage .chart-overlay")).to_be_hidden()
    expect(page.locator("#chart-voltage .u-legend")).to_contain_text(re.compile(r"Phase A\s*2\d\d\.\d V"))
    expect(page.locator("#chart-energy-day .chart-overlay")).to_be_hidden()
    expect(page.locator("#energy-month-total")).to_contain_text("kWh")
    dash.check_console()
