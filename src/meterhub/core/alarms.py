"""Alarms: raised and cleared from what meters report, kept in the ``alarms`` table.

Two kinds:

- ``fault``: each label of a ``fault`` data point (dp 19, a bitmap of 14 labels) is its own alarm. A
  label that appears in a report is raised; a label missing from a later report is cleared (so a
  report of 0 / ``[]`` clears them all). The alarm carries the device's latest ``alarm_level``
  (dp 20: general / serious / urgent): the level known when it is raised, updated while it is active
  when the meter reports a new level (meters may send the level just after the fault).
- ``threshold``: a measurement the meter reports compared with a limit the meter also reports
  (both in real units, ``raw / 10^scale``), level ``general``:

  =================  ===================  ==========================  =====
  label              measurement          limit                       rule
  =================  ===================  ==========================  =====
  ``overvoltage``    voltage_current (5)  voltage_over (12)           >
  ``undervoltage``   voltage_current (5)  voltage_under (11)          <
  ``over_temp``      temp_current (10)    over_temp_value (34)        >
  ``power_limit``    power_current (3)    power_limit (48)            >
  ``leakage``        leakage_current (15) leakage_warn_value (13)     >
  =================  ===================  ==========================  =====

  A limit of 0 (or never reported) means "not set": the rule is off and an active alarm of it is
  cleared. The alarm is raised while the rule holds and cleared when it no longer does (no hysteresis:
  meters report seldom enough). It is re-checked when either the measurement or the limit changes.

Times are the reports' measurement times ``t``. Reports older than the newest one already seen for
the same data point (buffered by a gateway) do not change alarms. The monitor is a listener on
``ProtocolService.listeners``: it only does work for the handful of data points above, keeps active
alarms in memory (loaded at start), and writes through the group-commit writer (op kinds
``alarm_raise``, ``alarm_clear``, ``alarm_update``). It gives out alarm ids itself (it is the only
writer of the table), so a raise and a clear can share one commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from meterhub.logs import get_logger
from meterhub.storage import schema
from meterhub.storage.database import GroupCommitWriter

log = get_logger(__name__)

FAULT = "fault"
THRESHOLD = "threshold"
LEVEL_CODE = "alarm_level"
THRESHOLD_LEVEL = "general"


@dataclass(slots=True, frozen=True)
class Rule:
    label: str
    measure: str
    limit: str
    above: bool  # True: alarm when measure > limit; False: when measure < limit

    def holds(self, measure: float, limit: float) -> bool:
        return measure > limit if self.above else measure < limit


RULES: tuple[Rule, ...] = (
    Rule("overvoltage", "voltage_current", "voltage_over", True),
    Rule("undervoltage", "voltage_current", "voltage_under", False),
    Rule("over_temp", "temp_current", "over_temp_value", True),
    Rule("power_limit", "power_current", "power_limit", True),
    Rule("leakage", "leakage_current", "leakage_warn_value", True),
)
_RULES_BY_CODE: dict[str, tuple[Rule, ...]] = {}
for _rule in RULES:
    for _code in (_rule.measure, _rule.limit):
        _RULES_BY_CODE[_code] = (*_RULES_BY_CODE.get(_code, ()), _rule)
WATCHED_CODES = frozenset({*_RULES_BY_CODE, LEVEL_CODE})


@dataclass(slots=True)
class Alarm:
    id: int
    cid: str
    kind: str
    label: str
    level: str | None
    raised_at: float
    cleared_at: float | None = None
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    details: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cid": self.cid,
            "kind": self.kind,
            "label": self.label,
            "level": self.level,
            "raised_at": self.raised_at,
            "cleared_at": self.cleared_at,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "details": self.details,
        }


@dataclass(slots=True)
class _DeviceAlarms:
    """Per device: the newest value (and its t) of each watched data point, and the active alarms."""

    values: dict[str, tuple[float, Any]] = field(default_factory=dict)
    active: dict[tuple[str, str], Alarm] = field(default_factory=dict)


class AlarmMonitor:
    """Raises and clears alarms from report events (see the module docstring)."""

    def __init__(
        self, engine: Engine, writer: GroupCommitWriter, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.clock = clock
        self.devices: dict[str, _DeviceAlarms] = {}
        self.next_id = 1
        # Cluster mode: ids from blocks reserved in the database (meterhub.cluster.ids), so that two
        # nodes never give out the same one; None: this process is the table's only writer.
        self.ids: Any = None
        self.watched: dict[str, str] = {}
        self.raised = 0
        self.cleared = 0

    # --- start -----------------------------------------------------------------------------------

    def load(self, watched_dp_ids: dict[str, str]) -> None:
        """Read active alarms and the latest values of the watched data points (blocking; run it in a
        thread). ``watched_dp_ids`` maps dp id -> code for the data points of interest."""
        a = schema.alarms
        lv = schema.latest
        self.watched = watched_dp_ids
        with self.engine.connect() as conn:
            self.next_id = (conn.execute(select(func.max(a.c.id))).scalar() or 0) + 1
            for row in conn.execute(select(a).where(a.c.cleared_at.is_(None))).all():
                alarm = Alarm(**row._mapping)
                self._device(alarm.cid).active[(alarm.kind, alarm.label)] = alarm
            if watched_dp_ids:
                rows = conn.execute(
                    select(lv.c.cid, lv.c.dp_id, lv.c.value, lv.c.num, lv.c.t).where(
                        lv.c.dp_id.in_(list(watched_dp_ids))
                    )
                ).all()
                for cid, dp_id, value, num, t in rows:
                    code = watched_dp_ids[dp_id]
                    self._device(cid).values[code] = (t, value if code in (LEVEL_CODE, FAULT) else num)
        log.info("alarms loaded", active=self.active_count(), next_id=self.next_id)

    def read_devices(self, cids: list[str]) -> dict[str, _DeviceAlarms]:
        """The stored state of some devices (blocking; for a cluster node taking their gateway over:
        another node raised and cleared their alarms meanwhile). Apply it with :meth:`replace`."""
        a, lv = schema.alarms, schema.latest
        out = {cid: _DeviceAlarms() for cid in cids}
        watched = self.watched
        with self.engine.connect() as conn:
            for i in range(0, len(cids), 1000):
                chunk = cids[i : i + 1000]
                for row in conn.execute(select(a).where(a.c.cleared_at.is_(None), a.c.cid.in_(chunk))).all():
                    alarm = Alarm(**row._mapping)
                    out[alarm.cid].active[(alarm.kind, alarm.label)] = alarm
                if watched:
                    rows = conn.execute(
                        select(lv.c.cid, lv.c.dp_id, lv.c.value, lv.c.num, lv.c.t).where(
                            lv.c.cid.in_(chunk), lv.c.dp_id.in_(list(watched))
                        )
                    ).all()
                    for cid, dp_id, value, num, t in rows:
                        code = watched[dp_id]
                        out[cid].values[code] = (t, value if code in (LEVEL_CODE, FAULT) else num)
        return out

    def replace(self, state: dict[str, _DeviceAlarms]) -> None:
        """Take devices' state read by :meth:`read_devices` (in the event loop)."""
        self.devices.update(state)

    def _device(self, cid: str) -> _DeviceAlarms:
        dev = self.devices.get(cid)
        if dev is None:
            dev = self.devices[cid] = _DeviceAlarms()
        return dev

    # --- the listener ----------------------------------------------------------------------------

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind != "report":
            return
        dp = event["dp"]
        if dp.type == FAULT:
            self._on_fault(event["cid"], event["value"], event["t"])
        elif dp.code in WATCHED_CODES:
            self._on_value(event["cid"], dp.code, event["value"], event["num"], event["t"])

    def _newer(self, dev: _DeviceAlarms, code: str, t: float, value: Any) -> bool:
        seen = dev.values.get(code)
        if seen is not None and t < seen[0]:
            return False  # a buffered, older report
        dev.values[code] = (t, value)
        return True

    def _on_fault(self, cid: str, labels: list[str], t: float) -> None:
        dev = self._device(cid)
        if not self._newer(dev, FAULT, t, labels):
            return
        now_set = set(labels)
        ops: list[tuple[str, dict[str, Any]]] = []
        for key, alarm in list(dev.active.items()):
            if key[0] == FAULT and key[1] not in now_set:
                self._clear(dev, alarm, t, ops)
        level_seen = dev.values.get(LEVEL_CODE)
        level = level_seen[1] if level_seen else None
        for label in labels:
            if (FAULT, label) not in dev.active:
                self._raise(dev, cid, FAULT, label, level, t, None, ops)
        if ops:
            self.writer.submit(ops)

    def _on_value(self, cid: str, code: str, value: Any, num: float | None, t: float) -> None:
        dev = self._device(cid)
        if code == LEVEL_CODE:
            if not self._newer(dev, code, t, value):
                return
            ops = [
                ("alarm_update", {"id": alarm.id, "level": value})
                for (kind, _), alarm in dev.active.items()
                if kind == FAULT and alarm.level != value
            ]
            for _, alarm in dev.active.items():
                if alarm.kind == FAULT:
                    alarm.level = value
            if ops:
                self.writer.submit(ops)
            return
        if num is None or not self._newer(dev, code, t, num):
            return
        ops = []
        for rule in _RULES_BY_CODE[code]:
            self._check(dev, cid, rule, t, ops)
        if ops:
            self.writer.submit(ops)

    def _check(self, dev: _DeviceAlarms, cid: str, rule: Rule, t: float, ops: list[Any]) -> None:
        measure = dev.values.get(rule.measure)
        limit = dev.values.get(rule.limit)
        key = (THRESHOLD, rule.label)
        active = dev.active.get(key)
        on = measure is not None and limit is not None and limit[1] != 0 and rule.holds(measure[1], limit[1])
        if on and active is None:
            assert measure is not None and limit is not None
            details = {
                "measure": rule.measure,
                "value": measure[1],
                "limit_code": rule.limit,
                "limit": limit[1],
                "rule": ">" if rule.above else "<",
            }
            self._raise(dev, cid, THRESHOLD, rule.label, THRESHOLD_LEVEL, t, details, ops)
        elif not on and active is not None:
            self._clear(dev, active, t, ops)

    def _raise(
        self,
        dev: _DeviceAlarms,
        cid: str,
        kind: str,
        label: str,
        level: str | None,
        t: float,
        details: dict[str, Any] | None,
        ops: list[Any],
    ) -> None:
        if self.ids is not None:
            alarm_id = self.ids.take()
        else:
            alarm_id = self.next_id
            self.next_id += 1
        alarm = Alarm(alarm_id, cid, kind, label, level, t, details=details)
        dev.active[(kind, label)] = alarm
        self.raised += 1
        ops.append(("alarm_raise", alarm.as_dict()))
        log.info("alarm raised", cid=cid, kind=kind, label=label, level=level, id=alarm.id)

    def _clear(self, dev: _DeviceAlarms, alarm: Alarm, t: float, ops: list[Any]) -> None:
        cleared_at = max(t, alarm.raised_at)
        alarm.cleared_at = cleared_at
        del dev.active[(alarm.kind, alarm.label)]
        self.cleared += 1
        ops.append(("alarm_clear", {"id": alarm.id, "cleared_at": cleared_at}))
        log.info("alarm cleared", cid=alarm.cid, kind=alarm.kind, label=alarm.label, id=alarm.id)

    # --- queries and operator actions ------------------------------------------------------------

    def active_count(self) -> int:
        return sum(len(d.active) for d in self.devices.values())

    def active_for(self, cid: str) -> list[Alarm]:
        dev = self.devices.get(cid)
        return sorted(dev.active.values(), key=lambda a: a.id) if dev else []

    def find_active(self, alarm_id: int) -> Alarm | None:
        for dev in self.devices.values():
            for alarm in dev.active.values():
                if alarm.id == alarm_id:
                    return alarm
        return None

    async def acknowledge(self, alarm_id: int, by: str, row: dict[str, Any]) -> dict[str, Any]:
        """Acknowledge an alarm (``row`` is its stored form). The first acknowledgement is kept."""
        alarm = self.find_active(alarm_id)
        current = alarm.as_dict() if alarm is not None else dict(row)
        if current.get("acknowledged_at") is not None:
            return current
        now = self.clock()
        if alarm is not None:
            alarm.acknowledged_at = now
            alarm.acknowledged_by = by
        await self.writer.write(
            [("alarm_update", {"id": alarm_id, "acknowledged_at": now, "acknowledged_by": by})]
        )
        current.update(acknowledged_at=now, acknowledged_by=by)
        return current
