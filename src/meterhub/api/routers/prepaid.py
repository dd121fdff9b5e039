"""Prepaid meters: the account (balance, threshold, grace rules, switch state), top-ups, per site.
Rules: :mod:`meterhub.core.prepaid`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from meterhub.api.deps import Hub, PagingDep
from meterhub.api.responses import errors
from meterhub.api.routers.sites import NO_NUL, Cid, Id, _In, actor, call
from meterhub.core import prepaid

router = APIRouter(tags=["prepaid"])

Amount = Annotated[
    str | int, Field(description='A decimal as a string ("20.00"); floats are refused, they are not exact.')
]
E = errors(404, 409)


class PrepaidIn(_In):
    mode: Literal["currency", "kwh"] = "currency"
    low_threshold: Amount = "0"
    grace: Annotated[
        dict[str, Any] | None,
        Field(
            description='e.g. {"nights": {"from": "20:00", "to": "08:00"}, "weekends": true, '
            '"holidays": ["2026-12-25"]} (site time zone)'
        ),
    ] = None
    balance: Annotated[
        str | int | None, Field(description="Set the balance (first setup or a correction).")
    ] = None


class TopupIn(_In):
    amount: Amount
    reference: Annotated[str | None, Field(max_length=255, pattern=NO_NUL)] = None


def _kick(hub: Any) -> None:
    service = getattr(hub, "prepaid", None)
    if service is not None:
        service.kick()


@router.put("/meters/{cid}/prepaid", responses=E)
async def configure(hub: Hub, request: Request, cid: Cid, body: PrepaidIn) -> dict[str, Any]:
    """Make the meter prepaid (or change its settings). The meter must be in a unit (its site gives the
    currency, time zone and tariff). Consumption is charged from now on."""
    out = await call(
        lambda: prepaid.configure(
            hub.engine,
            cid,
            mode=body.mode,
            low_threshold=body.low_threshold,
            grace=body.grace,
            balance=body.balance,
            actor=actor(request),
        )
    )
    _kick(hub)
    return out


@router.get("/meters/{cid}/prepaid", responses=E)
async def account(hub: Hub, cid: Cid) -> dict[str, Any]:
    """Balance (rounded for display, and exact), low-credit state, switch wanted and last command."""
    return await call(prepaid.get_account, hub.engine, cid)


@router.post("/meters/{cid}/topups", status_code=201, responses=E)
async def topup(hub: Hub, request: Request, cid: Cid, body: TopupIn) -> dict[str, Any]:
    """Add credit (amount > 0). A meter switched off for lack of credit is switched on again."""
    out = await call(prepaid.topup, hub.engine, cid, body.amount, body.reference, actor(request))
    _kick(hub)
    return out


@router.get("/meters/{cid}/topups", responses=E)
async def topups(hub: Hub, cid: Cid, paging: PagingDep) -> list[dict[str, Any]]:
    return await call(prepaid.list_topups, hub.engine, cid, paging.limit, paging.offset)


@router.get("/sites/{site_id}/prepaid", responses=E)
async def site_accounts(hub: Hub, site_id: Id) -> list[dict[str, Any]]:
    return await call(prepaid.list_accounts, hub.engine, site_id)
