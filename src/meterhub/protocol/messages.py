"""Decoding and encoding of the edge protocol's JSON messages (sans-I/O, no clock: ``now`` is injected).

Uplink messages are decoded with one ``msgspec.json.Decoder`` per message type into an envelope Struct
whose fields are typed ``Any``; every check after JSON parsing is done here so each problem maps to the
protocol's own error code (see the package docstring for the rules). Checks run in the order
JSON -> request_id -> t -> param -> fields, and every ``ProtocolError`` raised after the JSON stage carries
the ``request_id`` and ``cid`` whenever they were readable, so an error response can still be addressed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import msgspec
from msgspec import UNSET

from meterhub.protocol.errors import ErrorCode, ProtocolError, message_for
from meterhub.protocol.text import bad_identifier, bad_text, clean_text, describe_bad

__all__ = [
    "ID_MAX_LENGTH",
    "MAX_AGE_SECONDS",
    "MAX_FUTURE_SECONDS",
    "MILLISECONDS_THRESHOLD",
    "MSG_MAX_LENGTH",
    "SYNC_FIELDS",
    "SYNC_FIELD_MAX_LENGTH",
    "SYNC_FREE_TEXT_FIELDS",
    "CommandResponse",
    "ReportRequest",
    "StatusRequest",
    "SyncRequest",
    "cid_problem",
    "decode_command_response",
    "decode_report",
    "decode_status",
    "decode_sync",
    "encode_command",
    "encode_command_response",
    "encode_report",
    "encode_response",
    "encode_status",
    "encode_sync",
]

#: ``t`` above this is in milliseconds.
MILLISECONDS_THRESHOLD = 10**11
#: ``t`` may be at most this far in the future (seconds) ...
MAX_FUTURE_SECONDS = 5 * 60
#: ... and at most this old (seconds): gateways may replay buffered reports.
MAX_AGE_SECONDS = 30 * 24 * 3600
#: request_id and cid: 1..128 characters.
ID_MAX_LENGTH = 128
#: data point id given as a string: 1..64 characters; as an integer: 0 <= id < 2**31.
DP_ID_MAX_LENGTH = 64
DP_ID_INT_LIMIT = 2**31
#: product_id: 0..128 characters (the document's own sample sends "").
PRODUCT_ID_MAX_LENGTH = 128
#: optional sync fields: up to 255 characters.
SYNC_FIELD_MAX_LENGTH = 255
#: a command response's msg is truncated to this many characters.
MSG_MAX_LENGTH = 1024
#: millisecond timestamps above this (year 318857) are simply "in the future".
_T_MS_LIMIT = 10**16
#: a command response's code must fit a signed 32-bit integer.
_CODE_LIMIT = 2**31

#: The optional fields of ``devices/sync`` (device_name appears only in the document's sample).
SYNC_FIELDS: tuple[str, ...] = (
    "vendor_code",
    "comm_type",
    "device_ip",
    "mac_address",
    "device_name",
    "device_desc",
    "install_location",
    "device_server_id",
    "product_sub_type",
)
#: The sync fields that are free text (tab, LF and CR allowed); the others follow the identifier rule.
SYNC_FREE_TEXT_FIELDS = frozenset({"device_name", "device_desc", "install_location"})

_EMPTY = ErrorCode.PARAMS_EMPTY
_RANGE = ErrorCode.PARAMS_RANGE_INVALID
_NULL = ErrorCode.PARAMS_NULL
_TYPE = ErrorCode.PARAMS_TYPE_INCORRECT
_TIME = ErrorCode.REQUEST_TIME_INVALID

_STATUS_VALUES: dict[object, bool] = {
    True: True,
    False: False,
    "true": True,
    "false": False,
    "1": True,
    "0": False,
}


# --------------------------------------------------------------------------------------------- results


class SyncRequest(msgspec.Struct, frozen=True):
    """``devices/sync``. ``fields`` holds only the optional fields present in the message (null -> None)."""

    t: float
    request_id: str
    cid: str
    product_id: str
    fields: dict[str, str | None]


class ReportRequest(msgspec.Struct, frozen=True):
    """``properties/report``. ``value`` is not validated here: the product model does that."""

    t: float
    request_id: str
    cid: str
    dp_id: str
    value: Any


class StatusRequest(msgspec.Struct, frozen=True):
    """``devices/status``: the valid ``(cid, online)`` items in order, and a reason per invalid item."""

    t: float
    request_id: str
    items: list[tuple[str, bool]]
    rejected: list[str]


class CommandResponse(msgspec.Struct, frozen=True):
    """``commands/response``: ``code`` 0 is success (also when the device left it out)."""

    t: float
    request_id: str
    cid: str
    code: int
    msg: str | None


# ------------------------------------------------------------------------------------------- envelopes


class _Envelope(msgspec.Struct, gc=False):
    t: Any = UNSET
    request_id: Any = UNSET
    param: Any = UNSET


class _CommandResponseEnvelope(msgspec.Struct, gc=False):
    t: Any = UNSET
    cid: Any = UNSET
    request_id: Any = UNSET
    param: Any = UNSET


_SYNC_DECODER = msgspec.json.Decoder(_Envelope)
_REPORT_DECODER = msgspec.json.Decoder(_Envelope)
_STATUS_DECODER = msgspec.json.Decoder(_Envelope)
_COMMAND_RESPONSE_DECODER = msgspec.json.Decoder(_CommandResponseEnvelope)


def _envelope(decoder: msgspec.json.Decoder[Any], payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        error = ProtocolError(_TYPE, f"payload is not a usable JSON object: {exc}")
    except msgspec.DecodeError as exc:
        error = ProtocolError(_TYPE, f"payload is not JSON: {exc}")
    except RecursionError:
        raise ProtocolError(_TYPE, "payload is nested too deeply") from None
    except TypeError as exc:  # not bytes/str at all
        raise ProtocolError(_TYPE, f"payload has an unusable type: {exc}") from None
    doc = _salvage(payload)
    if type(doc) is not dict:
        raise error
    struct = decoder.type
    return struct(**{name: doc.get(name, UNSET) for name in struct.__struct_fields__})


#: the most digits msgspec (and Python's ``int()``, by default) read in one integer.
_INT_DIGITS_MAX = 4300
#: stands for any longer integer: larger than every bound meterhub checks, so it fails them all.
_HUGE = 10 ** (_INT_DIGITS_MAX + 1)
#: payloads larger than this are not re-read by :func:`_salvage` (MQTT's packet limit is lower).
_SALVAGE_MAX_BYTES = 1 << 20


def _salvage_int(text: str) -> int:
    negative = text[0] == "-"
    if len(text) - negative <= _INT_DIGITS_MAX:
        return int(text)
    return -_HUGE if negative else _HUGE


def _refuse_constant(text: str) -> object:
    raise ValueError(f"{text} is not JSON")


_SALVAGE = json.JSONDecoder(parse_int=_salvage_int, parse_constant=_refuse_constant)


def _salvage(payload: bytes) -> Any:
    """Re-read a payload msgspec refused, in case it is JSON after all: an integer of more than 4300
    digits (read as ``_HUGE``, so the usual range checks refuse it with the field's own code and the
    answer keeps its request_id), a float beyond double range (``inf``: not an integer), or a lone
    surrogate escape such as ``"\\ud800"`` (the string checks refuse it: 1101). None if it is not JSON."""
    if len(payload) > _SALVAGE_MAX_BYTES:
        return None
    try:
        text = payload.decode("utf-8") if type(payload) is not str else payload
        return _SALVAGE.decode(text)
    except (ValueError, RecursionError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------- field checks


def _absent(value: object, field: str, expected: str = "a string") -> ProtocolError:
    """The error for a required field that is missing (1100), null (1102) or of the wrong JSON type (1103)."""
    if value is UNSET:
        return ProtocolError(_EMPTY, f"{field} is missing")
    if value is None:
        return ProtocolError(_NULL, f"{field} is null")
    return ProtocolError(_TYPE, f"{field} must be {expected}, not {_json_type(value)}")


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short repr for log text (an int too long to print does not raise)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 40 else text[:37] + "..."


def _identifier(value: object, field: str) -> str:
    """request_id: a string of 1..128 characters, without control characters or surrogates."""
    if type(value) is str:
        if not 0 < len(value) <= ID_MAX_LENGTH:
            raise ProtocolError(_RANGE, f"{field} must be 1-{ID_MAX_LENGTH} characters, got {len(value)}")
        if bad_identifier(value):
            raise ProtocolError(_RANGE, f"{field} holds a {describe_bad(value)}")
        return value
    raise _absent(value, field)


def cid_problem(cid: str) -> str | None:
    """Why ``cid`` cannot name a device, or None: besides the identifier rule, a cid must be usable as
    one path segment of the REST API (``/api/v1/devices/{cid}``), so no ``/`` and not ``.`` or ``..``."""
    if "/" in cid:
        return "holds a '/'"
    if cid in (".", ".."):
        return f"is {cid!r}"
    return None


def _cid(value: object, field: str) -> str:
    """A device id: an identifier (1..128 characters) that is also one path segment."""
    cid = _identifier(value, field)
    problem = cid_problem(cid)
    if problem is not None:
        raise ProtocolError(_RANGE, f"{field} {problem}")
    return cid


def _readable_identifier(value: object) -> str | None:
    """``value`` when it can be echoed in an error response (a valid identifier), else None."""
    if type(value) is str and 0 < len(value) <= ID_MAX_LENGTH and not bad_identifier(value):
        return value
    return None


def _short_text(value: object, field: str, max_length: int, *, free_text: bool) -> None:
    """An optional string field (sync): at most ``max_length`` characters, the text rule."""
    if type(value) is not str:
        raise ProtocolError(_TYPE, f"{field} must be a string, not {_json_type(value)}")
    if len(value) > max_length:
        raise ProtocolError(_RANGE, f"{field} is longer than {max_length} characters")
    if bad_text(value) if free_text else bad_identifier(value):
        raise ProtocolError(_RANGE, f"{field} holds a {describe_bad(value, free_text=free_text)}")


def _timestamp(value: object, now: float) -> float:
    if type(value) is not int:
        if value is UNSET:
            raise ProtocolError(_TIME, "t is missing")
        raise ProtocolError(_TIME, f"t must be an integer, not {_json_type(value)}")
    ts = value
    if value > MILLISECONDS_THRESHOLD:
        # (compare before dividing: a huge integer cannot be converted to float)
        ts = value / 1000 if value <= _T_MS_LIMIT else _T_MS_LIMIT
    if ts > now + MAX_FUTURE_SECONDS:
        raise ProtocolError(_TIME, f"t={_show(value)} is more than {MAX_FUTURE_SECONDS} s in the future")
    if ts < now - MAX_AGE_SECONDS:
        raise ProtocolError(_TIME, f"t={_show(value)} is older than {MAX_AGE_SECONDS // 86400} days")
    return float(ts)


def _param_object(value: object) -> dict[str, Any]:
    if type(value) is dict:
        if value:
            return value
        raise ProtocolError(_EMPTY, "param is empty")
    if type(value) is list and not value:
        raise ProtocolError(_EMPTY, "param is empty")
    raise _absent(value, "param", "an object")


def _param_array(value: object) -> list[Any]:
    if type(value) is list:
        if value:
            return value
        raise ProtocolError(_EMPTY, "param is empty")
    if type(value) is dict and not value:
        raise ProtocolError(_EMPTY, "param is empty")
    if value is UNSET or value is None:
        raise _absent(value, "param")
    raise ProtocolError(_TYPE, f"param must be an array, not {_json_type(value)}")


def _annotate(exc: ProtocolError, request_id: object, cid: object) -> None:
    if exc.request_id is None:
        exc.request_id = _readable_identifier(request_id)
    if exc.cid is None:
        exc.cid = _readable_identifier(cid)


def _param_cid(param: object) -> object:
    return param.get("cid") if type(param) is dict else None


# ------------------------------------------------------------------------------------------- decoders


def decode_sync(payload: bytes, now: float) -> SyncRequest:
    """Decode a ``devices/sync`` payload; raises ``ProtocolError``."""
    env = _envelope(_SYNC_DECODER, payload)
    try:
        request_id = _identifier(env.request_id, "request_id")
        t = _timestamp(env.t, now)
        param = _param_object(env.param)
        cid = _cid(param.get("cid", UNSET), "param.cid")
        product_id = param.get("product_id", UNSET)
        if type(product_id) is not str:
            raise _absent(product_id, "param.product_id")
        _short_text(product_id, "param.product_id", PRODUCT_ID_MAX_LENGTH, free_text=False)
        fields: dict[str, str | None] = {}
        for key in SYNC_FIELDS:
            value = param.get(key, UNSET)
            if value is UNSET:
                continue
            if value is not None:
                _short_text(
                    value, f"param.{key}", SYNC_FIELD_MAX_LENGTH, free_text=key in SYNC_FREE_TEXT_FIELDS
                )
            fields[key] = value
    except ProtocolError as exc:
        _annotate(exc, env.request_id, _param_cid(env.param))
        raise
    return SyncRequest(t, request_id, cid, product_id, fields)


def decode_report(payload: bytes, now: float) -> ReportRequest:
    """Decode a ``properties/report`` payload; ``param.id`` 1 or "1" both give ``dp_id`` "1"."""
    env = _envelope(_REPORT_DECODER, payload)
    try:
        # Hot path: the common valid case is checked inline; the helpers run only to raise the exact error.
        request_id = env.request_id
        if (
            type(request_id) is not str
            or not 0 < len(request_id) <= ID_MAX_LENGTH
            or not (request_id.isascii() and request_id.isprintable())
        ):
            _identifier(request_id, "request_id")
        t = env.t
        if type(t) is int and now - MAX_AGE_SECONDS <= t <= now + MAX_FUTURE_SECONDS:
            t = float(t)
        else:
            t = _timestamp(t, now)
        param = env.param
        if type(param) is not dict or not param:
            _param_object(param)
        cid = param.get("cid", UNSET)
        if (
            type(cid) is not str
            or not 0 < len(cid) <= ID_MAX_LENGTH
            or not (cid.isascii() and cid.isprintable())
            or "/" in cid
            or cid in (".", "..")
        ):
            _cid(cid, "param.cid")
        dp_id = param.get("id", UNSET)
        if type(dp_id) is str:
            if not 0 < len(dp_id) <= DP_ID_MAX_LENGTH:
                raise ProtocolError(_RANGE, f"param.id must be 1-{DP_ID_MAX_LENGTH} characters")
            if bad_identifier(dp_id):
                raise ProtocolError(_RANGE, f"param.id holds a {describe_bad(dp_id)}")
        elif type(dp_id) is int:
            if not 0 <= dp_id < DP_ID_INT_LIMIT:
                raise ProtocolError(_RANGE, f"param.id {_show(dp_id)} is out of range")
            dp_id = str(dp_id)
        else:
            raise _absent(dp_id, "param.id", "a string or an integer")
        value = param.get("value", UNSET)
        if value is UNSET or value is None:
            raise _absent(value, "param.value")
        if type(value) is str and bad_text(value):  # whatever the data point's type: 1101
            raise ProtocolError(_RANGE, f"param.value holds a {describe_bad(value, free_text=True)}")
    except ProtocolError as exc:
        _annotate(exc, env.request_id, _param_cid(env.param))
        raise
    return ReportRequest(t, request_id, cid, dp_id, value)


def decode_status(payload: bytes, now: float) -> StatusRequest:
    """Decode a ``devices/status`` payload.

    Envelope problems raise ``ProtocolError``; a bad item does not: it is described in ``rejected``
    (``"param[i]: <detail> (<code>)"``) and the valid items are still returned.
    """
    env = _envelope(_STATUS_DECODER, payload)
    try:
        request_id = _identifier(env.request_id, "request_id")
        t = _timestamp(env.t, now)
        param = _param_array(env.param)
    except ProtocolError as exc:
        _annotate(exc, env.request_id, None)
        raise
    items: list[tuple[str, bool]] = []
    rejected: list[str] = []
    for i, item in enumerate(param):
        try:
            if type(item) is not dict:
                raise _absent(item, "item", "an object")
            cid = _cid(item.get("cid", UNSET), "cid")
            status = item.get("status", UNSET)
            tp = type(status)
            online = _STATUS_VALUES.get(status) if tp is bool or tp is int or tp is str else None
            if online is None:
                if status is UNSET or status is None:
                    raise _absent(status, f"status of {cid!r}")
                raise ProtocolError(_TYPE, f"status of {cid!r} must be true or false, not {_show(status)}")
        except ProtocolError as exc:
            rejected.append(f"param[{i}]: {exc.detail} ({int(exc.code)})")
            continue
        items.append((cid, online))
    return StatusRequest(t, request_id, items, rejected)


def decode_command_response(payload: bytes, now: float) -> CommandResponse:
    """Decode a ``commands/response`` payload. ``param.code`` missing or null means success (0)."""
    env = _envelope(_COMMAND_RESPONSE_DECODER, payload)
    try:
        request_id = _identifier(env.request_id, "request_id")
        t = _timestamp(env.t, now)
        cid = _cid(env.cid, "cid")
        param = _param_object(env.param)
        code = param.get("code")
        if code is None:
            code = 0
        elif type(code) is not int:
            raise ProtocolError(_TYPE, f"param.code must be an integer, not {_json_type(code)}")
        elif not -_CODE_LIMIT <= code < _CODE_LIMIT:
            raise ProtocolError(_RANGE, f"param.code {_show(code)} does not fit 32 bits")
        msg = param.get("msg")
        if msg is not None:
            if type(msg) is not str:
                raise ProtocolError(_TYPE, f"param.msg must be a string, not {_json_type(msg)}")
            if len(msg) > MSG_MAX_LENGTH:
                msg = msg[:MSG_MAX_LENGTH]
            msg = clean_text(msg)  # informational: kept, with unstorable characters replaced
    except ProtocolError as exc:
        _annotate(exc, env.request_id, env.cid)
        raise
    return CommandResponse(t, request_id, cid, code, msg)


# ------------------------------------------------------------------------------------------- encoders


class _ResponseParam(msgspec.Struct, gc=False):
    cid: str | None
    msg: str
    code: int


class _Response(msgspec.Struct, gc=False):
    t: int
    request_id: str | None
    param: _ResponseParam


class _CommandParam(msgspec.Struct, gc=False):
    id: str
    value: Any


class _Command(msgspec.Struct, gc=False):
    t: int
    cid: str
    request_id: str
    param: _CommandParam


_ENCODER = msgspec.json.Encoder()


def encode_response(
    request_id: str | None, cid: str | None, code: int, now: float, msg: str | None = None
) -> bytes:
    """``{"t", "request_id", "param": {"cid", "msg", "code"}}`` for sync/report responses.

    ``msg`` defaults to the document's message for ``code`` (``ValueError`` for a code not in the table).
    ``t`` is ``now`` truncated to whole seconds.
    """
    if msg is None:
        msg = message_for(code)
    return _ENCODER.encode(_Response(int(now), request_id, _ResponseParam(cid, msg, int(code))))


def encode_command(cid: str, request_id: str, dp_id: str | int, value: Any, now: float) -> bytes:
    """``{"t", "cid", "request_id", "param": {"id": "<dp id>", "value"}}`` for ``gateway_id/{gw}/commands``.

    ``value`` is the data point's wire form (``DataPoint.to_wire``).
    """
    return _ENCODER.encode(_Command(int(now), cid, request_id, _CommandParam(str(dp_id), value)))


# Gateway-side encoders: what a meter gateway sends. For simulators, benchmarks and tests.


def encode_sync(request_id: str, cid: str, product_id: str, now: float, **fields: str | None) -> bytes:
    """A ``devices/sync`` payload as a gateway sends it (optional fields as keyword arguments)."""
    return _ENCODER.encode(
        {"t": int(now), "request_id": request_id, "param": {"cid": cid, "product_id": product_id, **fields}}
    )


def encode_report(request_id: str, cid: str, dp_id: str | int, value: Any, now: float) -> bytes:
    """A ``properties/report`` payload as a gateway sends it."""
    return _ENCODER.encode(
        {"t": int(now), "request_id": request_id, "param": {"cid": cid, "id": str(dp_id), "value": value}}
    )


def encode_status(request_id: str, statuses: Iterable[tuple[str, bool]], now: float) -> bytes:
    """A ``devices/status`` payload as a gateway sends it."""
    param = [{"cid": cid, "status": bool(online)} for cid, online in statuses]
    return _ENCODER.encode({"t": int(now), "request_id": request_id, "param": param})


def encode_command_response(
    request_id: str, cid: str, code: int, now: float, msg: str | None = None
) -> bytes:
    """A ``commands/response`` payload as a gateway sends it (``msg`` defaults to the code's message)."""
    if msg is None:
        msg = message_for(code)
    return _ENCODER.encode(
        {"t": int(now), "cid": cid, "request_id": request_id, "param": {"msg": msg, "code": int(code)}}
    )
