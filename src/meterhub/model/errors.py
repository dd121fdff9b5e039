"""Exceptions of the product model layer."""

from __future__ import annotations

__all__ = ["ModelError", "ValueRejected"]


class ValueRejected(Exception):
    """A data point value (or command) was refused.

    ``code`` is a protocol error code: 1101 range/step/choices/length, 1102 null, 1103 wrong type,
    2002 unknown data point or read-only data point commanded. ``message`` is human text for logs.
    """

    __slots__ = ("code", "message")

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{int(self.code)}: {self.message}"


class ModelError(ValueError):
    """A product model file (or in-memory model definition) is invalid.

    ``source`` names the file, ``field`` the offending field as a path such as ``data_points[3].min``
    (``None`` when the problem is the whole document), ``reason`` what is wrong.
    """

    def __init__(self, source: str, field: str | None, reason: str) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")
