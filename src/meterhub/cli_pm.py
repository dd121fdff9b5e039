"""Property-management commands, over the REST API like ``meterhub devices`` (``--url``, ``--token``):

- ``meterhub bill --site S --month 2026-11 [--csv | --html | --json] [--unit ID [--tenant ID]]``
- ``meterhub site list | create NAME --timezone Z --currency C``
- ``meterhub meter rename CID [--name N] [--location L]``, ``meterhub meter move CID --unit ID [--at T]``
- ``meterhub tenant add NAME --site S [--unit ID --move-in D [--move-out D]]``, ``tenant move-out OCC --at D``
- ``meterhub tariff add NAME SPEC.json --site S [--default]``
- ``meterhub topup CID AMOUNT [--reference R]``, ``meterhub balance CID``

``PM_COMMANDS`` is what ``meterhub.cli`` registers.
"""

from __future__ import annotations

from typing import Any

import click

from meterhub.cli_ops import ApiClient, _api_options, _print_json, _table


def _site_id(api: ApiClient, ref: str) -> int:
    for s in api.get("/api/v1/sites"):
        if s["name"] == ref or str(s["id"]) == ref:
            return int(s["id"])
    raise click.ClickException(f"no site {ref!r} (meterhub site list shows them)")


def _text(api: ApiClient, path: str, **params: Any) -> str:
    import httpx

    try:
        r = api.http.get(path, params={k: v for k, v in params.items() if v is not None})
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach meterhub at {api.url}: {exc}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:200]
        raise click.ClickException(f"HTTP {r.status_code}: {message}")
    return r.text


@click.command("bill")
@click.option("--site", "site", required=True, help="Site name or id.")
@click.option("--month", required=True, help="YYYY-MM, in the site's time zone.")
@click.option("--unit", "unit_id", type=int, default=None, help="Only this unit.")
@click.option("--tenant", "tenant_id", type=int, default=None, help="Only this tenant's part (with --unit).")
@click.option("--csv", "as_csv", is_flag=True, help="One CSV row per line item (for accounting tools).")
@click.option("--html", "as_html", is_flag=True, help="The printable HTML statement(s).")
@_api_options
def bill_cmd(
    site: str,
    month: str,
    unit_id: int | None,
    tenant_id: int | None,
    as_csv: bool,
    as_html: bool,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Bills of a site (every tenant) or of one unit for a month."""
    api = ApiClient(url, token)
    sid = _site_id(api, site)
    fmt = "csv" if as_csv else "html" if as_html else None
    if unit_id is not None:
        path, params = f"/api/v1/units/{unit_id}/bill", {"month": month, "tenant_id": tenant_id}
    else:
        path, params = f"/api/v1/sites/{sid}/bills", {"month": month}
    if fmt is not None:
        click.echo(_text(api, path, format=fmt, **params), nl=False)
        return
    out = api.get(path, **params)
    bills = [out] if unit_id is not None else out["bills"]
    if as_json:
        _print_json(out)
        return
    rows = [
        [
            b["unit"]["name"],
            (b.get("tenant") or {}).get("name", "-"),
            b["kwh_total"],
            b["total"],
            b["currency"],
        ]
        for b in bills
    ]
    _table(rows, ["unit", "tenant", "kWh", "total", "currency"])
    for b in bills:
        for w in b.get("warnings", []):
            click.echo(f"warning ({b['unit']['name']}): {w}", err=True)


@click.group("site")
def site_cmd() -> None:
    """Sites (property: buildings, units, tenants)."""


@site_cmd.command("list")
@_api_options
def site_list(url: str, token: str | None, as_json: bool) -> None:
    api = ApiClient(url, token)
    sites = api.get("/api/v1/sites")
    if as_json:
        _print_json(sites)
        return
    _table(
        [[s["id"], s["name"], s["timezone"], s["currency"], s["tariff_id"]] for s in sites],
        ["id", "name", "timezone", "currency", "tariff"],
    )


@site_cmd.command("create")
@click.argument("name")
@click.option("--timezone", default="UTC", show_default=True)
@click.option("--currency", default="EUR", show_default=True)
@_api_options
def site_create(name: str, timezone: str, currency: str, url: str, token: str | None, as_json: bool) -> None:
    api = ApiClient(url, token)
    out = api.request(
        "POST", "/api/v1/sites", json={"name": name, "timezone": timezone, "currency": currency}
    )
    _print_json(out) if as_json else click.echo(f"site {out['id']}: {out['name']}")


@click.group("meter")
def meter_cmd() -> None:
    """A meter's name, location and unit."""


@meter_cmd.command("rename")
@click.argument("cid")
@click.option("--name", default=None)
@click.option("--location", default=None)
@_api_options
def meter_rename(
    cid: str, name: str | None, location: str | None, url: str, token: str | None, as_json: bool
) -> None:
    api = ApiClient(url, token)
    out = api.request("PATCH", f"/api/v1/meters/{cid}", json={"name": name, "location": location})
    _print_json(out) if as_json else click.echo(f"{cid}: {out['name']} ({out['location'] or '-'})")


@meter_cmd.command("move")
@click.argument("cid")
@click.option("--unit", "unit_id", type=int, required=True, help="The unit id (0 takes the meter out).")
@click.option("--at", default=None, help="When (YYYY-MM-DD, ISO time or Unix seconds); default now.")
@_api_options
def meter_move(cid: str, unit_id: int, at: str | None, url: str, token: str | None, as_json: bool) -> None:
    api = ApiClient(url, token)
    body = {"unit_id": unit_id or None, "at": at}
    out = api.request("PUT", f"/api/v1/meters/{cid}/unit", json=body)
    _print_json(out) if as_json else click.echo(f"{cid}: unit {out['unit_id']}")


@click.command("topup")
@click.argument("cid")
@click.argument("amount")
@click.option("--reference", default=None, help="Payment reference (receipt, transaction id).")
@_api_options
def topup_cmd(
    cid: str, amount: str, reference: str | None, url: str, token: str | None, as_json: bool
) -> None:
    """Add credit to a prepaid meter (AMOUNT as a decimal, e.g. 20.00)."""
    api = ApiClient(url, token)
    out = api.request("POST", f"/api/v1/meters/{cid}/topups", json={"amount": amount, "reference": reference})
    _print_json(out) if as_json else click.echo(f"{cid}: balance {out['balance']} {out['unit']}")


@click.command("balance")
@click.argument("cid")
@_api_options
def balance_cmd(cid: str, url: str, token: str | None, as_json: bool) -> None:
    """A prepaid meter's balance, low-credit state and switch."""
    api = ApiClient(url, token)
    out = api.get(f"/api/v1/meters/{cid}/prepaid")
    if as_json:
        _print_json(out)
        return
    low = " LOW CREDIT" if out["low_credit"] else ""
    click.echo(
        f"{cid}: balance {out['balance']} {out['unit']}{low}; switch {out['switch_state']}, "
        f"last command {out['last_command_status'] or '-'}"
    )


@click.group("tenant")
def tenant_cmd() -> None:
    """Tenants and their occupancy of units."""


@tenant_cmd.command("add")
@click.argument("name")
@click.option("--site", "site", required=True, help="Site name or id.")
@click.option("--unit", "unit_id", type=int, default=None, help="The unit they move into.")
@click.option("--move-in", default=None, help="YYYY-MM-DD, ISO time or Unix seconds (with --unit).")
@click.option("--move-out", default=None, help="Exclusive; absent: open-ended.")
@click.option("--reference", default=None)
@_api_options
def tenant_add(
    name: str,
    site: str,
    unit_id: int | None,
    move_in: str | None,
    move_out: str | None,
    reference: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    api = ApiClient(url, token)
    sid = _site_id(api, site)
    out = api.request("POST", f"/api/v1/sites/{sid}/tenants", json={"name": name, "reference": reference})
    if unit_id is not None:
        if move_in is None:
            raise click.UsageError("--unit needs --move-in")
        out = api.request(
            "POST",
            f"/api/v1/tenants/{out['id']}/occupancies",
            json={"unit_id": unit_id, "move_in": move_in, "move_out": move_out},
        )
    _print_json(out) if as_json else click.echo(f"tenant {out['id']}: {out['name']}")


@tenant_cmd.command("move-out")
@click.argument("occupancy_id", type=int)
@click.option("--at", "at", required=True, help="YYYY-MM-DD, ISO time or Unix seconds.")
@_api_options
def tenant_move_out(occupancy_id: int, at: str, url: str, token: str | None, as_json: bool) -> None:
    api = ApiClient(url, token)
    out = api.request("PATCH", f"/api/v1/occupancies/{occupancy_id}", json={"move_out": at})
    _print_json(out) if as_json else click.echo(f"tenant {out['id']} ({out['name']}) moves out at {at}")


@click.group("tariff")
def tariff_cmd() -> None:
    """Tariffs (flat, time-of-use, tiered) and their versions."""


@tariff_cmd.command("add")
@click.argument("name")
@click.argument("spec", type=click.File("r"))
@click.option("--site", "site", required=True, help="Site name or id.")
@click.option("--default", "make_default", is_flag=True, help="Make it the site's tariff.")
@_api_options
def tariff_add(
    name: str, spec: Any, site: str, make_default: bool, url: str, token: str | None, as_json: bool
) -> None:
    """A tariff from SPEC, a JSON file: one version object or a list of them (see docs/operators.md)."""
    import json

    try:
        data = json.load(spec)
    except ValueError as exc:
        raise click.ClickException(f"{spec.name}: not JSON: {exc}") from None
    api = ApiClient(url, token)
    sid = _site_id(api, site)
    versions = data if isinstance(data, list) else [data]
    out = api.request("POST", f"/api/v1/sites/{sid}/tariffs", json={"name": name, "versions": versions})
    if make_default:
        api.request("PATCH", f"/api/v1/sites/{sid}", json={"tariff_id": out["id"]})
    _print_json(out) if as_json else click.echo(
        f"tariff {out['id']}: {name}, {len(out['versions'])} version(s)"
    )


PM_COMMANDS: list[click.Command] = [
    bill_cmd,
    site_cmd,
    meter_cmd,
    tenant_cmd,
    tariff_cmd,
    topup_cmd,
    balance_cmd,
]
