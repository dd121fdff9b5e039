"""Alarms: raised and cleared from what meters report, kept in the ``alarms`` table.

Three kinds:

- ``fault``: each label of a ``fault`` data point (dp 19, a bitmap of 14 labels) is its own alarm. A
  label that appears in a report asserts it; a label missing from a later report stops asserting it
  (so a report of 0 / ``[]`` clears them all). The alarm carries the device's latest ``alarm_level``
  (dp 20: general / serious / urgent).
- ``threshold``: a measurement the meter reports compared with a limit the meter also reports
  (both in real units, ``raw / 10^scale``), level ``general``:

  =================  ===================  ==========================  =====  =====================
  label              measurement          limit                       rule   meter's fault label
  =================  ===================  ==========================  =====  =====================
  ``overvoltage``    voltage_current (5)  voltage_over (12)           >      ``ov_vol``
  ``undervoltage``   voltage_current (5)  voltage_under (11)          <      ``undervoltage_alarm``
  ``over_temp``      temp_current (10)    over_temp_value (34)        >      ``temp_dif_fault``
  ``power_limit``    power_current (3)    power_limit (48)            >      ``high_power_alarm``
  ``leakage``        leakage_current (15) leakage_warn_value (13)     >      ``leakagecurr_alarm``
  =================  ===================  ==========================  =====  =====================

  A limit of 0 (or never reported) means "not set". The meter's own fault for the same condition
  (last column) is the same alarm with a second source: one ``threshold`` alarm whose ``sources``
  lists ``meter`` and / or ``meterhub``; it is on while either source asserts it.
- ``rule``: operators' rules (:mod:`meterhub.core.alarm_rules`, table ``alarm_rules``): a data point
  above / below a value, its rate of change per minute, or no data for N minutes, per model
  (product id) or site, with a level.

Flapping: every alarm has a hysteresis (thresholds: the value must come back past ``limit -+
hysteresis``; default 2 % of the limit) and minimum durations: the condition must hold for
``raise_after`` seconds before the alarm is raised and be gone for ``clear_after`` seconds before it is
cleared (defaults: settings ``alarm_raise_after`` / ``alarm_clear_after``, 10 s / 30 s; a ``tune`` rule
changes them per label, model or site). Durations are measured in report time ``t``; when no further report
comes, a timer in the event loop finishes the wait. An open alarm whose condition comes back while it
waits to clear is not raised again: its ``count`` goes up.

Times are the reports' measurement times ``t``; ``raised_at`` is when the condition began, ``cleared_at``
when it ended. Reports older than the newest one already seen for the same data point (buffered by a
gateway) do not change alarms. The monitor is a listener on ``ProtocolService.listeners``, keeps the
state of the devices it evaluates in a bounded cache (their active alarms and the latest values of
the watched data points, read from the database on a device's first report: that report and the
ones after it wait for the read, one batched query for every device missed meanwhile; at most
``max_devices``, those inserted longest ago evicted first unless a condition of theirs is on or being
debounced), and writes through the group-commit writer (op kinds
``alarm_raise``, ``alarm_clear``, ``alarm_update``, and ``notify`` for the notification outbox of
:mod:`meterhub.core.notify`, in the same commit as the change it tells of).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from meterhub.core.alarm_rules import RuleSet, Tuning
from meterhub.logs import get_logger
from meterhub.storage import schema
from meterhub.storage.database import GroupCommitWriter

log = get_logger(__name__)

FAULT = "fault"
THRESHOLD = "threshold"
RULE = "rule"
LEVEL_CODE = "alarm_level"
THRESHOLD_LEVEL = "general"
METER = "meter"
METERHUB = "meterhub"
LEVELS = ("general", "serious", "urgent")
DEFAULT_RAISE_AFTER = 10.0
DEFAULT_CLEAR_AFTER = 30.0
DEFAULT_HYSTERESIS = 0.02  # of the limit, for the built-in thresholds
#: Reports kept per device while its state is read (the oldest dropped beyond, counted).
WAIT_MAX = 256
#: Devices one read asks for.
LOAD_BATCH = 1000


def level_rank(level: str | None) -> int:
    return LEVELS.index(level) + 1 if level in LEVELS else 0


@dataclass(slots=True, frozen=True)
class Rule:
    label: str
    measure: str
    limit: str
    above: bool  # True: alarm when measure > limit; False: when measure < limit
    fault: str  # the meter's own fault label for the same condition

    def holds(self, measure: float, limit: float, on: bool, hysteresis: float) -> bool:
        """Whether the condition holds; once on, it must come back past the limit by ``hysteresis``."""
        if self.above:
            return measure > (limit - hysteresis if on else limit)
        return measure < (limit + hysteresis if on else limit)


RULES: tuple[Rule, ...] = (
    Rule("overvoltage", "voltage_current", "voltage_over", True, "ov_vol"),
    Rule("undervoltage", "voltage_current", "voltage_under", False, "undervoltage_alarm"),
    Rule("over_temp", "temp_current", "over_temp_value", True, "temp_dif_fault"),
    Rule("power_limit", "power_current", "power_limit", True, "high_power_alarm"),
    Rule("leakage", "leakage_current", "leakage_warn_value", True, "leakagecurr_alarm"),
)
_RULES_BY_CODE: dict[str, tuple[Rule, ...]] = {}
for _rule in RULES:
    for _code in (_rule.measure, _rule.limit):
        _RULES_BY_CODE[_code] = (*_RULES_BY_CODE.get(_code, ()), _rule)
WATCHED_CODES = frozenset({*_RULES_BY_CODE, LEVEL_CODE})
#: The meter's fault labels that are the same alarm as a built-in threshold.
MERGED_FAULTS: dict[str, str] = {r.fault: r.label for r in RULES}

Key = tuple[str, str]


def fault_key(label: str) -> Key:
    merged = MERGED_FAULTS.get(label)
    return (THRESHOLD, merged) if merged is not None else (FAULT, label)


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
    count: int = 1
    sources: list[str] | None = None
    last_raised_at: float | None = None

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
            "count": self.count,
            "sources": self.sources,
            "last_raised_at": self.last_raised_at,
        }


@dataclass(slots=True)
class _Condition:
    """One alarm's debouncing: which sources assert it, since when it is on / off (report time)."""

    asserted: dict[str, tuple[str | None, dict[str, Any] | None]] = field(default_factory=dict)
    on_since: float | None = None
    off_since: float | None = None
    timer: Any = None


@dataclass(slots=True)
class _DeviceAlarms:
    """Per device: the newest value (and its t) of each watched data point, the active alarms and
    the conditions being debounced."""

    values: dict[str, tuple[float, Any]] = field(default_factory=dict)
    active: dict[Key, Alarm] = field(default_factory=dict)
    conditions: dict[Key, _Condition] = field(default_factory=dict)
    previous: dict[str, tuple[float, float]] = field(default_factory=dict)  # for rate rules
    product_id: str | None = None


class AlarmMonitor:
    """Raises and clears alarms from report events (see the module docstring)."""

    def __init__(
        self, engine: Engine, writer: GroupCommitWriter, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.clock = clock
        #: The devices' state in memory, bounded (see the module docstring), oldest first.
        self.devices: OrderedDict[str, _DeviceAlarms] = OrderedDict()
        self.max_devices = 200_000  # settings.device_cache_max
        #: Devices being read: what waits for the read (report events; futures of ensure()).
        self._waiting: dict[str, list[Any]] = {}
        self._to_load: list[str] = []
        self._loader: asyncio.Task[None] | None = None
        #: Cluster: whether this node holds the device's gateway (the no-data sweep covers those
        #: only, so each device is swept by one node); None: every device in memory (one node).
        self.holds: Callable[[str], bool] | None = None
        #: Active alarms stored (every node's), refreshed by :meth:`count_active`.
        self.active_total = 0
        self.loaded = 0
        self.evicted = 0
        self.dropped = 0
        self.next_id = 1
        # Cluster mode: ids from blocks reserved in the database (meterhub.cluster.ids), so that two
        # nodes never give out the same one; None: this process is the table's only writer.
        self.ids: Any = None
        self.watched: dict[str, str] = {}
        self.models: list[Any] = []
        self.rules = RuleSet()
        self.raise_after = DEFAULT_RAISE_AFTER  # settings.alarm_raise_after / alarm_clear_after
        self.clear_after = DEFAULT_CLEAR_AFTER
        # notifications: (event, alarm, site_id) -> writer ops for the outbox (meterhub.core.notify)
        self.notify: Callable[[str, Alarm, int | None], list[Any]] | None = None
        self.raised = 0
        self.cleared = 0
        self.repeats = 0

    # --- start -----------------------------------------------------------------------------------

    def load(self, watched_dp_ids: dict[str, str]) -> None:
        """Read rules, active alarms and the latest values of the watched data points (blocking; run
        it in a thread). ``watched_dp_ids`` maps dp id -> code for the data points of interest."""
        a = schema.alarms
        self.rules = RuleSet.read(self.engine)
        self.watched = dict(watched_dp_ids)
        self._watch_rule_codes()
        with self.engine.connect() as conn:
            self.next_id = (conn.execute(select(func.max(a.c.id))).scalar() or 0) + 1
        self.count_active()
        log.info("alarms ready", active=self.active_total, next_id=self.next_id, rules=len(self.rules))

    def count_active(self) -> int:
        """Count the stored active alarms (blocking; every few seconds, for the metric)."""
        a = schema.alarms
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(a).where(a.c.cleared_at.is_(None))).scalar()
        self.active_total = int(total or 0)
        return self.active_total

    def _watch_rule_codes(self) -> None:
        codes = self.rules.codes()
        for model in self.models:
            for dp in model:
                if dp.code in codes and dp.id_str not in self.watched:
                    self.watched[dp.id_str] = dp.code

    def reload_rules(self) -> None:
        """Read the rules again (blocking; the API calls it after a change, nodes every few seconds)."""
        self.rules = RuleSet.read(self.engine)
        self._watch_rule_codes()

    def read_devices(self, cids: list[str] | None) -> dict[str, _DeviceAlarms]:
        """The stored state of some devices (all: None; blocking). For a cluster node taking their
        gateway over: another node raised and cleared their alarms meanwhile. Apply it with
        :meth:`replace`."""
        a, lv, d = schema.alarms, schema.latest, schema.devices
        out: dict[str, _DeviceAlarms] = {cid: _DeviceAlarms() for cid in cids or ()}

        def dev(cid: str) -> _DeviceAlarms:
            got = out.get(cid)
            if got is None:
                got = out[cid] = _DeviceAlarms()
            return got

        watched = self.watched
        chunks = [None] if cids is None else [cids[i : i + 1000] for i in range(0, len(cids), 1000)]
        with self.engine.connect() as conn:
            for chunk in chunks:
                q = select(a).where(a.c.cleared_at.is_(None))
                if chunk is not None:
                    q = q.where(a.c.cid.in_(chunk))
                for row in conn.execute(q).all():
                    alarm = Alarm(**row._mapping)
                    dev(alarm.cid).active[(alarm.kind, alarm.label)] = alarm
                if watched:
                    q = select(lv.c.cid, lv.c.dp_id, lv.c.value, lv.c.num, lv.c.t).where(
                        lv.c.dp_id.in_(list(watched))
                    )
                    if chunk is not None:
                        q = q.where(lv.c.cid.in_(chunk))
                    for cid, dp_id, value, num, t in conn.execute(q).all():
                        code = watched[dp_id]
                        dev(cid).values[code] = (t, value if code in (LEVEL_CODE, FAULT) else num)
                q = select(d.c.cid, d.c.product_id)
                if chunk is not None:
                    q = q.where(d.c.cid.in_(chunk))
                for cid, product_id in conn.execute(q).all():
                    if cid in out:
                        out[cid].product_id = product_id
        for state in out.values():  # what was active stays asserted until a report says otherwise
            for key, alarm in state.active.items():
                cond = state.conditions[key] = _Condition()
                for source in alarm.sources or [METER if key[0] == FAULT else METERHUB]:
                    cond.asserted[source] = (alarm.level, alarm.details)
        return out

    def replace(self, state: dict[str, _DeviceAlarms]) -> None:
        """Take devices' state read by :meth:`read_devices` (in the event loop)."""
        for cid in state:
            old = self.devices.get(cid)
            if old is not None:
                for cond in old.conditions.values():
                    if cond.timer is not None:
                        cond.timer.cancel()
        self.devices.update(state)
        self._evict()

    def _device(self, cid: str) -> _DeviceAlarms:
        dev = self.devices.get(cid)
        if dev is None:
            dev = self.devices[cid] = _DeviceAlarms()
            self._evict()
        return dev

    def _evict(self) -> None:
        """Forget the devices inserted longest ago beyond ``max_devices``, except those with a
        condition on or being debounced (their state is not only in the database)."""
        devices = self.devices
        over = len(devices) - self.max_devices
        if over <= 0:
            return
        for cid in list(itertools.islice(devices, min(len(devices), over * 4 + 16))):
            if over <= 0:
                break
            if devices[cid].conditions or cid in self._waiting:
                continue
            del devices[cid]
            self.evicted += 1
            over -= 1

    # --- loading on demand -----------------------------------------------------------------------

    async def ensure(self, cid: str) -> None:
        """Have the device's state in memory (read it from the database if need be)."""
        if cid in self.devices and cid not in self._waiting:
            return
        fut = asyncio.get_running_loop().create_future()
        self._wait(cid, fut)
        await fut

    def _wait(self, cid: str, item: Any) -> None:
        waiting = self._waiting.get(cid)
        if waiting is None:
            waiting = self._waiting[cid] = []
            self._to_load.append(cid)
            if self._loader is None or self._loader.done():
                self._loader = asyncio.get_running_loop().create_task(self._load_waiting())
        if len(waiting) >= WAIT_MAX:
            for i, old in enumerate(waiting):
                if not isinstance(old, asyncio.Future):
                    del waiting[i]
                    self.dropped += 1
                    break
        waiting.append(item)

    async def _load_waiting(self) -> None:
        """Read the devices waiting, a batch at a time, then evaluate what waited for them in order."""
        while self._to_load:
            batch, self._to_load = self._to_load[:LOAD_BATCH], self._to_load[LOAD_BATCH:]
            try:
                state = await asyncio.to_thread(self.read_devices, batch)
            except Exception as exc:
                log.error(
                    "alarm state not read: reports not evaluated", devices=len(batch), error=str(exc)[:200]
                )
                state = None
            for cid in batch:
                items = self._waiting.pop(cid, [])
                if state is not None and cid not in self.devices:
                    self.devices[cid] = state.get(cid) or _DeviceAlarms()
                    self.loaded += 1
                for item in items:
                    if isinstance(item, asyncio.Future):
                        if not item.done():
                            if state is None:
                                item.set_exception(RuntimeError("alarm state not read"))
                            else:
                                item.set_result(None)
                    elif state is not None:
                        self._evaluate(item)
                    else:
                        self.dropped += 1
            self._evict()

    # --- the listener ----------------------------------------------------------------------------

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind != "report":
            return
        dp = event["dp"]
        if dp.type != FAULT and dp.code not in WATCHED_CODES and dp.code not in self.rules.codes():
            return
        cid = event["cid"]
        if cid not in self.devices or cid in self._waiting:
            self._wait(cid, event)  # evaluated once its state is read
            return
        self._evaluate(event)

    def _evaluate(self, event: dict[str, Any]) -> None:
        dp = event["dp"]
        if dp.type == FAULT:
            dev = self._device(event["cid"])
            dev.product_id = event.get("product_id") or dev.product_id
            self._on_fault(event["cid"], event["value"], event["t"])
        elif dp.code in WATCHED_CODES or dp.code in self.rules.codes():
            dev = self._device(event["cid"])
            dev.product_id = event.get("product_id") or dev.product_id
            self._on_value(event["cid"], dp.code, event["value"], event["num"], event["t"])

    def _newer(self, dev: _DeviceAlarms, code: str, t: float, value: Any) -> bool:
        seen = dev.values.get(code)
        if seen is not None and t < seen[0]:
            return False  # a buffered, older report
        dev.values[code] = (t, value)
        return True

    def _level(self, dev: _DeviceAlarms) -> str | None:
        seen = dev.values.get(LEVEL_CODE)
        return seen[1] if seen else None

    def _on_fault(self, cid: str, labels: list[str], t: float) -> None:
        dev = self._device(cid)
        if not self._newer(dev, FAULT, t, labels):
            return
        ops: list[Any] = []
        now_keys = {fault_key(label): label for label in labels}
        level = self._level(dev)
        for key, cond in list(dev.conditions.items()):
            if METER in cond.asserted and key not in now_keys:
                self._assert(dev, cid, key, METER, False, None, None, t, ops)
        for key, label in now_keys.items():
            details = {"fault": label} if key[0] != FAULT else None
            self._assert(dev, cid, key, METER, True, level, details, t, ops)
        if ops:
            self.writer.submit(ops)

    def _on_value(self, cid: str, code: str, value: Any, num: float | None, t: float) -> None:
        dev = self._device(cid)
        ops: list[Any] = []
        if code == LEVEL_CODE:
            if not self._newer(dev, code, t, value):
                return
            for key, cond in dev.conditions.items():
                if METER in cond.asserted:
                    cond.asserted[METER] = (value, cond.asserted[METER][1])
                    alarm = dev.active.get(key)
                    if alarm is not None:
                        self._update_level(dev, alarm, cond, ops)
        else:
            if num is None:
                return
            prev = dev.values.get(code)
            if not self._newer(dev, code, t, num):
                return
            if prev is not None and t > prev[0]:
                dev.previous[code] = (prev[0], prev[1])
            for rule in _RULES_BY_CODE.get(code, ()):
                self._check(dev, cid, rule, t, ops)
            self._check_operator_rules(dev, cid, code, t, ops)
        if ops:
            self.writer.submit(ops)

    def _site(self, cid: str) -> int | None:
        return self.rules.site_of.get(cid)

    def _tuning(self, dev: _DeviceAlarms, cid: str, key: Key) -> Tuning:
        return self.rules.tuning(key[1], dev.product_id, self._site(cid))

    def _check(self, dev: _DeviceAlarms, cid: str, rule: Rule, t: float, ops: list[Any]) -> None:
        measure = dev.values.get(rule.measure)
        limit = dev.values.get(rule.limit)
        key = (THRESHOLD, rule.label)
        cond = dev.conditions.get(key)
        was_on = cond is not None and METERHUB in cond.asserted
        on = False
        details = None
        if measure is not None and limit is not None and limit[1] != 0:
            tune = self._tuning(dev, cid, key)
            hyst = tune.hysteresis if tune.hysteresis is not None else abs(limit[1]) * DEFAULT_HYSTERESIS
            on = rule.holds(measure[1], limit[1], was_on, hyst)
            details = {
                "measure": rule.measure,
                "value": measure[1],
                "limit_code": rule.limit,
                "limit": limit[1],
                "rule": ">" if rule.above else "<",
            }
        self._assert(dev, cid, key, METERHUB, on, THRESHOLD_LEVEL, details, t, ops)

    def _check_operator_rules(
        self, dev: _DeviceAlarms, cid: str, code: str, t: float, ops: list[Any]
    ) -> None:
        site = self._site(cid)
        for rule in self.rules.detecting(code, dev.product_id, site):
            key = (RULE, rule.label)
            cond = dev.conditions.get(key)
            was_on = cond is not None and METERHUB in cond.asserted
            value = dev.values[code][1]
            if rule.kind == "rate":
                prev = dev.previous.get(code)
                if prev is None:
                    continue
                value = abs(value - prev[1]) / max(t - prev[0], 1e-9) * 60.0
            if rule.kind == "no_data":
                on = False  # a report came: data is there
            elif rule.kind == "below":
                on = value < (rule.value + rule.hysteresis if was_on else rule.value)
            else:
                on = value > (rule.value - rule.hysteresis if was_on else rule.value)
            details = {
                "rule_id": rule.id,
                "code": code,
                "value": value,
                "kind": rule.kind,
                "limit": rule.value,
            }
            self._assert(dev, cid, key, METERHUB, on, rule.level, details, t, ops)

    def sweep_no_data(self, now: float | None = None) -> None:
        """Raise ``no_data`` rules' alarms for meters silent on a data point for N minutes (called
        every few seconds in the event loop)."""
        now = self.clock() if now is None else now
        ops: list[Any] = []
        holds = self.holds
        for rule in self.rules.no_data():
            key = (RULE, rule.label)
            for cid, dev in self.devices.items():
                if holds is not None and not holds(cid):
                    continue  # another node holds its gateway: swept there
                if not self.rules.matches(rule, dev.product_id, self._site(cid)):
                    continue
                seen = dev.values.get(rule.code or "")
                if seen is None or key in dev.active:
                    continue
                if now - seen[0] >= rule.value * 60.0:
                    details = {"rule_id": rule.id, "code": rule.code, "last_t": seen[0], "kind": "no_data"}
                    self._assert(dev, cid, key, METERHUB, True, rule.level, details, now, ops)
        if ops:
            self.writer.submit(ops)

    # --- debouncing ------------------------------------------------------------------------------

    def _assert(
        self,
        dev: _DeviceAlarms,
        cid: str,
        key: Key,
        source: str,
        on: bool,
        level: str | None,
        details: dict[str, Any] | None,
        t: float,
        ops: list[Any],
    ) -> None:
        """One source says the condition ``key`` is on or off at ``t``."""
        cond = dev.conditions.get(key)
        if cond is None:
            if not on:
                return
            cond = dev.conditions[key] = _Condition()
        if on:
            cond.asserted[source] = (level, details)
        else:
            cond.asserted.pop(source, None)
        self._step(dev, cid, key, cond, t, ops)

    def _step(
        self, dev: _DeviceAlarms, cid: str, key: Key, cond: _Condition, t: float, ops: list[Any]
    ) -> None:
        alarm = dev.active.get(key)
        tune = self._tuning(dev, cid, key)
        raise_after = self.raise_after if tune.raise_after is None else tune.raise_after
        clear_after = self.clear_after if tune.clear_after is None else tune.clear_after
        if cond.asserted:
            if alarm is None:
                if cond.on_since is None:
                    cond.on_since = t
                if t - cond.on_since >= raise_after:
                    self._do_raise(dev, cid, key, cond, cond.on_since, ops)
                else:
                    self._arm(cid, key, cond, raise_after - (t - cond.on_since))
            else:
                if cond.off_since is not None:  # came back while waiting to clear: counted
                    cond.off_since = None
                    self._cancel(cond)
                    alarm.count += 1
                    alarm.last_raised_at = t
                    self.repeats += 1
                    ops.append(("alarm_update", {"id": alarm.id, "count": alarm.count, "last_raised_at": t}))
                self._update_sources(alarm, cond, ops)
                self._update_level(dev, alarm, cond, ops)
        else:
            if alarm is None:
                self._cancel(cond)
                del dev.conditions[key]
                return
            if cond.off_since is None:
                cond.off_since = t
            if t - cond.off_since >= clear_after:
                self._do_clear(dev, alarm, cond.off_since, ops)
            else:
                self._arm(cid, key, cond, clear_after - (t - cond.off_since))

    def _arm(self, cid: str, key: Key, cond: _Condition, delay: float) -> None:
        self._cancel(cond)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        cond.timer = loop.call_later(max(delay, 0.0), self._timer_fired, cid, key, cond)

    @staticmethod
    def _cancel(cond: _Condition) -> None:
        if cond.timer is not None:
            cond.timer.cancel()
            cond.timer = None

    def _timer_fired(self, cid: str, key: Key, cond: _Condition) -> None:
        """No report changed the condition while it waited: it held long enough."""
        cond.timer = None
        dev = self.devices.get(cid)
        if dev is None or dev.conditions.get(key) is not cond:
            return
        ops: list[Any] = []
        alarm = dev.active.get(key)
        if cond.asserted and alarm is None and cond.on_since is not None:
            self._do_raise(dev, cid, key, cond, cond.on_since, ops)
        elif not cond.asserted and alarm is not None and cond.off_since is not None:
            self._do_clear(dev, alarm, cond.off_since, ops)
        if ops:
            self.writer.submit(ops)

    def _merged_level(self, cond: _Condition) -> str | None:
        levels = [lv for lv, _ in cond.asserted.values()]
        return max(levels, key=level_rank) if levels else None

    def _merged_details(self, cond: _Condition) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for source in (METER, METERHUB):
            got = cond.asserted.get(source)
            if got is not None and got[1]:
                out.update(got[1])
        return out or None

    def _update_sources(self, alarm: Alarm, cond: _Condition, ops: list[Any]) -> None:
        sources = sorted(set(alarm.sources or ()) | set(cond.asserted))
        if sources != alarm.sources:
            alarm.sources = sources
            alarm.details = {**(alarm.details or {}), **(self._merged_details(cond) or {})}
            ops.append(("alarm_update", {"id": alarm.id, "sources": sources, "details": alarm.details}))

    def _update_level(self, dev: _DeviceAlarms, alarm: Alarm, cond: _Condition, ops: list[Any]) -> None:
        level = self._merged_level(cond)
        if level is None or level == alarm.level:
            return
        escalated = level_rank(level) > level_rank(alarm.level)
        alarm.level = level
        ops.append(("alarm_update", {"id": alarm.id, "level": level}))
        if escalated:
            self._notify("escalate", alarm, ops)

    def _do_raise(
        self, dev: _DeviceAlarms, cid: str, key: Key, cond: _Condition, t: float, ops: list[Any]
    ) -> None:
        self._cancel(cond)
        cond.on_since = None
        cond.off_since = None
        kind = key[0]
        sources = sorted(cond.asserted)
        self._raise(dev, cid, kind, key[1], self._merged_level(cond), t, self._merged_details(cond), ops)
        dev.active[key].sources = sources
        ops[-1][1]["sources"] = sources
        self._notify("raise", dev.active[key], ops)

    def _do_clear(self, dev: _DeviceAlarms, alarm: Alarm, t: float, ops: list[Any]) -> None:
        key = (alarm.kind, alarm.label)
        cond = dev.conditions.pop(key, None)
        if cond is not None:
            self._cancel(cond)
        self._clear(dev, alarm, t, ops)
        self._notify("clear", alarm, ops)

    def _notify(self, event: str, alarm: Alarm, ops: list[Any]) -> None:
        if self.notify is not None:
            ops.extend(self.notify(event, alarm, self._site(alarm.cid)))

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
        alarm = Alarm(alarm_id, cid, kind, label, level, t, details=details, last_raised_at=t)
        dev.active[(kind, label)] = alarm
        self.raised += 1
        self.active_total += 1
        ops.append(("alarm_raise", alarm.as_dict()))
        log.info("alarm raised", cid=cid, kind=kind, label=label, level=level, id=alarm.id)

    def _clear(self, dev: _DeviceAlarms, alarm: Alarm, t: float, ops: list[Any]) -> None:
        cleared_at = max(t, alarm.raised_at)
        alarm.cleared_at = cleared_at
        dev.active.pop((alarm.kind, alarm.label), None)
        self.cleared += 1
        self.active_total = max(0, self.active_total - 1)
        ops.append(("alarm_clear", {"id": alarm.id, "cleared_at": cleared_at}))
        log.info("alarm cleared", cid=alarm.cid, kind=alarm.kind, label=alarm.label, id=alarm.id)

    # --- raised by other components (prepaid) ----------------------------------------------------

    def raise_now(
        self, cid: str, kind: str, label: str, level: str | None, t: float, details: dict[str, Any] | None
    ) -> Alarm | None:
        """Raise an alarm decided elsewhere (e.g. prepaid's ``low_credit``) at once, without
        debouncing; nothing when it is already active. In the event loop."""
        dev = self._device(cid)
        key = (kind, label)
        if key in dev.active:
            return None
        ops: list[Any] = []
        self._raise(dev, cid, kind, label, level, t, details, ops)
        alarm = dev.active[key]
        alarm.sources = [METERHUB]
        ops[-1][1]["sources"] = alarm.sources
        self._notify("raise", alarm, ops)
        self.writer.submit(ops)
        return alarm

    def clear_now(self, cid: str, kind: str, label: str, t: float) -> Alarm | None:
        """Clear an alarm raised with :meth:`raise_now`; nothing when it is not active."""
        dev = self._device(cid)
        alarm = dev.active.get((kind, label))
        if alarm is None:
            return None
        ops: list[Any] = []
        self._do_clear(dev, alarm, t, ops)
        self.writer.submit(ops)
        return alarm

    # --- queries and operator actions ------------------------------------------------------------

    def active_count(self) -> int:
        """Active alarms of the devices in memory (:attr:`active_total`: all stored ones)."""
        return sum(len(d.active) for d in self.devices.values())

    async def active_of(self, cid: str) -> list[Alarm]:
        """The device's active alarms (its state read first if it is not in memory)."""
        await self.ensure(cid)
        return self.active_for(cid)

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
