"""OpenAPI ``responses`` entries for the error answers, so that every status the API sends is documented."""

from __future__ import annotations

from typing import Any

from meterhub.api.schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "Not supported (protocol code 2002: unknown or read-only data point, or no numeric value).",
    401: "No token, an unknown one, or a revoked one.",
    403: "The token's scope does not allow this (read tokens may only GET).",
    404: "Not found (protocol code 2003 for an unknown device).",
    409: "Conflict (protocol code 2001: the device is offline; or a duplicate name).",
    422: "Invalid request or value (protocol codes 1101/1102/1103, or null for request problems).",
    502: "The device answered the command with an error code.",
    503: "Service not available (storage down, or the protocol service not running).",
    504: "The device did not answer the command in time.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


#: Every route behind a token.
AUTHED = errors(401, 403, 422, 503)
