"""CLI for alarm rules, notification targets, the notification log and dead letters (over the API)."""

from __future__ import annotations

import json
from typing import Any

import click

from meterhub.cli_ops import ApiClient, _api_options, _print_json, _table


def _delete(api: ApiClient, path: str) -> None:
    r = api.http.delete(path)
    if r.status_code != 204:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:200]
        raise click.ClickException(f"HTTP {r.status_code}: {message}")


@click.group("alarm-rule")
def alarm_rule() -> None:
    """Alarm rules: thresholds per data point, and tuning (hysteresis, minimum durations)."""


@alarm_rule.command("add")
@click.argument("kind", type=click.Choice(["above", "below", "rate", "no_data", "tune"]))
@click.argument("label")
@click.option("--code", default=None, help="The data point code (e.g. voltage_current).")
@click.option("--value", type=float, default=None, help="Limit; rate: per minute; no_data: minutes.")
@click.option("--level", type=click.Choice(["general", "serious", "urgent"]), default="general")
@click.option("--model", "product_id", default=None, help="Only meters of this product id.")
@click.option("--site", "site_id", type=int, default=None, help="Only meters of this site (id).")
@click.option("--hysteresis", type=float, default=0.0, show_default=True)
@click.option("--raise-after", type=float, default=0.0, show_default=True, help="Seconds.")
@click.option("--clear-after", type=float, default=0.0, show_default=True, help="Seconds.")
@_api_options
def rule_add(url: str, token: str | None, as_json: bool, **body: Any) -> None:
    """Add a rule (KIND LABEL); ``tune *`` tunes every alarm without a rule of its own."""
    out = ApiClient(url, token).request("POST", "/api/v1/alarm-rules", json=body)
    if as_json:
        _print_json(out)
    else:
        click.echo(out["id"])


@alarm_rule.command("list")
@_api_options
def rule_list(url: str, token: str | None, as_json: bool) -> None:
    """List the rules."""
    items = ApiClient(url, token).get("/api/v1/alarm-rules")["items"]
    if as_json:
        _print_json(items)
        return
    cols = ["id", "kind", "label", "code", "value", "level", "product_id", "site_id", "hysteresis"]
    _table([[r[c] for c in (*cols, "raise_after", "clear_after")] for r in items], [*cols, "raise", "clear"])


@alarm_rule.command("delete")
@click.argument("rule_id", type=int)
@_api_options
def rule_delete(url: str, token: str | None, as_json: bool, rule_id: int) -> None:
    """Delete a rule."""
    _delete(ApiClient(url, token), f"/api/v1/alarm-rules/{rule_id}")


@click.group("notify")
def notify_cmd() -> None:
    """Alarm notifications: webhook and e-mail targets, the log, dead letters."""


@notify_cmd.command("add-webhook")
@click.argument("name")
@click.argument("target_url")
@click.option("--secret", required=True, help="HMAC-SHA256 key for X-Meterhub-Signature.")
@click.option("--site", "site_id", type=int, default=None)
@click.option("--level", "levels", multiple=True, type=click.Choice(["general", "serious", "urgent"]))
@click.option("--event", "events", multiple=True, type=click.Choice(["raise", "escalate", "clear"]))
@_api_options
def add_webhook(
    url: str, token: str | None, as_json: bool, name: str, target_url: str, secret: str, **rest: Any
) -> None:
    """Send alarms to a webhook (all levels and events unless --level / --event)."""
    body = {"name": name, "kind": "webhook", "config": {"url": target_url, "secret": secret}, **_scope(rest)}
    out = ApiClient(url, token).request("POST", "/api/v1/notify/targets", json=body)
    _print_json(out) if as_json else click.echo(out["id"])


@notify_cmd.command("add-email")
@click.argument("name")
@click.option("--host", required=True)
@click.option("--port", type=int, default=587, show_default=True)
@click.option("--no-starttls", is_flag=True, help="Plain SMTP (not recommended).")
@click.option("--username", default=None)
@click.option("--password", envvar="METERHUB_SMTP_PASSWORD", default=None, help="env METERHUB_SMTP_PASSWORD")
@click.option("--sender", required=True)
@click.option("--to", "to", multiple=True, required=True)
@click.option("--site", "site_id", type=int, default=None)
@click.option("--level", "levels", multiple=True, type=click.Choice(["general", "serious", "urgent"]))
@click.option("--event", "events", multiple=True, type=click.Choice(["raise", "escalate", "clear"]))
@_api_options
def add_email(url: str, token: str | None, as_json: bool, name: str, **opts: Any) -> None:
    """Send alarms by e-mail over SMTP with STARTTLS."""
    cfg = {
        "host": opts["host"],
        "port": opts["port"],
        "starttls": not opts["no_starttls"],
        "username": opts["username"],
        "password": opts["password"],
        "sender": opts["sender"],
        "to": list(opts["to"]),
    }
    body = {"name": name, "kind": "email", "config": cfg, **_scope(opts)}
    out = ApiClient(url, token).request("POST", "/api/v1/notify/targets", json=body)
    _print_json(out) if as_json else click.echo(out["id"])


def _scope(opts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"site_id": opts.get("site_id")}
    if opts.get("levels"):
        out["levels"] = list(opts["levels"])
    if opts.get("events"):
        out["events"] = list(opts["events"])
    return out


@notify_cmd.command("targets")
@_api_options
def targets(url: str, token: str | None, as_json: bool) -> None:
    """List the targets (secrets hidden)."""
    items = ApiClient(url, token).get("/api/v1/notify/targets")["items"]
    if as_json:
        _print_json(items)
        return
    rows = [
        [t["id"], t["name"], t["kind"], t["site_id"], ",".join(t["levels"]), ",".join(t["events"])]
        for t in items
    ]
    _table(rows, ["id", "name", "kind", "site", "levels", "events"])


@notify_cmd.command("delete-target")
@click.argument("target_id", type=int)
@_api_options
def delete_target(url: str, token: str | None, as_json: bool, target_id: int) -> None:
    """Delete a target."""
    _delete(ApiClient(url, token), f"/api/v1/notify/targets/{target_id}")


@notify_cmd.command("log")
@click.option("--dead", is_flag=True, help="Only the dead letters.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@_api_options
def notify_log(url: str, token: str | None, as_json: bool, dead: bool, limit: int) -> None:
    """The notification log, newest first."""
    items = ApiClient(url, token).get("/api/v1/notify/log", status="dead" if dead else None, limit=limit)[
        "items"
    ]
    if as_json:
        _print_json(items)
        return
    rows = [
        [n["id"], n["target_id"], n["alarm_id"], n["event"], n["status"], n["attempts"], n["last_error"]]
        for n in items
    ]
    _table(rows, ["id", "target", "alarm", "event", "status", "attempts", "last error"])


@notify_cmd.command("retry")
@click.argument("outbox_id", type=int)
@_api_options
def notify_retry(url: str, token: str | None, as_json: bool, outbox_id: int) -> None:
    """Send a dead letter again."""
    out = ApiClient(url, token).request("POST", f"/api/v1/notify/dead/{outbox_id}/retry")
    _print_json(out) if as_json else click.echo(json.dumps({"id": out["id"], "status": out["status"]}))


ALARM_COMMANDS = (alarm_rule, notify_cmd)
