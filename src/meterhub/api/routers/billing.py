"""Bills: per unit (optionally one tenant's part), per tenant, or every occupancy of a site, as JSON,
CSV (one row per line item) or a printable HTML statement. Rules: :mod:`meterhub.billing`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response

from meterhub.api.deps import Hub
from meterhub.api.errors import ApiError
from meterhub.api.responses import errors
from meterhub.api.routers.sites import Id, call
from meterhub.billing.render import bill_html, bills_csv
from meterhub.core import sites

router = APIRouter(tags=["bills"])

Month = Annotated[str, Query(min_length=7, max_length=7, pattern=r"^\d{4}-\d{2}$", description="YYYY-MM.")]
Format = Annotated[Literal["json", "csv", "html"], Query(description="json, csv or html.")]
CONTENT = {
    200: {
        "description": "The bill.",
        "content": {"application/json": {}, "text/csv": {}, "text/html": {}},
    },
    **errors(404, 409),
}


def _answer(bills: list[dict[str, Any]], fmt: str, name: str, single: bool) -> Response:
    if fmt == "csv":
        return Response(
            bills_csv(bills),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    if fmt == "html":
        if not single:
            return HTMLResponse("".join(bill_html(b) for b in bills))
        return HTMLResponse(bill_html(bills[0]))
    return JSONResponse(bills[0] if single else {"bills": bills})


@router.get("/units/{unit_id}/bill", responses=CONTENT, response_model=None)
async def unit_bill(
    hub: Hub,
    unit_id: Id,
    month: Month,
    tenant_id: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Only this tenant's part.")
    ] = None,
    vacant: Annotated[bool, Query(description="Only the time no tenant occupied the unit.")] = False,
    format: Format = "json",
) -> Response:
    """Opening and closing reading of each meter (interpolated at move-in / move-out and marked so),
    kWh per tariff band and version, cost lines, tax and total, all decimal strings."""
    if vacant and tenant_id is not None:
        raise ApiError(422, "tenant_id and vacant=true exclude each other")
    bill = await call(lambda: sites.unit_bill(hub.engine, unit_id, month, tenant_id, vacant=vacant))
    return _answer([bill], format, f"bill-unit{unit_id}-{month}", True)


@router.get("/tenants/{tenant_id}/bill", responses=CONTENT, response_model=None)
async def tenant_bill(hub: Hub, tenant_id: Id, month: Month, format: Format = "json") -> Response:
    """The tenant's bill for the month (their occupancy of one unit)."""
    bill = await call(sites.tenant_bill, hub.engine, tenant_id, month)
    return _answer([bill], format, f"bill-tenant{tenant_id}-{month}", True)


@router.get("/sites/{site_id}/bills", responses=CONTENT, response_model=None)
async def site_bills(hub: Hub, site_id: Id, month: Month, format: Format = "json") -> Response:
    """Every tenant's bill in the site for the month, and each unit's vacant part (CSV: all line items
    of all bills)."""
    bills = await call(sites.site_bills, hub.engine, site_id, month)
    if format == "html" and not bills:
        raise ApiError(404, f"no occupancy in site {site_id} in {month}")
    return _answer(bills, format, f"bills-site{site_id}-{month}", False)
