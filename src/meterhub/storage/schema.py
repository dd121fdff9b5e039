"""The database schema, as SQLAlchemy Core tables (the one place that names tables and columns).

JSON values are stored as text (:class:`JSONText`). Times are stored as Unix seconds (float) so that
SQLite and PostgreSQL behave alike and range queries
stay simple. Schema changes go through Alembic migrations
in ``meterhub/storage/migrations``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class JSONText(TypeDecorator[Any]):
    """A JSON value kept as text, encoded with msgspec.

    Not SQLAlchemy's ``JSON``: SQLite gives a column typed JSON numeric affinity, which turns the
    stored text ``"1"`` into the integer 1.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else _encode(value).decode()

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else _decode(value)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# An integer primary key that is SQLite's rowid and PostgreSQL's bigint identity.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

vendors = Table(
    "vendors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("allowlist_enabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

gateways = Table(
    "gateways",
    metadata,
    Column("gateway_id", String(128), primary_key=True),
    Column("vendor_id", Integer, ForeignKey("vendors.id"), nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("allowed", Boolean, nullable=False, default=False),
    Column("connected", Boolean, nullable=False, default=False),
    Column("client_address", String(64)),
    Column("first_seen", Float),
    Column("last_seen", Float),
    Column("last_connected_at", Float),
    Column("last_disconnected_at", Float),
    # Cluster mode (migration 0007): the node holding the gateway's connection (kept after a clean
    # disconnect: the last holder; NULL once a dead node's gateways are freed) and the session
    # generation, raised by every accepted CONNECT (the highest generation owns the gateway).
    Column("owner_node", String(128), index=True),
    Column("session_gen", BigInteger, nullable=False, default=0, server_default="0"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(128), primary_key=True),
    Column("host", String(255)),
    Column("version", String(32)),
    Column("mqtt_port", Integer),
    Column("http_port", Integer),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
    Column("state", String(16), nullable=False),  # alive, stopped, lost
    Column("links", Integer, nullable=False, default=0, server_default="0"),
)

# Blocks of ids a node gives out itself (alarm ids) in cluster mode: the next id not yet reserved.
id_blocks = Table(
    "id_blocks",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("next", BigInteger, nullable=False),
)

products = Table(
    "products",
    metadata,
    Column("product_id", String(128), primary_key=True),
    Column("model", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("cid", String(128), primary_key=True),
    Column("gateway_id", String(128), nullable=False, index=True),
    Column("product_id", String(128), nullable=False),
    Column("model", String(64), nullable=False),
    Column("vendor_code", String(255)),
    Column("comm_type", String(255)),
    Column("device_ip", String(255)),
    Column("mac_address", String(255)),
    Column("device_name", String(255)),
    Column("device_desc", Text),
    Column("install_location", String(255)),
    Column("device_server_id", String(255)),
    Column("product_sub_type", String(255)),
    Column("online", Boolean, nullable=False, default=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("synced_at", Float, nullable=False),
    # The vendor that owns the device (migration 0005): only its gateways may sync it.
    Column("vendor_id", Integer, nullable=True),
)

device_rebinds = Table(
    "device_rebinds",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("cid", String(128), nullable=False, index=True),
    Column("old_gateway_id", String(128), nullable=False),
    Column("new_gateway_id", String(128), nullable=False),
    Column("at", Float, nullable=False),
    Column("cause", String(16)),  # "sync" or "operator" (migration 0005)
)

latest = Table(
    "latest_values",
    metadata,
    Column("cid", String(128), primary_key=True),
    Column("dp_id", String(16), primary_key=True),
    Column("value", JSONText, nullable=False),
    Column("num", Float),
    Column("t", Float, nullable=False),
    Column("received_at", Float, nullable=False),
)

reports = Table(
    "reports",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("gateway_id", String(128), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("cid", String(128), nullable=False),
    Column("dp_id", String(16), nullable=False),
    Column("value", JSONText, nullable=False),
    Column("num", Float),
    Column("t", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    # report_digest() of the content (migration 0004): a redelivery (same gateway, request_id and
    # content) is stored once; a reused request_id with other content is another report.
    Column("digest", String(32), nullable=False),
    # The dedupe key includes ``t`` (migration 0014): on PostgreSQL the table is partitioned by ``t``
    # (daily ranges, meterhub.storage.partitions; primary key (id, t)) and a unique index must hold
    # the partition key. The digest covers ``t`` already, so the same reports are redeliveries.
    UniqueConstraint("gateway_id", "request_id", "digest", "t", name="uq_reports_gateway_request_digest"),
    Index("ix_reports_cid_dp_t", "cid", "dp_id", "t"),
    # Time ranges across all meters: SQLite's bounded retention delete; PostgreSQL (BRIN) the rollup
    # job's windows (retention there drops whole partitions).
    Index("ix_reports_t", "t", postgresql_using="brin"),
)

# 5-minute / hourly / daily aggregates of the reports' numbers (migration 0015; meterhub.storage.rollups).
# On PostgreSQL partitioned by ``bucket`` (30-day ranges); SQLite has the table but does not fill it.
# Filled by the rollup job from committed reports (late ones through ``rollup_dirty``).
rollups = Table(
    "rollups",
    metadata,
    Column("res", Integer, primary_key=True),  # 300, 3600 or 86400 (a day of the configured zone)
    Column("cid", String(128), primary_key=True),
    Column("dp_id", String(16), primary_key=True),
    Column("bucket", Float, primary_key=True),
    Column("bucket_end", Float, nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("total", Float, nullable=False),
    Column("lo", Float, nullable=False),
    Column("hi", Float, nullable=False),
    Column("last", Float, nullable=False),
    Column("last_t", Float, nullable=False),
    Column("last_id", BigInteger, nullable=False),
    # migration 0016: the earliest report's number by (t, id), and "never decreases in the bucket"
    # (NULL in rows from before it: energy then reads raw rows)
    Column("first", Float),
    Column("first_t", Float),
    Column("first_id", BigInteger),
    Column("mono", Boolean),
)

# 5-minute buckets late reports changed, for the rollup job to recompute (migration 0015).
rollup_dirty = Table(
    "rollup_dirty",
    metadata,
    Column("cid", String(128), primary_key=True),
    Column("dp_id", String(16), primary_key=True),
    Column("bucket", Float, primary_key=True),
)

# Small facts about the storage itself (migration 0015), e.g. ``rollup_zone``.
storage_state = Table(
    "storage_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text),
    Column("updated_at", Float, nullable=False),
)


def report_digest(cid: str, dp_id: str, value_json: str, t: float) -> str:
    """The digest identifying a report's content: its device, data point, stored value (JSON text with
    sorted object keys, as in ``reports.value``) and measurement time ``t`` (float seconds, as its 8
    IEEE bytes). 32 hex digits of MD5: not a security hash, only telling apart the contents sent
    under one (gateway_id, request_id); a collision could only merge two reports of one gateway."""
    head = f"{cid}\x00{dp_id}\x00{value_json}\x00".encode("utf-8", "surrogatepass")
    return hashlib.md5(head + _pack_double(float(t)), usedforsecurity=False).hexdigest()


_pack_double = struct.Struct("<d").pack

presence = Table(
    "presence",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("cid", String(128), nullable=False),
    Column("online", Boolean, nullable=False),
    Column("cause", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_presence_cid_at", "cid", "at"),
)

commands = Table(
    "commands",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("cid", String(128), nullable=False, index=True),
    Column("gateway_id", String(128)),
    Column("dp_id", String(16), nullable=False),
    Column("value", JSONText),
    Column("status", String(16), nullable=False),
    Column("code", Integer),
    Column("msg", Text),
    Column("created_at", Float, nullable=False),
    Column("answered_at", Float),
    Column("late", Boolean, nullable=False, default=False),
)

# --- API and alarms (migration 0002) ----------------------------------------------------------------

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    # sha256 hex of the token; the token itself is shown once and never stored.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("revoked_at", Float),
)

alarms = Table(
    "alarms",
    metadata,
    # Ids are given out by the alarm monitor (the only writer of this table), so that an alarm can be
    # raised and cleared in the same group commit.
    Column("id", _BigId, primary_key=True, autoincrement=False),
    Column("cid", String(128), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("label", String(64), nullable=False),
    Column("level", String(32)),
    Column("raised_at", Float, nullable=False),
    Column("cleared_at", Float),
    Column("acknowledged_at", Float),
    Column("acknowledged_by", String(128)),
    Column("details", JSONText),
    # migration 0012: how often the condition came back while the alarm was open, who asserted it
    # ("meter": its fault bitmap, "meterhub": a threshold rule), the level's history
    Column("count", Integer, nullable=False, default=1, server_default="1"),
    Column("sources", JSONText),
    Column("last_raised_at", Float),
    Index("ix_alarms_cid_raised_at", "cid", "raised_at"),
    Index("ix_alarms_cleared_at", "cleared_at"),
)

# --- property management: sites, units, tenants, tariffs, prepaid (migration 0008) ---------------
# Money and kWh are decimal strings (Text): identical on SQLite and PostgreSQL, never a float.
# Instants are Unix seconds like everywhere else; tariff effective dates are local dates (YYYY-MM-DD).

sites = Table(
    "sites",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("timezone", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("tariff_id", Integer),  # the default tariff of the site's units
    Column("created_at", Float, nullable=False),
)

buildings = Table(
    "buildings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("site_id", "name", name="uq_buildings_site_name"),
)

units = Table(
    "units",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("building_id", Integer, ForeignKey("buildings.id"), nullable=False, index=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("label", String(64)),  # flat, shop, floor, ...: free text
    Column("tariff_id", Integer),  # overrides the site's tariff
    Column("created_at", Float, nullable=False),
    UniqueConstraint("building_id", "name", name="uq_units_building_name"),
)

meter_info = Table(
    "meter_info",
    metadata,
    Column("cid", String(128), primary_key=True),
    Column("name", String(255)),
    Column("location", String(255)),
    Column("updated_at", Float, nullable=False),
)

meter_assignments = Table(
    "meter_assignments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cid", String(128), nullable=False, index=True),
    Column("unit_id", Integer, ForeignKey("units.id"), nullable=False, index=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("start_t", Float, nullable=False),
    Column("end_t", Float),  # None: still there
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("reference", String(128)),
    Column("email", String(255)),
    Column("created_at", Float, nullable=False),
)

occupancies = Table(
    "occupancies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id"), nullable=False, index=True),
    Column("unit_id", Integer, ForeignKey("units.id"), nullable=False, index=True),
    Column("start_t", Float, nullable=False),
    Column("end_t", Float),  # None: open-ended
    Column("created_at", Float, nullable=False),
)

tariffs = Table(
    "tariffs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("site_id", "name", name="uq_tariffs_site_name"),
)

tariff_versions = Table(
    "tariff_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tariff_id", Integer, ForeignKey("tariffs.id"), nullable=False, index=True),
    Column("effective_from", String(10), nullable=False),
    Column("spec", JSONText, nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("tariff_id", "effective_from", name="uq_tariff_versions_tariff_from"),
)

prepaid_accounts = Table(
    "prepaid_accounts",
    metadata,
    Column("cid", String(128), primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), nullable=False, index=True),
    Column("mode", String(8), nullable=False),  # currency | kwh
    Column("balance", Text, nullable=False),
    Column("low_threshold", Text, nullable=False),
    Column("grace", JSONText, nullable=False),
    Column("charged_t", Float),  # consumption is charged up to this instant
    Column("low_alarm", Boolean, nullable=False, default=False),
    Column("switch_wanted", Boolean),  # what the meter's switch should be (None: leave it)
    Column("switch_state", Boolean),  # what the last successful command set
    Column("command_attempts", Integer, nullable=False, default=0),
    Column("last_command_at", Float),
    Column("last_command_status", String(32)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

prepaid_topups = Table(
    "prepaid_topups",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("cid", String(128), nullable=False, index=True),
    Column("amount", Text, nullable=False),
    Column("balance_after", Text, nullable=False),
    Column("reference", String(255)),
    Column("actor", String(128), nullable=False),
    Column("at", Float, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("site_id", Integer),
    Column("action", String(64), nullable=False),
    Column("target", String(255)),
    Column("details", JSONText),
    Index("ix_audit_log_site_at", "site_id", "at"),
)

# A token with rows here sees only these sites (see meterhub.api.scoping); without rows, every site.
api_token_sites = Table(
    "api_token_sites",
    metadata,
    Column("token_id", Integer, ForeignKey("api_tokens.id"), primary_key=True),
    Column("site_id", Integer, ForeignKey("sites.id"), primary_key=True),
)


# --- alarm rules and notifications (migration 0012) -------------------------------------------------

alarm_rules = Table(
    "alarm_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # scope: a product id (model) or a site; both None = every meter
    Column("product_id", String(64)),
    Column("site_id", Integer),
    # kind: above / below / rate (per minute, absolute) / no_data (minutes) / tune (hysteresis and
    # durations for a built-in alarm named by ``label``)
    Column("kind", String(16), nullable=False),
    Column("code", String(64)),
    Column("value", Float),
    Column("label", String(64), nullable=False),
    Column("level", String(16), nullable=False, default="general"),
    Column("hysteresis", Float, nullable=False, default=0.0),
    Column("raise_after", Float, nullable=False, default=0.0),
    Column("clear_after", Float, nullable=False, default=0.0),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

notify_targets = Table(
    "notify_targets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # webhook / email
    Column("site_id", Integer),  # None: every site
    Column("levels", JSONText, nullable=False),  # e.g. ["serious", "urgent"]
    Column("events", JSONText, nullable=False),  # raise / escalate / clear
    # webhook: url, secret; email: host, port, starttls, username, password, sender, to
    Column("config", JSONText, nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
)

notify_outbox = Table(
    "notify_outbox",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("target_id", Integer, nullable=False),
    Column("alarm_id", _BigId),
    Column("event", String(16), nullable=False),
    Column("payload", JSONText, nullable=False),
    Column("status", String(16), nullable=False),  # pending / sent / dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("done_at", Float),
    Column("claimed_by", String(128)),
    Index("ix_notify_outbox_status_next", "status", "next_at"),
)


# Persistent MQTT sessions (clean_session=0): Session.to_dict() as JSON text, written by
# meterhub.mqtt.session_store; ``node`` holds it now when ``connected`` (see docs/decisions.md).
mqtt_sessions = Table(
    "mqtt_sessions",
    metadata,
    Column("client_id", String(256), primary_key=True),
    Column("owner", String(256), nullable=False),
    Column("node", String(128), nullable=False),
    Column("connected", Boolean, nullable=False),
    Column("state", Text, nullable=False),
    # + 1 each time a node takes the session: an older copy's writes and deletes do not apply
    Column("gen", BigInteger, nullable=False, default=0, server_default="0"),
    Column("updated_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_mqtt_sessions_owner", "owner", "updated_at"),
    Index("ix_mqtt_sessions_expires_at", "expires_at"),
)


# A gateway's conformance record (meterhub.storage.conformance_rows): JSON text, the sum of what every
# node observed of it (each adds its delta), bounded per gateway; one row per registered gateway.
conformance_records = Table(
    "conformance_records",
    metadata,
    Column("gateway_id", String(128), primary_key=True),
    Column("record", Text),
)
