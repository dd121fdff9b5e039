"""The open hub's Tuya device API: Tuya's own SDK (TuyaDeviceManager, TuyaHomeManager) unchanged, for
both project types, against meterhub and a simulated meter over MQTT; specifications from the model;
commands; scope; Tuya-style errors; importing Tuya's specification JSON as a product model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RunningHub, wait_for
from meterhub.model.loader import builtin_model, load_model, parse_model
from meterhub.model.tuya import import_tuya_spec, specification
from meterhub.openhub import store
from meterhub.openhub.client import OpenHubClient
from meterhub.openhub.http import make_sign, string_to_sign
from test_openhub import REPO, World, tuya_python

SMART_METER = builtin_model()


class Meter(World):
    """World's gateway, answering commands like a meter: code ``answer`` (0: then it reports the new
    value), or silence when ``answer`` is None. Commands received are kept in ``received``."""

    def __init__(self, hub: RunningHub, clients: Any) -> None:
        super().__init__(hub, clients)
        self.answer: int | None = 0
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        inbox = self.gw.messages

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            if msg.topic == "gateway_id/gw-oh/commands":
                self._on_command(json.loads(msg.payload))
            elif b'"request_id":"auto-' in msg.payload.replace(b" ", b""):
                return  # the answer to a report this meter made by itself
            else:
                inbox.put(msg)

        self.gw.c.on_message = on_message
        # alice's second meter, and an unbound one: nobody's, so no application sees it
        for cid in ("meter-a2", "meter-c"):
            self.gateway_send("devices/sync", {"cid": cid, "product_id": "pk-meter"})
        store.bind(hub.engine, self.alice, "meter-a2")
        hub.call(hub.hub.openhub.fanout.refresh_bindings())

    def _on_command(self, cmd: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(cmd)
        if self.answer is None:
            return
        now = int(time.time())
        reply = {"t": now, "cid": cmd["cid"], "request_id": cmd["request_id"], "param": {"code": self.answer}}
        self.gw.c.publish("gateway_id/gw-oh/commands/response", json.dumps(reply), 1)
        if self.answer == 0:
            report = {
                "t": now,
                "request_id": f"auto-{uuid.uuid4().hex}",
                "param": {"cid": cmd["cid"], "id": cmd["param"]["id"], "value": cmd["param"]["value"]},
            }
            self.gw.c.publish("gateway_id/gw-oh/properties/report", json.dumps(report), 1)

    def answer_received(self, code: int = 0) -> None:
        """Answer every command received so far (for commands left waiting with ``answer = None``)."""
        with self._lock:
            received = list(self.received)
        for cmd in received:
            reply = {"t": int(time.time()), "cid": cmd["cid"], "request_id": cmd["request_id"]}
            reply["param"] = {"code": code}
            self.gw.c.publish("gateway_id/gw-oh/commands/response", json.dumps(reply), 1)

    def signed(
        self,
        token: str,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """A request signed like Tuya's SDK signs it; the raw HTTP response."""
        data = json.dumps(body).encode() if body else b""
        query = [(k, str(v)) for k, v in (params or {}).items()]
        t = str(int(time.time() * 1000))
        sign = make_sign(
            self.app.secret, self.app.access_id, token, t, string_to_sign(method, path, query, data)
        )
        headers = {"client_id": self.app.access_id, "sign": sign, "t": t, "access_token": token}
        headers["sign_method"] = "HMAC-SHA256"
        return httpx.request(method, self.endpoint + path, params=query, content=data, headers=headers)

    def call(self, token: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = self.signed(token, method, path, **kw)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert isinstance(answer["t"], int) and isinstance(answer["success"], bool)
        return answer

    def token(self, username: str | None) -> str:
        client = OpenHubClient(self.endpoint, self.app.access_id, self.app.secret)
        if username is None:
            client.project_login()
        else:
            client.user_login(username, f"{username}-pw")
        return client.access_token


def make_meter(hub_factory: Any, clients: Any, command_timeout: float = 3) -> Meter:
    hub = hub_factory("protocol", http_port=0, command_timeout=command_timeout)
    world = Meter(hub, clients)
    world.online("meter-a")
    world.report("meter-a", "1", True)
    world.report("meter-a", "5", 2301234)
    world.report("meter-a", "19", 3)  # fault: short_circuit_alarm + surge_alarm
    world.report("meter-a2", "1", True)
    world.report("meter-a2", "5", 2200000)
    world.report("meter-b", "1", True)
    return world


@pytest.fixture
def meter(hub_factory, clients) -> Meter:
    return make_meter(hub_factory, clients)


class SDK:
    """tests/tuya/sdk_devices.py in the SDK's own venv: one JSON request, one JSON answer."""

    def __init__(self, world: World, auth: str, user: str = "alice") -> None:
        self.proc = subprocess.Popen(
            [
                str(tuya_python()),
                str(REPO / "tests" / "tuya" / "sdk_devices.py"),
                world.endpoint,
                world.app.access_id,
                world.app.secret,
                user,
                f"{user}-pw",
                auth,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.login = self._read()["login"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise AssertionError(f"the SDK script stopped: {self.proc.communicate(timeout=5)[1]}")
        return json.loads(line)

    def __call__(self, op: str, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **req}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def sdk_factory():
    made: list[SDK] = []

    def make(world: World, auth: str, user: str = "alice") -> SDK:
        sdk = SDK(world, auth, user)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        sdk.close()


# --- Tuya's SDK, unchanged ------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["custom", "smart_home"])
def test_sdk_managers_see_control_and_follow_the_users_meters(meter: Meter, sdk_factory, auth: str) -> None:
    sdk = sdk_factory(meter, auth)
    assert sdk.login["success"] is True and sdk.login["result"]["uid"] == meter.alice
    devices = sdk("update_cache")["devices"]
    assert set(devices) == {"meter-a", "meter-a2"}  # not bob's meter-b, not the unbound meter-c
    assert devices["meter-a2"]["status"] == {"switch": True, "voltage_current": 2200000}
    dev = devices["meter-a"]
    assert (dev["id"], dev["name"], dev["category"], dev["product_id"]) == (
        "meter-a",
        "meter-a",
        "zndb",
        "pk-meter",
    )
    assert dev["product_name"] == "Smart electricity meter" and dev["online"] is True
    assert dev["sub"] is True and dev["uuid"] == "meter-a" and dev["time_zone"].count(":") == 1
    assert abs(dev["update_time"] - time.time()) < 60 and dev["active_time"] <= dev["update_time"]
    assert dev["status"] == {"switch": True, "voltage_current": 2301234, "fault": 3}
    # functions and status ranges from the model
    assert dev["function"]["switch"]["type"] == "Boolean"
    assert "power_current" not in dev["function"]  # report-only
    voltage = dev["status_range"]["voltage_current"]
    assert voltage["type"] == "Integer"
    assert json.loads(voltage["values"]) == {"unit": "V", "min": 0, "max": 1000000000, "scale": 4, "step": 1}
    fault = dev["status_range"]["fault"]
    assert fault["type"] == "Bitmap"
    assert json.loads(fault["values"])["label"] == list(SMART_METER.by_code("fault").labels)
    assert set(dev["status_range"]) == {dp.code for dp in SMART_METER if dp.access != "wo"}

    # a command reaches the meter over MQTT as an edge-protocol command; the MQ event updates the cache
    wait_for(lambda: meter.links_of(meter.alice) == 1, timeout=15)  # TuyaOpenMQ has connected
    answer = sdk("manager", method="send_commands", args=["meter-a", [{"code": "switch", "value": False}]])
    assert answer["result"]["success"] is True and answer["result"]["result"] is True, answer
    assert [(c["cid"], c["param"]) for c in meter.received] == [("meter-a", {"id": "1", "value": False})]
    followed = sdk("wait_status", id="meter-a", code="switch", value=False)
    assert followed["ok"] is True, followed
    assert sdk("devices")["devices"]["meter-a2"]["status"]["switch"] is True  # each meter its own

    # status and info through the manager's own calls
    status = sdk("manager", method="get_device_list_status", args=[["meter-a", "meter-b"]])["result"]
    assert status["success"] is True
    assert [s["id"] for s in status["result"]] == ["meter-a"]
    assert {"code": "switch", "value": False} in status["result"][0]["status"]
    info = sdk("manager", method="get_device_info", args=["meter-a"])["result"]
    assert info["success"] is True and info["result"]["id"] == "meter-a"
    assert info["result"].get("status", {}) == {}  # smart-home: the SDK pops it; industry: {}
    functions = sdk("manager", method="get_device_functions", args=["meter-a"])["result"]
    assert functions["success"] is True and functions["result"]["category"] == "zndb"
    assert {f["code"] for f in functions["result"]["functions"]} == {
        dp.code for dp in SMART_METER if dp.writable
    }
    category = sdk("manager", method="get_category_functions", args=["zndb"])["result"]
    assert category["result"]["functions"] == functions["result"]["functions"]

    # an offline meter's command is refused Tuya-style, and never sent
    meter.online("meter-a", False)
    offline = sdk("wait_status", id="meter-a", code="switch", value=False)  # just a round trip
    assert offline["ok"] is True
    refused = sdk("manager", method="send_commands", args=["meter-a", [{"code": "switch", "value": True}]])
    assert refused["result"]["success"] is False and refused["result"]["code"] == 2001, refused
    assert refused["result"]["msg"] == "device is offline"
    assert len(meter.received) == 1

    # bob's meter is not alice's: Tuya's permission error
    if auth == "custom":
        other = sdk("manager", method="get_device_status", args=["meter-b"])["result"]
    else:
        other = sdk("get", path="/v1.0/devices/meter-b")["result"]
    assert (other["success"], other["code"]) == (False, 1106)

    # the operator's device management is refused, Tuya-style
    removed = sdk("manager", method="remove_device", args=["meter-a"])["result"]
    assert (removed["success"], removed["code"]) == (False, 1106)
    reset = sdk("manager", method="factory_reset", args=["meter-a"])["result"]
    assert (reset["success"], reset["code"]) == (False, 1106)
    # homes, scenes and infrared (smart-home), assets (industry)
    assert sdk("home", method="query_scenes") == {"result": []}
    assert sdk("home", method="query_infrared_devices") == {"result": []}
    if auth == "custom":
        assets = sdk("asset", method="get_asset_list", args=["-1"])["result"]
        assert len(assets) == 1 and assets[0]["asset_name"] == "alice"
        in_asset = sdk("asset", method="get_device_list", args=[assets[0]["asset_id"]])
        assert in_asset == {"result": ["meter-a", "meter-a2"]}
        assert sdk("asset", method="get_asset_list", args=[assets[0]["asset_id"]]) == {"result": []}
    else:
        homes = sdk("get", path=f"/v1.0/users/{meter.alice}/homes")["result"]
        assert homes["success"] is True and [h["name"] for h in homes["result"]] == ["alice"]
        assert isinstance(homes["result"][0]["home_id"], int)
        scenes = sdk("get", path=f"/v1.0/homes/{homes['result'][0]['home_id']}/scenes")["result"]
        assert (scenes["success"], scenes["result"]) == (True, [])
    # a path Tuya has and meterhub does not: Tuya's error, not an HTML 404
    unknown = sdk("get", path="/v1.0/devices/meter-a/logs", params={"type": 7})["result"]
    assert (unknown["success"], unknown["code"], unknown["msg"]) == (False, 1108, "uri path invalid")


# --- the API itself -------------------------------------------------------------------------------


def test_specification_is_generated_from_the_model(meter: Meter) -> None:
    token = meter.token("alice")
    smart = meter.call(token, "GET", "/v1.0/devices/meter-a/specifications")["result"]
    industry = meter.call(token, "GET", "/v1.0/iot-03/devices/meter-a/specification")["result"]
    assert smart == industry == specification(SMART_METER)
    by_code = {s["code"]: s for s in smart["status"]}
    for dp in SMART_METER:
        if dp.access == "wo":
            continue
        item = by_code[dp.code]
        assert item["dp_id"] == dp.id
        values = json.loads(item["values"])
        if dp.type == "value":
            assert item["type"] == "Integer"
            assert values == {
                "unit": dp.display_unit or "",
                "min": dp.min,
                "max": dp.max,
                "scale": dp.scale,
                "step": dp.step,
            }
        elif dp.type == "enum":
            assert (item["type"], values) == ("Enum", {"range": list(dp.labels)})
        elif dp.type == "fault":
            assert item["type"] == "Bitmap" and values["label"] == list(dp.labels)
        elif dp.type == "bool":
            assert (item["type"], values) == ("Boolean", {})
        elif dp.type == "string":
            assert (item["type"], values) == ("String", {"maxlen": dp.max_length})
        else:
            assert item["type"] == "Raw"
    assert smart["status"][0] == {"code": "switch", "dp_id": 1, "type": "Boolean", "values": "{}"}
    # the smart-home functions answer names each function
    funcs = meter.call(token, "GET", "/v1.0/devices/meter-a/functions")["result"]["functions"]
    assert funcs[0] == {
        "code": "switch",
        "dp_id": 1,
        "type": "Boolean",
        "values": "{}",
        "name": "Switch",
        "desc": "Switch",
    }


def test_scope_shapes_and_errors(meter: Meter) -> None:
    alice, project = meter.token("alice"), meter.token(None)
    # a user sees only their own devices, and asks only for their own uid
    listed = meter.call(alice, "GET", "/v1.0/devices/", params={"device_ids": "meter-a,meter-b,meter-c"})
    assert [d["id"] for d in listed["result"]["devices"]] == ["meter-a"]
    assert {"code": "switch", "value": True} in listed["result"]["devices"][0]["status"]
    denied = meter.call(alice, "GET", f"/v1.0/users/{meter.bob}/devices")
    assert (denied["success"], denied["code"], denied["msg"]) == (False, 1106, "permission deny")
    assert set(denied) == {"success", "code", "msg", "t"}
    # the industry list carries no status (the SDK's industry manager breaks on one)
    iot = meter.call(alice, "GET", "/v1.0/iot-03/devices", params={"device_ids": "meter-a"})["result"]
    assert [d["id"] for d in iot["list"]] == ["meter-a"] and iot["list"][0]["status"] == {}
    assert iot["list"][0]["asset_id"] == str(
        meter.call(alice, "GET", f"/v1.0/users/{meter.alice}/homes")["result"][0]["home_id"]
    )
    # a project token sees every bound meter, never an unbound one
    every = meter.call(project, "GET", "/v1.0/iot-03/devices", params={"page_size": 10})["result"]
    assert [d["id"] for d in every["list"]] == ["meter-a", "meter-a2", "meter-b"]
    assert every["has_more"] is False
    page = meter.call(project, "GET", "/v1.0/iot-03/devices", params={"page_size": 1})["result"]
    assert [d["id"] for d in page["list"]] == ["meter-a"] and page["has_more"] is True
    assert page["last_row_key"] == "meter-a"
    params = {"page_size": 5, "last_row_key": "meter-a"}
    rest = meter.call(project, "GET", "/v1.0/iot-03/devices", params=params)
    assert [d["id"] for d in rest["result"]["list"]] == ["meter-a2", "meter-b"]
    assert meter.call(project, "GET", "/v1.0/iot-03/devices/meter-c")["code"] == 1106
    bobs = meter.call(project, "GET", f"/v1.0/users/{meter.bob}/devices")["result"]
    assert [d["id"] for d in bobs] == ["meter-b"]
    assert meter.call(project, "GET", "/v1.0/users/nobody/devices")["code"] == 1000
    # homes: the user's own only; their devices, no scenes, no infrared remotes
    home = meter.call(alice, "GET", f"/v1.0/users/{meter.alice}/homes")["result"][0]
    bob_home = meter.call(project, "GET", f"/v1.0/users/{meter.bob}/homes")["result"][0]
    assert home["home_id"] != bob_home["home_id"] and bob_home["name"] == "bob"
    assert meter.call(alice, "GET", f"/v1.0/homes/{home['home_id']}")["result"] == home
    assert meter.call(alice, "GET", f"/v1.0/homes/{bob_home['home_id']}")["code"] == 1106
    in_home = meter.call(alice, "GET", f"/v1.0/homes/{home['home_id']}/devices")["result"]
    assert [d["id"] for d in in_home] == ["meter-a", "meter-a2"]
    assert in_home[0]["owner_id"] == str(home["home_id"]) and in_home[0]["uid"] == meter.alice
    trigger = meter.call(alice, "POST", f"/v1.0/homes/{home['home_id']}/scenes/s1/trigger")
    assert (trigger["success"], trigger["code"]) == (False, 1000)
    assert meter.call(alice, "GET", "/v1.0/infrareds/meter-a/remotes")["result"] == []
    assert meter.call(alice, "GET", "/v1.0/infrareds/meter-b/remotes")["code"] == 1106
    # status paths
    status = meter.call(alice, "GET", "/v1.0/iot-03/devices/meter-a/status")["result"]
    assert status == [
        {"code": "switch", "value": True},
        {"code": "voltage_current", "value": 2301234},
        {"code": "fault", "value": 3},
    ]
    # bad signature, no token, an expired one, bad parameters: Tuya's codes, HTTP 200
    response = httpx.get(meter.endpoint + "/v1.0/devices/meter-a", headers={"client_id": "x"})
    assert response.status_code == 200 and response.json()["code"] == 1105
    assert meter.call("", "GET", "/v1.0/devices/meter-a")["code"] == 1002
    expired = store.issue_token(meter.hub.engine, meter.app.access_id, meter.alice, 60, now=time.time() - 120)
    assert meter.call(expired.access_token, "GET", "/v1.0/devices/meter-a")["code"] == 1010
    assert meter.call(alice, "GET", "/v1.0/iot-03/devices/status")["code"] == 1100
    for size in (0, 101, "x", "²"):
        answer = meter.call(alice, "GET", "/v1.0/iot-03/devices", params={"page_size": size})
        assert answer["code"] == 1109, size
    too_many = ",".join(f"m{i}" for i in range(1001))
    assert meter.call(alice, "GET", "/v1.0/devices/", params={"device_ids": too_many})["code"] == 1109
    assert meter.call(alice, "POST", "/v1.0/devices/meter-a/commands", body={"commands": "x"})["code"] == 1109
    for method, path in [("GET", "/v2.0/cloud/thing/meter-a/model"), ("PUT", "/v1.0/devices/meter-a")]:
        answer = meter.call(alice, method, path)
        assert (answer["success"], answer["code"]) == (False, 1108), path


def test_commands_map_to_tuya_results(meter: Meter) -> None:
    alice = meter.token("alice")

    def command(*commands: dict[str, Any], path: str = "/v1.0/iot-03/devices/meter-a/commands") -> Any:
        return meter.call(alice, "POST", path, body={"commands": list(commands)})

    ok = command({"code": "switch", "value": False}, {"code": "voltage_over", "value": 2500000})
    assert (ok["success"], ok["result"]) == (True, True)
    assert [c["param"] for c in meter.received] == [
        {"id": "1", "value": False},
        {"id": "12", "value": 2500000},
    ]
    # checked against the model before anything is sent: nothing reaches the meter
    for bad in (
        {"code": "power_current", "value": 5},  # report-only
        {"code": "no_such_code", "value": 1},
        {"code": "voltage_over", "value": -1},  # below min
        {"code": "switch", "value": "yes"},
    ):
        answer = command({"code": "switch", "value": True}, bad)
        assert (answer["success"], answer["code"]) == (False, 2008), (bad, answer)
        assert answer["msg"].startswith("command or value not support")
    assert command()["code"] == 1100
    assert command({"code": "switch"})["code"] == 1109
    assert len(meter.received) == 2
    # the meter refuses: its code is in the message
    meter.answer = 2002
    refused = command({"code": "switch", "value": True}, path="/v1.0/devices/meter-a/commands")
    assert (refused["success"], refused["code"]) == (False, 2008)
    assert "the device answered code 2002" in refused["msg"]
    meter.answer = 500
    failed = command({"code": "switch", "value": True})
    assert (failed["success"], failed["code"]) == (False, 1103)
    # no answer within command_timeout (3 s here)
    meter.answer = None
    silent = command({"code": "switch", "value": True})
    assert (silent["success"], silent["code"]) == (False, 500) and "no answer" in silent["msg"]
    # another user's meter, even a real one
    other = meter.call(
        alice,
        "POST",
        "/v1.0/devices/meter-b/commands",
        body={"commands": [{"code": "switch", "value": True}]},
    )
    assert other["code"] == 1106
    assert len(meter.received) == 5


# --- importing Tuya's specification JSON ----------------------------------------------------------


TSL = {
    "modelId": "pk-tuya-meter",
    "services": [
        {
            "code": "",
            "name": "default",
            "properties": [
                {
                    "abilityId": 1,
                    "code": "switch",
                    "name": "Switch",
                    "accessMode": "rw",
                    "typeSpec": {"type": "bool"},
                },
                {
                    "abilityId": 6,
                    "code": "phase_a",
                    "name": "Phase A",
                    "accessMode": "ro",
                    "typeSpec": {"type": "raw", "maxlen": 128},
                },
                {
                    "abilityId": 9,
                    "code": "fault",
                    "name": "Fault",
                    "accessMode": "ro",
                    "typeSpec": {"type": "bitmap", "label": ["short_circuit", "surge"], "maxlen": 2},
                },
                {
                    "abilityId": 17,
                    "code": "add_ele",
                    "name": "Added energy",
                    "accessMode": "ro",
                    "typeSpec": {"type": "value", "min": 0, "max": 50000, "scale": 3, "step": 100}
                    | {"unit": "kwh"},
                },
                {
                    "abilityId": 20,
                    "code": "mode",
                    "name": "Mode",
                    "accessMode": "wr",
                    "typeSpec": {"type": "enum", "range": ["auto", "manual"]},
                },
                {
                    "abilityId": 21,
                    "code": "label",
                    "name": "Label",
                    "accessMode": "rw",
                    "typeSpec": {"type": "string", "maxlen": 64},
                },
            ],
        }
    ],
}


def test_import_thing_model_schema_and_specification_forms() -> None:
    model = import_tuya_spec(json.dumps({"result": {"model": json.dumps(TSL)}}), model="tuya-meter")
    assert model.product_ids == ("pk-tuya-meter",) and model.category == "zndb"
    sw, phase, fault, energy, mode, label = model.data_points
    assert (sw.id, sw.code, sw.type, sw.access) == (1, "switch", "bool", "rw")
    assert (phase.type, phase.layout) == ("raw", "phase")
    assert (fault.type, fault.labels) == ("fault", ("short_circuit", "surge"))
    assert (energy.min, energy.max, energy.scale, energy.step, energy.unit) == (0, 50000, 3, 100, "kwh")
    assert (mode.type, mode.access, mode.labels) == ("enum", "wo", ("auto", "manual"))
    assert (label.type, label.max_length) == ("string", 64)
    assert energy.coerce(300) == 300
    # the data point schema form (a device's "schema"), same model
    schema = [
        {
            "id": p["abilityId"],
            "code": p["code"],
            "name": p["name"],
            "mode": p["accessMode"],
            "type": "obj",
            "property": p["typeSpec"],
        }
        for p in TSL["services"][0]["properties"]
    ]
    from_schema = import_tuya_spec(json.dumps(schema), model="tuya-meter", product_ids=["pk-tuya-meter"])
    assert from_schema.to_dict() | {"source": ""} == model.to_dict() | {"source": ""}
    # meterhub's own specification answer imports back to the same types, ranges and access
    again = import_tuya_spec({"result": specification(SMART_METER)}, model="again")
    assert again.category == "zndb"
    for dp in SMART_METER:
        twin = again.get(dp.id)
        assert twin is not None and (twin.code, twin.type, twin.access) == (dp.code, dp.type, dp.access)
        assert (twin.min, twin.max, twin.scale, twin.step, twin.labels) == (
            dp.min,
            dp.max,
            dp.scale,
            dp.step,
            dp.labels,
        )
    # the result is a model file meterhub loads
    assert parse_model(json.dumps(model.to_dict())).to_dict()["data_points"] == model.to_dict()["data_points"]


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"functions": [{"code": "switch", "type": "Boolean", "values": "{}"}]}, "functions[0].dp_id"),
        ([{"id": 1, "code": "x", "mode": "rw", "property": {"type": "struct"}}], "[0]"),
        ([{"id": 1, "code": "x", "mode": "rx", "property": {"type": "bool"}}], "[0]"),
        ([{"id": 1, "code": "v", "mode": "ro", "property": {"type": "value", "max": 5}}], "[0].min"),
        ({"what": 1}, None),
    ],
)
def test_import_refuses_what_it_cannot_represent(doc: Any, where: str | None) -> None:
    from meterhub.model.errors import ModelError

    with pytest.raises(ModelError) as err:
        import_tuya_spec(json.dumps(doc), model="bad", source="spec.json")
    assert err.value.field == where and "spec.json" in str(err.value)


def test_cli_model_import(tmp_path: Path) -> None:
    spec = tmp_path / "tuya-spec.json"
    spec.write_text(json.dumps(TSL))
    models = tmp_path / "models"
    env_args = ["--data-dir", str(tmp_path / "data")]

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meterhub", *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )

    done = cli("model", "import", str(spec), "--name", "acme-meter", "--models-dir", str(models), *env_args)
    assert done.returncode == 0, done.stderr
    written = models / "acme-meter.json"
    assert str(written) in done.stdout and "6 data points" in done.stdout
    model = load_model(written)
    assert model.model == "acme-meter" and model.product_ids == ("pk-tuya-meter",)
    assert [dp.code for dp in model] == ["switch", "phase_a", "fault", "add_ele", "mode", "label"]
    again = cli("model", "import", str(spec), "--name", "acme-meter", "--models-dir", str(models), *env_args)
    assert again.returncode != 0 and "exists" in again.stderr
    spec.write_text('{"services": [{"properties": [{"abilityId": 1, "code": "x"}]}]}')
    bad = cli("model", "import", str(spec), "--name", "x", "--models-dir", str(models), *env_args)
    assert bad.returncode != 0 and "services[0].properties[0]" in bad.stderr
    listed = cli("models", *env_args, env={"METERHUB_MODELS_DIR": str(models)})
    assert listed.returncode == 0 and "acme-meter\t6 data points" in listed.stdout, listed.stderr
    # printed instead of written
    spec.write_text(json.dumps(TSL))
    printed = cli("model", "import", str(spec), "--name", "m2", "--output", "-", *env_args)
    assert printed.returncode == 0 and json.loads(printed.stdout)["model"] == "m2"


def test_one_application_cannot_pile_up_commands(hub_factory, clients, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from meterhub.openhub import device_api

    monkeypatch.setattr(device_api, "MAX_CONCURRENT_COMMANDS", 3)
    meter = make_meter(hub_factory, clients, command_timeout=60)
    alice = meter.token("alice")
    meter.answer = None  # the meter holds its answers: each command request waits

    def send(i: int) -> int:
        body = {"commands": [{"code": "voltage_over", "value": 2500000 + i}]}  # each request its own
        return meter.call(alice, "POST", "/v1.0/devices/meter-a/commands", body=body)["code"]

    with ThreadPoolExecutor(5) as pool:
        waiting = [pool.submit(send, i) for i in range(3)]
        wait_for(lambda: len(meter.received) == 3)
        assert send(3) == 1110  # over the limit: answered at once, never sent
        meter.answer_received(2002)
        codes = sorted(f.result(timeout=30) for f in waiting)
    assert codes == [2008, 2008, 2008] and len(meter.received) == 3
    meter.answer = 0
    body = {"commands": [{"code": "switch", "value": False}]}
    done = meter.call(alice, "POST", "/v1.0/devices/meter-a/commands", body=body)
    assert done["result"] is True  # the slots are free again


def test_a_storage_failure_is_answered_tuya_style(meter: Meter) -> None:
    from sqlalchemy import text

    alice = meter.token("alice")
    with meter.hub.engine.begin() as conn:
        conn.execute(text("ALTER TABLE latest_values RENAME TO latest_away"))
    try:
        for path in ("/v1.0/devices/meter-a", "/v1.0/iot-03/devices/meter-a/status"):
            answer = meter.call(alice, "GET", path)
            assert (answer["success"], answer["code"]) == (False, 500), answer
            assert answer["msg"] == "system error, please contact the admin"
    finally:
        with meter.hub.engine.begin() as conn:
            conn.execute(text("ALTER TABLE latest_away RENAME TO latest_values"))
    assert meter.call(alice, "GET", "/v1.0/devices/meter-a")["success"] is True
