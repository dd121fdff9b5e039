"""Topic names of the edge protocol: ``gateway_id/{gateway_id}/...`` (the document's topic table).

Parsing uses plain string operations (no regex); it is called once per inbound PUBLISH.
"""

from __future__ import annotations

import enum

__all__ = [
    "PREFIX",
    "Kind",
    "commands_topic",
    "gateway_prefix",
    "parse_topic",
    "response_topic",
    "uplink_topic",
]

PREFIX = "gateway_id/"


class Kind(enum.Enum):
    """The uplink (gateway -> meterhub) topics; the value is the topic suffix after ``gateway_id/{gw}/``."""

    SYNC = "devices/sync"
    REPORT = "properties/report"
    STATUS = "devices/status"
    COMMAND_RESPONSE = "commands/response"


_BY_SUFFIX: dict[str, Kind] = {k.value: k for k in Kind}
_RESPONSE_SUFFIX: dict[Kind, str] = {
    Kind.SYNC: "/devices/sync/response",
    Kind.REPORT: "/properties/report/response",
}
_PREFIX_LEN = len(PREFIX)


def parse_topic(topic: str) -> tuple[str, Kind] | None:
    """``(gateway_id, kind)`` for an uplink topic, ``None`` for anything else.

    The gateway id is one non-empty topic level (it cannot contain ``/``). Downlink topics
    (``.../response``, ``.../commands``) are not uplink topics and give ``None``.
    """
    if not topic.startswith(PREFIX):
        return None
    gw, sep, suffix = topic[_PREFIX_LEN:].partition("/")
    if not gw or not sep:
        return None
    kind = _BY_SUFFIX.get(suffix)
    if kind is None:
        return None
    return gw, kind


def gateway_prefix(gateway_id: str) -> str:
    """``gateway_id/{gw}/``: every topic a gateway may use starts with this."""
    return f"{PREFIX}{gateway_id}/"


def uplink_topic(gateway_id: str, kind: Kind) -> str:
    """The topic a gateway publishes ``kind`` messages on (for simulators and tests)."""
    return f"{PREFIX}{gateway_id}/{kind.value}"


def response_topic(gateway_id: str, kind: Kind) -> str:
    """The downlink response topic for ``kind`` (SYNC and REPORT only; ``ValueError`` otherwise)."""
    try:
        suffix = _RESPONSE_SUFFIX[kind]
    except KeyError:
        raise ValueError(f"{kind} has no response topic") from None
    return f"{PREFIX}{gateway_id}{suffix}"


def commands_topic(gateway_id: str) -> str:
    """``gateway_id/{gw}/commands``: where meterhub publishes commands for the gateway's devices."""
    return f"{PREFIX}{gateway_id}/commands"
