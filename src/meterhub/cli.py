"""The ``meterhub`` command line."""

from __future__ import annotations

import contextlib
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
        _dispose_at_exit(engine)
        migrate(engine)
        return engine


def _dispose_at_exit(engine: Any) -> None:
    """Close the engine's connections when the command ends (its click context closes), not when the
    engine happens to be collected: commands run in-process too (tests, ``CliRunner``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(engine.dispose)


pass_ctx = click.make_pass_decorator(Context)


@contextlib.contextmanager
def _startup_errors() -> Any:
    """A server that cannot start (its database served by another process, a port taken) exits
    with one line (``Error: ...``, status 1) instead of a traceback."""
    from meterhub.app import StartupError
    from meterhub.storage.lock import LockError

    try:
        yield
    except (LockError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None


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
@click.option("--database-url", default=None, help="SQLAlchemy URL (cluster: a shared PostgreSQL).")
@click.option("--bus-url", default=None, help="Cluster bus, nats://HOST:PORT (default: in process).")
@click.option("--node-id", default=None, help="This node's name (default: host name + MQTT port).")
@click.option(
    "--proxy-protocol", is_flag=True, default=None, help="The MQTT port requires PROXY protocol v2/v1."
)
@click.option(
    "--handler",
    type=click.Choice(["protocol", "echo"]),
    default="protocol",
    help="Application handler: the edge protocol, or echo (transport benchmarks).",
)
@click.option(
    "--ha-broker", default=None, help="Publish to Home Assistant: mqtt://host:1883 or mqtts://host:8883."
)
@click.option("--ha-username", default=None, help="User name on the Home Assistant broker.")
@click.option("--ha-password", default=None, help="Its password (better: METERHUB_HA_PASSWORD).")
@click.option(
    "--ha-tls-ca", type=click.Path(path_type=Path, exists=True), default=None, help="CA file (TLS)."
)
@click.option("--ha-tls-insecure", is_flag=True, default=None, help="Skip the broker's host name check.")
@click.option("--ha-discovery-prefix", default=None, help="Home Assistant's discovery prefix.")
@click.option("--log-level", default=None)
@pass_ctx
def serve(ctx: Context, handler: str, **overrides: Any) -> None:
    """Run the server (MQTT for gateways, storage, API)."""
    settings = ctx.settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    from meterhub.app import run
    from meterhub.app import serve as serve_coro

    with _startup_errors():
        run(serve_coro(settings, handler=handler))


@main.command()
@_common
@click.option("--mqtt-port", type=int, default=None, help="MQTT port for gateways (default 21883).")
@click.option(
    "--http-port", type=int, default=None, help="HTTP port for the API and dashboard (default 8080)."
)
@click.option("--gateways", type=click.IntRange(1), default=3, show_default=True, help="Simulated gateways.")
@click.option("--meters", type=click.IntRange(1), default=4, show_default=True, help="Meters per gateway.")
@click.option(
    "--interval",
    type=click.FloatRange(0.05),
    default=2.0,
    show_default=True,
    help="Seconds between a meter's reports.",
)
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
@pass_ctx
def demo(
    ctx: Context, gateways: int, meters: int, interval: float, duration: float | None, **overrides: Any
) -> None:
    """Run the server with a simulated fleet of three-phase meters, so data flows at once."""
    import asyncio

    from meterhub.api.security import create_token
    from meterhub.app import Hub, check_ports_free, run, start_or_explain
    from meterhub.core import demo_site
    from meterhub.storage import registry
    from meterhub.tools.simulator import run_fleet

    settings = ctx.settings(**overrides)
    configure_logging("WARNING", settings.log_format)
    hub = Hub(settings)
    with _startup_errors():
        hub.lock.acquire()  # before the database is touched; the hub keeps it while it runs
        check_ports_free(settings)
    engine = ctx.engine()
    vendor = registry.get_vendor(engine, "demo") or registry.add_vendor(engine, "demo")
    token = _demo_token(engine, Path(settings.data_dir), create_token)
    engine.dispose()

    async def main_task() -> None:
        import signal

        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):  # both stop the demo cleanly (hub.stop below)
            loop.add_signal_handler(sig, task.cancel)
        await start_or_explain(hub)
        base = f"http://127.0.0.1:{hub.http_port}"
        click.echo(f"meterhub demo: MQTT for gateways on port {hub.mqtt_port}, API and dashboard at {base}/")
        click.echo(f"  dashboard / API token (admin): {token}")
        click.echo(f"  try: curl -H 'Authorization: Bearer {token}' {base}/api/v1/devices")
        click.echo(
            f"  simulating {gateways} gateways x {meters} meters, a report every {interval:g} s; "
            "Ctrl-C (or SIGTERM) stops"
        )
        try:
            await run_fleet(
                "127.0.0.1",
                hub.mqtt_port or 21883,
                vendor.username,
                gateways=gateways,
                meters=meters,
                interval=interval,
                duration=duration,
                progress=True,
                on_ready=lambda fleet: demo_site.announce(hub, fleet, base, token, click.echo),
            )
        finally:
            await hub.stop()

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError), _startup_errors():
            run(main_task())
    finally:
        hub.lock.release()


def _demo_token(engine: Any, data_dir: Path, create_token: Any) -> str:
    """The demo's admin token: kept in ``DATA_DIR/demo-token`` (mode 0600) and reused while it is
    still valid, so every ``make demo`` does not add one more admin token."""
    import time

    from meterhub.api.security import lookup_token

    path = data_dir / "demo-token"
    with contextlib.suppress(OSError):
        kept = path.read_text().strip()
        info = lookup_token(engine, kept)
        if info is not None and not info.revoked and info.scope == "admin" and info.sites is None:
            return kept
    token, _ = create_token(engine, f"demo-{int(time.time())}", "admin")
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


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


@main.group("model")
def model_group() -> None:
    """Product models: import one from Tuya's specification JSON."""


@model_group.command("import")
@_common
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--name", "name", required=True, help="The model's name (letters, digits, '.', '_', '-').")
@click.option("--product-id", "product_ids", multiple=True, help="Product ids (default: the file's).")
@click.option("--category", default=None, help="Tuya category code (default: the file's, else zndb).")
@click.option("--models-dir", type=click.Path(path_type=Path), default=None, help="Default: models_dir.")
@click.option("--output", default=None, help="Write this file instead ('-': print the model).")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@pass_ctx
def model_import(
    ctx: Context,
    file: Path,
    name: str,
    product_ids: tuple[str, ...],
    category: str | None,
    models_dir: Path | None,
    output: str | None,
    force: bool,
) -> None:
    """Turn a Tuya specification (thing model, DP schema or device specification JSON) into a model file."""
    from meterhub.model.errors import ModelError
    from meterhub.model.tuya import import_tuya_spec

    try:
        model = import_tuya_spec(
            file.read_bytes(),
            model=name,
            product_ids=list(product_ids) or None,
            category=category,
            source=str(file),
        )
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    text = json.dumps(model.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if output == "-":
        click.echo(text, nl=False)
        return
    if output is None:
        folder = models_dir or ctx.settings().models_dir
        if folder is None:
            raise click.ClickException("no models_dir configured: pass --models-dir or --output")
        target = Path(folder) / f"{model.model}.json"
    else:
        target = Path(output)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists (--force replaces it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    click.echo(f"{target}: model {model.model}, {len(model)} data points, category {model.category}")


# --- open hub ------------------------------------------------------------------------------------


@main.group()
def openhub() -> None:
    """Open hub: applications, users and the devices they see."""


def _openhub_call(fn: Any, *args: Any) -> Any:
    from meterhub.openhub.store import OpenHubError

    try:
        return fn(*args)
    except OpenHubError as exc:
        raise click.ClickException(exc.msg) from None


@openhub.command("app-create")
@_common
@click.argument("name")
@pass_ctx
def openhub_app_create(ctx: Context, name: str) -> None:
    """Create application credentials (access id and secret) for the signed API."""
    from meterhub.openhub import store

    app = _openhub_call(store.create_app, ctx.engine(), name)
    click.echo(f"access_id: {app.access_id}")
    click.echo(f"secret:    {app.secret}")


@openhub.command("user-add")
@_common
@click.argument("username")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=False)
@pass_ctx
def openhub_user_add(ctx: Context, username: str, password: str) -> None:
    """Create an end user; prints the uid."""
    from meterhub.openhub import store

    click.echo(_openhub_call(store.add_user, ctx.engine(), username, password))


@openhub.command("users")
@_common
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def openhub_users(ctx: Context, as_json: bool) -> None:
    """List users and their devices."""
    from meterhub.openhub import store

    users = store.list_users(ctx.engine())
    if as_json:
        click.echo(json.dumps(users))
        return
    click.echo(f"{'UID':<18} {'USERNAME':<24} DEVICES")
    for u in users:
        click.echo(f"{u['uid']:<18} {u['username']:<24} {', '.join(u['devices'])}")


@openhub.command("bind")
@_common
@click.argument("uid")
@click.argument("cid")
@pass_ctx
def openhub_bind(ctx: Context, uid: str, cid: str) -> None:
    """Let user UID see device CID (a running server picks it up within 10 s)."""
    from meterhub.openhub import store

    _openhub_call(store.bind, ctx.engine(), uid, cid)
    click.echo(f"{cid} bound to {uid}")


@openhub.command("unbind")
@_common
@click.argument("uid")
@click.argument("cid")
@pass_ctx
def openhub_unbind(ctx: Context, uid: str, cid: str) -> None:
    """Stop user UID seeing device CID."""
    from meterhub.openhub import store

    if not store.unbind(ctx.engine(), uid, cid):
        raise click.ClickException(f"{cid} is not bound to {uid}")
    click.echo(f"{cid} unbound from {uid}")


@main.command("tail")
@click.option("--uid", required=True, help="The user whose devices to follow.")
@click.option("--url", envvar="METERHUB_URL", default="http://127.0.0.1:8080", show_default=True)
@click.option("--access-id", envvar="METERHUB_ACCESS_ID", required=True)
@click.option("--secret", envvar="METERHUB_SECRET", required=True)
@click.option("--link-type", type=click.Choice(["mqtt", "websocket"]), default="mqtt", show_default=True)
@click.option("--version", "msg_version", type=click.Choice(["1.0", "2.0"]), default="2.0", show_default=True)
@click.option("--count", type=int, default=0, help="Stop after this many events (0 = never).")
def tail(
    url: str, uid: str, access_id: str, secret: str, link_type: str, msg_version: str, count: int
) -> None:
    """Print a user's decrypted open hub events live (one JSON line each)."""
    import asyncio

    from meterhub.openhub.client import OpenHubClient, OpenHubClientError

    client = OpenHubClient(url, access_id, secret)

    async def follow() -> None:
        seen = 0
        async for event in client.events(uid, link_type=link_type, version=msg_version):
            click.echo(json.dumps(event), nl=True)
            seen += 1
            if count and seen >= count:
                return

    try:
        client.project_login()
        asyncio.run(follow())
    except OpenHubClientError as exc:
        raise click.ClickException(f"open hub refused: {exc}") from None
    except KeyboardInterrupt:
        pass


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


def _register_ops() -> None:
    from meterhub.cli_ops import OPS_COMMANDS

    for command in OPS_COMMANDS:
        main.add_command(command)
    from meterhub.tools.simulator import simulate_command

    main.add_command(simulate_command)
    from meterhub.cluster.cli import cluster_cmd

    main.add_command(cluster_cmd)
    from meterhub.cli_pm import PM_COMMANDS

    for command in PM_COMMANDS:
        main.add_command(command)
    from meterhub.cli_alarms import ALARM_COMMANDS

    for command in ALARM_COMMANDS:
        main.add_command(command)


_register_ops()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
