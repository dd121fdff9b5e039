"""Tokens scoped to sites, and the ``operate`` role.

Roles (``api_tokens.scope``): ``read`` may only read; ``operate`` may also send commands, top up
prepaid meters and acknowledge alarms (:data:`OPERATE_ROUTES`), but not manage vendors, gateways,
products, sites or tokens; ``admin`` may do everything.

A token with rows in ``api_token_sites`` sees only those sites, in every endpoint: a request is let
through only when the resource in its path belongs to one of them (a site, building, unit, tenant,
tariff or occupancy by id; a device ``cid``, an alarm or a command by the unit its meter is in now).
Endpoints that name no such resource are refused with 403, except the few that filter their answer
by the token's sites themselves (:data:`FILTERED_ROUTES`: the site list, the audit log) and the
product models (:data:`HARMLESS_ROUTES`, no fleet data). The live stream needs ``?cid=`` of a meter in
one of the token's sites. A meter in no unit belongs to no site: only unscoped tokens see it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import Request
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from meterhub.api.errors import ApiError
from meterhub.storage import schema

OPERATE_ROUTES = frozenset(
    {
        ("POST", "/api/v1/devices/{cid}/commands"),
        ("POST", "/api/v1/meters/{cid}/topups"),
        ("POST", "/api/v1/alarms/{alarm_id}/ack"),
    }
)
FILTERED_ROUTES = frozenset({"/api/v1/sites", "/api/v1/audit"})
HARMLESS_ROUTES = frozenset({"/api/v1/models", "/api/v1/models/{model}"})


def token_sites(conn: Connection, token_id: int) -> tuple[int, ...] | None:
    ts = schema.api_token_sites
    rows = conn.execute(select(ts.c.site_id).where(ts.c.token_id == token_id).order_by(ts.c.site_id)).all()
    return tuple(r.site_id for r in rows) if rows else None


def attach_sites(conn: Connection, token_id: int, sites: Iterable[int]) -> None:
    from meterhub.api.security import TokenError

    for site_id in sorted(set(sites)):
        if conn.execute(select(schema.sites.c.id).where(schema.sites.c.id == site_id)).first() is None:
            raise TokenError(f"site {site_id} does not exist")
        conn.execute(insert(schema.api_token_sites).values(token_id=token_id, site_id=site_id))


def _route(request: Request) -> str | None:
    """The matched route's path template, with the API prefix (``/api/v1/sites/{site_id}``)."""
    path = getattr(request.scope.get("route"), "path", None)
    if path is not None and not path.startswith("/api/") and request.url.path.startswith("/api/v1/"):
        path = "/api/v1" + path
    return path


def operate_allows(request: Request) -> bool:
    return (request.method, _route(request)) in OPERATE_ROUTES


def site_of_cid(conn: Connection, cid: str) -> int | None:
    ma = schema.meter_assignments
    row = conn.execute(select(ma.c.site_id).where(ma.c.cid == cid, ma.c.end_t.is_(None))).first()
    return None if row is None else row.site_id


def _site_by(conn: Connection, table: Any, key: Any) -> int | None:
    row = conn.execute(select(table.c.site_id).where(table.c.id == key)).first()
    return None if row is None else row.site_id


def resolve_site(conn: Connection, params: dict[str, Any], jobs: Any = None) -> tuple[bool, int | None]:
    """``(named, site)``: whether the path names a site-bound resource, and its site (None: unknown)."""
    if "site_id" in params:
        return True, int(params["site_id"])
    by_id = {
        "unit_id": schema.units,
        "building_id": schema.buildings,
        "tenant_id": schema.tenants,
        "tariff_id": schema.tariffs,
    }
    for key, table in by_id.items():
        if key in params:
            return True, _site_by(conn, table, int(params[key]))
    if "occupancy_id" in params:
        o = schema.occupancies
        row = conn.execute(select(o.c.unit_id).where(o.c.id == int(params["occupancy_id"]))).first()
        return True, None if row is None else _site_by(conn, schema.units, row.unit_id)
    if "cid" in params:
        return True, site_of_cid(conn, params["cid"])
    if "alarm_id" in params:
        a = schema.alarms
        row = conn.execute(select(a.c.cid).where(a.c.id == int(params["alarm_id"]))).first()
        return True, None if row is None else site_of_cid(conn, row.cid)
    if "command_id" in params:
        job = jobs.get(params["command_id"]) if jobs is not None else None
        cid = getattr(job, "cid", None)
        if cid is None:
            c = schema.commands
            row = conn.execute(select(c.c.cid).where(c.c.request_id == params["command_id"])).first()
            cid = None if row is None else row.cid
        return True, None if cid is None else site_of_cid(conn, cid)
    return False, None


async def check_sites(hub: Any, request: Request, info: Any) -> None:
    """403 unless the request stays inside the token's sites (see the module docstring)."""
    path = _route(request)
    allowed = info.sites
    if path in HARMLESS_ROUTES:
        return
    if path in FILTERED_ROUTES:
        if request.method != "GET":
            raise ApiError(
                403, f"token {info.name!r} is limited to sites {list(allowed)}: it cannot create sites"
            )
        wanted = request.query_params.get("site_id")
        if wanted is not None and wanted.isdigit() and int(wanted) not in allowed:
            raise ApiError(403, f"site {wanted} is not one of token {info.name!r}'s sites {list(allowed)}")
        return
    jobs = getattr(request.app.state, "jobs", None)

    def resolve() -> tuple[bool, int | None]:
        with hub.engine.connect() as conn:
            return resolve_site(conn, dict(request.path_params), jobs)

    try:
        named, site = await run_in_threadpool(resolve)
    except (ValueError, TypeError):
        named, site = True, None
    if not named:
        raise ApiError(
            403,
            f"token {info.name!r} is limited to sites {list(allowed)}; {path} spans every site "
            "(use /api/v1/sites/{id}/... instead)",
        )
    if site is None or site not in allowed:
        raise ApiError(403, f"not in token {info.name!r}'s sites {list(allowed)}")


def check_site_ids(request: Request, site_ids: Iterable[int]) -> None:
    """For body fields that name a site-bound resource (a unit to move a meter into)."""
    info = getattr(request.state, "token", None)
    if info is None or info.sites is None:
        return
    for sid in site_ids:
        if sid not in info.sites:
            raise ApiError(403, f"not in token {info.name!r}'s sites {list(info.sites)}")


async def check_stream(hub: Any, info: Any, cid: str | None) -> None:
    """The live stream of a site-scoped token: one meter of its sites (``?cid=``)."""
    if info.sites is None:
        return
    if cid is None:
        raise ApiError(
            403, f"token {info.name!r} is limited to sites {list(info.sites)}: stream one meter (?cid=)"
        )

    def site() -> int | None:
        with hub.engine.connect() as conn:
            return site_of_cid(conn, cid)

    if await run_in_threadpool(site) not in info.sites:
        raise ApiError(403, f"not in token {info.name!r}'s sites {list(info.sites)}")


def visible_sites(request: Request) -> tuple[int, ...] | None:
    info = getattr(request.state, "token", None)
    return None if info is None else info.sites
