"""A week of simulated history for the demo's meters, written at the demo's first start so that the
charts, energy bars, bills and the alarms history mean something at once (``meterhub demo``).

Marked as simulated (docs/decisions.md): every report has a ``request_id`` starting with
:data:`PREFIX` and every alarm ``details.simulated = true``. Written through the storage writer (the
path of live reports and alarms) in batches. Idempotent: a gateway that already has backfilled
reports gets nothing more (a later start with more ``--gateways`` backfills only the new ones). The
history ends where each live simulated meter starts (its energy register continues the backfilled
one), and on later starts each meter continues its stored register, so no meter seems to be reset.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import Engine, and_, select

from meterhub.core.alarms import Alarm
from meterhub.storage import schema
from meterhub.storage.schema import report_digest
from meterhub.tools.simulator import NOMINAL_VOLTAGE, daily_profile

#: ``request_id`` prefix of every backfilled report (a reserved prefix: the SDK and the simulator use
#: UUIDs or counters).
PREFIX = "sim-backfill:"
DAYS = 7
STEP = 900.0  # s between two backfilled readings (15 min)
BATCH = 5000  # writer ops per transaction
_json = msgspec.json.Encoder(order="sorted").encode

#: A few past alarms for the history: (kind, label, level, sources, minutes open).
ALARMS: tuple[tuple[str, str, str, list[str], float], ...] = (
    ("threshold", "undervoltage", "general", ["meter", "meterhub"], 4),
    ("fault", "magnetism_alarm", "serious", ["meter"], 12),
    ("threshold", "undervoltage", "general", ["meterhub"], 2),
    ("fault", "surge_alarm", "general", ["meter"], 1),
    ("fault", "overload_alarm", "serious", ["meter"], 25),
    ("fault", "self_test_alarm", "general", ["meter"], 6),
)


@dataclass(slots=True)
class Backfill:
    """What a backfill wrote (``created`` False: it was there already, nothing written)."""

    created: bool
    reports: int = 0
    alarms: int = 0
    seconds: float = 0.0
    since: float = 0.0


def backfilled_gateways(engine: Engine, gateway_ids: Iterable[str]) -> set[str]:
    """Those of these gateways that have backfilled reports (blocking)."""
    r = schema.reports
    found = set()
    with engine.connect() as conn:
        for gw in gateway_ids:
            q = select(r.c.id).where(and_(r.c.gateway_id == gw, r.c.request_id.like(PREFIX + "%"))).limit(1)
            if conn.execute(q).first() is not None:
                found.add(gw)
    return found


def stored_registers(engine: Engine, cids: Iterable[str]) -> dict[str, float]:
    """The stored electric_total (dp 44, kWh) of these meters (blocking)."""
    lv = schema.latest
    q = select(lv.c.cid, lv.c.num).where(and_(lv.c.cid.in_(list(cids)), lv.c.dp_id == "44"))
    with engine.connect() as conn:
        return {row.cid: float(row.num) for row in conn.execute(q) if row.num is not None}


def _raw(x: float, scale: int = 4) -> int:
    return round(x * 10**scale)


def meter_history(
    gateway_id: str, meter: Any, start: float, end: float, rng: random.Random, sags: Sequence[float] = ()
) -> tuple[list[tuple[str, Any]], float]:
    """Writer ops for one simulated meter's readings every :data:`STEP` s from ``start`` to ``end``:
    power, voltage, current, temperature, the three phases and the energy registers (dp 44 and 50),
    which end at the live meter's register. ``sags``: instants with a voltage sag (an undervoltage
    alarm in the history). Returns (ops, the energy register at ``start``)."""
    steps = int((end - start) // STEP)
    times = [start + k * STEP for k in range(steps)]
    readings = []
    for t in times:
        local = time.localtime(t)
        profile = daily_profile(local.tm_hour + local.tm_min / 60)
        sag = 0.1 if any(abs(t - s) < STEP / 2 for s in sags) else 0.0
        phases = []
        for p in range(3):
            v = (NOMINAL_VOLTAGE + meter.v_offset[p] + rng.gauss(0.0, 1.0)) * (1.0 - sag)
            i = max(0.05, meter.peak_current * meter.shares[p] * profile * (1.0 + rng.gauss(0.0, 0.08)))
            if rng.random() < 0.03:
                i += rng.uniform(2.0, 8.0)  # a kettle, a motor start
            phases.append((v, i, v * i * meter.pf[p]))
        readings.append((t, profile, phases))
    used = sum(sum(ph[2] for ph in r[2]) * STEP / 3.6e6 for r in readings)  # kWh
    if meter.energy - used < 10.0:  # the live register must continue the history: start it higher
        meter.energy = used + 10.0 + rng.uniform(0.0, 500.0)
    energy = meter.energy - used
    first = energy
    ops: list[tuple[str, Any]] = []
    temperature = 24.0
    for n, (t, profile, phases) in enumerate(readings):
        power = sum(ph[2] for ph in phases)
        energy += power * STEP / 3.6e6
        temperature += (22.0 + 18.0 * min(1.0, profile) - temperature) * 0.6 + rng.gauss(0.0, 0.2)
        values: list[tuple[str, Any, float | None]] = [
            ("3", _raw(power), power),
            ("5", _raw(sum(ph[0] for ph in phases) / 3), sum(ph[0] for ph in phases) / 3),
            ("7", _raw(sum(ph[1] for ph in phases) / 3 * 1000), sum(ph[1] for ph in phases) / 3 * 1000),
            ("10", _raw(temperature, 2), round(temperature, 2)),
            ("44", _raw(energy), round(energy, 4)),
            ("50", _raw(energy), round(energy, 4)),
        ]
        for dp, (v, i, w) in zip(("30", "31", "32"), phases, strict=True):
            phase = {"voltage": round(v, 1), "current": round(i, 3), "power": round(w), "electricity": None}
            values.append((dp, phase, None))
        for dp, value, num in values:
            stored = _json(value).decode()
            rid = f"{PREFIX}{meter.cid}:{n}:{dp}"
            row = (gateway_id, rid, meter.cid, dp, stored, num, t, t, report_digest(meter.cid, dp, stored, t))
            ops.append(("report", row))
            if n == len(readings) - 1:
                ops.append(("latest", (meter.cid, dp, stored, num, t, t)))
    return ops, first


def past_alarms(
    monitor: Any, cids: Sequence[str], start: float, end: float, rng: random.Random
) -> tuple[list[tuple[str, Any]], dict[str, list[float]]]:
    """Writer ops for a few cleared alarms spread over the history (ids from the alarm monitor, the
    table's only writer), and the instants of the undervoltage ones per meter (voltage sags)."""
    ops: list[tuple[str, Any]] = []
    sags: dict[str, list[float]] = {}
    span = end - start
    for k, (kind, label, level, sources, minutes) in enumerate(ALARMS):
        cid = cids[(k * 5) % len(cids)]
        raised = start + span * (k + rng.uniform(0.2, 0.8)) / len(ALARMS)
        raised -= raised % 60
        details: dict[str, Any] = {"simulated": True}
        if label == "undervoltage":
            sags.setdefault(cid, []).append(raised)
            value = round(NOMINAL_VOLTAGE * 0.9 + rng.uniform(-1.0, 1.0), 2)
            details.update(measure="voltage_current", value=value, limit_code="voltage_under", limit=207.0)
            details["rule"] = "<"
        if monitor.ids is not None:
            alarm_id = monitor.ids.take()
        else:
            alarm_id = monitor.next_id
            monitor.next_id += 1
        alarm = Alarm(alarm_id, cid, kind, label, level, raised, details=details, last_raised_at=raised)
        alarm.cleared_at = raised + minutes * 60
        alarm.sources = list(sources)
        if k % 2 == 1:  # some were looked at
            alarm.acknowledged_at = raised + rng.uniform(60, 600)
            alarm.acknowledged_by = "demo"
        ops.append(("alarm_raise", alarm.as_dict()))
    return ops, sags


async def backfill(hub: Any, fleet: Any, *, days: float = DAYS, now: float | None = None) -> Backfill:
    """Write ``days`` of simulated history for the fleet's meters, once (see the module docstring).
    Call it before the fleet ticks (``run_fleet``'s ``on_ready``)."""
    import asyncio

    began = time.monotonic()
    gateways = {sim.gw.gateway_id: sim.meters for sim in fleet.gateways}
    done = await asyncio.to_thread(backfilled_gateways, hub.engine, list(gateways))
    if done:
        # A later start: each live meter continues its stored register (no reset in the energy data).
        kept = [m.cid for gw in done for m in gateways[gw]]
        for cid, kwh in (await asyncio.to_thread(stored_registers, hub.engine, kept)).items():
            fleet.meters[cid].energy = kwh
    todo = {gw: meters for gw, meters in gateways.items() if gw not in done}
    if not todo:
        return Backfill(created=False)
    now = time.time() if now is None else now
    end = now - now % STEP
    start = end - days * 86400
    rng = random.Random(f"backfill/{start}")
    cids = [m.cid for meters in todo.values() for m in meters]
    # The past alarms once, at the first start (a later start with more gateways backfills only those).
    alarm_ops, sags = past_alarms(hub.alarms, cids, start, end, rng) if not done else ([], {})
    reports = 0
    pending: list[tuple[str, Any]] = []
    for gw, meters in todo.items():
        for meter in meters:
            ops, _ = meter_history(gw, meter, start, end, rng, sags.get(meter.cid, ()))
            reports += sum(1 for op in ops if op[0] == "report")
            pending.extend(ops)
            while len(pending) >= BATCH:
                await hub.writer.write(pending[:BATCH])
                del pending[:BATCH]
    pending.extend(alarm_ops)
    if pending:
        await hub.writer.write(pending)
    return Backfill(
        created=True, reports=reports, alarms=len(alarm_ops), seconds=time.monotonic() - began, since=start
    )
