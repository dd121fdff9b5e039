"""A fleet of simulated three-phase smart meters behind simulated gateways, built on ``meterhub.sdk``.

For demos, load tests and end-to-end checks: ``meterhub simulate --username U --gateways 10 --meters 50``.

Each meter behaves like a real three-phase meter (real units below; the SDK converts to the wire):

- mains voltage per phase ~230 V (a small fixed offset per phase, +- noise), with occasional sags of
  4-12 % lasting a few ticks; always kept within 200-250 V;
- per-phase currents following a daily load profile (low at night, peaks around 07:30 and 19:30, a
  lunchtime bump) scaled per meter (household size 0.5-2x), per-phase shares, noise and short appliance
  spikes; power factor per phase 0.85-0.99 (slow random walk); phase power = V x I x PF;
- totals: power_current (dp 3, W) = sum of phase powers; voltage_current (dp 5) and cur_current (dp 7,
  mA) are the means over the phases (*choice*: the document does not say); power_reactive (dp 38) and
  power_apparent (dp 52, kVA) from the phases; power_factor (dp 40) = P / S; supply_frequency (dp 41)
  ~50 Hz;
- energy integrates power over time and never decreases: electric_total (dp 44) = forward_energy_total
  (dp 50), kWh; electric_daily / electric_month (dp 45/46) restart at local midnight / month start;
  energy_reactive (dp 51); per-phase energy in the phase object form's ``electricity``; a prepaid
  balance residual_electricity (dp 47) that consumption lowers (credit_alarm below electric_warm_value);
- temp_current (dp 10) drifts toward 22 C + 18 C x load with a 10-minute time constant;
- faults (dp 19) from conditions -- undervoltage during a sag below voltage_under, ov_vol above
  voltage_over, overload_alarm above current_max, high_power_alarm above power_limit, temp_dif_fault
  above over_temp_value, leakagecurr_alarm, credit_alarm -- and rare random ones (surge, magnetism,
  self test, outage) that clear after 5-30 ticks; alarm_level (dp 20) follows the worst active fault.
  The fault data point is reported when the set of active faults changes (an empty list when cleared);
- commands are obeyed: switch / switch_state (dp 1 / 57) off -> currents and power 0 (switch_times
  counts); any other writable setting is stored, acts on the fault thresholds, and is reported back;
  status_query (dp 9) asks for a full report on the next tick. *choice*: the writable measurements
  (voltage, leakage current, power, power factor, frequency, energy registers: dp 5, 15, 37, 38, 40, 41,
  44-46) cannot be set by a command: answered 2002;
- each tick a meter reports a handful of data points: power_current, one phase (in turn), two of a
  rotation of slower quantities (energy, voltage, current, temperature, ...), plus fault changes and
  command echoes; the first tick (and status_query) reports everything, settings included;
- phase_a/b/c go as base64 of the 8-byte layout ("binary") or as the object form ("object");
  "mixed" alternates by meter.

Gateways: ``gateways`` gateways (``{prefix}-001``...) of ``meters`` meters each (``{gateway}-m001``...);
each ticks every ``interval`` s (spread by a random start offset). With ``drop_probability`` per gateway
and tick a gateway loses its connection abruptly and stays offline 1-5 s (``outage``); its meters keep
measuring, the SDK buffers their reports and sends them after the reconnection with their original ``t``.
Meters sync with ``product_id`` (default "sim-meter"; the server's default model must be the smart meter
or the product registered: ``meterhub product add sim-meter smart-meter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from meterhub.model.datapoint import DataPoint
from meterhub.protocol.errors import MESSAGES, ErrorCode
from meterhub.sdk import Gateway, GatewayConnectError, InvalidValue

__all__ = [
    "DEFAULT_DROP_PROBABILITY",
    "Fleet",
    "FleetSummary",
    "Meter",
    "SimulationError",
    "daily_profile",
    "run_fleet",
    "simulate",
    "simulate_command",
]

NOMINAL_VOLTAGE = 230.0
VOLTAGE_BOUNDS = (200.5, 249.5)
NOMINAL_FREQUENCY = 50.0
PHASES = ("phase_a", "phase_b", "phase_c")
PHASE_ENCODING_CHOICES = ("mixed", "binary", "object")
#: Chance per gateway and tick of an abrupt connection loss (1-5 s offline).
DEFAULT_DROP_PROBABILITY = 0.0005
DEFAULT_FAULT_PROBABILITY = 0.002
DEFAULT_SAG_PROBABILITY = 0.01

#: Writable data points that are measurements: a command cannot set them (answered 2002).
MEASURED = frozenset(
    {
        "voltage_current",
        "leakage_current",
        "power_effective",
        "power_reactive",
        "power_factor",
        "supply_frequency",
        "electric_total",
        "electric_daily",
        "electric_month",
    }
)
#: Writable settings with their initial values (real units).
DEFAULT_SETTINGS: dict[str, Any] = {
    "current_max": 40.0,  # A
    "voltage_under": 207.0,  # V
    "voltage_over": 253.0,  # V
    "leakage_warn_value": 30.0,  # mA
    "leakage_fault_value": 100.0,  # mA
    "leakage_action_value": 30.0,
    "switch_enabled": True,
    "over_current_duration": 5.0,  # s
    "over_temp_value": 70.0,
    "over_vol_protect_time": 1.0,  # min
    "over_vol_recovery_time": 5.0,  # min
    "power_limit": 15000.0,  # W
    "electric_warm_value": 20.0,  # kWh of remaining credit that raises credit_alarm
    "cold_stall_type": "consumption",
    "hot_stall_type": "consumption",
}
#: Quantities reported two per tick, in turn.
ROTATION = (
    "electric_total",
    "voltage_current",
    "cur_current",
    "forward_energy_total",
    "temp_current",
    "supply_frequency",
    "power_factor",
    "electric_daily",
    "power_reactive",
    "power_apparent",
    "electric_month",
    "energy_reactive",
    "leakage_current",
    "residual_electricity",
)
RANDOM_FAULTS = ("surge_alarm", "magnetism_alarm", "self_test_alarm", "outage_alarm")
URGENT = frozenset({"short_circuit_alarm", "fire_alarm"})
SERIOUS = frozenset({"overload_alarm", "ov_vol", "high_power_alarm", "temp_dif_fault", "leakagecurr_alarm"})
FAULT_ORDER = (
    "short_circuit_alarm",
    "surge_alarm",
    "overload_alarm",
    "ov_vol",
    "undervoltage_alarm",
    "temp_dif_fault",
    "leakagecurr_alarm",
    "self_test_alarm",
    "fire_alarm",
    "high_power_alarm",
    "ov_cr",
    "outage_alarm",
    "magnetism_alarm",
    "credit_alarm",
)


class SimulationError(RuntimeError):
    """The fleet could not start (connection refused, sync refused, ...)."""


def daily_profile(hour: float) -> float:
    """Relative household load for a local hour (0-24): ~0.15 at night, peaks ~0.7 at 07:30, ~1.0 at 19:30."""

    def bump(center: float, width: float) -> float:
        d = min(abs(hour - center), 24 - abs(hour - center))  # wraps around midnight
        return math.exp(-((d / width) ** 2))

    return 0.15 + 0.55 * bump(7.5, 1.2) + 0.2 * bump(13.0, 2.0) + 0.85 * bump(19.5, 1.8)


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


class Meter:
    """One simulated three-phase meter. ``step(now)`` advances it and returns ``(code, value)`` reports."""

    def __init__(
        self,
        cid: str,
        rng: random.Random,
        *,
        phase_encoding: str = "binary",
        now: float | None = None,
        time_scale: float = 1.0,
        fault_probability: float = DEFAULT_FAULT_PROBABILITY,
        sag_probability: float = DEFAULT_SAG_PROBABILITY,
    ) -> None:
        self.cid = cid
        self.rng = rng
        self.phase_encoding = phase_encoding
        self.time_scale = time_scale
        self.fault_probability = fault_probability
        self.sag_probability = sag_probability
        now = time.time() if now is None else now
        self.last_wall = now
        self.sim_time = now
        self.size = rng.uniform(0.5, 2.0)
        self.peak_current = 12.0 * self.size  # A per phase at profile 1.0
        self.shares = [rng.uniform(0.7, 1.3) for _ in PHASES]
        self.v_offset = [rng.gauss(0.0, 1.5) for _ in PHASES]
        self.pf = [rng.uniform(0.88, 0.97) for _ in PHASES]
        self.voltage = [NOMINAL_VOLTAGE] * 3
        self.current = [0.0] * 3
        self.power = [0.0] * 3
        self.frequency = NOMINAL_FREQUENCY
        self.energy = rng.uniform(500.0, 20000.0)  # kWh
        self.phase_energy = [self.energy * s / sum(self.shares) for s in self.shares]
        self.reactive_energy = self.energy * rng.uniform(0.15, 0.3)
        local = time.localtime(now)
        hours_today = local.tm_hour + local.tm_min / 60
        self.daily = 0.4 * self.size * hours_today
        self.monthly = 9.0 * self.size * (local.tm_mday - 1) + self.daily
        self.day_key = (local.tm_year, local.tm_yday)
        self.month_key = (local.tm_year, local.tm_mon)
        self.residual = rng.uniform(100.0, 800.0)  # prepaid kWh
        self.temperature = 24.0 + rng.uniform(-2.0, 2.0)
        self.leakage = rng.uniform(0.5, 3.0)  # mA
        self.switch = True
        self.switch_times = rng.randint(0, 30)
        self.short_times = 0
        self.settings: dict[str, Any] = dict(DEFAULT_SETTINGS)
        self.settings["device_info"] = {"model": "SIM-3P", "firmware": "1.4.2", "serial": cid}
        self.sag_ticks = 0
        self.sag_depth = 0.0
        self.spike = [0.0] * 3
        self.random_faults: dict[str, int] = {}  # label -> ticks left
        self.reported_faults: tuple[str, ...] = ()
        self.tick = 0
        self.rotation = rng.randrange(len(ROTATION))
        self.full_report_due = True

    # --- physics ---------------------------------------------------------------------------------

    @property
    def total_power(self) -> float:
        return sum(self.power)

    def _advance(self, now: float) -> None:
        rng = self.rng
        dt = max(0.0, now - self.last_wall) * self.time_scale  # simulated seconds
        self.last_wall = now
        self.sim_time += dt
        local = time.localtime(self.sim_time)
        day_key = (local.tm_year, local.tm_yday)
        if day_key != self.day_key:
            self.day_key, self.daily = day_key, 0.0
        month_key = (local.tm_year, local.tm_mon)
        if month_key != self.month_key:
            self.month_key, self.monthly = month_key, 0.0
        hour = local.tm_hour + local.tm_min / 60 + local.tm_sec / 3600
        profile = daily_profile(hour)

        if self.sag_ticks > 0:
            self.sag_ticks -= 1
            if self.sag_ticks == 0:
                self.sag_depth = 0.0
        elif rng.random() < self.sag_probability:
            self.sag_ticks = rng.randint(2, 10)
            self.sag_depth = rng.uniform(0.04, 0.12)
        for p in range(3):
            v = (NOMINAL_VOLTAGE + self.v_offset[p] + rng.gauss(0.0, 1.0)) * (1.0 - self.sag_depth)
            self.voltage[p] = _clamp(v, *VOLTAGE_BOUNDS)
            self.pf[p] = _clamp(self.pf[p] + rng.gauss(0.0, 0.004), 0.85, 0.99)
            if self.spike[p] > 0:
                self.spike[p] = 0.0
            elif rng.random() < 0.02:
                self.spike[p] = rng.uniform(2.0, 8.0)  # a kettle, a motor start
            if self.switch:
                base = self.peak_current * self.shares[p] * profile
                self.current[p] = max(0.05, base * (1.0 + rng.gauss(0.0, 0.05)) + self.spike[p])
            else:
                self.current[p] = 0.0
            self.power[p] = self.voltage[p] * self.current[p] * self.pf[p]

        hours = dt / 3600.0
        reactive = sum(self.voltage[p] * self.current[p] * math.sin(math.acos(self.pf[p])) for p in range(3))
        for p in range(3):
            self.phase_energy[p] += self.power[p] * hours / 1000.0
        used = self.total_power * hours / 1000.0
        self.energy += used
        self.daily += used
        self.monthly += used
        self.residual = max(0.0, self.residual - used)
        self.reactive_energy += reactive * hours / 1000.0
        self.frequency = _clamp(self.frequency + rng.gauss(0.0, 0.004), 49.9, 50.1)
        self.leakage = _clamp(self.leakage + rng.gauss(0.0, 0.1), 0.0, 8.0)
        load = sum(self.current) / (3 * self.peak_current * 1.3)
        target = 22.0 + 18.0 * min(1.0, load)
        self.temperature += (target - self.temperature) * (1.0 - math.exp(-dt / 600.0))
        self.temperature += rng.gauss(0.0, 0.02)

    def active_faults(self) -> tuple[str, ...]:
        """The active fault labels, in the model's order."""
        s = self.settings
        active = set(self.random_faults)
        if min(self.voltage) < s["voltage_under"]:
            active.add("undervoltage_alarm")
        if max(self.voltage) > s["voltage_over"]:
            active.add("ov_vol")
        if max(self.current) > s["current_max"]:
            active.add("overload_alarm")
        if self.total_power > s["power_limit"]:
            active.add("high_power_alarm")
        if self.temperature > s["over_temp_value"]:
            active.add("temp_dif_fault")
        if self.leakage > s["leakage_warn_value"]:
            active.add("leakagecurr_alarm")
        if self.residual < s["electric_warm_value"]:
            active.add("credit_alarm")
        return tuple(label for label in FAULT_ORDER if label in active)

    def _update_random_faults(self) -> None:
        for label in list(self.random_faults):
            self.random_faults[label] -= 1
            if self.random_faults[label] <= 0:
                del self.random_faults[label]
        if self.rng.random() < self.fault_probability:
            self.random_faults[self.rng.choice(RANDOM_FAULTS)] = self.rng.randint(5, 30)

    # --- what is reported ------------------------------------------------------------------------

    def phase_value(self, p: int) -> dict[str, float]:
        return {
            "voltage": self.voltage[p],
            "current": self.current[p],
            "power": self.power[p],
            "electricity": self.phase_energy[p],
        }

    def value_of(self, code: str) -> Any:
        """The current value of a data point (real units)."""
        apparent = sum(v * i for v, i in zip(self.voltage, self.current, strict=True))
        if code in ("power_current", "power_effective"):
            return self.total_power
        if code == "voltage_current":
            return sum(self.voltage) / 3
        if code == "cur_current":
            return sum(self.current) / 3 * 1000.0  # the document's unit is mA
        if code in ("electric_total", "forward_energy_total"):
            return self.energy
        if code == "electric_daily":
            return self.daily
        if code == "electric_month":
            return self.monthly
        if code == "energy_reactive":
            return self.reactive_energy
        if code == "residual_electricity":
            return self.residual
        if code == "temp_current":
            return self.temperature
        if code == "supply_frequency":
            return self.frequency
        if code == "power_factor":
            return self.total_power / apparent if apparent > 0 else 1.0
        if code == "power_reactive":
            return sum(self.voltage[p] * self.current[p] * math.sin(math.acos(self.pf[p])) for p in range(3))
        if code == "power_apparent":
            return apparent / 1000.0  # kVA
        if code == "leakage_current":
            return self.leakage
        if code in PHASES:
            return self.phase_value(PHASES.index(code))
        if code in ("switch", "switch_state"):
            return self.switch
        if code == "switch_times":
            return self.switch_times
        if code == "short_times":
            return self.short_times
        if code == "breaker_id":
            return f"BRK-{self.cid[-12:]}"
        if code == "leakage_protection":
            return "leak_pro_with_value"
        if code == "fault":
            return list(self.active_faults())
        if code in ("d_end_time", "m_end_time"):
            local = time.localtime(self.sim_time)
            if code == "d_end_time":
                start = time.mktime((local.tm_year, local.tm_mon, local.tm_mday, 0, 0, 0, 0, 0, -1))
            else:
                start = time.mktime((local.tm_year, local.tm_mon, 1, 0, 0, 0, 0, 0, -1))
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start - 1))
        return self.settings[code]

    def full_report(self) -> list[tuple[str, Any]]:
        codes = [
            "switch",
            "switch_state",
            "breaker_id",
            "power_current",
            "power_effective",
            *PHASES,
            *ROTATION,
            "leakage_protection",
            "switch_times",
            "short_times",
            "d_end_time",
            "m_end_time",
            *self.settings,
        ]
        return [(code, self.value_of(code)) for code in codes]

    def step(self, now: float) -> list[tuple[str, Any]]:
        """Advance to wall time ``now`` and return this tick's reports (real units)."""
        self._advance(now)
        self._update_random_faults()
        self.tick += 1
        if self.full_report_due:
            self.full_report_due = False
            out = self.full_report()
        else:
            out = [
                ("power_current", self.total_power),
                (PHASES[self.tick % 3], self.phase_value(self.tick % 3)),
            ]
            for _ in range(2):
                code = ROTATION[self.rotation % len(ROTATION)]
                self.rotation += 1
                out.append((code, self.value_of(code)))
        faults = self.active_faults()
        if faults != self.reported_faults:
            self.reported_faults = faults
            out.append(("fault", list(faults)))
            if faults:
                level = "general"
                if URGENT.intersection(faults):
                    level = "urgent"
                elif SERIOUS.intersection(faults):
                    level = "serious"
                out.append(("alarm_level", level))
        return out

    def command(self, dp: DataPoint, value: Any) -> tuple[int, list[tuple[str, Any]]]:
        """Obey a command (``value`` in real units): ``(code, reports to send back)``."""
        code = dp.code
        if code in ("switch", "switch_state"):
            on = bool(value)
            if on != self.switch:
                self.switch = on
                self.switch_times += 1
                if not on:
                    self.current = [0.0] * 3
                    self.power = [0.0] * 3
            return 0, [("switch", on), ("switch_state", on), ("switch_times", self.switch_times)]
        if code == "status_query":
            self.full_report_due = True
            return 0, []
        if code in MEASURED:
            return ErrorCode.NOT_SUPPORTED, []
        if code == "residual_electricity":  # a top-up
            self.residual = float(value)
            return 0, [(code, self.residual)]
        self.settings[code] = value
        return 0, [(code, value)]


# --- the fleet ------------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class FleetSummary:
    """Totals of a simulation run."""

    elapsed: float
    gateways: int
    meters: int
    sent: int
    acked: int
    errors: dict[str, int]
    dropped: int
    buffered: int
    reconnects: int
    drops: int
    commands: int
    local_errors: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def reports_per_s(self) -> float:
        """Answered reports (acked + errors) per second."""
        answered = self.acked + sum(self.errors.values())
        return answered / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        errors = " ".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "0"
        p50 = "-" if self.p50_ms is None else f"{self.p50_ms:.1f}"
        p99 = "-" if self.p99_ms is None else f"{self.p99_ms:.1f}"
        return (
            f"simulated {self.gateways} gateways x {self.meters // max(1, self.gateways)} meters for "
            f"{self.elapsed:.1f} s: {self.reports_per_s:.1f} reports/s | sent {self.sent} acked "
            f"{self.acked} errors {errors} | p50 {p50} ms p99 {p99} ms | buffered {self.buffered} "
            f"dropped {self.dropped} | drops {self.drops} reconnects {self.reconnects} | "
            f"commands {self.commands}"
        )


@dataclass
class _SimGateway:
    gw: Gateway
    meters: list[Meter]
    rng: random.Random
    by_cid: dict[str, Meter] = field(default_factory=dict)


class Fleet:
    """Simulated gateways and their meters: ``await start()``, ``await run(duration)``, ``await stop()``."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        *,
        gateways: int = 2,
        meters: int = 5,
        interval: float = 5.0,
        seed: int | str | None = None,
        tls_ca: Any = None,
        phase_encoding: str = "mixed",
        gateway_prefix: str = "sim-gw",
        product_id: str = "sim-meter",
        drop_probability: float = DEFAULT_DROP_PROBABILITY,
        outage: tuple[float, float] = (1.0, 5.0),
        fault_probability: float = DEFAULT_FAULT_PROBABILITY,
        sag_probability: float = DEFAULT_SAG_PROBABILITY,
        time_scale: float = 1.0,
        status_interval: float = 60.0,
        buffer_size: int = 10_000,
        reconnect_cap: float = 30.0,
    ) -> None:
        if gateways < 1 or meters < 1:
            raise ValueError("gateways and meters must be >= 1")
        if not interval > 0:
            raise ValueError("interval must be > 0")
        if phase_encoding not in PHASE_ENCODING_CHOICES:
            raise ValueError(f"phase_encoding must be one of {PHASE_ENCODING_CHOICES}")
        if not 0 <= drop_probability <= 1:
            raise ValueError("drop_probability must be within [0, 1]")
        self.interval = interval
        self.product_id = product_id
        self.drop_probability = drop_probability
        self.outage = outage
        self.rng = random.Random(seed)
        self.gateways: list[_SimGateway] = []
        self.meters: dict[str, Meter] = {}
        self.drops = 0
        self.commands = 0
        self.local_errors = 0
        self.late_ticks = 0
        self.latencies: deque[float] = deque(maxlen=200_000)
        self.started_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        now = time.time()
        index = 0
        for g in range(gateways):
            gw_id = f"{gateway_prefix}-{g + 1:03d}"
            gw_rng = random.Random(f"{seed}/{gw_id}") if seed is not None else random.Random()
            gw = Gateway(
                host,
                port,
                gw_id,
                username,
                tls_ca=tls_ca,
                status_interval=status_interval,
                buffer_size=buffer_size,
                reconnect_cap=reconnect_cap,
                response_timeout=30.0,
            )
            sim = _SimGateway(gw, [], gw_rng)
            for m in range(meters):
                encoding = phase_encoding
                if encoding == "mixed":
                    encoding = "binary" if index % 2 == 0 else "object"
                index += 1
                meter = Meter(
                    f"{gw_id}-m{m + 1:03d}",
                    random.Random(gw_rng.random()),
                    phase_encoding=encoding,
                    now=now,
                    time_scale=time_scale,
                    fault_probability=fault_probability,
                    sag_probability=sag_probability,
                )
                sim.meters.append(meter)
                sim.by_cid[meter.cid] = meter
                self.meters[meter.cid] = meter
            gw.command_handler = self._command_handler(sim)
            self.gateways.append(sim)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Connect every gateway and sync every meter; ``SimulationError`` when that fails."""
        results = await asyncio.gather(
            *(sim.gw.start(timeout=timeout) for sim in self.gateways), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop(flush_timeout=0)
            first = failures[0]
            if isinstance(first, (GatewayConnectError, TimeoutError)):
                raise SimulationError(str(first)) from first
            raise first
        codes = await asyncio.gather(
            *(
                sim.gw.sync(
                    meter.cid,
                    self.product_id,
                    timeout=timeout,
                    device_name=f"Simulated meter {meter.cid}",
                    comm_type="mqtt",
                    vendor_code="meterhub-sim",
                )
                for sim in self.gateways
                for meter in sim.meters
            ),
            return_exceptions=True,
        )
        bad = [(cid, c) for cid, c in zip(self.meters, codes, strict=True) if c != 0]
        if bad:
            await self.stop(flush_timeout=0)
            cid, code = bad[0]
            if isinstance(code, BaseException):
                raise SimulationError(f"sync of {cid} failed: {code!r}") from code
            hint = ""
            if code == ErrorCode.PARAMS_RANGE_INVALID:
                hint = (
                    f" (is product {self.product_id!r} known? `meterhub product add "
                    f"{self.product_id} smart-meter`, or run the server with a default model)"
                )
            raise SimulationError(
                f"the server refused to sync {cid}: {code} {MESSAGES.get(code, '')}{hint}"
                + (f"; {len(bad) - 1} more" if len(bad) > 1 else "")
            )
        self.started_at = time.monotonic()

    async def run(
        self,
        duration: float | None = None,
        *,
        progress: Callable[[str], None] | None = None,
        progress_interval: float = 5.0,
    ) -> None:
        """Tick every gateway's meters for ``duration`` s (forever when None, until cancelled)."""
        if self.started_at is None:
            raise RuntimeError("start() the fleet first")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._tick_loop(sim)) for sim in self.gateways]
        if progress is not None:
            self._tasks.append(loop.create_task(self._progress_loop(progress, progress_interval)))
        try:
            if duration is None:
                await asyncio.Future()  # until cancelled
            else:
                await asyncio.sleep(duration)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Let the gateways send what is queued (up to ``flush_timeout`` s), then disconnect them."""
        await asyncio.gather(
            *(sim.gw.close(flush_timeout=flush_timeout) for sim in self.gateways), return_exceptions=True
        )
        self._collect_latencies()

    # --- ticking ---------------------------------------------------------------------------------

    def _report(self, sim: _SimGateway, meter: Meter, code: str, value: Any, now: float) -> None:
        try:
            sim.gw.report_nowait(meter.cid, code, value, t=now, phase_encoding=meter.phase_encoding)
        except InvalidValue as exc:  # a simulator bug: count it, keep going
            self.local_errors += 1
            if self.local_errors <= 10:
                print(f"simulator: {meter.cid}: {exc}", file=sys.stderr)

    async def _tick_loop(self, sim: _SimGateway) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(sim.rng.uniform(0, self.interval))
        next_at = loop.time()
        while True:
            now = time.time()
            for meter in sim.meters:
                for code, value in meter.step(now):
                    self._report(sim, meter, code, value, now)
            dropping = sim.gw.connected and sim.rng.random() < self.drop_probability
            if dropping and sim.gw.drop(offline_for=sim.rng.uniform(*self.outage)):
                self.drops += 1
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:  # behind schedule: do not try to catch up
                self.late_ticks += 1
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    def _command_handler(self, sim: _SimGateway) -> Callable[[str, DataPoint, Any], Any]:
        async def handle(cid: str, dp: DataPoint, value: Any) -> int:
            meter = sim.by_cid.get(cid)
            if meter is None:
                return ErrorCode.DEVICE_NOT_EXIST
            self.commands += 1
            code, echo = meter.command(dp, value)
            now = time.time()
            for echo_code, echo_value in echo:
                self._report(sim, meter, echo_code, echo_value, now)
            return code

        return handle

    # --- statistics ------------------------------------------------------------------------------

    def _collect_latencies(self) -> list[float]:
        fresh: list[float] = []
        for sim in self.gateways:
            fresh.extend(sim.gw.stats.take_latencies())
        self.latencies.extend(fresh)
        return fresh

    def summary(self) -> FleetSummary:
        """Totals so far."""
        self._collect_latencies()
        errors: Counter[str] = Counter()
        sent = acked = dropped = buffered = reconnects = 0
        for sim in self.gateways:
            st = sim.gw.stats
            sent += st.sent
            acked += st.acked
            dropped += st.dropped
            buffered += sim.gw.buffered
            reconnects += st.reconnects
            for code, n in st.errors.items():
                errors[str(code)] += n
        samples = sorted(self.latencies)
        p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
        elapsed = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        return FleetSummary(
            elapsed=elapsed,
            gateways=len(self.gateways),
            meters=len(self.meters),
            sent=sent,
            acked=acked,
            errors=dict(errors),
            dropped=dropped,
            buffered=buffered,
            reconnects=reconnects,
            drops=self.drops,
            commands=self.commands,
            local_errors=self.local_errors,
            p50_ms=None if p50 is None else p50 * 1000,
            p99_ms=None if p99 is None else p99 * 1000,
        )

    def progress_line(self, window: Iterable[float], answered: int, seconds: float) -> str:
        samples = sorted(window)
        p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
        total = self.summary()
        errors = " ".join(f"{k}:{v}" for k, v in sorted(total.errors.items())) or "0"
        connected = sum(1 for sim in self.gateways if sim.gw.connected)
        lat = "-" if p50 is None or p99 is None else f"p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms"
        return (
            f"[{total.elapsed:6.1f}s] {answered / seconds if seconds > 0 else 0:8.1f} reports/s | "
            f"sent {total.sent} acked {total.acked} errors {errors} | {lat} | "
            f"gateways {connected}/{len(self.gateways)} | buffered {total.buffered} dropped {total.dropped}"
            f" | reconnects {total.reconnects}"
        )

    async def _progress_loop(self, emit: Callable[[str], None], every: float) -> None:
        loop = asyncio.get_running_loop()
        last_at = loop.time()
        last_answered = 0
        while True:
            await asyncio.sleep(every)
            window: list[float] = []
            for sim in self.gateways:
                window.extend(sim.gw.stats.take_latencies())
            self.latencies.extend(window)
            answered = sum(sim.gw.stats.acked + sum(sim.gw.stats.errors.values()) for sim in self.gateways)
            now = loop.time()
            emit(self.progress_line(window, answered - last_answered, now - last_at))
            last_at, last_answered = now, answered


def _stderr_line(stream: TextIO) -> Callable[[str], None]:
    def emit(line: str) -> None:
        print(line, file=stream, flush=True)

    return emit


async def run_fleet(
    host: str,
    port: int,
    username: str,
    *,
    gateways: int = 2,
    meters: int = 5,
    interval: float = 5.0,
    duration: float | None = None,
    seed: int | str | None = None,
    tls_ca: Any = None,
    phase_encoding: str = "mixed",
    progress: bool | Callable[[str], None] = False,
    progress_interval: float = 5.0,
    gateway_prefix: str = "sim-gw",
    on_ready: Callable[[Fleet], Any] | None = None,
    start_timeout: float = 30.0,
    **fleet_options: Any,
) -> FleetSummary:
    """Start a fleet, run it for ``duration`` s (or until cancelled), stop it, return its totals.

    ``progress``: True prints a progress line to stderr every ``progress_interval`` s (and the summary at
    the end), or pass a callable taking the line. ``on_ready(fleet)`` is called once every meter is
    synced, before ticking starts (e.g. to keep a reference for a dashboard). Other keyword arguments go
    to ``Fleet`` (product_id, drop_probability, outage, fault_probability, sag_probability,
    time_scale, status_interval, buffer_size, reconnect_cap).
    """
    emit: Callable[[str], None] | None
    if progress is True:
        emit = _stderr_line(sys.stderr)
    elif callable(progress):
        emit = progress
    else:
        emit = None
    fleet = Fleet(
        host,
        port,
        username,
        gateways=gateways,
        meters=meters,
        interval=interval,
        seed=seed,
        tls_ca=tls_ca,
        phase_encoding=phase_encoding,
        gateway_prefix=gateway_prefix,
        **fleet_options,
    )
    await fleet.start(timeout=start_timeout)
    if on_ready is not None:
        result = on_ready(fleet)
        if asyncio.iscoroutine(result):
            await result
    try:
        await fleet.run(duration, progress=emit, progress_interval=progress_interval)
    finally:
        # also on cancellation (Ctrl-C): flush briefly and disconnect cleanly
        stopping = asyncio.ensure_future(fleet.stop(flush_timeout=3.0))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(stopping)
        summary = fleet.summary()
        if emit is not None:
            emit(summary.line())
    return summary


async def simulate(host: str, port: int, username: str, **options: Any) -> FleetSummary:
    """Run a simulated fleet against ``host:port`` with progress lines on stderr (``run_fleet``'s
    options: gateways, meters, interval, duration, seed, tls_ca, phase_encoding, ...)."""
    options.setdefault("progress", True)
    return await run_fleet(host, port, username, **options)


# --- command line ---------------------------------------------------------------------------------


def _simulator_username(data_dir: Path) -> str:
    """The username of vendor "simulator" in the database under ``data_dir`` (created when missing)."""
    from meterhub.storage import registry
    from meterhub.storage.database import create_db_engine, migrate

    db = data_dir / "meterhub.db"
    if not db.is_file():
        raise click.ClickException(f"no meterhub database at {db} (is --data-dir the server's?)")
    engine = create_db_engine(f"sqlite:///{db.resolve()}")
    try:
        migrate(engine)
        vendor = registry.get_vendor(engine, "simulator") or registry.add_vendor(engine, "simulator")
        return vendor.username
    finally:
        engine.dispose()


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@click.command("simulate")
@click.option("--gateways", type=click.IntRange(min=1), default=2, show_default=True, help="Gateways.")
@click.option(
    "--meters", type=click.IntRange(min=1), default=5, show_default=True, help="Meters per gateway."
)
@click.option(
    "--interval", type=click.FloatRange(min=0.01), default=5.0, show_default=True, help="Seconds per tick."
)
@click.option(
    "--duration", type=click.FloatRange(min=0), default=None, help="Seconds to run (default: until Ctrl-C)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=21883, show_default=True)
@click.option("--username", default=None, help="The vendor username (`meterhub vendor add NAME` prints it).")
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA certificate: connect with TLS and verify the server with it.",
)
@click.option("--seed", type=int, default=None, help="Random seed (repeatable runs).")
@click.option(
    "--phase-encoding", type=click.Choice(PHASE_ENCODING_CHOICES), default="mixed", show_default=True
)
@click.option(
    "--drop-probability",
    type=click.FloatRange(0, 1),
    default=DEFAULT_DROP_PROBABILITY,
    show_default=True,
    help="Chance per gateway and tick of an abrupt disconnection (1-5 s offline).",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Simulated seconds per real second (the daily load profile and the energy run faster).",
)
@click.option("--gateway-prefix", default="sim-gw", show_default=True)
@click.option("--product-id", default="sim-meter", show_default=True)
@click.option("--progress-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress lines, only the final summary.")
@click.option(
    "--data-dir",
    "sim_data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Without --username: use (or create) vendor 'simulator' in the server's database here.",
)
@click.pass_context
def simulate_command(
    ctx: click.Context,
    gateways: int,
    meters: int,
    interval: float,
    duration: float | None,
    host: str,
    port: int,
    username: str | None,
    tls_ca: Path | None,
    seed: int | None,
    phase_encoding: str,
    drop_probability: float,
    time_scale: float,
    gateway_prefix: str,
    product_id: str,
    progress_interval: float,
    quiet: bool,
    sim_data_dir: Path | None,
) -> None:
    """Simulate meter gateways and three-phase meters against a meterhub server."""
    if username is None:
        data_dir = sim_data_dir or getattr(ctx.find_root().obj, "data_dir", None)
        if data_dir is None:
            raise click.UsageError(
                "--username is required: the vendor username printed by `meterhub vendor add NAME` "
                "(or give --data-dir DIR of a local server to use its vendor 'simulator')."
            )
        username = _simulator_username(Path(data_dir))
    emit = _stderr_line(sys.stderr)
    fleets: list[Fleet] = []

    def ready(fleet: Fleet) -> None:
        fleets.append(fleet)
        emit(
            f"simulating {gateways} gateways x {meters} meters against {host}:{port}, "
            f"a tick every {interval:g} s" + ("" if duration is None else f" for {duration:g} s")
        )

    try:
        summary = _run_async(
            run_fleet(
                host,
                port,
                username,
                gateways=gateways,
                meters=meters,
                interval=interval,
                duration=duration,
                seed=seed,
                tls_ca=tls_ca,
                phase_encoding=phase_encoding,
                progress=not quiet and emit,
                progress_interval=progress_interval,
                gateway_prefix=gateway_prefix,
                product_id=product_id,
                drop_probability=drop_probability,
                time_scale=time_scale,
                on_ready=ready,
            )
        )
    except SimulationError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        if quiet and fleets:
            emit(fleets[0].summary().line())
        return
    if quiet:
        emit(summary.line())
