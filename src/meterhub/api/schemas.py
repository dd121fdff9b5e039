"""Request and response models of the REST API (they make /openapi.json).

Times are Unix seconds (float) with an ``*_iso`` twin in the configured time zone where a person
may read them.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


# --- errors --------------------------------------------------------------------------------------


class Problem(_Model):
    loc: list[str]
    msg: str
    type: str


class ErrorInfo(_Model):
    message: str
    code: int | None = Field(None, description="The protocol error code (e.g. 2001 offline) or null.")
    details: list[Problem] | None = None


class ErrorResponse(_Model):
    error: ErrorInfo
    command: CommandOut | None = Field(None, description="For command errors: the command as logged.")


# --- paging --------------------------------------------------------------------------------------


class Page(_Model, Generic[T]):
    items: list[T]
    total: int = Field(description="Items matching the filters, all pages together.")
    limit: int
    offset: int


# --- vendors, gateways, products, models ---------------------------------------------------------


class VendorIn(_Model):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    allowlist: bool = Field(False, description="Only gateways explicitly allowed may connect.")


class VendorOut(_Model):
    name: str
    username: str | None = Field(
        None, description="The gateways' MQTT username (a secret): shown to admin tokens only."
    )
    enabled: bool
    allowlist: bool
    created_at: float
    created_at_iso: str


class GatewayOut(_Model):
    gateway_id: str
    vendor: str | None
    enabled: bool
    allowed: bool
    connected: bool = Field(description="Connected to meterhub's MQTT server right now.")
    client_address: str | None
    first_seen: float | None
    last_seen: float | None
    last_seen_iso: str | None
    last_connected_at: float | None
    last_disconnected_at: float | None
    device_count: int
    devices_online: int


class DeviceSummary(_Model):
    cid: str
    name: str | None
    gateway_id: str
    product_id: str
    model: str
    online: bool
    last_seen: float
    last_seen_iso: str
    install_location: str | None


class DeviceMoveIn(_Model):
    model_config = ConfigDict(extra="forbid")
    gateway_id: str = Field(min_length=1, max_length=128, description="The gateway to move the device to.")


class DeviceMoveOut(_Model):
    cid: str
    old_gateway_id: str = Field(description="The gateway the device was bound to.")
    gateway_id: str = Field(description="The gateway it is bound to now.")
    vendor: str = Field(description="The vendor it belongs to now (the gateway's).")
    moved: bool = Field(description="false: it was already there, nothing changed.")


class GatewayDetail(GatewayOut):
    devices: list[DeviceSummary]


class ProductIn(_Model):
    model_config = ConfigDict(extra="forbid")
    product_id: str = Field(min_length=1, max_length=128)
    model: str = Field("smart-meter", min_length=1, max_length=64)


class ProductOut(_Model):
    product_id: str
    model: str
    created_at: float | None
    devices: int


class LabelOut(_Model):
    label: str
    description: str | None


class DataPointOut(_Model):
    id: int
    code: str
    name: str
    access: Literal["rw", "ro", "wo"]
    type: str
    writable: bool
    unit: str | None = Field(None, description="The document's unit (kept as on the wire).")
    display_unit: str | None = Field(None, description="The unit to show people.")
    min: int | None = None
    max: int | None = None
    step: int | None = None
    scale: int = Field(0, description="Real value = raw / 10^scale.")
    labels: list[LabelOut] = Field(default_factory=list)
    layout: str | None = None
    max_length: int | None = None
    description: str | None = None


class ModelSummary(_Model):
    model: str
    name: str
    version: str
    source: str | None
    product_ids: list[str]
    data_points: int


class ModelOut(_Model):
    model: str
    name: str
    version: str
    source: str | None
    product_ids: list[str]
    data_points: list[DataPointOut]


# --- devices -------------------------------------------------------------------------------------


class LatestValue(_Model):
    dp_id: str
    code: str | None
    name: str | None
    type: str | None
    raw: Any = Field(description="The stored value: raw integer, bool, label, list of fault labels, object.")
    scaled: float | None = Field(description="Value data points: raw / 10^scale, in `unit`.")
    unit: str | None
    display_unit: str | None
    t: float = Field(description="Measurement time (the report's t).")
    t_iso: str
    received_at: float


class PresenceNow(_Model):
    online: bool
    since: float | None
    since_iso: str | None
    cause: str | None


class AlarmOut(_Model):
    id: int
    cid: str
    kind: str
    label: str
    level: str | None
    active: bool
    raised_at: float
    raised_at_iso: str
    cleared_at: float | None
    cleared_at_iso: str | None
    acknowledged_at: float | None
    acknowledged_by: str | None
    details: dict[str, Any] | None
    count: int = 1
    sources: list[str] | None = None
    last_raised_at: float | None = None


class DeviceDetail(_Model):
    cid: str
    gateway_id: str
    product_id: str
    model: str
    vendor_code: str | None
    comm_type: str | None
    device_ip: str | None
    mac_address: str | None
    device_name: str | None
    device_desc: str | None
    install_location: str | None
    device_server_id: str | None
    product_sub_type: str | None
    first_seen: float
    synced_at: float
    last_seen: float
    last_seen_iso: str
    presence: PresenceNow
    values: list[LatestValue]
    alarms: list[AlarmOut] = Field(description="Active alarms.")


class PresenceEvent(_Model):
    online: bool
    cause: str
    at: float
    at_iso: str


class HistoryRow(_Model):
    t: float
    t_iso: str
    raw: Any
    value: float | None = Field(
        description="The number charted: scaled value, 1/0 for bool, or the phase field."
    )
    received_at: float


class HistoryBucket(_Model):
    start: float
    end: float
    start_iso: str
    count: int
    min: float | None
    max: float | None
    avg: float | None
    last: float | None


class HistoryOut(_Model):
    cid: str
    dp_id: str
    code: str
    unit: str | None
    display_unit: str | None
    field: str | None = Field(None, description="For phase data points: the field charted.")
    from_: float = Field(alias="from")
    to: float
    mode: Literal["raw", "buckets"]
    total: int | None = Field(None, description="raw mode: rows in the range.")
    limit: int | None = None
    offset: int | None = None
    items: list[HistoryRow] | None = None
    interval: float | None = Field(None, description="buckets mode: seconds per bucket.")
    buckets: list[HistoryBucket] | None = None


# --- commands ------------------------------------------------------------------------------------


class CommandIn(_Model):
    model_config = ConfigDict(extra="forbid")
    dp: int | str = Field(description='Data point id (1 or "1") or code ("switch").')
    value: Any = Field(description="The value, in the data point's raw form (e.g. true, 2300000, a label).")
    timeout: float | None = Field(
        None, gt=0, le=300, description="Seconds to wait for the answer (default 10)."
    )
    wait: bool = Field(True, description="false: answer 202 at once with an id to poll.")


class CommandOut(_Model):
    id: str = Field(description="The id to poll (GET /api/v1/commands/{id}).")
    request_id: str | None = Field(description="The protocol request_id (known once the command is sent).")
    cid: str
    dp_id: str
    status: Literal["pending", "ok", "failed", "timeout", "rejected"]
    code: int | None
    msg: str | None
    value: Any = None
    elapsed: float | None = Field(None, description="Seconds from sending to the answer.")
    created_at: float | None = None
    created_at_iso: str | None = None
    answered_at: float | None = None
    late: bool = Field(False, description="The answer came after the timeout.")


class CommandAccepted(_Model):
    id: str
    status: Literal["pending"]
    cid: str
    dp_id: str
    poll: str


# --- energy --------------------------------------------------------------------------------------


class EnergySource(_Model):
    dp_id: str
    code: str


class EnergyBucket(_Model):
    period: str = Field(description='"2026-11-21" (day) or "2026-11" (month), in the configured zone.')
    start: float
    end: float
    start_iso: str
    consumption_kwh: float | None = Field(description="Derived from the cumulative total; null = no data.")
    readings: int = Field(description="Readings of the cumulative total in this period.")
    reported_kwh: float | None = Field(
        description="The meter's own counter: last electric_daily (day) / electric_month (month) value."
    )


class EnergyEventOut(_Model):
    t: float
    t_iso: str
    kind: Literal["reset", "rebase", "glitch"]
    before_kwh: float
    after_kwh: float


class DeviceEnergyOut(_Model):
    cid: str
    period: Literal["day", "month"]
    timezone: str
    from_: str = Field(alias="from")
    to: str
    spread: bool
    unit: Literal["kWh"] = "kWh"
    source: EnergySource | None
    total_kwh: float | None
    buckets: list[EnergyBucket]
    events: list[EnergyEventOut]


class GroupEnergyBucket(_Model):
    period: str
    start: float
    end: float
    start_iso: str
    consumption_kwh: float | None
    devices_with_data: int


class GroupDevicePart(_Model):
    cid: str
    source: EnergySource | None
    total_kwh: float | None
    events: list[EnergyEventOut]


class GroupEnergyOut(_Model):
    period: Literal["day", "month"]
    timezone: str
    from_: str = Field(alias="from")
    to: str
    spread: bool
    unit: Literal["kWh"] = "kWh"
    total_kwh: float | None
    buckets: list[GroupEnergyBucket]
    devices: list[GroupDevicePart]


# --- alarms --------------------------------------------------------------------------------------


class AckIn(_Model):
    model_config = ConfigDict(extra="forbid")
    by: str | None = Field(None, max_length=128, description="Who acknowledges; default: the token's name.")


# --- health --------------------------------------------------------------------------------------


class StorageHealth(_Model):
    ok: bool
    writer_healthy: bool | None
    queue_depth: int | None
    error: str | None = None
    #: storage maintenance: retention settings, partitions, what the last runs dropped or deleted
    retention: dict[str, Any] | None = None


class MqttHealth(_Model):
    listening: bool
    port: int | None
    tls_port: int | None
    connected_clients: int


class Health(_Model):
    status: Literal["ok", "degraded"]
    version: str
    time: float
    storage: StorageHealth
    mqtt: MqttHealth


ErrorResponse.model_rebuild()
