"""The FastAPI application: ``create_app(hub)``.

Routes:

- ``GET /healthz`` (no token) and ``GET /metrics`` (read token, Prometheus text).
- ``/api/v1/...`` (bearer token; read scope may GET, admin may do everything): vendors, gateways,
  products and models, devices (list, detail, presence, history), commands, energy, alarms.
- ``/docs`` and ``/openapi.json`` (public unless ``http_docs_public = false``, then not served).

Errors are always ``{"error": {"message", "code"}}`` (see :mod:`meterhub.api.errors`).

Other components can add routes: routers in ``hub.http_routers`` (a list of APIRouter, set before
``Hub.start()``) are included as they are, without the token check or the error handlers' prefix
(the handlers are app-wide, but only change errors raised as exceptions, not returned responses).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from meterhub import __version__
from meterhub.api.errors import install_error_handlers
from meterhub.api.responses import AUTHED
from meterhub.api.routers import (
    alarm_config,
    alarms,
    billing,
    commands,
    conformance,
    devices,
    energy,
    export,
    fleet,
    prepaid,
    registry,
    sites,
    system,
    users,
)
from meterhub.api.security import Authorizer
from meterhub.core.metrics import Metrics
from meterhub.web.router import router as dashboard_router
from meterhub.web.router import static_files as dashboard_static

DESCRIPTION = """
meterhub's REST API: gateways, devices and their data, commands, energy, alarms.

**Authentication**: `Authorization: Bearer <token>`; create tokens with
`meterhub token create NAME --scope read|admin`. Read tokens may only GET. `/healthz` is open;
`/metrics` needs a read token.

**Errors**: `{"error": {"message": "...", "code": <protocol code or null>}}`: 404 with code 2003
for an unknown device, 409 with 2001 for an offline one, 422 with 1101/1102/1103 for a bad value,
400 with 2002 for an unknown or read-only data point, 504 when a command gets no answer in time.

**Times** are Unix seconds, with `*_iso` twins in the server's configured time zone. Time query
parameters take Unix seconds or ISO 8601.
"""


def create_app(hub: Any, *, extra_routers: list[APIRouter] | None = None) -> FastAPI:
    """The API for a running :class:`meterhub.app.Hub` (its engine, writer, MQTT server, handler)."""
    docs = bool(getattr(hub.settings, "http_docs_public", True))
    app = FastAPI(
        title="meterhub",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,  # served below, with Swagger UI's files from the package (works offline)
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.hub = hub
    app.state.metrics = Metrics(hub)
    app.state.jobs = commands.CommandJobs(app.state.metrics)
    install_error_handlers(app)
    authorize = Authorizer(hub)

    app.include_router(system.health_router)
    app.include_router(system.metrics_router, dependencies=[Depends(authorize)], responses=AUTHED)
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)], responses=AUTHED)
    routers = (registry, devices, commands, energy, alarms, alarm_config, users, conformance, sites, billing)
    for module in (*routers, prepaid, export, fleet):
        api.include_router(module.router)
    app.include_router(api)
    for extra in extra_routers or []:
        app.include_router(extra)
    # The operator dashboard (meterhub.web): the page at /, its files, the live event stream.
    app.include_router(dashboard_router)
    app.mount("/static", dashboard_static(), name="static")
    if docs:
        install_docs(app)
    return app


DOCS_ASSETS = "/docs-assets"


def install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package, so it works without internet (an
    edge gateway is often offline); no file comes from another host."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="meterhub API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )
