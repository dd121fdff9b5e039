"""Operators' alarm rules (table ``alarm_rules``): what raises ``rule`` alarms, and ``tune`` rows that
set hysteresis and minimum durations of any alarm label, per model (product id) and / or site.

Kinds: ``above`` / ``below`` (``code`` compared with ``value`` in real units), ``rate`` (the change of
``code`` per minute, absolute, above ``value``), ``no_data`` (no report of ``code`` for ``value``
minutes), ``tune`` (only ``label``, ``hysteresis``, ``raise_after``, ``clear_after``; label ``*``: every
alarm without a row of its own).
When several rows fit a meter, the most specific wins: site and model, then site, then model, then
neither. :class:`RuleSet` is the in-memory form the alarm monitor evaluates; the functions below are
what the API and CLI call (blocking).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from meterhub.storage import schema

KINDS = ("above", "below", "rate", "no_data", "tune")
LEVELS = ("general", "serious", "urgent")
R = schema.alarm_rules


class RuleError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, frozen=True)
class AlarmRule:
    id: int
    product_id: str | None
    site_id: int | None
    kind: str
    code: str | None
    value: float | None
    label: str
    level: str
    hysteresis: float
    raise_after: float
    clear_after: float
    enabled: bool
    created_at: float
    updated_at: float

    @property
    def specificity(self) -> int:
        return (2 if self.site_id is not None else 0) + (1 if self.product_id is not None else 0)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True, frozen=True)
class Tuning:
    """Hysteresis (real units) and durations (s); None: the monitor's default."""

    hysteresis: float | None = None
    raise_after: float | None = None
    clear_after: float | None = None


_NO_TUNING = Tuning()


@dataclass(slots=True)
class RuleSet:
    rules: list[AlarmRule] = field(default_factory=list)
    site_of: dict[str, int] = field(default_factory=dict)  # cid -> site id (meter assignments)
    _codes: frozenset[str] = frozenset()
    _tuning: dict[tuple[str, str | None, int | None], Tuning] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._codes = frozenset(r.code for r in self.rules if r.kind != "tune" and r.code)

    def __len__(self) -> int:
        return len(self.rules)

    @classmethod
    def read(cls, engine: Engine) -> RuleSet:
        with engine.connect() as conn:
            rows = conn.execute(select(R).where(R.c.enabled.is_(True)).order_by(R.c.id)).all()
            ma = schema.meter_assignments
            sites = dict(conn.execute(select(ma.c.cid, ma.c.site_id)).all())
        return cls([AlarmRule(**r._mapping) for r in rows], sites)

    def codes(self) -> frozenset[str]:
        return self._codes

    @staticmethod
    def matches(rule: AlarmRule, product_id: str | None, site_id: int | None) -> bool:
        return (rule.product_id is None or rule.product_id == product_id) and (
            rule.site_id is None or rule.site_id == site_id
        )

    def _best(self, rules: Iterable[AlarmRule]) -> dict[str, AlarmRule]:
        best: dict[str, AlarmRule] = {}
        for rule in rules:
            got = best.get(rule.label)
            if got is None or rule.specificity > got.specificity:
                best[rule.label] = rule
        return best

    def detecting(self, code: str, product_id: str | None, site_id: int | None) -> list[AlarmRule]:
        """The rules on ``code`` for this meter (one per label, the most specific)."""
        if code not in self._codes:
            return []
        fit = (
            r
            for r in self.rules
            if r.code == code and r.kind != "tune" and self.matches(r, product_id, site_id)
        )
        return list(self._best(fit).values())

    def no_data(self) -> list[AlarmRule]:
        return [r for r in self.rules if r.kind == "no_data"]

    def tuning(self, label: str, product_id: str | None, site_id: int | None) -> Tuning:
        key = (label, product_id, site_id)
        got = self._tuning.get(key)
        if got is None:
            fit = [
                r
                for r in self.rules
                if (r.label == label or (r.label == "*" and r.kind == "tune"))
                and self.matches(r, product_id, site_id)
            ]
            best = max(fit, key=lambda r: (r.specificity, r.label != "*"), default=None)
            got = (
                Tuning(best.hysteresis, best.raise_after, best.clear_after)
                if best is not None
                else _NO_TUNING
            )
            if len(self._tuning) < 100_000:
                self._tuning[key] = got
        return got


# --- the API's and CLI's operations ----------------------------------------------------------------

_FIELDS = (
    "product_id",
    "site_id",
    "kind",
    "code",
    "value",
    "label",
    "level",
    "hysteresis",
    "raise_after",
    "clear_after",
    "enabled",
)


def _validate(data: dict[str, Any]) -> dict[str, Any]:
    kind = data.get("kind")
    if kind not in KINDS:
        raise RuleError(422, f"kind must be one of {', '.join(KINDS)}")
    if data.get("level", "general") not in LEVELS:
        raise RuleError(422, f"level must be one of {', '.join(LEVELS)}")
    label = data.get("label")
    if not isinstance(label, str) or not 1 <= len(label) <= 64:
        raise RuleError(422, "label: 1 to 64 characters")
    if kind != "tune":
        if not data.get("code"):
            raise RuleError(422, f"a {kind} rule needs the data point code it watches")
        if data.get("value") is None:
            raise RuleError(422, f"a {kind} rule needs a value")
        if kind in ("rate", "no_data") and data["value"] <= 0:
            raise RuleError(422, f"a {kind} rule's value must be above 0")
    for name in ("hysteresis", "raise_after", "clear_after"):
        if (data.get(name) or 0) < 0:
            raise RuleError(422, f"{name} must not be negative")
    return data


def create_rule(engine: Engine, data: dict[str, Any]) -> dict[str, Any]:
    row = {k: data.get(k) for k in _FIELDS}
    row.update(
        level=row["level"] or "general",
        hysteresis=row["hysteresis"] or 0.0,
        raise_after=row["raise_after"] or 0.0,
        clear_after=row["clear_after"] or 0.0,
        enabled=True if row["enabled"] is None else row["enabled"],
    )
    _validate(row)
    now = time.time()
    with engine.begin() as conn:
        if (
            row["site_id"] is not None
            and conn.execute(select(schema.sites.c.id).where(schema.sites.c.id == row["site_id"])).first()
            is None
        ):
            raise RuleError(404, f"site {row['site_id']} not found")
        rule_id = conn.execute(insert(R).values(**row, created_at=now, updated_at=now)).inserted_primary_key[
            0
        ]
    return get_rule(engine, int(rule_id))


def get_rule(engine: Engine, rule_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(select(R).where(R.c.id == rule_id)).first()
    if row is None:
        raise RuleError(404, f"rule {rule_id} not found")
    return dict(row._mapping)


def list_rules(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(R).order_by(R.c.id)).all()]


def update_rule(engine: Engine, rule_id: int, changes: dict[str, Any]) -> dict[str, Any]:
    current = get_rule(engine, rule_id)
    merged = {**current, **{k: v for k, v in changes.items() if k in _FIELDS}}
    _validate(merged)
    with engine.begin() as conn:
        conn.execute(
            update(R)
            .where(R.c.id == rule_id)
            .values(**{k: merged[k] for k in _FIELDS}, updated_at=time.time())
        )
    return get_rule(engine, rule_id)


def delete_rule(engine: Engine, rule_id: int) -> None:
    with engine.begin() as conn:
        if conn.execute(delete(R).where(R.c.id == rule_id)).rowcount != 1:
            raise RuleError(404, f"rule {rule_id} not found")
