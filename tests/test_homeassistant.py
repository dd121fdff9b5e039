"""Home Assistant MQTT discovery against a real broker: a mosquitto started per test on a free port, a real
paho subscriber playing Home Assistant, a real gateway (paho) reporting to a real meterhub.

The schema checks below are written from Home Assistant's documentation (home-assistant/home-assistant.io):
- source/_integrations/mqtt.markdown, "MQTT Discovery": the topic
  ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`` with node_id and object_id in
  ``[a-zA-Z0-9_-]``; a JSON dictionary payload; the ``origin`` block (``name`` required, ``sw_version``,
  ``support_url``); "an empty payload will cause a previously discovered device to be deleted"; the
  device registry keys; availability (``availability`` list of ``{topic, payload_available,
  payload_not_available, value_template}``, ``availability_mode`` all/any/latest, not together with
  ``availability_topic``); "Sharing of device configuration": identifiers or connections, and name.
- source/_integrations/sensor.mqtt.markdown and switch.mqtt.markdown: each platform's configuration
  variables (the allowed keys), the required ones (``state_topic`` / ``command_topic``; ``platform`` only
  in device-based discovery), ``options`` only with ``device_class: enum`` and never with
  ``state_class`` or ``unit_of_measurement``, a sensor's ``entity_category`` must be ``diagnostic``.
- source/_integrations/sensor.markdown, "Device class": the units each sensor device class accepts;
  switch.markdown: switch device classes ``outlet`` and ``switch``.
- developers.home-assistant.io/blog/2021/09/20/state_class_total: the state classes ``measurement``,
  ``total``, ``total_increasing`` (energy needs a total for statistics and the energy dashboard).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import text

from conftest import RunningHub, close_paho, free_port, storage_held, wait_for
from meterhub.config import load_settings
from meterhub.core.metrics import HubCollector
from meterhub.storage import registry
from meterhub.tools.devcert import make_dev_cert

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto (the broker) not installed")

# --- Home Assistant's documented discovery schema -------------------------------------------------

TOPIC_RE = re.compile(r"^homeassistant/(?P<component>[a-z_]+)/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config$")
# Keys any single-component discovery payload may carry besides the platform's own (mqtt.markdown).
DISCOVERY_KEYS = {"origin", "~"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
AVAILABILITY_ITEM_KEYS = {"payload_available", "payload_not_available", "topic", "value_template"}
COMMON_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "payload_available",
    "payload_not_available",
    "qos",
    "state_topic",
    "unique_id",
    "value_template",
}
PLATFORM_KEYS = {
    "sensor": COMMON_KEYS
    | {
        "expire_after",
        "force_update",
        "last_reset_value_template",
        "options",
        "suggested_display_precision",
        "state_class",
        "unit_of_measurement",
    },
    "switch": COMMON_KEYS
    | {"command_template", "command_topic", "optimistic", "payload_off", "payload_on", "retain"}
    | {"state_off", "state_on"},
}
REQUIRED = {"sensor": {"state_topic"}, "switch": {"command_topic"}}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
SWITCH_DEVICE_CLASSES = {"outlet", "switch"}
# sensor.markdown: device class -> the units Home Assistant accepts (None = no unit).
SENSOR_UNITS: dict[str, set[str | None]] = {
    "apparent_power": {"VA"},
    "current": {"A", "mA"},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "power_factor": {None, "%"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW"},
    "reactive_power": {"var"},
    "temperature": {"°C", "°F", "K"},
    "voltage": {"V", "mV", "µV", "kV", "MV"},
    "enum": {None},
}


def check_config(topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """Fail unless ``payload`` on ``topic`` is a discovery config Home Assistant's documentation allows."""
    m = TOPIC_RE.match(topic)
    assert m, f"not a discovery topic: {topic}"
    component = m["component"]
    assert component in PLATFORM_KEYS, topic
    config = json.loads(payload)
    assert isinstance(config, dict)
    unknown = set(config) - PLATFORM_KEYS[component] - DISCOVERY_KEYS
    assert not unknown, f"{topic}: keys not in the {component} documentation: {unknown}"
    assert REQUIRED[component] <= set(config), f"{topic}: missing {REQUIRED[component] - set(config)}"
    assert "platform" not in config  # only in device-based discovery
    assert isinstance(config["unique_id"], str) and config["unique_id"]
    assert isinstance(config.get("name"), str)
    for key, value in config.items():
        if key.endswith("_topic"):
            assert isinstance(value, str) and value and "+" not in value and "#" not in value, (key, value)
    # origin
    origin = config["origin"]
    assert set(origin) <= ORIGIN_KEYS and origin["name"] == "meterhub"
    # device: identifiers or connections, and a name (shared device configuration)
    device = config["device"]
    assert set(device) <= DEVICE_KEYS, set(device) - DEVICE_KEYS
    assert device.get("identifiers") or device.get("connections")
    assert isinstance(device["name"], str) and device["name"]
    for conn in device.get("connections", ()):
        assert isinstance(conn, list) and len(conn) == 2
    # availability
    assert not ("availability" in config and "availability_topic" in config)
    for item in config.get("availability", ()):
        assert set(item) <= AVAILABILITY_ITEM_KEYS and isinstance(item["topic"], str)
    assert config.get("availability_mode", "latest") in {"all", "any", "latest"}
    assert config.get("qos", 0) in (0, 1, 2)
    dc = config.get("device_class")
    if component == "switch":
        assert dc is None or dc in SWITCH_DEVICE_CLASSES
        assert config.get("payload_on", "ON") != config.get("payload_off", "OFF")
        return component, config
    # sensor
    if "state_class" in config:
        assert config["state_class"] in STATE_CLASSES
    if "entity_category" in config:
        assert config["entity_category"] == "diagnostic"
    if "suggested_display_precision" in config:
        precision = config["suggested_display_precision"]
        assert isinstance(precision, int) and not isinstance(precision, bool) and precision >= 0
    if "options" in config:
        assert dc == "enum" and config["options"] and isinstance(config["options"], list)
        assert "state_class" not in config and "unit_of_measurement" not in config
    if dc is not None:
        assert dc in SENSOR_UNITS, f"{topic}: device class {dc} not checked here"
        assert config.get("unit_of_measurement") in SENSOR_UNITS[dc], (dc, config.get("unit_of_measurement"))
    if dc == "energy":
        assert config.get("state_class") in ("total", "total_increasing")
    return component, config


# --- a broker of our own ---------------------------------------------------------------------------


class Mosquitto:
    """``mosquitto -c conf`` on 127.0.0.1 only, anonymous, no persistence (optionally TLS)."""

    def __init__(self, tmp: Path, port: int | None = None, tls: dict[str, Path] | None = None) -> None:
        self.port = port or free_port()
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to a user who cannot read tmp files
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


class HomeAssistant:
    """A real MQTT subscriber standing in for Home Assistant: the latest payload per topic."""

    def __init__(self, port: int, *, tls_ca: str | None = None) -> None:
        self.latest: dict[str, tuple[bytes, bool]] = {}
        self.log: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ha-{uuid.uuid4().hex[:6]}")
        if tls_ca:
            self.c.tls_set(ca_certs=tls_ca)
        self.c.on_message = self._on_message
        self.subscribed = threading.Event()
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.connect("127.0.0.1" if not tls_ca else "localhost", port)
        self.c.loop_start()
        self.c.subscribe([("homeassistant/#", 1), ("meterhub/#", 1)])
        assert self.subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.latest[msg.topic] = (msg.payload, bool(msg.retain))
            self.log.append((msg.topic, msg.payload, bool(msg.retain)))

    def value(self, topic: str) -> bytes | None:
        with self.lock:
            item = self.latest.get(topic)
        return None if item is None else item[0]

    def wait_value(self, topic: str, expected: bytes | str, timeout: float = 10) -> None:
        want = expected.encode() if isinstance(expected, str) else expected
        wait_for(lambda: self.value(topic) == want, timeout)

    def configs(self) -> dict[str, bytes]:
        with self.lock:
            return {t: p for t, (p, _r) in self.latest.items() if t.endswith("/config") and p}

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.c.publish(topic, payload, 1, retain).wait_for_publish(5)

    def close(self) -> None:
        close_paho(self.c)


class Gateway:
    """A meter gateway (paho) that answers every command with code 0 and records it."""

    def __init__(self, hub: RunningHub, gw_id: str, username: str) -> None:
        from meterhub.core.auth import gateway_password

        self.gw_id = gw_id
        self.closed = False
        _gateways.append(self)
        self.answers: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=gw_id, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, gateway_password(gw_id, username))
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *_a: subscribed.set()
        self.c.connect("127.0.0.1", hub.port)
        self.c.loop_start()
        self.c.subscribe(f"gateway_id/{gw_id}/#", 1)
        assert subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        if msg.topic.endswith("/commands"):
            answer = {"t": int(time.time()), "cid": body["cid"], "request_id": body["request_id"]}
            answer["param"] = {"code": 0, "msg": "success"}
            self.c.publish(f"gateway_id/{self.gw_id}/commands/response", json.dumps(answer), 1)
        with self.cond:
            (self.commands if msg.topic.endswith("/commands") else self.answers).append(body)
            self.cond.notify_all()

    def send(self, kind: str, param: Any, expect_answer: bool = True) -> int | None:
        rid = str(uuid.uuid4())
        self.c.publish(
            f"gateway_id/{self.gw_id}/{kind}",
            json.dumps({"t": int(time.time()), "request_id": rid, "param": param}),
            1,
        ).wait_for_publish(5)
        if not expect_answer:
            return None
        with self.cond:
            ok = self.cond.wait_for(lambda: any(a.get("request_id") == rid for a in self.answers), 10)
        assert ok, f"no answer to {kind}"
        return next(a for a in self.answers if a.get("request_id") == rid)["param"]["code"]

    def sync(self, cid: str, **fields: str) -> None:
        assert self.send("devices/sync", {"cid": cid, "product_id": "pk-meter", **fields}) == 0

    def report(self, cid: str, dp: str, value: Any) -> None:
        assert self.send("properties/report", {"cid": cid, "id": dp, "value": value}) == 0

    def close(self, clean: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if clean:
            close_paho(self.c)
            return
        self.c.socket().close()  # the connection is lost: no DISCONNECT
        self.c.loop_stop()
        self.c._reset_sockets()  # as close_paho does


#: gateways made by the test running, closed after it (a paho thread and three sockets each)
_gateways: list[Gateway] = []


@pytest.fixture(autouse=True)
def _close_gateways(hub_factory: Callable[..., RunningHub]) -> Iterator[None]:
    """After each test, before its hubs stop (the fixture it depends on is torn down after it)."""
    yield
    while _gateways:
        with contextlib.suppress(Exception):
            _gateways.pop().close()


@pytest.fixture
def make_hub(hub_factory: Callable[..., RunningHub]) -> Callable[..., RunningHub]:
    def make(broker_port: int, **overrides: Any) -> RunningHub:
        overrides.setdefault("ha_resync_interval", 0.5)
        overrides.setdefault("ha_client_id", "meterhub-test")
        overrides.setdefault("ha_publish_interval", 0.05)
        hub = hub_factory("protocol", ha_broker=f"mqtt://127.0.0.1:{broker_port}", **overrides)
        ha = hub.hub.homeassistant
        ha.reconnect_base, ha.reconnect_cap, ha.birth_delay = 0.05, 0.3, 0.05
        return hub

    return make


@pytest.fixture
def ha(broker: Mosquitto) -> Iterator[HomeAssistant]:
    client = HomeAssistant(broker.port)
    yield client
    client.close()


def sql(hub: RunningHub, query: str) -> list[tuple[Any, ...]]:
    with hub.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query))]


def vendor_gateway(hub: RunningHub, gw_id: str = "gw-ha") -> Gateway:
    vendor = registry.add_vendor(hub.engine, "Acme Meters")
    return Gateway(hub, gw_id, vendor.username)


# --- tests -------------------------------------------------------------------------------------------


def test_every_discovery_config_follows_home_assistants_documented_schema(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync(
        "meter-1",
        device_name="Main meter",
        vendor_code="ACME",
        product_sub_type="DDS-3P",
        install_location="Basement",
        mac_address="02:5B:26:A8:DC:12",
    )
    gw.sync(
        "meter 2+b"
    )  # not topic-safe (+ is an MQTT wildcard): gets a slug; no vendor_code: the vendor's name
    wait_for(lambda: len(ha.configs()) == 2 * 27, 10)
    configs = ha.configs()
    by_uid: dict[str, tuple[str, dict[str, Any]]] = {}
    for topic, payload in configs.items():
        component, config = check_config(topic, payload)
        assert config["unique_id"] not in by_uid, "unique_id must be unique"
        by_uid[config["unique_id"]] = (component, config)

    def entity(cid_slug: str, key: str) -> dict[str, Any]:
        return by_uid[f"meterhub_{cid_slug}_{key}"][1]

    power = entity("meter-1", "power_current")
    assert (power["device_class"], power["unit_of_measurement"], power["state_class"]) == (
        "power",
        "W",
        "measurement",
    )
    assert power["device"] == {
        "identifiers": ["meterhub:meter-1"],
        "name": "Main meter",
        "manufacturer": "ACME",
        "model": "DDS-3P",
        "model_id": "pk-meter",
        "suggested_area": "Basement",
        "serial_number": "meter-1",
        "connections": [["mac", "02:5b:26:a8:dc:12"]],
    }
    assert power["availability"] == [{"topic": "meterhub/status"}, {"topic": "meterhub/meter-1/availability"}]
    assert power["availability_mode"] == "all"
    for key in ("electric_total", "forward_energy_total", "electric_daily", "electric_month"):
        energy = entity("meter-1", key)
        assert (energy["device_class"], energy["unit_of_measurement"], energy["state_class"]) == (
            "energy",
            "kWh",
            "total_increasing",
        )
    assert entity("meter-1", "voltage_current")["unit_of_measurement"] == "V"
    assert entity("meter-1", "voltage_current")["suggested_display_precision"] == 1
    assert entity("meter-1", "cur_current")["unit_of_measurement"] == "mA"  # the model's unit
    assert entity("meter-1", "temp_current")["unit_of_measurement"] == "°C"
    assert entity("meter-1", "supply_frequency")["unit_of_measurement"] == "Hz"
    assert "unit_of_measurement" not in entity("meter-1", "power_factor")
    assert entity("meter-1", "phase_b_current")["value_template"] == "{{ value_json.current }}"
    assert entity("meter-1", "alarm_level")["options"] == ["general", "serious", "urgent"]
    fault = entity("meter-1", "fault")
    assert fault["json_attributes_topic"] == "meterhub/meter-1/fault/attributes"
    switch_topic = "homeassistant/switch/meterhub/meter-1_switch/config"
    switch = json.loads(configs[switch_topic])
    assert switch["command_topic"] == "meterhub/meter-1/switch/set"
    assert switch["state_topic"] == "meterhub/meter-1/switch"
    assert (switch["payload_on"], switch["payload_off"]) == ("ON", "OFF")

    other = [c for _, c in by_uid.values() if c["device"]["identifiers"] == ["meterhub:meter 2+b"]]
    assert len(other) == 27
    slugged = other[0]["state_topic"].split("/")[1]
    assert re.fullmatch(r"meter_2_b_[0-9a-f]{10}", slugged)
    assert other[0]["device"]["manufacturer"] == "Acme Meters"  # no vendor_code: the vendor's name
    assert other[0]["device"]["name"] == "meter 2+b"

    # Retained where Home Assistant expects it: a subscriber arriving later gets every config and the
    # bridge's availability at once.
    late = HomeAssistant(broker.port)
    try:
        wait_for(lambda: len(late.configs()) == 2 * 27, 5)
        assert all(late.latest[t][1] for t in late.configs())
        late.wait_value("meterhub/status", "online")
        assert late.latest["meterhub/status"][1] is True
        assert late.value("meterhub/meter-1/availability") == b"offline"  # synced, not yet heard
    finally:
        late.close()


def test_states_availability_and_a_switch_command_reach_the_meter(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1")
    wait_for(lambda: len(ha.configs()) == 27, 10)
    gw.report("meter-1", "5", 2301234)  # voltage_current, scale 4
    gw.report("meter-1", "3", 12345678)  # power_current: 1234.5678 W
    gw.report("meter-1", "44", 98765432)  # electric_total: 9876.5432 kWh
    gw.report("meter-1", "7", 51234000)  # cur_current in mA: 5123.4
    gw.report("meter-1", "10", 3655)  # temp_current, scale 2
    gw.report("meter-1", "1", True)
    gw.report("meter-1", "19", 0b1001)  # fault: short_circuit_alarm + ov_vol
    gw.report("meter-1", "20", "serious")
    gw.report("meter-1", "30", {"voltage": 218.7, "current": 11.203, "power": 2410})
    ha.wait_value("meterhub/meter-1/voltage_current", "230.1234")
    ha.wait_value("meterhub/meter-1/power_current", "1234.5678")
    ha.wait_value("meterhub/meter-1/electric_total", "9876.5432")
    ha.wait_value("meterhub/meter-1/cur_current", "5123.4")
    ha.wait_value("meterhub/meter-1/temp_current", "36.55")
    ha.wait_value("meterhub/meter-1/switch", "ON")
    ha.wait_value("meterhub/meter-1/fault", "short_circuit_alarm,ov_vol")
    attributes = json.loads(ha.value("meterhub/meter-1/fault/attributes") or b"{}")
    assert attributes["short_circuit_alarm"] is True and attributes["ov_vol"] is True
    assert attributes["surge_alarm"] is False and len(attributes) == 14
    ha.wait_value("meterhub/meter-1/alarm_level", "serious")
    wait_for(lambda: ha.value("meterhub/meter-1/phase_a"))
    assert json.loads(ha.value("meterhub/meter-1/phase_a") or b"{}") == {
        "voltage": 218.7,
        "current": 11.203,
        "power": 2410.0,
    }
    ha.wait_value("meterhub/meter-1/availability", "online")  # a report is presence
    late = HomeAssistant(broker.port)  # retained: a subscriber arriving now gets the states at once
    try:
        late.wait_value("meterhub/meter-1/voltage_current", "230.1234", 5)
        late.wait_value("meterhub/meter-1/availability", "online", 5)
        assert late.latest["meterhub/meter-1/voltage_current"][1] is True
    finally:
        late.close()
    # A newer value replaces the old one.
    gw.report("meter-1", "5", 2299000)
    ha.wait_value("meterhub/meter-1/voltage_current", "229.9")

    # Home Assistant turns the switch off: the meter gets the command, answers 0, the state follows.
    ha.publish("meterhub/meter-1/switch/set", "OFF")
    with gw.cond:
        assert gw.cond.wait_for(lambda: gw.commands, 10)
    command = gw.commands[0]
    assert command["cid"] == "meter-1" and command["param"] == {"id": "1", "value": False}
    ha.wait_value("meterhub/meter-1/switch", "OFF")
    assert sql(hub, "SELECT dp_id, status FROM commands") == [("1", "ok")]

    # A retained command is not executed when it is replayed at (re)subscription: it would switch the
    # meter at every restart. Kick the publisher's connection (same client id) so it subscribes again.
    ha.publish("meterhub/meter-1/switch/set", "ON", retain=True)
    with gw.cond:
        assert gw.cond.wait_for(lambda: len(gw.commands) == 2, 10)  # live: a command like any other
    ha.wait_value("meterhub/meter-1/switch", "ON")
    impostor = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="meterhub-test")
    impostor.connect("127.0.0.1", broker.port)
    impostor.loop_start()
    wait_for(lambda: hub.run(lambda: hub.hub.homeassistant.stats["ha.connects"]) >= 2, 10)
    impostor.loop_stop()
    impostor.disconnect()
    publisher = hub.hub.homeassistant
    wait_for(lambda: hub.run(lambda: publisher.stats["ha.commands.retained_ignored"]) >= 1, 10)
    ha.publish("meterhub/meter-1/switch/set", "")  # clears the retained message
    ha.publish("meterhub/meter-1/switch/set", "MAYBE")  # not ON/OFF: refused, counted
    wait_for(lambda: hub.run(lambda: publisher.stats["ha.commands.invalid"]) >= 1)
    time.sleep(0.3)
    assert len(gw.commands) == 2
    stats = hub.run(lambda: dict(publisher.stats))
    assert stats["ha.commands.ok"] == 2

    # The gateway goes away: its meters become unavailable in Home Assistant.
    gw.close(clean=False)
    ha.wait_value("meterhub/meter-1/availability", "offline")
    # A command now is refused by meterhub (device offline), logged like any command; the state stays.
    ha.publish("meterhub/meter-1/switch/set", "OFF")
    wait_for(lambda: hub.run(lambda: publisher.stats["ha.commands.rejected"]) == 1)
    assert ha.value("meterhub/meter-1/switch") == b"ON"
    assert sql(hub, "SELECT status, code FROM commands ORDER BY id")[-1] == ("rejected", 2001)


def test_a_value_reaches_home_assistant_only_once_it_is_committed(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1", device_name="Kitchen")
    gw.report("meter-1", "5", 2300000)
    ha.wait_value("meterhub/meter-1/voltage_current", "230.0")
    with storage_held(hub.engine):  # the writer cannot commit
        report = {"t": int(time.time()), "request_id": "held-1", "param": {"cid": "meter-1", "id": "5"}}
        report["param"]["value"] = 2400000
        # (meterhub's PUBACK waits for the commit too, so do not wait for it here)
        gw.c.publish("gateway_id/gw-ha/properties/report", json.dumps(report), 1)
        time.sleep(1.0)
        assert ha.value("meterhub/meter-1/voltage_current") == b"230.0"  # not committed: not published
    ha.wait_value("meterhub/meter-1/voltage_current", "240.0")
    # A new sync updates the device in Home Assistant (the config is published again).
    gw.sync("meter-1", device_name="Kitchen meter")
    config = "homeassistant/sensor/meterhub/meter-1_voltage_current/config"
    wait_for(lambda: json.loads(ha.value(config) or b"{}").get("device", {}).get("name") == "Kitchen meter")


def test_updates_coalesce_within_the_publish_interval(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port, ha_publish_interval=1.0)
    gw = vendor_gateway(hub)
    gw.sync("meter-1")
    wait_for(lambda: len(ha.configs()) == 27, 10)
    for i in range(20):
        gw.report("meter-1", "5", 2300000 + i)
    ha.wait_value("meterhub/meter-1/voltage_current", "230.0019")  # the newest value arrives
    time.sleep(1.2)
    sent = [p for t, p, _r in list(ha.log) if t == "meterhub/meter-1/voltage_current"]
    assert sent[-1] == b"230.0019" and len(sent) < 20  # not one message per report


def test_the_energy_dashboard_inputs_are_the_meters_totals(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    """Home Assistant's energy dashboard takes sensors with device_class energy, a total state class
    and an energy unit; the meter's totals are exactly those, with the value in kWh."""
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1")
    wait_for(lambda: len(ha.configs()) == 27, 10)
    energy = [json.loads(p) for p in ha.configs().values() if json.loads(p).get("device_class") == "energy"]
    assert sorted(c["state_topic"].rsplit("/", 1)[1] for c in energy) == [
        "electric_daily",
        "electric_month",
        "electric_total",
        "forward_energy_total",
    ]
    gw.report("meter-1", "50", 12340000)  # forward_energy_total 1234 kWh
    ha.wait_value("meterhub/meter-1/forward_energy_total", "1234.0")


def test_an_absent_broker_costs_the_gateways_nothing_and_everything_arrives_when_it_comes(
    tmp_path: Path, make_hub: Callable[..., RunningHub], capfd: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens here yet
    hub = make_hub(port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1", device_name="Late meter")
    for i in range(20):
        gw.report("meter-1", "5", 2300000 + i)  # every report answered 0 and stored meanwhile
    gw.report("meter-1", "44", 5000000)
    wait_for(lambda: hub.run(lambda: hub.hub.homeassistant.stats["ha.connection_errors"]) >= 2)
    assert hub.run(lambda: hub.hub.homeassistant.connected) is False
    broker = Mosquitto(tmp_path, port).start()
    try:
        ha = HomeAssistant(port)
        try:
            wait_for(lambda: len(ha.configs()) == 27, 10)  # configs, then states from the database
            ha.wait_value("meterhub/meter-1/voltage_current", "230.0019")
            ha.wait_value("meterhub/meter-1/electric_total", "500.0")
            ha.wait_value("meterhub/meter-1/availability", "online")
            ha.wait_value("meterhub/status", "online")
            assert json.loads(next(iter(ha.configs().values())))["device"]["name"] == "Late meter"
            # Quiet: several failed attempts, one warning for the outage, one line when it was over.
            errors = hub.run(lambda: hub.hub.homeassistant.stats["ha.connection_errors"])
            captured = capfd.readouterr()
            logged = captured.out + captured.err
            assert errors >= 2
            assert logged.count("Home Assistant broker unreachable") == 1, logged
            assert logged.count("Home Assistant broker reachable again") == 1
        finally:
            ha.close()
    finally:
        broker.stop()


def test_a_stalled_broker_never_slows_reports_and_the_queue_is_bounded_newest_wins(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port, ha_queue_max=2)
    gw = vendor_gateway(hub)
    for i in range(4):
        gw.sync(f"meter-{i}")
    # Even if some of these syncs were pushed out of the bounded queue, every config arrives (a dropped
    # config or presence change makes the publisher republish everything from the database).
    wait_for(lambda: len(ha.configs()) == 4 * 27, 15)
    gw.report("meter-0", "5", 2000000)
    ha.wait_value("meterhub/meter-0/voltage_current", "200.0")
    broker.pause()  # the broker stops reading: the publisher's PUBACKs never come
    try:
        gw.report("meter-0", "5", 2100000)  # in flight to the stalled broker
        time.sleep(0.3)
        for value in range(2200000, 2200010):
            for i in range(4):
                gw.report(f"meter-{i}", "5", value)  # each answered 0 (stored) while the broker is stalled
        gw.report("meter-3", "5", 2200042)  # the same meter again: newest wins in place
        stats = hub.run(lambda: dict(hub.hub.homeassistant.stats))
        waiting = hub.run(lambda: len(hub.hub.homeassistant.pending))
        assert waiting <= 2
        assert stats["ha.dropped"] >= 1 and stats["ha.coalesced"] >= 1
        samples = {
            (sample.name, tuple(sample.labels.values())): sample.value
            for family in hub.run(lambda: list(HubCollector(hub.hub).collect()))
            for sample in family.samples
        }
        assert samples[("meterhub_homeassistant_events_total", ("dropped",))] == stats["ha.dropped"]
        assert samples[("meterhub_homeassistant_pending", ())] == waiting
        # Two new meters, whose sync (a config to publish) is then pushed out of the queue.
        gw.sync("meter-4")
        gw.sync("meter-5")
        gw.report("meter-0", "5", 2300000)
        gw.report("meter-1", "5", 2300000)
    finally:
        broker.resume()
    # The newest values arrive: those still waiting, and (republished from the database because a
    # dropped update held a config) those pushed out, with the new meters' configs.
    ha.wait_value("meterhub/meter-0/voltage_current", "230.0")
    ha.wait_value("meterhub/meter-3/voltage_current", "220.0042")
    ha.wait_value("meterhub/meter-2/voltage_current", "220.0009")
    wait_for(lambda: len(ha.configs()) == 6 * 27, 15)
    stats = hub.run(lambda: dict(hub.hub.homeassistant.stats))
    assert stats["ha.resyncs"] >= 1
    assert stats["ha.connects"] == 1  # not by a reconnection


def test_a_deleted_meter_and_a_stale_config_are_removed(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    # A config left on the broker by an earlier run, for a meter that is no longer anywhere.
    ghost_topic = "homeassistant/sensor/meterhub/ghost_power_current/config"
    ghost = {
        "name": "Power",
        "unique_id": "meterhub_ghost_power_current",
        "state_topic": "meterhub/ghost/power_current",
        "availability": [{"topic": "meterhub/status"}, {"topic": "meterhub/ghost/availability"}],
        "device": {"identifiers": ["meterhub:ghost"], "name": "ghost"},
    }
    ha.publish(ghost_topic, json.dumps(ghost), retain=True)
    ha.publish("meterhub/ghost/power_current", "5", retain=True)
    foreign = "homeassistant/sensor/other_tool/thing/config"  # not ours: left alone
    ha.publish(foreign, json.dumps({"state_topic": "x", "device": {"identifiers": ["x"]}}), retain=True)
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1")
    gw.sync("meter-2")
    gw.report("meter-2", "5", 2300000)
    wait_for(lambda: len([t for t in ha.configs() if "/meterhub/" in t]) == 2 * 27, 10)
    ha.wait_value(ghost_topic, b"")  # removed at connection
    ha.wait_value("meterhub/ghost/power_current", b"")
    ha.wait_value("meterhub/meter-2/voltage_current", "230.0")
    # An operator deletes meter-2 (from any process: the publisher looks in the database).
    with hub.engine.begin() as conn:
        conn.execute(text("DELETE FROM latest_values WHERE cid = 'meter-2'"))
        conn.execute(text("DELETE FROM devices WHERE cid = 'meter-2'"))
    ha.wait_value("homeassistant/switch/meterhub/meter-2_switch/config", b"")
    wait_for(lambda: not [t for t in ha.configs() if "meter-2" in t], 5)
    ha.wait_value("meterhub/meter-2/voltage_current", b"")
    ha.wait_value("meterhub/meter-2/availability", b"")
    # A fresh subscriber sees no retained config of meter-2 or the ghost, and all of meter-1's.
    late = HomeAssistant(broker.port)
    try:
        wait_for(lambda: len([t for t in late.configs() if "meter-1" in t]) == 27, 5)
        assert not [t for t in late.configs() if "meter-2" in t or "ghost" in t]
        assert foreign in late.configs()
    finally:
        late.close()


def test_home_assistants_birth_message_republishes_everything(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    hub = make_hub(broker.port)
    gw = vendor_gateway(hub)
    gw.sync("meter-1")
    gw.report("meter-1", "5", 2300000)
    ha.wait_value("meterhub/meter-1/voltage_current", "230.0")
    # Someone wiped the broker's retained messages (a broker without persistence restarted).
    for topic in [*ha.configs(), "meterhub/meter-1/voltage_current"]:
        ha.publish(topic, "", retain=True)
    wait_for(lambda: not ha.configs(), 5)
    ha.publish("homeassistant/status", "online")
    wait_for(lambda: len(ha.configs()) == 27, 10)
    ha.wait_value("meterhub/meter-1/voltage_current", "230.0")


def test_the_bridge_availability_follows_meterhub(
    broker: Mosquitto, ha: HomeAssistant, make_hub: Callable[..., RunningHub]
) -> None:
    """Every entity needs ``meterhub/status`` online too (availability_mode all): the publisher's will
    says offline when its connection breaks, a clean stop says it itself, a reconnection says online."""
    hub = make_hub(broker.port)
    ha.wait_value("meterhub/status", "online")
    publisher = hub.hub.homeassistant
    before = len(ha.log)

    def cut() -> None:  # the connection breaks without a DISCONNECT (network failure)
        publisher._client._client.socket().shutdown(socket.SHUT_RDWR)

    hub.run(cut)
    wait_for(lambda: b"offline" in [p for t, p, _r in ha.log[before:] if t == "meterhub/status"], 10)
    ha.wait_value("meterhub/status", "online")  # reconnected
    assert hub.run(lambda: publisher.stats["ha.connects"]) >= 2
    hub.call(publisher.stop())
    ha.wait_value("meterhub/status", "offline")
    late = HomeAssistant(broker.port)
    try:
        late.wait_value("meterhub/status", "offline", 5)  # retained
    finally:
        late.close()


def test_tls_broker_with_a_ca_file(tmp_path: Path, make_hub: Callable[..., RunningHub]) -> None:
    paths = make_dev_cert(tmp_path / "tls", ["localhost", "127.0.0.1"])
    broker = Mosquitto(tmp_path, tls=paths).start()
    try:
        hub = make_hub(broker.port, ha_tls_ca=paths["ca"])
        # mqtt:// with a CA file still means TLS; the URL's host is checked against the certificate.
        assert hub.hub.homeassistant._ssl is not None
        ha = HomeAssistant(broker.port, tls_ca=str(paths["ca"]))
        try:
            gw = vendor_gateway(hub)
            gw.sync("meter-1")
            wait_for(lambda: len(ha.configs()) == 27, 10)
        finally:
            ha.close()
    finally:
        broker.stop()


def test_bad_broker_urls_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="mqtt:// or mqtts://"):
        load_settings(None, ha_broker="http://127.0.0.1:1883")
    with pytest.raises(ValueError, match="no host"):
        load_settings(None, ha_broker="mqtt://")
    settings = load_settings(None, ha_broker="mqtts://user:p%40ss@ha.local")
    from meterhub.northbound.ha_discovery import parse_broker

    assert parse_broker(settings.ha_broker or "") == parse_broker("mqtts://user:p%40ss@ha.local:8883")
    b = parse_broker("mqtts://user:p%40ss@ha.local")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("ha.local", 8883, True, "user", "p@ss")
