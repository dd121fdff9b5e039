"""Per-type validators, compiled once per data point into closures (the hot path of every report).

Each ``*_coercer`` returns a callable ``value -> canonical value`` that raises ``ValueRejected`` with 1101
(range, step, choices, length), 1102 (null) or 1103 (wrong type). Dispatch is on ``type(value) is ...``
(so ``bool`` is never mistaken for ``int``); messages are only formatted on the error path.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from meterhub.model.errors import ValueRejected
from meterhub.protocol.errors import ErrorCode
from meterhub.protocol.text import bad_text, describe_bad

__all__ = [
    "PHASE_BYTES",
    "RAW_MAX_BYTES",
    "STRING_MAX_LENGTH",
    "Coercer",
    "bool_coercer",
    "decode_binary_string",
    "decode_phase_bytes",
    "encode_phase_bytes",
    "enum_coercer",
    "fault_coercer",
    "fault_to_wire",
    "phase_coercer",
    "phase_to_wire",
    "raw_coercer",
    "raw_to_wire",
    "string_coercer",
    "value_coercer",
]

Coercer = Callable[[Any], Any]

#: Default maximum length of a string data point (characters).
STRING_MAX_LENGTH = 255
#: Default maximum size of a raw data point (decoded bytes, or compact JSON bytes for the object form).
RAW_MAX_BYTES = 4096
#: Size of the binary phase_a/b/c layout: voltage 2 bytes (0.1 V), current 3 bytes (mA), power 3 bytes (W).
PHASE_BYTES = 8

_RANGE = ErrorCode.PARAMS_RANGE_INVALID
_NULL = ErrorCode.PARAMS_NULL
_TYPE = ErrorCode.PARAMS_TYPE_INCORRECT

# An integer in decimal, optionally written with a zero fraction ("5.0"). ASCII digits only.
_INT_RE = re.compile(r"(-?[0-9]+)(?:\.0+)?")
# A decimal number for the phase object form ("218.7", "2410", "-1.5").
_DECIMAL_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_JSON = msgspec.json.Encoder()


def _short(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 40 else text[:37] + "..."


def _wrong_type(name: str, value: object, expected: str) -> ValueRejected:
    if value is None:
        return ValueRejected(_NULL, f"{name}: value is null")
    return ValueRejected(_TYPE, f"{name}: expected {expected}, got {type(value).__name__} {_short(value)}")


def _int_from_string(name: str, text: str) -> int:
    if text.isdecimal() and text.isascii():
        digits = text
    else:
        match = _INT_RE.fullmatch(text)
        if match is None:
            raise ValueRejected(_TYPE, f"{name}: {_short(text)} is not an integer")
        digits = match.group(1)
    try:
        return int(digits)
    except ValueError:  # more digits than int() accepts: certainly out of range
        raise ValueRejected(_RANGE, f"{name}: {_short(text)} is out of range") from None


def _to_int(name: str, value: object) -> int:
    """int, a float without a fractional part, or an integer string; ``bool`` is not an integer."""
    tp = type(value)
    if tp is int:
        return value  # type: ignore[return-value]
    if tp is str:
        return _int_from_string(name, value)  # type: ignore[arg-type]
    if tp is float and value.is_integer():  # type: ignore[union-attr]
        return int(value)  # type: ignore[call-overload]
    raise _wrong_type(name, value, "an integer")


# --------------------------------------------------------------------------------------------- value


def value_coercer(name: str, minimum: int, maximum: int, step: int) -> Coercer:
    """Raw integer in ``[minimum, maximum]`` with ``(raw - minimum) % step == 0``."""

    def coerce_value(value: Any) -> int:
        raw = value if type(value) is int else _to_int(name, value)
        if raw < minimum or raw > maximum:
            raise ValueRejected(_RANGE, f"{name}: {_short(raw)} is outside [{minimum}, {maximum}]")
        if step != 1 and (raw - minimum) % step:
            raise ValueRejected(_RANGE, f"{name}: {raw} is not {minimum} + a multiple of {step}")
        return raw

    return coerce_value


# --------------------------------------------------------------------------------------------- bool

_BOOL_VALUES: dict[object, bool] = {
    True: True,
    False: False,
    "true": True,
    "false": False,
    "1": True,
    "0": False,
}


def bool_coercer(name: str) -> Coercer:
    """true/false; also "true"/"false", 1/0, "1"/"0"."""

    def coerce_bool(value: Any) -> bool:
        tp = type(value)
        if tp is bool:
            return value  # type: ignore[no-any-return]
        if tp is str or tp is int:
            result = _BOOL_VALUES.get(value)
            if result is not None:
                return result
        raise _wrong_type(name, value, 'true, false, "true", "false", 1, 0, "1" or "0"')

    return coerce_bool


# --------------------------------------------------------------------------------------------- enum / string


def enum_coercer(name: str, labels: Sequence[str]) -> Coercer:
    """One of ``labels`` (a string); another string is 1101."""
    allowed = frozenset(labels)

    def coerce_enum(value: Any) -> str:
        if type(value) is str:
            if value in allowed:
                return value
            raise ValueRejected(_RANGE, f"{name}: {_short(value)} is not one of {sorted(allowed)}")
        raise _wrong_type(name, value, "a label string")

    return coerce_enum


def string_coercer(name: str, max_length: int = STRING_MAX_LENGTH) -> Coercer:
    """A string of at most ``max_length`` characters."""

    def coerce_string(value: Any) -> str:
        if type(value) is str:
            if len(value) > max_length:
                raise ValueRejected(_RANGE, f"{name}: {len(value)} characters, at most {max_length} allowed")
            if bad_text(value):
                bad = describe_bad(value, free_text=True)
                raise ValueRejected(_RANGE, f"{name}: the string holds a {bad}")
            return value
        raise _wrong_type(name, value, "a string")

    return coerce_string


# --------------------------------------------------------------------------------------------- fault


def fault_coercer(name: str, labels: Sequence[str]) -> Coercer:
    """Bitmap (bit i = ``labels[i]``), one label, or a list of labels -> active labels in model order."""
    bits = tuple((1 << i, label) for i, label in enumerate(labels))
    bit_of = {label: 1 << i for i, label in enumerate(labels)}
    limit = 1 << len(labels)

    def coerce_fault(value: Any) -> list[str]:
        tp = type(value)
        if tp is int:
            mask = value
        elif tp is list or tp is tuple:
            mask = 0
            for item in value:
                if type(item) is not str:
                    raise _wrong_type(name, item, "a list of fault labels")
                bit = bit_of.get(item)
                if bit is None:
                    raise ValueRejected(_RANGE, f"{name}: unknown fault label {_short(item)}")
                mask |= bit
            return [label for bit, label in bits if mask & bit]
        elif tp is str:
            bit = bit_of.get(value)
            if bit is not None:
                return [value]
            if _INT_RE.fullmatch(value) is None:
                raise ValueRejected(_RANGE, f"{name}: unknown fault label {_short(value)}")
            mask = _int_from_string(name, value)
        else:
            mask = _to_int(name, value)
        if mask == 0:
            return []
        if not 0 < mask < limit:
            raise ValueRejected(_RANGE, f"{name}: bitmap {_short(mask)} is outside [0, {limit - 1}]")
        return [label for bit, label in bits if mask & bit]

    return coerce_fault


def fault_to_wire(labels: Sequence[str]) -> Callable[[Any], int]:
    """Canonical label list (or an int bitmap) -> int bitmap."""
    bit_of = {label: 1 << i for i, label in enumerate(labels)}

    def to_wire(canonical: Any) -> int:
        if type(canonical) is int:
            return canonical  # type: ignore[no-any-return]
        mask = 0
        for label in canonical:
            mask |= bit_of[label]
        return mask

    return to_wire


# --------------------------------------------------------------------------------------------- raw


def decode_binary_string(text: str, max_bytes: int = RAW_MAX_BYTES) -> bytes:
    """Decode a hex or base64 string (hex wins when the string is even-length and all hex digits).

    Base64 is the standard alphabet; missing ``=`` padding is tolerated. Raises ``ValueError`` for a
    string that is neither, ``OverflowError`` when it decodes to more than ``max_bytes``.
    """
    if len(text) > 2 * max_bytes + 4:  # longer than any encoding of max_bytes, hex being the least dense
        raise OverflowError(f"longer than {max_bytes} bytes")
    if not text.isascii():
        raise ValueError("not a hex or base64 string")
    if len(text) % 2 == 0 and text.isalnum():
        try:
            data = bytes.fromhex(text)
        except ValueError:
            pass
        else:
            if len(data) > max_bytes:
                raise OverflowError(f"longer than {max_bytes} bytes")
            return data
    padding = -len(text) % 4
    try:
        data = binascii.a2b_base64(text + "=" * padding if padding else text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a hex or base64 string") from None
    if len(data) > max_bytes:
        raise OverflowError(f"longer than {max_bytes} bytes")
    return data


def raw_coercer(name: str, max_bytes: int = RAW_MAX_BYTES) -> Coercer:
    """A JSON object (kept as is), or a hex/base64 string (-> ``{"hex": "<lowercase hex>"}``)."""

    def coerce_raw(value: Any) -> dict[str, Any]:
        tp = type(value)
        if tp is str:
            return {"hex": _binary(name, value, max_bytes).hex()}
        if tp is dict:
            if len(value) == 1 and "hex" in value:
                text = value["hex"]
                if type(text) is not str:
                    raise _wrong_type(name, text, "a hex string in the 'hex' key")
                try:
                    if not text.isascii() or (text and not text.isalnum()):
                        raise ValueError(text)
                    size = len(bytes.fromhex(text))  # odd length or a non-hex digit: ValueError
                except ValueError:
                    raise ValueRejected(_TYPE, f"{name}: 'hex' is not a hex string") from None
                if size > max_bytes:
                    raise ValueRejected(_RANGE, f"{name}: {size} bytes, at most {max_bytes} allowed")
                return {"hex": text.lower()}
            bad = _bad_string_in(value)  # before encoding: a lone surrogate cannot be encoded
            if bad is not None:
                raise ValueRejected(_RANGE, f"{name}: a string in the object holds a {bad}")
            try:
                size = len(_JSON.encode(value))
            except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
                raise ValueRejected(_TYPE, f"{name}: object is not JSON-encodable") from None
            if size > max_bytes:
                raise ValueRejected(_RANGE, f"{name}: object is {size} bytes of JSON, at most {max_bytes}")
            return value  # type: ignore[no-any-return]
        raise _wrong_type(name, value, "an object, a hex string or a base64 string")

    return coerce_raw


def _bad_string_in(value: Any) -> str | None:
    """The first offending character (free-text rule) of any string in a JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        tp = type(item)
        if tp is str:
            if bad_text(item):
                return describe_bad(item, free_text=True)
        elif tp is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif tp is list or tp is tuple:
            stack.extend(item)
    return None


def _binary(name: str, text: str, max_bytes: int) -> bytes:
    try:
        return decode_binary_string(text, max_bytes)
    except OverflowError as exc:
        raise ValueRejected(_RANGE, f"{name}: {exc}") from None
    except ValueError as exc:
        raise ValueRejected(_TYPE, f"{name}: {_short(text)} is {exc}") from None


def raw_to_wire(canonical: Any) -> Any:
    """``{"hex": h}`` -> the hex string ``h``; an object -> itself."""
    if type(canonical) is dict and len(canonical) == 1 and "hex" in canonical:
        return canonical["hex"]
    return canonical


# --------------------------------------------------------------------------------------------- phase


def decode_phase_bytes(data: bytes) -> dict[str, float | None]:
    """The 8-byte phase layout -> ``{"voltage": V, "current": A, "power": W, "electricity": None}``."""
    if len(data) != PHASE_BYTES:
        raise ValueError(f"phase data must be {PHASE_BYTES} bytes, got {len(data)}")
    decivolts = (data[0] << 8) | data[1]
    milliamps = (data[2] << 16) | (data[3] << 8) | data[4]
    watts = (data[5] << 16) | (data[6] << 8) | data[7]
    return {
        "voltage": round(decivolts / 10, 1),
        "current": round(milliamps / 1000, 3),
        "power": float(watts),
        "electricity": None,
    }


def encode_phase_bytes(voltage: float, current: float, power: float) -> bytes:
    """Volts, amperes, watts -> the 8-byte phase layout (``OverflowError`` when a field does not fit)."""
    return (
        round(voltage * 10).to_bytes(2, "big")
        + round(current * 1000).to_bytes(3, "big")
        + round(power).to_bytes(3, "big")
    )


# (key, decimals kept): voltage at 0.1 V and current at 1 mA like the binary layout; power and
# electricity are only rounded to strip binary floating point noise.
_PHASE_REQUIRED = (("voltage", 1), ("current", 3), ("power", 3))
_ELECTRICITY_DECIMALS = 4
_MISSING: Any = object()


def _phase_number(name: str, key: str, value: object, decimals: int) -> float:
    tp = type(value)
    if tp is str:
        if _DECIMAL_RE.fullmatch(value) is None:  # type: ignore[arg-type]
            raise ValueRejected(_TYPE, f"{name}: {key} {_short(value)} is not a decimal number")
        number = float(value)  # type: ignore[arg-type]
    elif tp is int:
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise ValueRejected(_RANGE, f"{name}: {key} is out of range") from None
    elif tp is float:
        number = value  # type: ignore[assignment]
    else:
        raise _wrong_type(f"{name}: {key}", value, "a number or a numeric string")
    if not (math.isfinite(number) and number >= 0):
        raise ValueRejected(_RANGE, f"{name}: {key} {_short(value)} must be a finite number >= 0")
    return round(number, decimals)


def phase_coercer(name: str) -> Coercer:
    """phase_a/b/c: 8 bytes as base64 or hex, or ``{"voltage", "current", "power", "electricity"}`` in
    real units (V, A, W, kWh; numbers or numeric strings). Both give the same canonical dict."""

    def coerce_phase(value: Any) -> dict[str, float | None]:
        tp = type(value)
        if tp is str:
            data = _binary(name, value, PHASE_BYTES)
            if len(data) != PHASE_BYTES:
                raise ValueRejected(
                    _RANGE, f"{name}: phase data must be {PHASE_BYTES} bytes, got {len(data)}"
                )
            return decode_phase_bytes(data)
        if tp is dict:
            result: dict[str, float | None] = {}
            for key, decimals in _PHASE_REQUIRED:
                item = value.get(key, _MISSING)
                if item is _MISSING or item == "":
                    raise ValueRejected(_RANGE, f"{name}: phase object lacks {key!r}")
                result[key] = _phase_number(name, key, item, decimals)
            item = value.get("electricity")
            if item is None or item == "":
                result["electricity"] = None
            else:
                result["electricity"] = _phase_number(name, "electricity", item, _ELECTRICITY_DECIMALS)
            return result
        raise _wrong_type(name, value, "a base64 or hex string of 8 bytes, or a phase object")

    return coerce_phase


def phase_to_wire(canonical: Any) -> dict[str, float]:
    """The canonical phase dict -> the document's object form (``electricity`` left out when unknown)."""
    wire = {"voltage": canonical["voltage"], "current": canonical["current"], "power": canonical["power"]}
    if canonical.get("electricity") is not None:
        wire["electricity"] = canonical["electricity"]
    return wire
