"""Home Assistant MQTT discovery, sans-I/O: which entities a meter gets, their config payloads, topics
and state payloads. No broker, socket or database here (``homeassistant.py`` does the I/O).

Home Assistant's documentation (https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery):
a discovery message is a retained JSON config on
``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`` (node_id and object_id only
``[a-zA-Z0-9_-]``); an empty payload on that topic removes the entity.
meterhub uses single-component discovery (works with every Home Assistant since 2023): one config per
entity, all of a meter's entities sharing one ``device`` block (identifiers ``meterhub:<cid>``), so a
meter is one device. The node_id is the base topic (``meterhub``), which lets meterhub find its own
retained configs again with one wildcard subscription (``<prefix>/+/meterhub/+/config``).

Entities are chosen by data point *code* (the product model's identifier), so any model that uses the
smart meter's codes gets them. Values are in real units: ``DataPoint.scaled`` (the model's own
conversion) for value data points; the unit is the model's display unit unless the table below says
otherwise (where the model has none, or Home Assistant only accepts another spelling).

Topics (``<base>`` = ``ha_base_topic``, default ``meterhub``; ``<dev>`` = the cid made topic-safe):
- ``<base>/status``: ``online`` / ``offline`` (retained; the publisher's MQTT will says ``offline``)
- ``<base>/<dev>/availability``: the meter's presence, ``online`` / ``offline`` (retained)
- ``<base>/<dev>/<code>``: one data point's latest value (retained)
- ``<base>/<dev>/fault/attributes``: ``{label: true|false}`` for every fault label (retained)
- ``<base>/<dev>/<code>/set``: commands from Home Assistant (the switch: ``ON`` / ``OFF``)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from meterhub import __version__
from meterhub.model.datapoint import DataPoint, ProductModel

_json = msgspec.json.Encoder().encode
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
#: Longest topic-safe device id (longer cids are cut and get a hash suffix).
SLUG_MAX = 64

ONLINE = "online"
OFFLINE = "offline"
ON = "ON"
OFF = "OFF"
#: Model units spelled the way Home Assistant's unit lists spell them.
_UNIT_SPELLING = {"kW·h": "kWh", "second (s)": "s"}
_KEEP = object()  # EntitySpec.unit: take the model's display unit


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """One Home Assistant entity for one data point (a phase data point gives three)."""

    code: str  # the data point's code
    key: str  # unique within a device: the object id suffix and unique_id suffix
    component: str  # "sensor" or "switch"
    name: str
    data_type: str  # the data point type this entity expects (others are skipped)
    device_class: str | None = None
    state_class: str | None = None
    unit: Any = _KEEP  # Home Assistant unit; _KEEP = the model's display unit; None = no unit
    field: str | None = None  # phase entities: which field of the phase object
    entity_category: str | None = None
    precision: int | None = None  # suggested_display_precision (decimals shown; the value keeps all)


_M, _TI = "measurement", "total_increasing"


def _value(
    code: str,
    name: str,
    device_class: str | None,
    state_class: str | None,
    precision: int,
    unit: Any = _KEEP,
) -> EntitySpec:
    return EntitySpec(
        code, code, "sensor", name, "value", device_class, state_class, unit, precision=precision
    )


def _phase(code: str, letter: str) -> tuple[EntitySpec, ...]:
    return tuple(
        EntitySpec(code, f"{code}_{f}", "sensor", f"Phase {letter} {f}", "raw", dc, _M, unit, f, precision=p)
        for f, dc, unit, p in (
            ("voltage", "voltage", "V", 1),
            ("current", "current", "A", 3),
            ("power", "power", "W", 0),
        )
    )


#: The smart meter's data points (src/meterhub/model/data/smart-meter.json) as Home Assistant entities.
ENTITIES: dict[str, tuple[EntitySpec, ...]] = {
    spec[0].code: spec
    for spec in (
        (EntitySpec("switch", "switch", "switch", "Switch", "bool", device_class="switch"),),
        (_value("power_current", "Power", "power", _M, 1),),
        (_value("voltage_current", "Voltage", "voltage", _M, 1),),
        (_value("cur_current", "Current", "current", _M, 0),),  # the model's unit: mA
        (_value("temp_current", "Temperature", "temperature", _M, 1),),
        (_value("leakage_current", "Leakage current", "current", _M, 1),),
        (_value("power_effective", "Active power", "power", _M, 1),),
        # The document says W; reactive power is measured in var, the only unit Home Assistant takes.
        (_value("power_reactive", "Reactive power", "reactive_power", _M, 1, "var"),),
        # Apparent power in kVA: Home Assistant's apparent_power class only takes VA, so no class.
        (_value("power_apparent", "Apparent power", None, _M, 3),),
        (_value("power_factor", "Power factor", "power_factor", _M, 2, None),),  # 0..1, unitless
        (_value("supply_frequency", "Frequency", "frequency", _M, 2, "Hz"),),  # the model has no unit
        (_value("electric_total", "Energy", "energy", _TI, 3),),
        (_value("forward_energy_total", "Forward active energy", "energy", _TI, 3),),
        # Daily / monthly totals restart at 0: total_increasing takes a decrease as a new meter cycle.
        (_value("electric_daily", "Energy today", "energy", _TI, 3),),
        (_value("electric_month", "Energy this month", "energy", _TI, 3),),
        (EntitySpec("fault", "fault", "sensor", "Fault", "fault"),),
        (EntitySpec("alarm_level", "alarm_level", "sensor", "Alarm level", "enum", device_class="enum"),),
        (
            EntitySpec(
                "leakage_protection",
                "leakage_protection",
                "sensor",
                "Leakage protection",
                "enum",
                device_class="enum",
                entity_category="diagnostic",
            ),
        ),
        _phase("phase_a", "A"),
        _phase("phase_b", "B"),
        _phase("phase_c", "C"),
    )
}


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker(url: str) -> Broker:
    """``mqtt://[user:pass@]host[:port]`` (default 1883) or ``mqtts://...`` (TLS, default 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"ha_broker {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"ha_broker {url!r}: no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"ha_broker {url!r}: bad port") from None
    return Broker(
        parts.hostname,
        port,
        tls,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def slug(text: str) -> str:
    """``text`` as a topic level and discovery object id (``[A-Za-z0-9_-]``); changed or long ids get
    a hash suffix, so two cids never share a slug."""
    safe = _SAFE.sub("_", text)
    if safe == text and len(text) <= SLUG_MAX:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{safe[: SLUG_MAX - 11]}_{digest}"


def entities_for(model: ProductModel) -> list[tuple[EntitySpec, DataPoint]]:
    """The entities a device of this model gets: every table entry whose data point the model has with
    the expected type (a phase entity needs the phase layout)."""
    out: list[tuple[EntitySpec, DataPoint]] = []
    for code, specs in ENTITIES.items():
        dp = model.by_code(code)
        if dp is None:
            continue
        for spec in specs:
            if dp.type != spec.data_type or (spec.field is not None and dp.layout != "phase"):
                continue
            out.append((spec, dp))
    return out


def mapped(dp: DataPoint) -> bool:
    """Whether a data point's reports reach Home Assistant (checked on the hot path: one dict lookup)."""
    specs = ENTITIES.get(dp.code)
    return specs is not None and specs[0].data_type == dp.type


@dataclass(slots=True)
class DeviceInfo:
    """What Home Assistant's device registry gets for a meter (from its sync and its vendor)."""

    cid: str
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    model_id: str | None = None
    suggested_area: str | None = None
    mac_address: str | None = None
    online: bool = False


class Topics:
    """Every topic meterhub uses for Home Assistant, from the discovery prefix and the base topic."""

    def __init__(self, discovery_prefix: str = "homeassistant", base: str = "meterhub") -> None:
        self.prefix = discovery_prefix.strip("/")
        self.base = base.strip("/")
        self.node = slug(self.base)
        self.bridge = f"{self.base}/status"
        self.birth = f"{self.prefix}/status"  # Home Assistant's own birth / will
        self.commands = f"{self.base}/+/+/set"
        self.our_configs = f"{self.prefix}/+/{self.node}/+/config"

    def device(self, cid: str) -> str:
        return f"{self.base}/{slug(cid)}"

    def availability(self, cid: str) -> str:
        return f"{self.device(cid)}/availability"

    def state(self, cid: str, code: str) -> str:
        return f"{self.device(cid)}/{code}"

    def attributes(self, cid: str, code: str) -> str:
        return f"{self.device(cid)}/{code}/attributes"

    def command(self, cid: str, code: str) -> str:
        return f"{self.device(cid)}/{code}/set"

    def config(self, component: str, cid: str, key: str) -> str:
        return f"{self.prefix}/{component}/{self.node}/{slug(cid)}_{key}/config"

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """``(device slug, code)`` of a command topic, else None."""
        parts = topic.split("/")
        base = self.base.split("/")
        if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[-1] != "set":
            return None
        return parts[-3], parts[-2]


def device_block(info: DeviceInfo) -> dict[str, Any]:
    block: dict[str, Any] = {"identifiers": [f"meterhub:{info.cid}"], "name": info.name or info.cid}
    for key in ("manufacturer", "model", "model_id", "suggested_area"):
        value = getattr(info, key)
        if value:
            block[key] = value
    block["serial_number"] = info.cid
    if info.mac_address:
        block["connections"] = [["mac", info.mac_address.lower()]]
    return block


def cid_of_config(payload: bytes) -> str | None:
    """The cid in a config meterhub published (its device identifier), or None for anything else."""
    try:
        config = msgspec.json.decode(payload)
        ids = config["device"]["identifiers"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
    if isinstance(ids, list) and ids and isinstance(ids[0], str) and ids[0].startswith("meterhub:"):
        return ids[0][len("meterhub:") :]
    return None


ORIGIN = {"name": "meterhub", "sw_version": __version__}


def discovery_configs(topics: Topics, info: DeviceInfo, model: ProductModel) -> dict[str, bytes]:
    """``{config topic: JSON payload}`` for every entity of one meter."""
    cid = info.cid
    device = device_block(info)
    availability = [{"topic": topics.bridge}, {"topic": topics.availability(cid)}]
    out: dict[str, bytes] = {}
    for spec, dp in entities_for(model):
        dev_slug = slug(cid)
        config: dict[str, Any] = {
            "name": spec.name,
            "unique_id": f"{topics.node}_{dev_slug}_{spec.key}",
            "state_topic": topics.state(cid, spec.code),
            "availability": availability,
            "availability_mode": "all",
            "device": device,
            "origin": ORIGIN,
            "qos": 1,
        }
        if spec.device_class is not None:
            config["device_class"] = spec.device_class
        if spec.state_class is not None:
            config["state_class"] = spec.state_class
        if spec.entity_category is not None:
            config["entity_category"] = spec.entity_category
        if spec.precision is not None:
            config["suggested_display_precision"] = spec.precision
        if spec.component == "switch":
            config.update(
                command_topic=topics.command(cid, spec.code),
                payload_on=ON,
                payload_off=OFF,
                retain=False,
                optimistic=False,
            )
        elif spec.field is not None:
            config["value_template"] = "{{ value_json.%s }}" % spec.field  # noqa: UP031 (Jinja braces)
            config["unit_of_measurement"] = spec.unit
        elif dp.type == "value":
            unit = dp.display_unit if spec.unit is _KEEP else spec.unit
            if unit is not None:
                config["unit_of_measurement"] = _UNIT_SPELLING.get(unit, unit)
        elif dp.type == "enum":
            config["options"] = list(dp.labels)
        elif dp.type == "fault":
            config["json_attributes_topic"] = topics.attributes(cid, spec.code)
            config["icon"] = "mdi:alert-circle-outline"
        out[topics.config(spec.component, cid, spec.key)] = _json(config)
    return out


def state_messages(topics: Topics, cid: str, dp: DataPoint, value: Any) -> list[tuple[str, bytes]]:
    """The retained state message(s) for one committed value of a mapped data point (canonical value,
    as ``DataPoint.coerce`` returns it)."""
    topic = topics.state(cid, dp.code)
    kind = dp.type
    if kind == "value":
        return [(topic, _json(dp.scaled(value)))]
    if kind == "bool":
        return [(topic, (ON if value else OFF).encode())]
    if kind == "enum":
        return [(topic, str(value).encode())]
    if kind == "fault":
        active = set(value)
        state = ",".join(label for label in dp.labels if label in active) or "none"
        attributes = {label: label in active for label in dp.labels}
        return [(topic, state[:255].encode()), (topics.attributes(cid, dp.code), _json(attributes))]
    if kind == "raw" and dp.layout == "phase" and isinstance(value, dict):
        return [(topic, _json({k: value.get(k) for k in ("voltage", "current", "power")}))]
    return []


def topics_in_config(payload: bytes, bridge: str) -> list[str]:
    """The retained topics a published config points at (state, attributes, the meter's availability),
    to clear with the config when the meter is removed."""
    try:
        config = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return []
    if not isinstance(config, dict):
        return []
    found = [config.get("state_topic"), config.get("json_attributes_topic")]
    for item in config.get("availability") or ():
        if isinstance(item, dict):
            found.append(item.get("topic"))
    return [t for t in found if isinstance(t, str) and t and t != bridge]


def retained_topics(topics: Topics, cid: str, model: ProductModel) -> list[str]:
    """Every non-config retained topic meterhub may have published for a meter (to clear on removal)."""
    out = [topics.availability(cid)]
    for code in {dp.code for _, dp in entities_for(model)}:
        out.append(topics.state(cid, code))
        if code == "fault":
            out.append(topics.attributes(cid, code))
    return out
