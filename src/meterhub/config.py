"""Configuration: defaults < TOML file < environment (``METERHUB_*``) < command-line flags.

A config file is TOML with the settings at top level, for example::

    data_dir = "/var/lib/meterhub"
    mqtt_port = 21883
    tls_cert = "/etc/meterhub/cert.pem"
    tls_key = "/etc/meterhub/key.pem"

Every setting can also be given as an environment variable, e.g. ``METERHUB_MQTT_PORT=1884``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    """All of meterhub's settings, with their defaults."""

    model_config = SettingsConfigDict(env_prefix="METERHUB_", extra="forbid")

    data_dir: Path = Field(Path("./data"), description="Directory for the SQLite database and state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/meterhub.db"
    )
    sqlite_synchronous: str = Field("FULL", description="SQLite synchronous pragma: FULL or NORMAL.")
    # Cluster mode (docs/cluster.md): several nodes on one PostgreSQL, NATS between them.
    bus_url: str | None = Field(None, description="nats://HOST:PORT; None = in-process bus (one node).")
    node_id: str | None = Field(None, description="This node's name; default host name + MQTT port.")
    node_timeout: float = Field(15.0, gt=0, description="Seconds without a heartbeat before a node is dead.")
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between a node's heartbeats.")
    proxy_protocol: bool = Field(
        False,
        description="The MQTT listener (mqtt_port) requires a PROXY protocol v2/v1 header on every "
        "connection (a TCP balancer's send-proxy-v2): the client's address is taken from it.",
    )
    drain_timeout: float = Field(
        10.0, ge=0, description="On SIGTERM, longest wait (s) for reports read so far to be answered."
    )
    drain_grace: float = Field(
        5.0,
        ge=0,
        description="After a drain (cluster mode), seconds its gateways have to reconnect to another "
        "node before their devices go offline (cause node-drain).",
    )

    mqtt_host: str = "0.0.0.0"
    mqtt_port: int = 21883
    tls_port: int | None = Field(None, description="Second listener with TLS; None = no TLS listener.")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Alarms (meterhub.core.alarms): how long a condition must hold / be gone before an alarm is raised
    # / cleared, unless a "tune" rule says otherwise.
    alarm_raise_after: float = Field(10.0, ge=0, description="Default seconds before an alarm is raised.")
    alarm_clear_after: float = Field(30.0, ge=0, description="Default seconds before an alarm is cleared.")
    # Alarm notifications (meterhub.core.notify): retry backoff base, attempts before a dead letter.
    notify_backoff: float = Field(5.0, gt=0, description="Seconds before a notification's first retry.")
    notify_max_attempts: int = Field(6, ge=1, description="Attempts before a notification is dead.")
    notify_poll: float = Field(1.0, gt=0, description="Seconds between two looks at the outbox.")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_docs_public: bool = Field(
        True, description="Serve /docs and /openapi.json without a token (they hold no data)."
    )
    ws_port: int | None = Field(
        None, description="MQTT over WebSocket listener (open hub websocket links); None = off."
    )
    openhub_host: str | None = Field(
        None, description="Host name put in open hub link URLs; default: the host the HTTP client used."
    )
    openhub_tls: bool = Field(False, description="Give open hub mqtt links ssl:// URLs (needs tls_port).")
    openhub_link_ttl: float = Field(
        7200,
        ge=300,  # openhub.store.LINK_MIN_EXPIRE: Tuya's SDK renews at expire_time - 60 s
        description="Seconds open hub link credentials stay valid (at least 300).",
    )
    openhub_backlog: int = Field(100_000, description="Open hub events waiting to be sent; oldest dropped.")
    # Home Assistant (northbound MQTT discovery, meterhub.northbound.homeassistant); off unless ha_broker
    ha_broker: str | None = Field(
        None, description="Home Assistant's MQTT broker, mqtt://host:1883 or mqtts://host:8883; None = off."
    )
    ha_username: str | None = None
    ha_password: str | None = None
    ha_tls_ca: Path | None = Field(None, description="CA file for the broker's certificate (implies TLS).")
    ha_tls_insecure: bool = Field(False, description="Do not check the broker certificate's host name.")
    ha_discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    ha_base_topic: str = Field("meterhub", description="Topic prefix of states, availability, commands.")
    ha_client_id: str | None = Field(None, description="MQTT client id; default meterhub-<host name>.")
    ha_queue_max: int = Field(
        10_000, ge=1, description="Meters with updates waiting for the broker; oldest dropped (counted)."
    )
    ha_publish_interval: float = Field(
        1.0, ge=0, description="Least seconds between two batches of state updates (values coalesce)."
    )
    ha_resync_interval: float = Field(
        60.0, gt=0, description="Seconds between checks for meters deleted from the database."
    )
    conformance_status_interval: float = Field(
        60.0, description="Longest expected gap between a gateway's devices/status messages (report card)."
    )
    conformance_flush_interval: float = Field(
        10.0,
        gt=0,
        description="Seconds between two batched writes of gateways' conformance records.",
    )
    timezone: str = Field(
        "UTC", description="IANA time zone for days and months in energy reports, e.g. Europe/Berlin."
    )

    # MQTT protection limits
    max_packet_size: int = 64 * 1024
    max_inflight: int = Field(
        32, description="Outbound QoS 1/2 messages awaiting acknowledgement per client."
    )
    max_pending_inbound: int = Field(
        256, description="Inbound QoS>0 messages being processed per client before reading pauses."
    )
    max_queued: int = Field(
        1000,
        description="Messages queued per client. A connected gateway past it is read only for its "
        "acknowledgements until half is sent (nothing QoS 1 dropped); subscribers and offline "
        "sessions lose the oldest.",
    )
    max_held_inbound: int = Field(
        8 * 1024 * 1024,
        description="Bytes of a gateway's packets read but held back (its queue is full) above which "
        "it is not read at all; disconnected after slow_client_timeout if it stays so.",
    )
    write_buffer_high: int = Field(
        256 * 1024, description="Socket write buffer above which a client is paused."
    )
    slow_client_timeout: float = Field(
        60.0, description="Seconds a client may stay above the high-water mark."
    )
    max_subscriptions: int = Field(
        64, ge=1, description="Topic filters one client may hold; SUBACK 0x80 for more."
    )
    max_persistent_sessions_per_vendor: int = Field(
        20_000,
        ge=1,
        description="clean_session=0 sessions per vendor (or open hub user); past it the vendor's "
        "oldest offline one is forgotten, or CONNACK 0x03 if all are connected.",
    )
    max_persistent_sessions: int = Field(
        100_000,
        ge=1,
        description="clean_session=0 sessions in all; past it the oldest offline one is forgotten, "
        "or CONNACK 0x03 if all are connected.",
    )
    connect_timeout: float = 10.0
    max_client_id_length: int = 128
    max_topic_length: int = Field(256, description="Longest topic name or topic filter accepted.")
    max_connections: int = 100_000
    keepalive_max: int = Field(3600, description="Largest keep-alive accepted (seconds); 0 = unlimited.")
    login_fail_window: float = Field(60.0, gt=0, description="Window (s) of the failed-login budgets.")
    login_fail_budget_client: int = Field(
        20, ge=0, description="Failed logins per client id in a window, then a ban (0 = no budget)."
    )
    login_fail_budget_source: int = Field(
        200, ge=0, description="Failed logins per source address in a window, then a ban (0 = no budget)."
    )
    login_ban_seconds: float = Field(60.0, ge=0, description="How long a login ban lasts (seconds).")

    # Protocol behaviour
    default_model: str | None = Field(
        "smart-meter", description="Model for products not registered; None refuses unknown products."
    )
    models_dir: Path | None = None
    command_timeout: float = 10.0
    presence_timeout: float = Field(180.0, description="Seconds of silence after which a device is offline.")
    device_cache_max: int = Field(
        200_000, ge=1, description="Most devices kept in memory (online ones are never evicted)."
    )
    dedupe_window: int = Field(100_000, description="Recent (gateway, request_id) answers remembered.")
    dedupe_max_age: float = Field(
        600.0, gt=0, description="Seconds a report's answer stays in memory (the database decides after)."
    )
    batch_max: int = Field(2000, description="Most operations per storage commit.")
    commit_linger: float = Field(
        0.002,
        ge=0,
        le=0.05,
        description="Seconds an idle writer lets a batch fill when traffic is dense (fewer commits per "
        "report at moderate rates; each answer waits at most this much longer). 0 = commit at once.",
    )
    max_queued_writes: int = Field(
        20_000,
        ge=1,
        description="Write groups (about one per report) waiting for storage above which no gateway is "
        "read from until half of them are committed (back-pressure instead of unbounded memory).",
    )
    retention_raw_days: float | None = Field(
        90.0, gt=0, description="Days raw reports are kept (None = forever); PostgreSQL drops whole days."
    )
    retention_rollup_days: float | None = Field(
        None, gt=0, description="Days rollups (5 min, hourly, daily aggregates) are kept; None = forever."
    )
    storage_maintenance_interval: float = Field(
        3600.0, gt=0, description="Seconds between storage maintenance runs (partitions, retention)."
    )
    rollup_interval: float = Field(
        30.0,
        gt=0,
        description="Seconds between runs of the rollup job (PostgreSQL; charts read raw rows "
        "for what it has not rolled up yet).",
    )

    log_level: str = "INFO"
    log_format: str = Field("console", description="console or json")
    log_repeat_interval: float = Field(
        60.0, gt=0, description="Seconds between two log lines of one kind of repeated error (with a count)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get("path")
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @field_validator("ha_broker")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value:
            from meterhub.northbound.ha_discovery import parse_broker

            parse_broker(value)  # ValueError with the reason
        return value or None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _cluster_settings(self) -> Settings:
        """Cluster mode (docs/cluster.md): heartbeats well within the timeout, a shared database."""
        if self.heartbeat_interval >= self.node_timeout:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be below node_timeout "
                f"({self.node_timeout:g}s)"
            )
        if self.bus_url and not self.resolved_database_url.startswith("postgresql"):
            raise ValueError("bus_url (cluster mode) needs a PostgreSQL database_url shared by the nodes")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'meterhub.db').resolve()}"


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from file, environment and explicit overrides (``None`` overrides are ignored)."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE["path"] = None
