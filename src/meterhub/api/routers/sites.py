"""Sites, buildings, units, meters in units, tenants and occupancy, tariffs, the audit log.

The records themselves live in :mod:`meterhub.core.sites`; this module maps HTTP onto it. Mistakes
get 404 (unknown site, unit, tenant, tariff, device), 409 (duplicate name, overlapping occupancy, a
move earlier than the meter's last one) or 422 (bad time zone, currency, time, tariff), each with a
message saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from meterhub.api.deps import Hub, PagingDep
from meterhub.api.errors import ApiError
from meterhub.api.responses import errors
from meterhub.api.scoping import check_site_ids, visible_sites
from meterhub.core import sites
from meterhub.core.sites import PMError

router = APIRouter(tags=["sites"])

Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
Cid = Annotated[str, Path(min_length=1, max_length=128)]
NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
Text = Annotated[str, Field(max_length=255, pattern=NO_NUL)]
When = Annotated[
    str | float | None,
    Field(description="Unix seconds, YYYY-MM-DD (local midnight) or ISO 8601 (no offset: the site's zone)."),
]
TariffRef = Annotated[int | None, Field(ge=1, le=2**31 - 1)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteIn(_In):
    name: Name
    timezone: Annotated[str, Field(max_length=64, pattern=NO_NUL)] = "UTC"
    currency: Annotated[str, Field(min_length=3, max_length=3, pattern=NO_NUL)] = "EUR"


class SitePatch(_In):
    name: Name | None = None
    timezone: Annotated[str | None, Field(max_length=64, pattern=NO_NUL)] = None
    currency: Annotated[str | None, Field(min_length=3, max_length=3, pattern=NO_NUL)] = None
    tariff_id: TariffRef = None


class BuildingIn(_In):
    name: Name


class UnitIn(_In):
    name: Name
    label: Annotated[str | None, Field(max_length=64, pattern=NO_NUL, description="flat, shop, floor...")] = (
        None
    )
    tariff_id: TariffRef = None


class UnitPatch(_In):
    name: Name | None = None
    label: Annotated[str | None, Field(max_length=64, pattern=NO_NUL)] = None
    tariff_id: TariffRef = None


class MeterPatch(_In):
    name: Text | None = None
    location: Text | None = None


class AssignIn(_In):
    unit_id: Annotated[int | None, Field(ge=1, le=2**31 - 1, description="null takes the meter out.")]
    at: When = None


class TenantIn(_In):
    name: Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]
    reference: Annotated[str | None, Field(max_length=128, pattern=NO_NUL)] = None
    email: Text | None = None


class OccupancyIn(_In):
    unit_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    move_in: Annotated[str | float, Field(description="Unix seconds, YYYY-MM-DD or ISO 8601.")]
    move_out: When = None


class MoveOutIn(_In):
    move_out: When


class TariffIn(_In):
    name: Name
    versions: Annotated[
        list[dict[str, Any]],
        Field(
            min_length=1,
            max_length=100,
            description="Each: effective_from (YYYY-MM-DD) and a specification (see docs/operators.md).",
        ),
    ]


def actor(request: Request) -> str:
    token = getattr(request.state, "token", None)
    return token.name if token is not None else "api"


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args)
    except PMError as exc:
        raise ApiError(exc.status, exc.message) from None


E = errors(404, 409)


# --- sites, buildings, units ---------------------------------------------------------------------


@router.post("/sites", status_code=201, responses=errors(409))
async def create_site(hub: Hub, request: Request, body: SiteIn) -> dict[str, Any]:
    """A site: a name, its IANA time zone (bills and time-of-use follow it) and its currency."""
    return await call(sites.create_site, hub.engine, body.name, body.timezone, body.currency, actor(request))


@router.get("/sites")
async def list_sites(hub: Hub, request: Request) -> list[dict[str, Any]]:
    """Every site (a site-scoped token: its own)."""
    return await call(sites.list_sites, hub.engine, visible_sites(request))


@router.get("/sites/{site_id}", responses=E)
async def get_site(hub: Hub, site_id: Id) -> dict[str, Any]:
    return await call(sites.get_site, hub.engine, site_id)


@router.patch("/sites/{site_id}", responses=E)
async def update_site(hub: Hub, request: Request, site_id: Id, body: SitePatch) -> dict[str, Any]:
    """Rename, change zone or currency, or set the default tariff (``tariff_id``) of the site's units."""
    return await call(
        sites.update_site, hub.engine, site_id, body.model_dump(exclude_unset=True), actor(request)
    )


@router.post("/sites/{site_id}/buildings", status_code=201, responses=E)
async def create_building(hub: Hub, request: Request, site_id: Id, body: BuildingIn) -> dict[str, Any]:
    return await call(sites.create_building, hub.engine, site_id, body.name, actor(request))


@router.get("/sites/{site_id}/buildings", responses=E)
async def list_buildings(hub: Hub, site_id: Id) -> list[dict[str, Any]]:
    return await call(sites.list_buildings, hub.engine, site_id)


@router.post("/buildings/{building_id}/units", status_code=201, responses=E)
async def create_unit(hub: Hub, request: Request, building_id: Id, body: UnitIn) -> dict[str, Any]:
    """A unit (flat, shop, floor: ``label`` is free text); ``tariff_id`` overrides the site's tariff."""
    return await call(
        sites.create_unit, hub.engine, building_id, body.name, body.label, body.tariff_id, actor(request)
    )


@router.get("/sites/{site_id}/units", responses=E)
async def list_units(hub: Hub, site_id: Id) -> list[dict[str, Any]]:
    return await call(sites.list_units, hub.engine, site_id)


@router.get("/units/{unit_id}", responses=E)
async def get_unit(hub: Hub, unit_id: Id) -> dict[str, Any]:
    return await call(sites.get_unit, hub.engine, unit_id)


@router.patch("/units/{unit_id}", responses=E)
async def update_unit(hub: Hub, request: Request, unit_id: Id, body: UnitPatch) -> dict[str, Any]:
    return await call(
        sites.update_unit, hub.engine, unit_id, body.model_dump(exclude_unset=True), actor(request)
    )


@router.get("/sites/{site_id}/overview", responses=E)
async def site_overview(
    hub: Hub,
    site_id: Id,
    silent_minutes: Annotated[float, Query(gt=0, le=525_600, description="Silent after this long.")] = 15,
    days: Annotated[int, Query(ge=1, le=92, description="Days of energy history.")] = 14,
) -> dict[str, Any]:
    """The site now: power per meter and in all, energy per day, top consumers this month, meters
    silent for more than ``silent_minutes``, active alarms of its meters."""
    return await call(sites.site_overview, hub.engine, site_id, silent_minutes, days)


# --- meters --------------------------------------------------------------------------------------


@router.get("/sites/{site_id}/meters", responses=E)
async def site_meters(
    hub: Hub,
    site_id: Id,
    q: Annotated[str | None, Query(max_length=128, description="Search cid, name and location.")] = None,
) -> list[dict[str, Any]]:
    """The meters in the site's units now, with name, location and unit (``q`` searches)."""
    return await call(sites.search_meters, hub.engine, site_id, q)


@router.get("/sites/{site_id}/alarms", responses=E)
async def site_alarms(
    hub: Hub,
    site_id: Id,
    paging: PagingDep,
    active: Annotated[bool | None, Query(description="true: not cleared yet; false: cleared.")] = None,
) -> dict[str, Any]:
    """Alarms of the meters in the site's units now, newest first."""
    rows, total = await run_in_threadpool(
        _rows, hub.engine, site_id, "alarms", active, paging.limit, paging.offset
    )
    return paging.page(rows, total)


@router.get("/sites/{site_id}/commands", responses=E)
async def site_commands(hub: Hub, site_id: Id, paging: PagingDep) -> dict[str, Any]:
    """Commands sent to the meters in the site's units now (prepaid switching among them), newest first."""
    rows, total = await run_in_threadpool(
        _rows, hub.engine, site_id, "commands", None, paging.limit, paging.offset
    )
    return paging.page(rows, total)


def _rows(engine: Any, site_id: int, kind: str, active: bool | None, limit: int, offset: int) -> Any:
    try:
        return sites.site_rows(engine, site_id, kind, active=active, limit=limit, offset=offset)
    except PMError as exc:
        raise ApiError(exc.status, exc.message) from None


@router.get("/sites/{site_id}/energy", responses=E)
async def site_energy(
    hub: Hub,
    site_id: Id,
    period: Annotated[Literal["day", "month"], Query()] = "day",
    from_: Annotated[str, Query(alias="from", max_length=10, description="YYYY-MM-DD or YYYY-MM.")] = "",
    to: Annotated[str, Query(max_length=10)] = "",
) -> dict[str, Any]:
    """Energy per day or month (the site's zone) of the meters in its units now, and each one's total.
    Default: this month by day, this year by month."""
    import datetime as dt

    if not from_ or not to:
        site = await call(sites.get_site, hub.engine, site_id)
        from zoneinfo import ZoneInfo

        today = dt.datetime.now(ZoneInfo(site["timezone"])).date()
        to = to or today.isoformat()
        from_ = (
            from_ or (today.replace(day=1) if period == "day" else today.replace(month=1, day=1)).isoformat()
        )
    return await call(sites.site_energy, hub.engine, site_id, period, from_, to)


@router.get("/meters/{cid}", responses=E)
async def get_meter(hub: Hub, cid: Cid) -> dict[str, Any]:
    """A meter's operator name and location, its unit now and every earlier assignment."""
    return await call(sites.meter, hub.engine, cid)


@router.patch("/meters/{cid}", responses=E)
async def update_meter(hub: Hub, request: Request, cid: Cid, body: MeterPatch) -> dict[str, Any]:
    """Name and location as the operator wants them shown (the gateway's own stay in the device)."""
    return await call(sites.set_meter_info, hub.engine, cid, body.name, body.location, actor(request))


@router.put("/meters/{cid}/unit", responses=E)
async def assign_meter(hub: Hub, request: Request, cid: Cid, body: AssignIn) -> dict[str, Any]:
    """Put the meter in a unit from ``at`` (default now), or take it out (``unit_id: null``). A move
    closes the current assignment at that instant: earlier bills still see the meter where it was."""
    if body.unit_id is not None and visible_sites(request) is not None:
        unit = await call(sites.get_unit, hub.engine, body.unit_id)
        check_site_ids(request, [unit["site_id"]])
    at = None
    if body.at is not None:
        at = await call(_instant_for_meter, hub.engine, body.unit_id, body.at)
    return await call(sites.assign_meter, hub.engine, cid, body.unit_id, at, actor(request))


def _instant_for_meter(engine: Any, unit_id: int | None, value: Any) -> float:
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("UTC")
    if unit_id is not None:
        unit = sites.get_unit(engine, unit_id)
        tz = ZoneInfo(sites.get_site(engine, unit["site_id"])["timezone"])
    return sites.parse_instant(value, tz, "at")


# --- tenants and occupancy -----------------------------------------------------------------------


@router.post("/sites/{site_id}/tenants", status_code=201, responses=E)
async def create_tenant(hub: Hub, request: Request, site_id: Id, body: TenantIn) -> dict[str, Any]:
    return await call(
        sites.create_tenant, hub.engine, site_id, body.name, body.reference, body.email, actor(request)
    )


@router.get("/sites/{site_id}/tenants", responses=E)
async def list_tenants(hub: Hub, site_id: Id) -> list[dict[str, Any]]:
    return await call(sites.list_tenants, hub.engine, site_id)


@router.get("/tenants/{tenant_id}", responses=E)
async def get_tenant(hub: Hub, tenant_id: Id) -> dict[str, Any]:
    return await call(sites.get_tenant, hub.engine, tenant_id)


@router.post("/tenants/{tenant_id}/occupancies", status_code=201, responses=E)
async def add_occupancy(hub: Hub, request: Request, tenant_id: Id, body: OccupancyIn) -> dict[str, Any]:
    """The tenant occupies the unit from ``move_in`` to ``move_out`` (exclusive; open-ended if absent).
    Occupancies of one unit may not overlap (409)."""
    return await call(
        sites.add_occupancy, hub.engine, tenant_id, body.unit_id, body.move_in, body.move_out, actor(request)
    )


@router.patch("/occupancies/{occupancy_id}", responses=E)
async def move_out(hub: Hub, request: Request, occupancy_id: Id, body: MoveOutIn) -> dict[str, Any]:
    """Set (or change) the move-out of an occupancy."""
    return await call(sites.end_occupancy, hub.engine, occupancy_id, body.move_out, actor(request))


# --- tariffs -------------------------------------------------------------------------------------


@router.post("/sites/{site_id}/tariffs", status_code=201, responses=E)
async def create_tariff(hub: Hub, request: Request, site_id: Id, body: TariffIn) -> dict[str, Any]:
    """A tariff with its versions (flat, tou or tiered; standing charge per day; tax rate), each in
    effect from its ``effective_from`` (local midnight) until the next one. Money is decimal strings."""
    return await call(sites.create_tariff, hub.engine, site_id, body.name, body.versions, actor(request))


@router.get("/sites/{site_id}/tariffs", responses=E)
async def list_tariffs(hub: Hub, site_id: Id) -> list[dict[str, Any]]:
    return await call(sites.list_tariffs, hub.engine, site_id)


@router.get("/tariffs/{tariff_id}", responses=E)
async def get_tariff(hub: Hub, tariff_id: Id) -> dict[str, Any]:
    return await call(sites.get_tariff, hub.engine, tariff_id)


@router.post("/tariffs/{tariff_id}/versions", status_code=201, responses=E)
async def add_tariff_version(
    hub: Hub, request: Request, tariff_id: Id, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """A new price from ``effective_from`` on (a change mid-month bills each part at its own price)."""
    return await call(sites.add_tariff_version, hub.engine, tariff_id, body, actor(request))


# --- audit ---------------------------------------------------------------------------------------


@router.get("/audit")
async def audit_log(
    hub: Hub,
    request: Request,
    paging: PagingDep,
    site_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> dict[str, Any]:
    """Every change to sites, units, meters, tenants, tariffs and prepaid accounts, newest first
    (a site-scoped token: its sites' entries)."""
    scope: Any = visible_sites(request) if site_id is None else [site_id]
    rows, total = await call(sites.audit_entries, hub.engine, scope, paging.limit, paging.offset)
    return paging.page(rows, total)
