"""``GET /api/v1/cluster``: the nodes, their heartbeat age, the gateways and open hub links each holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from meterhub.api.responses import AUTHED
from meterhub.api.security import Authorizer


def cluster_router(hub: Any) -> APIRouter:
    router = APIRouter(
        prefix="/api/v1", tags=["cluster"], dependencies=[Depends(Authorizer(hub))], responses=AUTHED
    )

    @router.get("/cluster")
    async def cluster_status() -> dict[str, Any]:
        """This node's id and bus, and every node known to the database: ``state`` (alive, dead:
        no heartbeat within ``node_timeout``, stopped, lost: swept after it died), heartbeat age in
        seconds, gateways held (connected), open hub links held, version and ports."""
        return await hub.cluster.status()  # type: ignore[no-any-return]

    return router


def ready_router(hub: Any) -> APIRouter:
    """``GET /ready`` and ``GET /live`` (no token): for load balancers and Kubernetes probes."""
    router = APIRouter(tags=["cluster"])

    @router.get("/ready", responses={503: {"description": "Not ready: do not send gateways here."}})
    async def ready() -> JSONResponse:
        """200 when this node is registered (its heartbeat stored within ``node_timeout``), its bus is
        connected, its MQTT listener accepts connections and it is not draining; 503 otherwise. The
        body says which: ``{ready, node_id, registered, heartbeat_age, bus_connected, accepting,
        draining}``."""
        body = hub.cluster.readiness()
        mqtt = hub.mqtt
        body["accepting"] = mqtt is not None and hub.mqtt_port is not None and bool(mqtt.accepting)
        body["draining"] = hub.draining
        ok = body["registered"] and body["bus_connected"] and body["accepting"] and not body["draining"]
        body = {"ready": ok, **body}
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/live")
    async def live() -> dict[str, Any]:
        """200 while the process serves HTTP, whatever PostgreSQL and the bus do (a liveness probe:
        restarting a node does not bring a lost database back)."""
        return {"alive": True, "node_id": hub.cluster.node_id}

    return router
