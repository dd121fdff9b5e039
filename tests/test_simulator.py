"""The meter simulator: its physics on its own, and a small fleet against a real meterhub."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from conftest import RunningHub
from meterhub.model import builtin_model
from meterhub.sdk import to_wire
from meterhub.storage import registry
from meterhub.tools.simulator import (
    MEASURED,
    Fleet,
    Meter,
    daily_profile,
    run_fleet,
    simulate_command,
)

MODEL = builtin_model("smart-meter")


def local_midnight() -> float:
    t = time.localtime()
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def test_daily_profile_is_low_at_night_and_peaks_morning_and_evening() -> None:
    assert daily_profile(3.0) < 0.2
    assert daily_profile(7.5) > 0.6
    assert daily_profile(19.5) > 0.95
    assert daily_profile(3.0) < daily_profile(13.0) < daily_profile(19.5)
    assert daily_profile(0.0) == pytest.approx(daily_profile(24.0))


def test_a_meter_over_a_simulated_day_is_physically_plausible() -> None:
    start = local_midnight()
    meter = Meter("m-day", random.Random(7), now=start, fault_probability=0.02, sag_probability=0.05)
    energy0 = meter.energy
    last_energy = energy0
    by_hour: dict[int, list[float]] = {}
    fault_reports: list[list[str]] = []
    for minute in range(1, 24 * 60):  # one tick per simulated minute, up to 23:59
        reports = meter.step(start + 60 * minute)
        for p in range(3):
            assert 200 <= meter.voltage[p] <= 250
            assert 0.85 <= meter.pf[p] <= 0.99
            assert meter.power[p] == pytest.approx(meter.voltage[p] * meter.current[p] * meter.pf[p])
        assert meter.energy >= last_energy
        last_energy = meter.energy
        assert 15 < meter.temperature < 45
        assert 49.9 <= meter.frequency <= 50.1
        by_hour.setdefault(minute // 60, []).append(sum(meter.current))
        codes = [code for code, _ in reports]
        assert "power_current" in codes
        if minute > 1:
            assert len(reports) <= 8  # a handful per tick, not everything
        fault_reports += [value for code, value in reports if code == "fault"]
        for code, value in reports:
            to_wire(MODEL.by_code(code), value)  # a value the model (and so the server) accepts
            if code == "power_current":
                assert value == pytest.approx(sum(meter.power))
    night = sum(by_hour[3]) / len(by_hour[3])
    evening = sum(by_hour[19]) / len(by_hour[19])
    assert night < 0.4 * evening
    # the energy registers: the total grew by the integral of power, and the daily counter with it
    assert meter.energy > energy0
    assert meter.daily == pytest.approx(meter.energy - energy0)
    assert meter.value_of("forward_energy_total") == meter.energy
    # faults came and went: a non-empty set was reported, and later an empty one
    first = next(i for i, faults in enumerate(fault_reports) if faults)
    assert [] in fault_reports[first:]


def test_a_meter_obeys_commands() -> None:
    now = time.time()
    meter = Meter("m-cmd", random.Random(1), now=now, fault_probability=0.0, sag_probability=0.0)
    meter.step(now + 1)  # the full first report
    assert sum(meter.power) > 0
    code, echo = meter.command(MODEL.by_code("switch"), False)
    assert code == 0 and ("switch", False) in echo
    energy = meter.energy
    for k in range(2, 6):
        reports = dict(meter.step(now + k))
        assert reports["power_current"] == 0.0
        assert meter.current == [0.0, 0.0, 0.0]
    assert meter.energy == energy
    assert meter.command(MODEL.by_code("electric_total"), 0.0)[0] == 2002
    assert "electric_total" in MEASURED
    code, echo = meter.command(MODEL.by_code("switch"), True)
    code, echo = meter.command(MODEL.by_code("current_max"), 0.5)  # below the load: overload
    assert (code, echo) == (0, [("current_max", 0.5)])
    reports = meter.step(now + 10)
    assert ("alarm_level", "serious") in reports
    assert any(code == "fault" and "overload_alarm" in value for code, value in reports)
    assert meter.command(MODEL.by_code("status_query"), {"hex": ""})[0] == 0
    assert len(meter.step(now + 11)) > 40  # everything again


# --- against a real server -------------------------------------------------------------------------


@pytest.fixture
def hub(hub_factory: Callable[..., RunningHub]) -> RunningHub:
    return hub_factory("protocol")


@pytest.fixture
def username(hub: RunningHub) -> str:
    return registry.add_vendor(hub.engine, "sim-vendor").username


def rows(hub: RunningHub, sql: str, **params: Any) -> list[Any]:
    with hub.engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def test_a_small_fleet_reports_plausible_data_and_obeys_a_switch_off(hub: RunningHub, username: str) -> None:
    svc = hub.hub.handler
    target = "simt-001-m002"
    switched: dict[str, Any] = {}
    lines: list[str] = []
    fleets: list[Fleet] = []

    async def switch_off_later() -> None:
        await asyncio.sleep(1.5)
        switched["result"] = await asyncio.to_thread(hub.call, svc.send_command(target, "switch", False))
        switched["at"] = time.time()

    def ready(fleet: Fleet) -> None:
        fleets.append(fleet)
        switched["task"] = asyncio.ensure_future(switch_off_later())

    summary = asyncio.run(
        run_fleet(
            "127.0.0.1",
            hub.port,
            username,
            gateways=2,
            meters=3,
            interval=0.2,
            duration=4.0,
            seed=42,
            gateway_prefix="simt",
            drop_probability=0.0,
            progress=lines.append,
            progress_interval=1.0,
            on_ready=ready,
        )
    )
    assert switched["result"].status == "ok"
    assert summary.errors == {} and summary.local_errors == 0 and summary.dropped == 0
    assert summary.acked == summary.sent > 300
    assert summary.reports_per_s > 50 and summary.p50_ms is not None
    assert summary.commands == 1
    assert len(lines) >= 4 and "reports/s" in lines[0] and "gateways 2/2" in lines[0]
    assert lines[-1].startswith("simulated 2 gateways x 3 meters")

    cids = [f"simt-00{g}-m00{m}" for g in (1, 2) for m in (1, 2, 3)]
    devices = rows(hub, "SELECT cid, gateway_id FROM devices ORDER BY cid")
    assert [(r.cid, r.gateway_id) for r in devices] == [(c, c[:8]) for c in cids]

    for cid in cids:
        for dp in ("44", "50"):  # energy never decreases
            energy = [
                r.num
                for r in rows(
                    hub, "SELECT num FROM reports WHERE cid=:c AND dp_id=:d ORDER BY t, id", c=cid, d=dp
                )
            ]
            assert len(energy) >= 3
            assert energy == sorted(energy), (cid, dp)
        volts = [r.num for r in rows(hub, "SELECT num FROM reports WHERE cid=:c AND dp_id='5'", c=cid)]
        assert volts and all(200 <= v <= 250 for v in volts)

    phases = rows(hub, "SELECT cid, value, t AS at FROM reports WHERE dp_id IN ('30', '31', '32')")
    encodings = set()
    checked = 0
    for r in phases:
        ph = json.loads(r.value)
        assert 200 <= ph["voltage"] <= 250
        encodings.add(ph["electricity"] is None)  # the binary layout carries no energy
        if ph["current"] > 0.5:
            checked += 1
            assert 0.83 <= ph["power"] / (ph["voltage"] * ph["current"]) <= 1.0, ph  # V x I x PF
    assert checked > 50 and encodings == {True, False}

    # after the switch-off command: power 0 on every later report of that meter
    later = int(switched["at"]) + 1
    powers = rows(
        hub,
        "SELECT dp_id, value, num FROM reports WHERE cid=:c AND t >= :t AND dp_id IN ('3', '30', '31', '32')",
        c=target,
        t=later,
    )
    assert len(powers) >= 4
    for r in powers:
        assert (r.num if r.dp_id == "3" else json.loads(r.value)["power"]) == 0
    before = rows(hub, "SELECT num FROM reports WHERE cid=:c AND dp_id='3' AND t < :t", c=target, t=later - 1)
    assert any(r.num > 0 for r in before)
    switch = rows(hub, "SELECT value FROM latest_values WHERE cid=:c AND dp_id='1'", c=target)
    assert [json.loads(r.value) for r in switch] == [False]
    assert fleets[0].meters[target].switch is False


def test_cli_requires_a_username() -> None:
    result = CliRunner().invoke(simulate_command, ["--duration", "1"])
    assert result.exit_code == 2
    assert "--username is required" in result.output


def test_cli_runs_against_a_server_and_reports_refusals(hub: RunningHub, username: str) -> None:
    runner = CliRunner()
    args = ["--port", str(hub.port), "--gateways", "1", "--meters", "2", "--interval", "0.2"]
    result = runner.invoke(
        simulate_command, [*args, "--duration", "1.2", "--username", username, "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "simulating 1 gateways x 2 meters" in result.output
    assert "simulated 1 gateways x 2 meters" in result.output and "errors 0" in result.output
    result = runner.invoke(simulate_command, [*args, "--duration", "1", "--username", "nobody"])
    assert result.exit_code == 1
    assert "bad user name or password" in result.output


def test_cli_without_username_uses_the_simulator_vendor_of_a_data_dir(
    hub: RunningHub, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["--port", str(hub.port), "--gateways", "1", "--meters", "1", "--interval", "0.2", "--quiet"]
    result = runner.invoke(
        simulate_command, [*args, "--duration", "0.6", "--data-dir", str(hub.settings.data_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "errors 0" in result.output and "reports/s" in result.output
    assert registry.get_vendor(hub.engine, "simulator") is not None
    result = runner.invoke(simulate_command, [*args, "--data-dir", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no meterhub database" in result.output


def test_gateways_that_drop_buffer_and_lose_nothing(hub: RunningHub, username: str) -> None:
    summary = asyncio.run(
        run_fleet(
            "127.0.0.1",
            hub.port,
            username,
            gateways=1,
            meters=2,
            interval=0.1,
            duration=3.0,
            seed=5,
            gateway_prefix="simd",
            drop_probability=0.08,
            outage=(0.2, 0.4),
            reconnect_cap=0.2,
        )
    )
    assert summary.drops >= 2 and summary.reconnects >= 2
    assert summary.errors == {} and summary.dropped == 0 and summary.buffered == 0
    stored = rows(hub, "SELECT COUNT(*) AS n FROM reports WHERE gateway_id = 'simd-001'")[0].n
    assert stored == summary.acked  # every report made while offline arrived, once
    for cid in ("simd-001-m001", "simd-001-m002"):
        energy = [
            r.num
            for r in rows(hub, "SELECT num FROM reports WHERE cid=:c AND dp_id='44' ORDER BY t, id", c=cid)
        ]
        assert len(energy) >= 5 and energy == sorted(energy)
