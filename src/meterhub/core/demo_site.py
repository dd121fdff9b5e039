"""The demo's property: a site with a building, units, tenants, a day/night tariff and one prepaid
meter, built from the simulated meters once they are synced (``meterhub demo``). Idempotent: a second
run finds the site and leaves it as it is."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from meterhub.core import prepaid, sites
from meterhub.core.sites import PMError

SITE = "Demo Court"
TENANTS = ("Alice Martin", "Bob Chen", "Carla Rossi", "Café Luna")
ACTOR = "demo"
TARIFF = {
    "kind": "tou",
    "bands": {"day": "0.32", "night": "0.18"},
    "windows": [
        {"days": "all", "start": "00:00", "end": "07:00", "band": "night"},
        {"days": "all", "start": "07:00", "end": "22:00", "band": "day"},
        {"days": "all", "start": "22:00", "end": "24:00", "band": "night"},
    ],
    "standing_charge_per_day": "0.40",
    "tax_rate": "0.19",
}


def populate(
    engine: Engine,
    cids: Sequence[str],
    timezone: str,
    now: float | None = None,
    since: float | None = None,
) -> dict[str, Any]:
    """Create the demo site from ``cids`` (the first four meters); returns what a newcomer needs.
    Meters and tenants are in their units from the month's start, or from the local day of ``since``
    when earlier (the backfilled history: last month's bill has its last days)."""
    now = time.time() if now is None else now
    tz = ZoneInfo(timezone)
    month = dt.datetime.fromtimestamp(now, tz).strftime("%Y-%m")
    month_start = f"{month}-01"
    if since is not None:
        month_start = min(month_start, dt.datetime.fromtimestamp(since, tz).strftime("%Y-%m-%d"))
    try:
        site = sites.find_site(engine, SITE)
        return {"site": site, "month": month, "created": False, "prepaid": _prepaid_cid(engine, site["id"])}
    except PMError:
        pass
    site = sites.create_site(engine, SITE, timezone, "EUR", ACTOR)
    building = sites.create_building(engine, site["id"], "House A", ACTOR)
    tariff = sites.create_tariff(
        engine, site["id"], "Day/night", [{"effective_from": "2020-01-01", **TARIFF}], ACTOR
    )
    sites.update_site(engine, site["id"], {"tariff_id": tariff["id"]}, ACTOR)
    chosen = list(cids)[: len(TENANTS)]
    prepaid_cid = None
    for k, cid in enumerate(chosen):
        shop = k == len(TENANTS) - 1
        unit = sites.create_unit(
            engine,
            building["id"],
            "Shop" if shop else f"Flat {k + 1}",
            "shop" if shop else "flat",
            None,
            ACTOR,
        )
        sites.assign_meter(engine, cid, unit["id"], sites.parse_instant(month_start, tz, "at"), ACTOR)
        sites.set_meter_info(engine, cid, f"{unit['name']} meter", f"House A, {unit['name']}", ACTOR)
        tenant = sites.create_tenant(engine, site["id"], TENANTS[k], f"T-{k + 1:03d}", None, ACTOR)
        sites.add_occupancy(engine, tenant["id"], unit["id"], month_start, None, ACTOR)
        if k == min(2, len(chosen) - 1):  # Carla's flat is prepaid: a little credit, to watch it fall
            prepaid.configure(
                engine, cid, mode="currency", low_threshold="0.05", grace=None, balance="0.10", actor=ACTOR
            )
            prepaid_cid = cid
    return {
        "site": sites.get_site(engine, site["id"]),
        "month": month,
        "created": True,
        "prepaid": prepaid_cid,
    }


def _prepaid_cid(engine: Engine, site_id: int) -> str | None:
    accounts = prepaid.list_accounts(engine, site_id)
    return accounts[0]["cid"] if accounts else None


async def announce(hub: Any, fleet: Any, base: str, token: str, echo: Any) -> None:
    """``run_fleet``'s ``on_ready`` for ``meterhub demo``: a week of simulated history (first start
    only), the site, and where to look."""
    import asyncio

    from meterhub.tools.backfill import backfill

    done = await backfill(hub, fleet)
    if done.created:
        echo(
            f"  backfilled a week of simulated history in {done.seconds:.1f} s: {done.reports} reports, "
            f"{done.alarms} past alarms (marked simulated: request_id sim-backfill:..., details.simulated)"
        )
    else:
        echo("  simulated history: backfilled at the first start (kept)")
    since = done.since if done.created else None
    info = await asyncio.to_thread(
        populate, hub.engine, list(fleet.meters), hub.settings.timezone, None, since
    )
    sid, month = info["site"]["id"], info["month"]
    auth = f"-H 'Authorization: Bearer {token}'"
    echo(f"  demo site {SITE!r} (4 units, tenants, a day/night tariff); this month's bills:")
    echo(f"    curl {auth} '{base}/api/v1/sites/{sid}/bills?month={month}&format=html'")
    echo(f"    .venv/bin/meterhub bill --site '{SITE}' --month {month} --token {token}")
    if info["prepaid"]:
        echo(f"  prepaid meter {info['prepaid']} (EUR 0.10 of credit: low at 0.05, off at 0):")
        echo(f"    .venv/bin/meterhub balance {info['prepaid']} --token {token}")
        echo(f"    .venv/bin/meterhub topup {info['prepaid']} 5.00 --reference cash --token {token}")
