"""The conformance report card of a gateway."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel

from meterhub.api.deps import Hub
from meterhub.api.errors import ApiError
from meterhub.api.responses import errors
from meterhub.core.conformance import report_card

router = APIRouter(tags=["gateways"])


class FindingOut(BaseModel):
    rule: str
    title: str
    verdict: str
    expected: str
    observed: str


class ReportCardOut(BaseModel):
    gateway_id: str
    generated_at: float
    connected: bool
    client_address: str | None = None
    verdict: str
    summary: dict[str, int]
    findings: list[FindingOut]


@router.get("/gateways/{gateway_id}/conformance", response_model=ReportCardOut, responses=errors(404))
async def conformance(
    hub: Hub, gateway_id: Annotated[str, Path(min_length=1, max_length=128)]
) -> dict[str, Any]:
    """How well the gateway follows the edge protocol, from what meterhub observed (stored, on any
    node of a cluster): each finding says what the document expects, what the gateway did, and
    pass / warn / fail / unknown."""
    card = await report_card(hub, gateway_id)
    if card is None:
        raise ApiError(404, f"gateway {gateway_id!r} has no conformance record (it never connected)")
    return card
