"""The operator dashboard: the page at ``/``, its static files, the live event stream.

Routes (none of them in /openapi.json: they are the dashboard's, not the API's):

- ``GET /``: the single page (``static/index.html``); the views are hash routes (``/#/devices/m1``).
- ``/static/...``: the page's scripts, styles and the vendored uPlot (shipped in the Python package).
- ``GET /api/v1/stream``: server-sent events (``text/event-stream``). ``EventSource`` cannot send an
  ``Authorization`` header, so the token is taken from ``?token=`` (a header works too, for curl). It is
  checked with the same lookup as the API (unknown or revoked: 401) and checked again every
  ``RECHECK`` seconds while the stream is open (revoked meanwhile: a ``bye`` event, then the end).
  ``?cid=`` streams one device; without it the stream is the fleet's (``?dp=3&dp=19`` limits its
  reports to those data points). Events: ``hello`` (first), ``report``, ``presence``, ``sync``,
  ``gateway``, ``overflow`` (events were dropped for a slow client: reload), ``bye`` (the server ends
  the stream), and a ``: ping`` comment every ``PING`` seconds. See ``meterhub.web.stream``.
- ``GET /ui/whoami``: the bearer token's name and scope, so that the page can tell a read token (no
  command panel) from an admin one. The API has no such endpoint (yet).

Choices: a token in a URL can end up in logs and browser history. meterhub's HTTP server writes no
access log, the page sends ``Referrer-Policy: no-referrer``, and the token lives in sessionStorage (gone
when the tab closes). Behind a reverse proxy that logs query strings, strip ``token`` there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from meterhub import __version__
from meterhub.api.errors import ApiError
from meterhub.api.scoping import check_stream
from meterhub.api.security import TokenInfo, lookup_token
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.web.stream import StreamBroker, event_data, sse

log = get_logger(__name__)
_repeats = RateLimitedLog(log)  # per-message lines: one per kind and interval, counted

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: Seconds between keep-alive comments on an idle stream.
PING = 15.0
#: Seconds between checks that the stream's token is still valid.
RECHECK = 60.0
#: How often (seconds) an idle stream looks whether the server is stopping.
TICK = 0.5
#: Events written in one chunk at most (a burst is sent in few writes).
BATCH = 200
#: What the browser waits before reconnecting after a dropped connection (ms).
RETRY_MS = 3000

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class DashboardStatic(StaticFiles):
    """The static files, always revalidated (ETag / Last-Modified make that a cheap 304)."""

    async def get_response(self, path: str, scope: Scope) -> Any:
        response = await super().get_response(path, scope)
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response


def static_files() -> StaticFiles:
    """The ASGI app serving ``static/`` (mount it at ``/static``)."""
    return DashboardStatic(directory=STATIC_DIR)


_page_cache: dict[str, str] = {}


def _page() -> str:
    page = _page_cache.get("index")
    if page is None:
        text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        page = _page_cache["index"] = text.replace("{{version}}", __version__)
    return page


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """The dashboard page."""
    return HTMLResponse(_page(), headers=PAGE_HEADERS)


# --- tokens --------------------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


async def check_token(hub: Any, token: str | None) -> TokenInfo:
    """The token's record (the API's lookup); 401 when missing, unknown or revoked."""
    if not token:
        raise _unauthorized("a token is required (?token=... or Authorization: Bearer ...)")
    if len(token) > 256:
        raise _unauthorized("unknown token")
    info = await run_in_threadpool(lookup_token, hub.engine, token)
    if info is None:
        raise _unauthorized("unknown token")
    if info.revoked:
        raise _unauthorized("this token was revoked")
    return info


@router.get("/ui/whoami")
async def whoami(request: Request) -> JSONResponse:
    """The bearer token's name and scope (read or admin)."""
    info = await check_token(request.app.state.hub, _bearer(request))
    who: dict[str, Any] = {"name": info.name, "scope": info.scope}
    if info.sites is not None:
        who["sites"] = list(info.sites)
    return JSONResponse(who, headers={"Cache-Control": "no-store"})


# --- the stream ----------------------------------------------------------------------------------


def broker_of(request: Request) -> StreamBroker:
    """The app's broker (created on first use)."""
    state = request.app.state
    broker = getattr(state, "web_stream", None)
    if broker is None:
        handler = getattr(state.hub, "handler", None)
        if handler is None or not hasattr(handler, "listeners") or not hasattr(handler, "devices"):
            raise ApiError(503, "the protocol service is not running (handler is not 'protocol')")
        broker = state.web_stream = StreamBroker(handler)
    return broker


def _stopping(hub: Any) -> bool:
    server = getattr(getattr(hub, "api", None), "server", None)
    return bool(server is not None and server.should_exit)


@router.get("/api/v1/stream")
async def stream(
    request: Request,
    cid: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    dp: Annotated[list[int] | None, Query()] = None,
    token: Annotated[str | None, Query(max_length=256)] = None,
) -> StreamingResponse:
    """Live events as server-sent events (see the module docstring)."""
    hub = request.app.state.hub
    secret = token or _bearer(request)
    info = await check_token(hub, secret)
    await check_stream(hub, info, cid)  # a site-scoped token: one meter of its sites
    broker = broker_of(request)
    if cid is not None and cid not in broker.handler.devices and not await _stored(broker.handler, cid):
        raise ApiError(404, f"device {cid!r} does not exist", 2003)
    dps = None if dp is None else [d for d in dp if 0 < d < 1_000_000]
    if broker.full:
        raise ApiError(503, f"too many live streams open ({broker.max_subscribers}); try again later")

    async def events() -> Any:
        # Subscribed here, not before: a generator that never starts would never unsubscribe.
        sub = broker.subscribe(cid, dps)
        next_id = 1
        try:
            hello = {
                "cid": cid,
                "dp": sorted(sub.dps) if sub.dps is not None else None,
                "token": {"name": info.name, "scope": info.scope},
                "server_time": time.time(),
                "version": __version__,
            }
            yield f"retry: {RETRY_MS}\n" + sse("hello", hello, 0)
            loop = asyncio.get_running_loop()
            last_write = last_check = loop.time()
            reported_drops = 0
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), timeout=TICK)
                except TimeoutError:
                    item = None
                if _stopping(hub):
                    yield sse("bye", {"reason": "server stopping"})
                    return
                now = loop.time()
                if item is not None:
                    batch = [item]
                    while len(batch) < BATCH and not sub.queue.empty():
                        batch.append(sub.queue.get_nowait())
                    chunks = []
                    for kind, event in batch:
                        try:
                            data = event_data(kind, event)
                        except Exception:  # an event of an unexpected shape: skip it, keep the stream
                            _repeats.error(
                                ("stream", kind), "stream event not sent", kind=kind, exc_info=True
                            )
                            continue
                        chunks.append(sse(kind, data, next_id))
                        next_id += 1
                    if sub.dropped != reported_drops:
                        chunks.append(sse("overflow", {"dropped": sub.dropped - reported_drops}))
                        reported_drops = sub.dropped
                    if chunks:
                        yield "".join(chunks)
                        last_write = now
                elif now - last_write >= PING:
                    yield ": ping\n\n"
                    last_write = now
                if now - last_check >= RECHECK:
                    last_check = now
                    try:
                        await check_token(hub, secret)
                    except ApiError as exc:
                        yield sse("bye", {"reason": exc.message, "status": exc.status})
                        return
        finally:
            broker.unsubscribe(sub)

    headers = {
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _stored(handler: Any, cid: str) -> bool:
    """Whether the device exists (the handler's cache holds only some devices)."""
    find = getattr(handler, "find_device", None)
    return find is not None and await find(cid) is not None
