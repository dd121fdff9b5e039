"""Real values <-> wire values for a product model's data points (no I/O).

A gateway thinks in real units (230.1 V, a list of fault labels, a phase's volts/amperes/watts); the
protocol carries Tuya's wire forms (a raw integer ``round(real * 10**scale)``, a fault bitmap, base64 of
the 8-byte phase layout). ``to_wire`` converts and checks the result with the model exactly as the
server will, so a bad value is a local ``InvalidValue`` (a ``ValueError``) instead of an error code
coming back later. ``to_real`` is the inverse, used for the values of incoming commands.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

from meterhub.model.coerce import PHASE_BYTES, encode_phase_bytes
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.errors import ValueRejected
from meterhub.protocol.errors import ErrorCode

__all__ = ["PHASE_ENCODINGS", "InvalidValue", "resolve", "to_real", "to_wire"]

#: How phase_a/b/c go on the wire: "binary" = base64 of Tuya's 8 bytes (voltage 0.1 V, current mA,
#: power W; no energy), "object" = the document's ``{"voltage", "current", "power", "electricity"}``.
PHASE_ENCODINGS = ("binary", "object")


class InvalidValue(ValueError):
    """A value (or data point) the server would refuse; ``code`` is the error code it would answer."""

    def __init__(self, code: int, message: str, dp: DataPoint | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.dp = dp


def resolve(model: ProductModel, dp: DataPoint | int | str) -> DataPoint:
    """The data point named by id (``5``, ``"5"``), code (``"voltage_current"``) or ``DataPoint``.

    Raises ``InvalidValue(2002)`` for a data point the model does not have.
    """
    found: DataPoint | None
    if isinstance(dp, DataPoint):
        found = model.get(dp.id)
        if found is not None and found.code != dp.code:
            found = None
    elif isinstance(dp, bool):
        found = None
    elif isinstance(dp, int):
        found = model.get(dp)
    elif isinstance(dp, str):
        found = model.get(dp) or model.by_code(dp)
    else:
        found = None
    if found is None:
        raise InvalidValue(ErrorCode.NOT_SUPPORTED, f"{model.model}: unknown data point {dp!r}")
    return found


def _rejected(dp: DataPoint, exc: ValueRejected) -> InvalidValue:
    return InvalidValue(exc.code, f"invalid value for {dp.code} (dp {dp.id}): {exc.message}", dp)


def _raw_integer(dp: DataPoint, value: Any) -> int:
    """A real number in the data point's unit -> its raw integer, rounded to the data point's resolution."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise InvalidValue(
            ErrorCode.PARAMS_TYPE_INCORRECT,
            f"{dp.code} (dp {dp.id}) takes a number in {dp.display_unit or 'its unit'}, "
            f"got {type(value).__name__} {value!r}",
            dp,
        )
    factor = 10**dp.scale
    if isinstance(value, int):
        return value * factor
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(
                ErrorCode.PARAMS_RANGE_INVALID, f"{dp.code} (dp {dp.id}): {value} is not finite", dp
            )
        return round(value * factor)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidValue(
                ErrorCode.PARAMS_RANGE_INVALID, f"{dp.code} (dp {dp.id}): {value} is not finite", dp
            )
        return int((value * factor).to_integral_value())
    return round(value * factor)


def _value_wire(dp: DataPoint, value: Any) -> int:
    raw = _raw_integer(dp, value)
    try:
        return dp.coerce(raw)  # type: ignore[no-any-return]
    except ValueRejected:
        assert dp.min is not None and dp.max is not None
        unit = f" {dp.display_unit}" if dp.display_unit else ""
        low, high = dp.scaled(dp.min), dp.scaled(dp.max)
        if dp.min <= raw <= dp.max:  # step
            reason = f"not a multiple of {dp.scaled(dp.step or 1)}{unit} from {low}{unit}"
        else:
            reason = f"outside [{low}, {high}]{unit}"
        raise InvalidValue(
            ErrorCode.PARAMS_RANGE_INVALID, f"{dp.code} (dp {dp.id}): {value}{unit} is {reason}", dp
        ) from None


def _phase_wire(dp: DataPoint, value: Any, encoding: str) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) != PHASE_BYTES:
            raise InvalidValue(
                ErrorCode.PARAMS_RANGE_INVALID,
                f"{dp.code} (dp {dp.id}): phase data must be {PHASE_BYTES} bytes, got {len(data)}",
                dp,
            )
        return base64.b64encode(data).decode("ascii")
    if isinstance(value, str):  # already base64 / hex: checked, sent as given
        try:
            dp.coerce(value)
        except ValueRejected as exc:
            raise _rejected(dp, exc) from None
        return value
    if isinstance(value, Mapping):
        try:
            canonical = dp.coerce(dict(value))
        except ValueRejected as exc:
            raise _rejected(dp, exc) from None
        if encoding == "object":
            return dp.to_wire(canonical)
        try:
            data = encode_phase_bytes(canonical["voltage"], canonical["current"], canonical["power"])
        except OverflowError:
            raise InvalidValue(
                ErrorCode.PARAMS_RANGE_INVALID,
                f"{dp.code} (dp {dp.id}): {canonical} does not fit the 8-byte phase layout "
                "(voltage < 6553.6 V, current < 16777.216 A, power < 16777216 W)",
                dp,
            ) from None
        return base64.b64encode(data).decode("ascii")
    raise InvalidValue(
        ErrorCode.PARAMS_TYPE_INCORRECT,
        f"{dp.code} (dp {dp.id}) takes {{'voltage': V, 'current': A, 'power': W}}, 8 bytes, or a "
        f"base64/hex string; got {type(value).__name__}",
        dp,
    )


def to_wire(dp: DataPoint, value: Any, *, raw: bool = False, phase_encoding: str = "binary") -> Any:
    """The wire value for reporting ``value`` (in real units) on ``dp``; ``InvalidValue`` if the server
    would refuse it.

    - value: a number in the data point's unit -> ``round(value * 10**scale)``, range/step checked;
    - bool: True/False; enum: a label; string: a string; fault: a list of labels, one label, or an int
      bitmap -> the int bitmap;
    - raw with the phase layout: ``{"voltage": V, "current": A, "power": W[, "electricity": kWh]}`` ->
      base64 of the 8-byte layout (``phase_encoding="binary"``; the energy is not part of that layout) or
      the object form (``"object"``); 8 ``bytes`` -> base64; a base64/hex string is checked and sent as is;
    - other raw: an object as is, ``bytes`` -> hex, a hex/base64 string as is.

    ``raw=True`` skips the unit conversion: ``value`` is already the wire value; it is only checked.
    """
    if dp.access == "wo":
        raise InvalidValue(
            ErrorCode.NOT_SUPPORTED, f"{dp.code} (dp {dp.id}) is send-only: it cannot be reported", dp
        )
    if phase_encoding not in PHASE_ENCODINGS:
        raise ValueError(f"phase_encoding must be one of {PHASE_ENCODINGS}, not {phase_encoding!r}")
    if raw:
        try:
            dp.coerce(value)
        except ValueRejected as exc:
            raise _rejected(dp, exc) from None
        return value
    kind = dp.type
    if kind == "value":
        return _value_wire(dp, value)
    if kind == "raw":
        if dp.layout == "phase":
            return _phase_wire(dp, value, phase_encoding)
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).hex()
        try:
            dp.coerce(value)
        except ValueRejected as exc:
            raise _rejected(dp, exc) from None
        return value
    try:
        canonical = dp.coerce(value)
    except ValueRejected as exc:
        raise _rejected(dp, exc) from None
    return dp.to_wire(canonical)  # bool/enum/string: the canonical value; fault: the int bitmap


def to_real(dp: DataPoint, canonical: Any) -> Any:
    """A canonical model value (what ``DataPoint.coerce`` returns) in real units: value data points are
    scaled (``2301000`` -> ``230.1`` for scale 4; an int when the scale is 0); everything else is the
    canonical value (bool, enum label, string, list of fault labels, phase dict, raw object)."""
    if dp.type == "value":
        return dp.scaled(canonical)
    return canonical
