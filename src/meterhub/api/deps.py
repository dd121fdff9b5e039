"""Helpers shared by the routers: the hub, time parsing and formatting, paging."""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Depends, Query, Request

from meterhub.api.errors import ApiError
from meterhub.protocol.errors import ErrorCode

MAX_LIMIT = 1000


def get_hub(request: Request) -> Any:
    return request.app.state.hub


Hub = Annotated[Any, Depends(get_hub)]


def protocol(hub: Any) -> Any:
    """The protocol service, or 503 when the hub runs another handler (echo benchmarks)."""
    handler = hub.handler
    if handler is None or not hasattr(handler, "devices"):
        raise ApiError(503, "the protocol service is not running (handler is not 'protocol')")
    return handler


class Paging:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")] = 0,
    ) -> None:
        self.limit = limit
        self.offset = offset

    def page(self, items: list[Any], total: int) -> dict[str, Any]:
        return {"items": items, "total": total, "limit": self.limit, "offset": self.offset}


PagingDep = Annotated[Paging, Depends()]


def zone(hub: Any) -> ZoneInfo:
    return ZoneInfo(hub.settings.timezone)


def iso(t: float | None, tz: ZoneInfo) -> str | None:
    if t is None:
        return None
    try:
        return dt.datetime.fromtimestamp(t, tz).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return None


def iso_required(t: float, tz: ZoneInfo) -> str:
    return iso(t, tz) or ""


def parse_time(text: str | None, name: str, tz: ZoneInfo, default: float) -> float:
    """Unix seconds ("1763766000", "1763766000.5") or ISO 8601 ("2026-11-21T10:00:00+01:00";
    without an offset, the configured time zone)."""
    if text is None or text == "":
        return default
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ApiError(
                422,
                f"{name}: expected Unix seconds or an ISO 8601 time, got {text[:40]!r}",
                int(ErrorCode.PARAMS_TYPE_INCORRECT),
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        try:
            return parsed.timestamp()
        except (OverflowError, OSError, ValueError):
            raise ApiError(422, f"{name}: time out of range", int(ErrorCode.PARAMS_RANGE_INVALID)) from None
    if not math.isfinite(value) or not -1e11 < value < 1e11:
        raise ApiError(422, f"{name}: time out of range", int(ErrorCode.PARAMS_RANGE_INVALID))
    return value
