"""Operator commands: talk to a running meterhub through its REST API (httpx), and manage API tokens.

``meterhub devices | show | history | command | energy | alarms`` use the API: ``--url`` (default
http://127.0.0.1:8080, env ``METERHUB_URL``) and ``--token`` (env ``METERHUB_TOKEN``); ``--json``
prints the API's JSON for scripts, otherwise readable tables.

``meterhub token create | list | revoke`` work on the database directly (``--data-dir`` /
``--config``), since the API needs a token to begin with.

``OPS_COMMANDS`` lists the commands for ``meterhub.cli`` to register; :data:`cli` is a group holding
them all (for tests, or ``python -m meterhub.cli_ops``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from meterhub.cli_values import ValueText, to_raw

DEFAULT_URL = "http://127.0.0.1:8080"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# --- talking to the API --------------------------------------------------------------------------


class ApiClient:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # its connections closed at the command's end, not when collected
            ctx.call_on_close(self.http.close)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach meterhub at {self.url}: {exc}") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code = f" (code {err['code']})" if err.get("code") is not None else ""
                message = f"{err['message']}{code}"
            except Exception:
                message = r.text[:200] or r.reason_phrase
            raise click.ClickException(f"HTTP {r.status_code}: {message}")
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})


def _api_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")(f)
    f = click.option(
        "--token", envvar="METERHUB_TOKEN", default=None, help="API token (env METERHUB_TOKEN)."
    )(f)
    f = click.option(
        "--url",
        envvar="METERHUB_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="meterhub's HTTP address (env METERHUB_URL).",
    )(f)
    return f


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _when(iso: str | None) -> str:
    """An API ``*_iso`` time, shortened for a table (seconds, no fraction)."""
    if not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def parse_since(text: str, now: float | None = None) -> float:
    """``1h``, ``30m``, ``2d``, ``90s``, ``1w`` (ago), or Unix seconds, or ISO 8601 -> Unix seconds."""
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use e.g. 1h, 30m, 2d, Unix seconds or an ISO time") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return parsed.timestamp()


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if m:
        return float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use e.g. 5m, 1h or seconds") from None


def parse_value(text: str) -> Any:
    """A command value: JSON when it parses (``true``, ``2300000``, ``"x"``, ``{...}``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- devices -------------------------------------------------------------------------------------


@click.command("devices")
@_api_options
@click.option("--gateway", default=None, help="Only devices of this gateway.")
@click.option("--online/--offline", "online", default=None, help="Only online (or offline) devices.")
@click.option("-q", "query", default=None, help="Search the cid, name and location.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
def devices_cmd(
    url: str,
    token: str | None,
    as_json: bool,
    gateway: str | None,
    online: bool | None,
    query: str | None,
    limit: int,
    offset: int,
) -> None:
    """List devices."""
    page = ApiClient(url, token).get(
        "/api/v1/devices",
        gateway=gateway,
        online=None if online is None else str(online).lower(),
        q=query,
        limit=limit,
        offset=offset,
    )
    if as_json:
        _print_json(page)
        return
    _table(
        [
            (
                d["cid"],
                d["name"],
                d["gateway_id"],
                d["online"],
                _when(d["last_seen_iso"]),
                d["install_location"],
            )
            for d in page["items"]
        ],
        ["CID", "NAME", "GATEWAY", "ONLINE", "LAST SEEN", "LOCATION"],
    )
    shown = len(page["items"])
    if page["total"] > shown:
        click.echo(f"({shown} of {page['total']}; use --offset/--limit for more)")


def _shown_value(v: dict[str, Any]) -> str:
    if v["scaled"] is not None:
        unit = v["display_unit"] or v["unit"]
        return f"{v['scaled']:g} {unit}" if unit else f"{v['scaled']:g}"
    return _cell(v["raw"])


@click.command("show")
@_api_options
@click.argument("cid")
def show_cmd(url: str, token: str | None, as_json: bool, cid: str) -> None:
    """Show a device: its sync fields, presence, latest values and active alarms."""
    d = ApiClient(url, token).get(f"/api/v1/devices/{cid}")
    if as_json:
        _print_json(d)
        return
    p = d["presence"]
    state = "online" if p["online"] else "offline"
    since = f" since {_when(p['since_iso'])} ({p['cause']})" if p["since"] else ""
    fields = [
        ("cid", d["cid"]),
        ("name", d["device_name"]),
        ("gateway", d["gateway_id"]),
        ("product", f"{d['product_id']} (model {d['model']})"),
        ("presence", state + since),
        ("last seen", _when(d["last_seen_iso"])),
        ("location", d["install_location"]),
        ("ip / mac", f"{d['device_ip'] or '-'} / {d['mac_address'] or '-'}"),
    ]
    for key, value in fields:
        click.echo(f"{key + ':':<11}{_cell(value)}")
    click.echo()
    _table(
        [(v["dp_id"], v["code"], _shown_value(v), _when(v["t_iso"])) for v in d["values"]],
        ["DP", "CODE", "VALUE", "MEASURED"],
    )
    if d["alarms"]:
        click.echo()
        _table(
            [(a["id"], a["kind"], a["label"], a["level"], _when(a["raised_at_iso"])) for a in d["alarms"]],
            ["ALARM", "KIND", "LABEL", "LEVEL", "RAISED"],
        )


@click.command("history")
@_api_options
@click.argument("cid")
@click.argument("dp")
@click.option("--since", default="1h", show_default=True, help="Start: 1h, 30m, 2d, Unix seconds or ISO.")
@click.option("--until", default=None, help="End (default now).")
@click.option("--buckets", type=click.IntRange(1, 1000), default=None, help="Downsample into N buckets.")
@click.option("--interval", default=None, help="Downsample by interval (5m, 1h, seconds).")
@click.option(
    "--field",
    type=click.Choice(["voltage", "current", "power", "electricity"]),
    default=None,
    help="Phase field.",
)
@click.option("--limit", type=click.IntRange(1, 10000), default=1000, show_default=True)
def history_cmd(
    url: str,
    token: str | None,
    as_json: bool,
    cid: str,
    dp: str,
    since: str,
    until: str | None,
    buckets: int | None,
    interval: str | None,
    field: str | None,
    limit: int,
) -> None:
    """History of a data point (id or code)."""
    now = time.time()
    params: dict[str, Any] = {
        "from": parse_since(since, now),
        "to": parse_since(until, now) if until else now,
        "buckets": buckets,
        "interval": parse_duration(interval) if interval else None,
        "field": field,
        "limit": limit,
    }
    h = ApiClient(url, token).get(f"/api/v1/devices/{cid}/history/{dp}", **params)
    if as_json:
        _print_json(h)
        return
    unit = h["display_unit"] or h["unit"] or ""
    title = f"{h['cid']} {h['code']} (dp {h['dp_id']}){' ' + h['field'] if h['field'] else ''} [{unit}]"
    click.echo(title)
    if h["mode"] == "raw":
        _table(
            [(_when(r["t_iso"]), r["value"] if r["value"] is not None else r["raw"]) for r in h["items"]],
            ["TIME", "VALUE"],
        )
        if h["total"] > len(h["items"]):
            click.echo(f"({len(h['items'])} of {h['total']} rows)")
    else:
        _table(
            [
                (_when(b["start_iso"]), b["count"], b["min"], b["max"], b["avg"], b["last"])
                for b in h["buckets"]
            ],
            ["FROM", "N", "MIN", "MAX", "AVG", "LAST"],
        )


@click.command("command")
@_api_options
@click.argument("cid")
@click.argument("dp")
@click.argument("value")
@click.option(
    "--timeout", type=click.FloatRange(0, 300, min_open=True), default=None, help="Seconds to wait."
)
@click.option("--no-wait", is_flag=True, help="Do not wait for the answer; print the id to poll.")
@click.option("--raw", is_flag=True, help="VALUE is the wire form (2070000 for 207 V), JSON or text.")
def command_cmd(
    url: str,
    token: str | None,
    as_json: bool,
    cid: str,
    dp: str,
    value: str,
    timeout: float | None,
    no_wait: bool,
    raw: bool,
) -> None:
    """Send a command. VALUE is in the data point's real unit (``voltage_under 207`` = 207 V), true or
    false, or a label; with --raw it is the wire value."""
    client = ApiClient(url, token, timeout=(timeout or 10) + 30)
    wire = parse_value(value) if raw else _typed_value(client, cid, dp, value)
    body: dict[str, Any] = {"dp": dp, "value": wire, "wait": not no_wait}
    if timeout is not None:
        body["timeout"] = timeout
    out = client.request("POST", f"/api/v1/devices/{cid}/commands", json=body)
    if as_json:
        _print_json(out)
    elif out["status"] == "pending":
        click.echo(f"sent; poll with: GET {out['poll']}")
    else:
        elapsed = f" in {out['elapsed'] * 1000:.0f} ms" if out.get("elapsed") else ""
        msg = out["msg"] or ""
        click.echo(f"{out['status']}: code {out['code']} {msg}{elapsed} (request_id {out['request_id']})")


def _typed_value(client: ApiClient, cid: str, dp: str, value: str) -> Any:
    """The wire value of ``value`` typed in real units, from the device's model as the server has it."""
    device = client.get(f"/api/v1/devices/{cid}")
    model = client.get(f"/api/v1/models/{device['model']}")
    key = dp.strip()
    found = next((d for d in model["data_points"] if key in (d["code"], str(d["id"]))), None)
    if found is None:
        return parse_value(value)  # the server answers "unknown data point"
    try:
        return to_raw(found, value)
    except ValueText as exc:
        raise click.UsageError(str(exc)) from None


@click.command("move")
@_api_options
@click.argument("cid")
@click.argument("gateway_id")
def move_cmd(url: str, token: str | None, as_json: bool, cid: str, gateway_id: str) -> None:
    """Move device CID to gateway GATEWAY_ID (also one of another vendor; needs an admin token)."""
    out = ApiClient(url, token).request(
        "POST", f"/api/v1/devices/{cid}/move", json={"gateway_id": gateway_id}
    )
    if as_json:
        _print_json(out)
    elif out["moved"]:
        click.echo(
            f"{cid} moved from {out['old_gateway_id']} to {out['gateway_id']} (vendor {out['vendor']})"
        )
    else:
        click.echo(f"{cid} is already on {out['gateway_id']} (vendor {out['vendor']}); nothing changed")


@click.command("energy")
@_api_options
@click.argument("cids", nargs=-1)
@click.option("--gateway", default=None, help="All devices of this gateway.")
@click.option("--month", default=None, help="Days of this month: YYYY-MM.")
@click.option("--year", type=int, default=None, help="Months of this year.")
@click.option("--period", type=click.Choice(["day", "month"]), default=None)
@click.option("--from", "from_", default=None, help="YYYY-MM-DD (or YYYY-MM for months).")
@click.option("--to", default=None)
@click.option("--spread", is_flag=True, help="Spread gaps linearly over the days they cover.")
def energy_cmd(
    url: str,
    token: str | None,
    as_json: bool,
    cids: tuple[str, ...],
    gateway: str | None,
    month: str | None,
    year: int | None,
    period: str | None,
    from_: str | None,
    to: str | None,
    spread: bool,
) -> None:
    """Energy consumption (kWh) per day or month, of one device, several, or a gateway's."""
    if month:
        try:
            first = dt.date.fromisoformat(month + "-01")
        except ValueError:
            raise click.BadParameter("use YYYY-MM", param_hint="--month") from None
        nxt = dt.date(first.year + (first.month == 12), first.month % 12 + 1, 1)
        period, from_, to = "day", first.isoformat(), (nxt - dt.timedelta(days=1)).isoformat()
    elif year:
        period, from_, to = "month", f"{year:04d}-01", f"{year:04d}-12"
    params: dict[str, Any] = {
        "period": period or "day",
        "from": from_,
        "to": to,
        "spread": str(spread).lower(),
    }
    api = ApiClient(url, token)
    if len(cids) == 1 and gateway is None:
        out = api.get(f"/api/v1/devices/{cids[0]}/energy", **params)
    elif cids or gateway:
        out = api.get("/api/v1/energy", cid=list(cids) or None, gateway=gateway, **params)
    else:
        raise click.UsageError("give a CID (or several), or --gateway")
    if as_json:
        _print_json(out)
        return
    single = "cid" in out
    who = out["cid"] if single else f"{len(out['devices'])} devices"
    source = f", from {out['source']['code']}" if single and out["source"] else ""
    click.echo(f"{who}: {out['from']} .. {out['to']} ({out['timezone']}{source})")
    if single:
        rows = [(b["period"], b["consumption_kwh"], b["reported_kwh"], b["readings"]) for b in out["buckets"]]
        _table(rows, ["PERIOD", "KWH", "METER SAYS", "READINGS"])
    else:
        rows = [(b["period"], b["consumption_kwh"], b["devices_with_data"]) for b in out["buckets"]]
        _table(rows, ["PERIOD", "KWH", "DEVICES"])
    click.echo(f"total: {_cell(out['total_kwh'])} kWh")
    events = out["events"] if single else [e for d in out["devices"] for e in d["events"]]
    for e in events:
        click.echo(f"note: {e['kind']} at {_when(e['t_iso'])}: {e['before_kwh']:g} -> {e['after_kwh']:g} kWh")


@click.group("alarms", invoke_without_command=True)
@_api_options
@click.option("--all", "show_all", is_flag=True, help="Cleared alarms too.")
@click.option("--cid", default=None)
@click.option("--level", type=click.Choice(["general", "serious", "urgent"]), default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.pass_context
def alarms_cmd(
    ctx: click.Context,
    url: str,
    token: str | None,
    as_json: bool,
    show_all: bool,
    cid: str | None,
    level: str | None,
    limit: int,
) -> None:
    """List active alarms (``--all`` for cleared ones too); ``alarms ack ID`` acknowledges one."""
    ctx.obj = {"url": url, "token": token, "json": as_json, "parent": ctx.obj}
    if ctx.invoked_subcommand is not None:
        return
    page = ApiClient(url, token).get(
        "/api/v1/alarms", active=None if show_all else "true", cid=cid, level=level, limit=limit
    )
    if as_json:
        _print_json(page)
        return
    _table(
        [
            (
                a["id"],
                a["cid"],
                a["kind"],
                a["label"],
                a["level"],
                _when(a["raised_at_iso"]),
                _when(a["cleared_at_iso"]) if a["cleared_at"] else "active",
                a["acknowledged_by"],
            )
            for a in page["items"]
        ],
        ["ID", "CID", "KIND", "LABEL", "LEVEL", "RAISED", "CLEARED", "ACK BY"],
    )


@alarms_cmd.command("ack")
@click.argument("alarm_id", type=int)
@click.option("--by", default=None, help="Who acknowledges (default: the token's name).")
@click.pass_obj
def alarms_ack(obj: dict[str, Any], alarm_id: int, by: str | None) -> None:
    """Acknowledge an alarm (admin token)."""
    out = ApiClient(obj["url"], obj["token"]).request(
        "POST", f"/api/v1/alarms/{alarm_id}/ack", json={"by": by} if by else None
    )
    if obj["json"]:
        _print_json(out)
    else:
        click.echo(f"alarm {out['id']} acknowledged by {out['acknowledged_by']}")


# --- tokens (on the database) --------------------------------------------------------------------


def _engine(ctx: click.Context, config: Path | None, data_dir: Path | None) -> Any:
    from meterhub.config import load_settings
    from meterhub.storage.database import create_db_engine, migrate

    parent = ctx.find_root().obj  # meterhub.cli's Context, when registered there
    config = config if config is not None else getattr(parent, "config", None)
    data_dir = data_dir if data_dir is not None else getattr(parent, "data_dir", None)
    try:
        settings = load_settings(config, data_dir=data_dir)
    except Exception as exc:
        raise click.ClickException(f"bad configuration: {exc}") from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous)
    ctx.call_on_close(engine.dispose)  # at the command's end, not whenever it is collected
    migrate(engine)
    return engine


def _db_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data directory.")(f)
    f = click.option(
        "--config", type=click.Path(path_type=Path), default=None, help="TOML configuration file."
    )(f)
    return f


@click.group("token")
def token_cmd() -> None:
    """API tokens (stored hashed; shown once at creation)."""


@token_cmd.command("create")
@click.argument("name")
@click.option(
    "--scope",
    type=click.Choice(["read", "operate", "admin"]),
    required=True,
    help="read: GET only; operate: also commands and top-ups; admin: all.",
)
@click.option(
    "--site", "sites", type=int, multiple=True, help="Limit the token to this site id (repeatable)."
)
@click.option("--json", "as_json", is_flag=True)
@_db_options
@click.pass_context
def token_create(
    ctx: click.Context,
    name: str,
    scope: str,
    sites: tuple[int, ...],
    as_json: bool,
    config: Path | None,
    data_dir: Path | None,
) -> None:
    """Create a token and print it (it cannot be shown again)."""
    from meterhub.api.security import TokenError, create_token

    try:
        token, info = create_token(_engine(ctx, config, data_dir), name, scope, list(sites) or None)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _print_json({"token": token, **info.as_dict()})
    else:
        click.echo(token)
        click.echo(f"token {name!r} ({scope}) created; store it now, it is not kept.", err=True)


@token_cmd.command("list")
@click.option("--json", "as_json", is_flag=True)
@_db_options
@click.pass_context
def token_list(ctx: click.Context, as_json: bool, config: Path | None, data_dir: Path | None) -> None:
    """List tokens (names, scopes, last use; never the tokens)."""
    from meterhub.api.security import list_tokens

    tokens = list_tokens(_engine(ctx, config, data_dir))
    if as_json:
        _print_json([t.as_dict() for t in tokens])
        return

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"

    _table(
        [
            (t.name, t.scope, when(t.created_at), when(t.last_used_at), "revoked" if t.revoked else "active")
            for t in tokens
        ],
        ["NAME", "SCOPE", "CREATED", "LAST USED", "STATE"],
    )


@token_cmd.command("revoke")
@click.argument("name")
@_db_options
@click.pass_context
def token_revoke(ctx: click.Context, name: str, config: Path | None, data_dir: Path | None) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    from meterhub.api.security import TokenError, revoke_token

    try:
        revoke_token(_engine(ctx, config, data_dir), name)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"token {name!r} revoked")


#: For ``meterhub.cli`` to register: ``for c in OPS_COMMANDS: main.add_command(c)``.
@click.command("conformance")
@_api_options
@click.argument("gateway_id")
def conformance_cmd(url: str, token: str | None, as_json: bool, gateway_id: str) -> None:
    """The gateway's conformance report card: what the document expects, what the gateway did.

    Exits 1 when a rule fails (verdict "fail"), 0 otherwise, with --json too: for scripts and CI."""
    card = ApiClient(url, token).get(f"/api/v1/gateways/{gateway_id}/conformance")
    if as_json:
        _print_json(card)
    else:
        _print_card(card)
    if card["verdict"] == "fail" or any(f["verdict"] == "fail" for f in card["findings"]):
        raise SystemExit(1)


def _print_card(card: dict[str, Any]) -> None:
    marks = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "unknown": " ?  "}
    state = "connected" if card["connected"] else "not connected"
    click.echo(f"gateway {card['gateway_id']} ({state}): {card['verdict'].upper()}")
    for f in card["findings"]:
        click.echo(f"  [{marks[f['verdict']]}] {f['title']}")
        click.echo(f"         expected: {f['expected']}")
        click.echo(f"         observed: {f['observed']}")


OPS_COMMANDS: list[click.Command] = [
    devices_cmd,
    show_cmd,
    history_cmd,
    command_cmd,
    move_cmd,
    energy_cmd,
    alarms_cmd,
    token_cmd,
    conformance_cmd,
]


@click.group()
def cli() -> None:
    """meterhub operator commands."""


for _command in OPS_COMMANDS:
    cli.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
