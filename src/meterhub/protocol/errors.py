"""The protocol's global error codes, their exact messages, and the exception carrying them."""

from __future__ import annotations

import enum

__all__ = ["MESSAGES", "ErrorCode", "ProtocolError", "message_for"]


class ErrorCode(enum.IntEnum):
    """Global error codes of the edge protocol (the document's "Global error codes" table, plus 0)."""

    SUCCESS = 0
    UPLINK = 400
    SYSTEM = 500
    REQUEST_TIME_INVALID = 1001
    PARAMS_EMPTY = 1100
    PARAMS_RANGE_INVALID = 1101
    PARAMS_NULL = 1102
    PARAMS_TYPE_INCORRECT = 1103
    DEVICE_OFFLINE = 2001
    NOT_SUPPORTED = 2002
    DEVICE_NOT_EXIST = 2003


#: ``param.msg`` for each code, verbatim from the document.
MESSAGES: dict[int, str] = {
    ErrorCode.SUCCESS: "success",
    ErrorCode.UPLINK: "tedge error: uplink specific error message",
    ErrorCode.SYSTEM: "system error, please contact the admin",
    ErrorCode.REQUEST_TIME_INVALID: "request time is invalid",
    ErrorCode.PARAMS_EMPTY: "params is empty",
    ErrorCode.PARAMS_RANGE_INVALID: "params range invalid",
    ErrorCode.PARAMS_NULL: "params is null",
    ErrorCode.PARAMS_TYPE_INCORRECT: "params type is incorrect",
    ErrorCode.DEVICE_OFFLINE: "device is offline",
    ErrorCode.NOT_SUPPORTED: "command or value not support",
    ErrorCode.DEVICE_NOT_EXIST: "device not exist",
}


def message_for(code: int) -> str:
    """The document's message for ``code``; raises ``ValueError`` for a code outside the table."""
    try:
        return MESSAGES[code]
    except KeyError:
        raise ValueError(f"no message for error code {code!r}") from None


class ProtocolError(Exception):
    """A message that must be answered (or dropped) with a protocol error code.

    ``request_id`` and ``cid`` are filled in whenever they could be read from the offending message, so the
    caller can address its error response. ``detail`` is human text for logs, never sent on the wire (the
    wire carries ``MESSAGES[code]``).
    """

    __slots__ = ("cid", "code", "detail", "request_id")

    def __init__(
        self, code: int, detail: str, *, request_id: str | None = None, cid: str | None = None
    ) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.cid = cid

    def __str__(self) -> str:
        return f"{int(self.code)} {MESSAGES.get(self.code, '?')}: {self.detail}"

    def __repr__(self) -> str:
        return (
            f"ProtocolError(code={int(self.code)}, detail={self.detail!r}, "
            f"request_id={self.request_id!r}, cid={self.cid!r})"
        )
