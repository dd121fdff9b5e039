"""``GET /api/v1/cluster``: the nodes, their heartbeat age, the gateways and open hub links each holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

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
