"""What a person types for a command (real units: ``207`` V, ``true``, a label) -> the wire value.

Works on a data point as the API describes it (``GET /api/v1/models/{model}``), so a model loaded only
by the server is converted the same way. A number is taken exactly (as a decimal): a value the data
point's scale and step cannot represent is refused with the values that are allowed.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["ValueText", "allowed_values", "to_raw"]


class ValueText(ValueError):
    """A typed value the data point cannot take; the message says what it can take."""


def _unit(dp: dict[str, Any]) -> str:
    return dp.get("display_unit") or dp.get("unit") or ""


def _real(dp: dict[str, Any], raw: int) -> str:
    value = Decimal(raw).scaleb(-int(dp.get("scale") or 0))
    text = format(value.normalize(), "f") if value else "0"
    return text


def allowed_values(dp: dict[str, Any]) -> str:
    """``0 to 100000 V in steps of 0.0001 V`` (a value data point), the labels, or the type."""
    kind = dp.get("type")
    if kind == "value":
        unit = _unit(dp)
        u = f" {unit}" if unit else ""
        return (
            f"{_real(dp, dp.get('min') or 0)} to {_real(dp, dp.get('max') or 0)}{u} "
            f"in steps of {_real(dp, dp.get('step') or 1)}{u}"
        )
    if kind == "bool":
        return "true or false"
    if kind in ("enum", "fault"):
        return "one of " + ", ".join(label["label"] for label in dp.get("labels") or [])
    return f"a {kind} value"


def to_raw(dp: dict[str, Any], text: str) -> Any:
    """The wire value for ``text`` typed in the data point's real unit; ``ValueText`` when it cannot be."""
    kind = dp.get("type")
    name = f"{dp.get('code')} (dp {dp.get('id')})"
    if kind == "value":
        cleaned = text.strip()
        unit = _unit(dp)
        if unit and cleaned.endswith(unit):  # "207 V" / "207V"
            cleaned = cleaned[: -len(unit)].strip()
        try:
            number = Decimal(cleaned)
        except InvalidOperation:
            raise ValueText(f"{name} takes a number in {unit or 'its unit'}: {allowed_values(dp)}") from None
        if not number.is_finite():
            raise ValueText(f"{name}: {text} is not a number; allowed: {allowed_values(dp)}")
        scaled = number.scaleb(int(dp.get("scale") or 0))
        low, high, step = dp.get("min") or 0, dp.get("max") or 0, dp.get("step") or 1
        if scaled != scaled.to_integral_value() or (int(scaled) - low) % step:
            raise ValueText(f"{name}: {text} {unit} is not representable; allowed: {allowed_values(dp)}")
        raw = int(scaled)
        if not low <= raw <= high:
            raise ValueText(f"{name}: {text} {unit} is out of range; allowed: {allowed_values(dp)}")
        return raw
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "on", "1", "yes"):
            return True
        if lowered in ("false", "off", "0", "no"):
            return False
        raise ValueText(f"{name} takes {allowed_values(dp)}, not {text!r}")
    if kind == "enum":
        labels = [label["label"] for label in dp.get("labels") or []]
        if text.strip() not in labels:
            raise ValueText(f"{name} takes {allowed_values(dp)}, not {text!r}")
        return text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text
