"""Health (no token) and Prometheus metrics (read token)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from meterhub import __version__
from meterhub.api import queries
from meterhub.api.deps import Hub
from meterhub.api.schemas import Health

health_router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])


@health_router.get(
    "/healthz", response_model=Health, responses={503: {"model": Health, "description": "Degraded."}}
)
async def healthz(hub: Hub) -> Any:
    """Liveness and readiness: the database answers, the writer's last commit worked, MQTT listens.
    No token needed. 200 when everything is fine, 503 (same body) otherwise."""
    writer = hub.writer
    storage: dict[str, Any] = {
        "ok": True,
        "writer_healthy": writer.healthy if writer is not None else None,
        "queue_depth": writer.depth if writer is not None else None,
        "error": None,
        "retention": hub.storage_maintenance.info() if hub.storage_maintenance is not None else None,
    }
    try:
        await asyncio.wait_for(run_in_threadpool(queries.ping, hub.engine), timeout=5)
    except Exception as exc:  # any database failure is a health answer, not a crash
        storage["ok"] = False
        storage["error"] = str(exc)[:200] or type(exc).__name__
    if writer is not None and not writer.healthy:
        storage["ok"] = False
    mqtt = hub.mqtt
    mqtt_info = {
        "listening": mqtt is not None and hub.mqtt_port is not None and mqtt.accepting,
        "port": hub.mqtt_port,
        "tls_port": hub.tls_port,
        "connected_clients": len(mqtt.connected) if mqtt is not None else 0,
    }
    ok = storage["ok"] and mqtt_info["listening"]
    body = Health(
        status="ok" if ok else "degraded",
        version=__version__,
        time=time.time(),
        storage=storage,
        mqtt=mqtt_info,
    ).model_dump()
    return JSONResponse(body, status_code=200 if ok else 503)


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Metrics."}
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format). Needs a read (or admin) token, like the API."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
