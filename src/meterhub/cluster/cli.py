"""``meterhub cluster status``: the cluster as a running node's API sees it."""

from __future__ import annotations

import time

import click

from meterhub.cli_ops import ApiClient, _api_options, _print_json, _table


@click.group("cluster")
def cluster_cmd() -> None:
    """Cluster mode: nodes, heartbeats, gateways held."""


@cluster_cmd.command("status")
@_api_options
def status_cmd(url: str, token: str | None, as_json: bool) -> None:
    """Nodes, heartbeat age, gateways and links held, version."""
    data = ApiClient(url, token).get("/api/v1/cluster")
    if as_json:
        _print_json(data)
        return
    click.echo(f"this node: {data['node_id']} (bus: {data['bus']}, node_timeout {data['node_timeout']:g}s)")
    rows = [
        [
            ("* " if n["self"] else "  ") + n["node_id"],
            n["state"],
            f"{n['heartbeat_age']:.1f}s",
            n["gateways"],
            n["links"],
            n["version"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n["started_at"])),
        ]
        for n in data["nodes"]
    ]
    _table(rows, ["node", "state", "heartbeat", "gateways", "links", "version", "started (UTC)"])
