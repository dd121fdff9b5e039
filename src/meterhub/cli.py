"""The ``meterhub`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from meterhub.config import Settings, load_settings
from meterhub.logs import configure_logging


class Context:
    def __init__(self, config: Path | None, data_dir: Path | None) -> None:
        self.config = config
        self.data_dir = data_dir

    def settings(self, **overrides: Any) -> Settings:
        try:
            return load_settings(self.config, data_dir=self.data_dir, **overrides)
        except Exception as exc:  # pydantic ValidationError, missing file
            raise click.ClickException(f"bad configuration: {exc}") from None

    def engine(self) -> Any:
        from meterhub.storage.database import create_db_engine, migrate

        settings = self.settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_db_engine(
            settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        migrate(engine)
        return engine


pass_ctx = click.make_pass_decorator(Context)

_config_opt = click.option(
    "--config", "config", type=click.Path(path_type=Path), default=None, help="TOML configuration file."
)
_data_dir_opt = click.option(
    "--data-dir", "data_dir", type=click.Path(path_type=Path), default=None, help="Data directory."
)


@click.group()
@_config_opt
@_data_dir_opt
@click.pass_context
def main(ctx: click.Context, config: Path | None, data_dir: Path | None) -> None:
    """meterhub: edge gateway for smart electricity meters."""
    ctx.obj = Context(config, data_dir)


def _common(f: Any) -> Any:
    """Accept --config/--data-dir after the subcommand too (``meterhub vendor add X --data-dir D``)."""

    def set_config(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            ctx.find_object(Context).config = value

    def set_data_dir(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            ctx.find_object(Context).data_dir = value

    f = click.option(
        "--config",
        type=click.Path(path_type=Path),
        expose_value=False,
        callback=set_config,
        help="TOML configuration file.",
    )(f)
    f = click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        expose_value=False,
        callback=set_data_dir,
        help="Data directory.",
    )(f)
    return f


@main.command()
@_common
@click.option("--mqtt-port", type=int, default=None, help="MQTT port for gateways (default 21883).")
@click.option("--http-port", type=int, default=None, help="HTTP port for the API and dashboard.")
@click.option("--tls-port", type=int, default=None, help="Also listen with TLS on this port.")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True), default=None)
@click.option(
    "--handler",
    type=click.Choice(["protocol", "echo"]),
    default="protocol",
    help="Application handler: the edge protocol, or echo (transport benchmarks).",
)
@click.option("--log-level", default=None)
@pass_ctx
def serve(ctx: Context, handler: str, **overrides: Any) -> None:
    """Run the server (MQTT for gateways, storage, API)."""
    settings = ctx.settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    from meterhub.app import run
    from meterhub.app import serve as serve_coro

    run(serve_coro(settings, handler=handler))


# --- vendors -------------------------------------------------------------------------------------


@main.group()
def vendor() -> None:
    """Manage vendors (the usernames issued to gateway manufacturers)."""


def _print_vendor(v: Any, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": v.name,
                    "username": v.username,
                    "enabled": v.enabled,
                    "allowlist": v.allowlist_enabled,
                }
            )
        )
    else:
        click.echo(v.username)


@vendor.command("add")
@_common
@click.argument("name")
@click.option("--allowlist", is_flag=True, help="Only gateways explicitly allowed may connect.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def vendor_add(ctx: Context, name: str, allowlist: bool, as_json: bool) -> None:
    """Create a vendor and print its username (the gateways' MQTT username)."""
    from meterhub.storage import registry

    try:
        v = registry.add_vendor(ctx.engine(), name, allowlist=allowlist)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    _print_vendor(v, as_json)


@vendor.command("list")
@_common
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def vendor_list(ctx: Context, as_json: bool) -> None:
    """List vendors."""
    from meterhub.storage import registry

    vendors = registry.list_vendors(ctx.engine())
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": v.name,
                        "username": v.username,
                        "enabled": v.enabled,
                        "allowlist": v.allowlist_enabled,
                    }
                    for v in vendors
                ]
            )
        )
        return
    click.echo(f"{'NAME':<24} {'USERNAME':<32} {'ENABLED':<8} ALLOWLIST")
    for v in vendors:
        click.echo(f"{v.name:<24} {v.username:<32} {v.enabled!s:<8} {v.allowlist_enabled}")


def _vendor_flag(ctx: Context, name: str, **values: Any) -> None:
    from meterhub.storage import registry

    try:
        registry.set_vendor(ctx.engine(), name, **values)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None


@vendor.command("disable")
@_common
@click.argument("name")
@pass_ctx
def vendor_disable(ctx: Context, name: str) -> None:
    """Refuse new connections of this vendor's gateways (CONNACK 0x05)."""
    _vendor_flag(ctx, name, enabled=False)
    click.echo(f"vendor {name} disabled")


@vendor.command("enable")
@_common
@click.argument("name")
@pass_ctx
def vendor_enable(ctx: Context, name: str) -> None:
    """Accept this vendor's gateways again."""
    _vendor_flag(ctx, name, enabled=True)
    click.echo(f"vendor {name} enabled")


@vendor.command("allowlist")
@_common
@click.argument("name")
@click.argument("state", type=click.Choice(["on", "off"]))
@pass_ctx
def vendor_allowlist(ctx: Context, name: str, state: str) -> None:
    """Turn the vendor's gateway allowlist on or off."""
    _vendor_flag(ctx, name, allowlist_enabled=state == "on")
    click.echo(f"vendor {name} allowlist {state}")


# --- gateways ------------------------------------------------------------------------------------


@main.group()
def gateway() -> None:
    """Operator flags for gateways: allowlist and disable."""


def _gateway_flag(ctx: Context, gateway_id: str, vendor_name: str | None, **values: Any) -> None:
    from meterhub.storage import registry

    try:
        registry.set_gateway(ctx.engine(), gateway_id, vendor=vendor_name, **values)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None


@gateway.command("allow")
@_common
@click.argument("gateway_id")
@click.option("--vendor", "vendor_name", default=None, help="Bind the gateway id to this vendor.")
@pass_ctx
def gateway_allow(ctx: Context, gateway_id: str, vendor_name: str | None) -> None:
    """Put a gateway on its vendor's allowlist."""
    _gateway_flag(ctx, gateway_id, vendor_name, allowed=True)
    click.echo(f"gateway {gateway_id} allowed")


@gateway.command("disable")
@_common
@click.argument("gateway_id")
@pass_ctx
def gateway_disable(ctx: Context, gateway_id: str) -> None:
    """Refuse this gateway (CONNACK 0x05)."""
    _gateway_flag(ctx, gateway_id, None, enabled=False)
    click.echo(f"gateway {gateway_id} disabled")


@gateway.command("enable")
@_common
@click.argument("gateway_id")
@pass_ctx
def gateway_enable(ctx: Context, gateway_id: str) -> None:
    """Accept this gateway again."""
    _gateway_flag(ctx, gateway_id, None, enabled=True)
    click.echo(f"gateway {gateway_id} enabled")


# --- products ------------------------------------------------------------------------------------


@main.group()
def product() -> None:
    """Map product ids to product models."""


@product.command("add")
@_common
@click.argument("product_id")
@click.option("--model", "model_name", default="smart-meter", show_default=True, help="Product model name.")
@pass_ctx
def product_add(ctx: Context, product_id: str, model_name: str) -> None:
    """Register a product id with a model (devices synced with this product_id use it)."""
    from meterhub.model.loader import ModelRegistry
    from meterhub.storage import registry

    settings = ctx.settings()
    models = ModelRegistry(settings.models_dir)
    if model_name not in models:
        raise click.ClickException(f"unknown model {model_name!r}; known: {', '.join(models.names())}")
    registry.add_product(ctx.engine(), product_id, model_name)
    click.echo(f"product {product_id} -> model {model_name}")


@product.command("list")
@_common
@pass_ctx
def product_list(ctx: Context) -> None:
    """List registered products."""
    from meterhub.storage import registry

    for pid, model_name in sorted(registry.list_products(ctx.engine()).items()):
        click.echo(f"{pid}\t{model_name}")


@main.command("models")
@_common
@pass_ctx
def models_cmd(ctx: Context) -> None:
    """List the product models this server knows (builtin and from models_dir)."""
    from meterhub.model.loader import ModelRegistry

    for m in ModelRegistry(ctx.settings().models_dir):
        click.echo(f"{m.model}\t{len(m)} data points\t{m.name}")


# --- tools ---------------------------------------------------------------------------------------


@main.command("dev-cert")
@click.option("--out", type=click.Path(path_type=Path), default=Path("./data/tls"), show_default=True)
@click.option("--host", "hosts", multiple=True, default=["localhost", "127.0.0.1"], show_default=True)
def dev_cert(out: Path, hosts: tuple[str, ...]) -> None:
    """Make a development CA and server certificate for the TLS listener."""
    from meterhub.tools.devcert import make_dev_cert

    paths = make_dev_cert(out, list(hosts))
    click.echo(f"CA (for clients):   {paths['ca']}")
    click.echo(f"tls_cert:           {paths['cert']}")
    click.echo(f"tls_key:            {paths['key']}")


def password_for(client_id: str, username: str) -> str:
    from meterhub.core.auth import gateway_password

    return gateway_password(client_id, username)


@main.command("password")
@click.argument("client_id")
@click.argument("username")
def password(client_id: str, username: str) -> None:
    """Print the MQTT password of a gateway: md5(clientId + username)."""
    click.echo(password_for(client_id, username))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
