"""The REST API end to end: a real hub (MQTT + HTTP), real paho gateway clients, real HTTP with httpx."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from conftest import Client, RunningHub, wait_for
from meterhub.api.security import create_token, revoke_token
from meterhub.storage import registry

# --- helpers shared with test_alarms / test_energy / test_api_schema -----------------------------


class GatewaySim:
    """A gateway over a real paho client: syncs and reports (waiting for the answers), and answers
    commands by itself (``command_code``; ``None`` = stay silent)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.gw = client.client_id
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.commands: list[dict[str, Any]] = []
        self.command_code: int | None = 0
        self.command_delay = 0.0
        self._lock = threading.Lock()
        client.c.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic.endswith("/commands"):
            cmd = json.loads(msg.payload)
            with self._lock:
                self.commands.append(cmd)
            code = self.command_code
            if code is None:
                return
            if self.command_delay:
                time.sleep(self.command_delay)
            reply = {
                "t": int(time.time()),
                "cid": cmd["cid"],
                "request_id": cmd["request_id"],
                "param": {"msg": "success" if code == 0 else "failed", "code": code},
            }
            self.client.c.publish(f"gateway_id/{self.gw}/commands/response", json.dumps(reply), 1)
        else:
            self.answers.put(json.loads(msg.payload))

    def ask(self, kind: str, param: Any, t: float | None = None) -> dict[str, Any]:
        rid = str(uuid.uuid4())
        payload = {"t": int(time.time()) if t is None else int(t), "request_id": rid, "param": param}
        self.client.publish(f"gateway_id/{self.gw}/{kind}", json.dumps(payload), 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = self.answers.get(timeout=5)
            if answer.get("request_id") == rid:
                return answer
        raise AssertionError(f"no answer to {kind}")

    def sync(self, cid: str, **fields: Any) -> None:
        answer = self.ask("devices/sync", {"cid": cid, "product_id": "pid-meter", **fields})
        assert answer["param"]["code"] == 0, answer

    def report(self, cid: str, dp: str, value: Any, t: float | None = None) -> None:
        answer = self.ask("properties/report", {"cid": cid, "id": dp, "value": value}, t)
        assert answer["param"]["code"] == 0, answer

    def status(self, items: list[tuple[str, bool]]) -> None:
        payload = {
            "t": int(time.time()),
            "request_id": str(uuid.uuid4()),
            "param": [{"cid": c, "status": s} for c, s in items],
        }
        self.client.publish(f"gateway_id/{self.gw}/devices/status", json.dumps(payload), 1)


class Api:
    """A running hub with tokens and HTTP clients."""

    def __init__(self, hub: RunningHub, clients: Callable[..., Client]) -> None:
        self.hub = hub
        self._clients = clients
        self.base = f"http://127.0.0.1:{hub.hub.http_port}"
        self.admin_token, _ = create_token(hub.engine, "admin", "admin")
        self.read_token, _ = create_token(hub.engine, "reader", "read")
        # 30 s rather than httpx's 5 s: a loaded CI machine must not fail a test on a slow answer
        auth = {"admin": self.admin_token, "read": self.read_token}
        self.admin = httpx.Client(
            base_url=self.base, timeout=30, headers={"Authorization": f"Bearer {auth['admin']}"}
        )
        self.read = httpx.Client(
            base_url=self.base, timeout=30, headers={"Authorization": f"Bearer {auth['read']}"}
        )
        self.anon = httpx.Client(base_url=self.base, timeout=30)
        self.vendor = registry.add_vendor(hub.engine, "meters-inc")

    def gateway(self, gw: str = "gw-api") -> GatewaySim:
        c = self._clients(self.hub.port, gw, self.vendor.username)
        rc, _ = c.connect()
        assert rc == 0
        c.subscribe(f"gateway_id/{gw}/#", 1)
        return GatewaySim(c)

    def close(self) -> None:
        for c in (self.admin, self.read, self.anon):
            c.close()


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]) -> Iterator[Api]:
    a = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    yield a
    a.close()


def error_of(r: httpx.Response) -> tuple[int, int | None]:
    body = r.json()
    assert set(body) >= {"error"} and set(body["error"]) >= {"message", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return r.status_code, body["error"]["code"]


# --- commands ------------------------------------------------------------------------------------


def test_command_reaches_the_gateway_and_its_answer_comes_back(api: Api) -> None:
    gw = api.gateway()
    gw.sync("m1", device_name="Kitchen")
    gw.report("m1", "1", False)
    r = api.admin.post("/api/v1/devices/m1/commands", json={"dp": "switch", "value": True, "timeout": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["status"], out["code"], out["dp_id"], out["value"]) == ("ok", 0, "1", True)
    assert len(gw.commands) == 1
    sent = gw.commands[0]
    assert sent["cid"] == "m1" and sent["param"] == {"id": "1", "value": True}
    assert sent["request_id"] == out["request_id"] and out["elapsed"] > 0
    # By job id and by request_id.
    for key in (out["id"], out["request_id"]):
        polled = api.read.get(f"/api/v1/commands/{key}").json()
        assert (polled["status"], polled["request_id"], polled["late"]) == ("ok", out["request_id"], False)
    log = api.read.get("/api/v1/devices/m1/commands").json()
    assert log["total"] == 1
    assert [(c["request_id"], c["status"], c["code"], c["dp_id"]) for c in log["items"]] == [
        (out["request_id"], "ok", 0, "1")
    ]
    # A numeric data point by id, with the device answering an error code: 502 with that code.
    gw.command_code = 2002
    r = api.admin.post("/api/v1/devices/m1/commands", json={"dp": 6, "value": 100000})
    assert error_of(r) == (502, 2002)
    assert r.json()["command"]["status"] == "failed"
    assert gw.commands[-1]["param"] == {"id": "6", "value": 100000}


def test_command_without_waiting_is_polled(api: Api) -> None:
    gw = api.gateway()
    gw.sync("m2")
    gw.report("m2", "1", False)
    gw.command_delay = 0.3
    r = api.admin.post("/api/v1/devices/m2/commands", json={"dp": "1", "value": False, "wait": False})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "pending" and accepted["poll"] == f"/api/v1/commands/{accepted['id']}"
    first = api.read.get(accepted["poll"]).json()
    assert first["status"] == "pending" and first["request_id"] is None
    done = wait_for(lambda: (x := api.read.get(accepted["poll"]).json())["status"] != "pending" and x)
    assert (done["status"], done["code"], done["value"]) == ("ok", 0, False)
    assert done["request_id"] == gw.commands[0]["request_id"]


def test_command_timeout_is_504_and_offline_is_409(api: Api) -> None:
    gw = api.gateway()
    gw.sync("m3")
    # Synced but never heard from: offline, refused at once with 2001.
    r = api.admin.post("/api/v1/devices/m3/commands", json={"dp": "switch", "value": True})
    assert error_of(r) == (409, 2001)
    assert r.json()["command"]["status"] == "rejected"
    assert gw.commands == []
    gw.report("m3", "1", False)
    gw.command_code = None  # the gateway stays silent
    started = time.monotonic()
    r = api.admin.post("/api/v1/devices/m3/commands", json={"dp": "switch", "value": True, "timeout": 0.3})
    assert error_of(r) == (504, None)
    assert 0.3 <= time.monotonic() - started < 3
    assert r.json()["command"]["status"] == "timeout" and len(gw.commands) == 1
    # Offline again after the gateway reports the device off.
    gw.status([("m3", False)])
    wait_for(lambda: not api.hub.run(lambda: api.hub.hub.handler.devices["m3"].online))
    r = api.admin.post("/api/v1/devices/m3/commands", json={"dp": "switch", "value": True, "wait": False})
    assert error_of(r) == (409, 2001)  # refused at once even without waiting
    statuses = [c["status"] for c in api.read.get("/api/v1/devices/m3/commands").json()["items"]]
    assert statuses == ["rejected", "timeout", "rejected"]


def test_command_refusals(api: Api) -> None:
    gw = api.gateway()
    gw.sync("m4")
    gw.report("m4", "1", False)
    post = api.admin.post
    assert error_of(post("/api/v1/devices/ghost/commands", json={"dp": 1, "value": True})) == (404, 2003)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": "5", "value": -1})) == (422, 1101)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": "1", "value": "perhaps"})) == (422, 1103)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": "1", "value": None})) == (422, 1102)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": "3", "value": 5})) == (400, 2002)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": "nope", "value": 5})) == (400, 2002)
    # Request shape problems: 422 without a protocol code, with the details.
    r = post("/api/v1/devices/m4/commands", json={"value": 5})
    assert error_of(r) == (422, None) and r.json()["error"]["details"][0]["loc"] == ["body", "dp"]
    assert error_of(post("/api/v1/devices/m4/commands", content=b"{not json")) == (422, None)
    assert error_of(post("/api/v1/devices/m4/commands", json={"dp": 1, "value": 1, "timeout": 0})) == (
        422,
        None,
    )
    assert gw.commands == []


# --- devices, history ----------------------------------------------------------------------------


def test_device_list_detail_and_presence(api: Api) -> None:
    gw = api.gateway("gw-a")
    gw.sync("k1", device_name="Kitchen", install_location="Floor 1", mac_address="aa:bb")
    gw.sync("k2", device_name="Garage", install_location="Basement")
    gw.sync("k3", device_name="Attic")
    gw.report("k1", "5", 2301234)
    gw.report("k1", "30", "CIsAK8MACWo=")
    gw.report("k1", "19", 9)
    gw.report("k2", "1", True)
    listing = api.read.get("/api/v1/devices").json()
    assert [d["cid"] for d in listing["items"]] == ["k1", "k2", "k3"] and listing["total"] == 3
    online = api.read.get("/api/v1/devices", params={"online": True}).json()
    assert [d["cid"] for d in online["items"]] == ["k1", "k2"]
    assert [d["cid"] for d in api.read.get("/api/v1/devices", params={"q": "floor"}).json()["items"]] == [
        "k1"
    ]
    assert [d["cid"] for d in api.read.get("/api/v1/devices", params={"q": "gar"}).json()["items"]] == ["k2"]
    page = api.read.get("/api/v1/devices", params={"limit": 1, "offset": 1}).json()
    assert ([d["cid"] for d in page["items"]], page["total"], page["limit"], page["offset"]) == (
        ["k2"],
        3,
        1,
        1,
    )
    assert api.read.get("/api/v1/devices", params={"gateway": "gw-x"}).json()["total"] == 0
    assert (
        api.read.get("/api/v1/devices", params={"gateway": "gw-a", "product": "pid-meter"}).json()["total"]
        == 3
    )

    detail = api.read.get("/api/v1/devices/k1").json()
    assert (detail["device_name"], detail["install_location"], detail["mac_address"]) == (
        "Kitchen",
        "Floor 1",
        "aa:bb",
    )
    assert detail["presence"]["online"] is True and detail["presence"]["cause"] == "report"
    values = {v["code"]: v for v in detail["values"]}
    volt = values["voltage_current"]
    assert (volt["raw"], volt["scaled"], volt["unit"], volt["dp_id"]) == (2301234, 230.1234, "V", "5")
    assert values["phase_a"]["raw"] == {
        "voltage": 218.7,
        "current": 11.203,
        "power": 2410.0,
        "electricity": None,
    }
    assert values["phase_a"]["scaled"] is None
    assert values["fault"]["raw"] == ["short_circuit_alarm", "ov_vol"]
    assert sorted(a["label"] for a in detail["alarms"]) == ["overvoltage", "short_circuit_alarm"]
    assert volt["t_iso"].endswith("+01:00")  # Europe/Berlin in November

    gw.status([("k1", False)])
    wait_for(lambda: api.read.get("/api/v1/devices/k1").json()["presence"]["online"] is False)
    events = api.read.get("/api/v1/devices/k1/presence").json()
    assert [(e["online"], e["cause"]) for e in events["items"]] == [(False, "status"), (True, "report")]
    assert error_of(api.read.get("/api/v1/devices/nobody")) == (404, 2003)
    assert error_of(api.read.get("/api/v1/devices/nobody/presence")) == (404, 2003)

    gws = api.read.get("/api/v1/gateways").json()
    assert [(g["gateway_id"], g["connected"], g["device_count"], g["vendor"]) for g in gws["items"]] == [
        ("gw-a", True, 3, "meters-inc")
    ]
    one = api.read.get("/api/v1/gateways/gw-a").json()
    assert [d["cid"] for d in one["devices"]] == ["k1", "k2", "k3"] and one["client_address"]
    assert error_of(api.read.get("/api/v1/gateways/none")) == (404, None)


def test_history_raw_and_downsampled(api: Api) -> None:
    gw = api.gateway()
    gw.sync("h1")
    t0 = int(time.time()) - 3600
    volts = [2300000, 2310000, 2290000, 2320000, 2305000, 2315000]  # raw, scale 4
    for i, raw in enumerate(volts):
        gw.report("h1", "5", raw, t=t0 + i * 60)  # one a minute
    gw.report("h1", "1", True, t=t0)
    gw.report("h1", "1", False, t=t0 + 200)
    raw = api.read.get(
        "/api/v1/devices/h1/history/voltage_current", params={"from": t0, "to": t0 + 300}
    ).json()
    assert raw["mode"] == "raw" and raw["total"] == 6 and raw["unit"] == "V"
    assert [r["raw"] for r in raw["items"]] == volts
    assert [r["value"] for r in raw["items"]] == [230.0, 231.0, 229.0, 232.0, 230.5, 231.5]
    assert [r["t"] for r in raw["items"]] == [t0 + i * 60 for i in range(6)]
    paged = api.read.get(
        "/api/v1/devices/h1/history/5", params={"from": t0, "to": t0 + 300, "limit": 2, "offset": 4}
    )
    assert [r["raw"] for r in paged.json()["items"]] == volts[4:]

    # Three buckets of 120 s: [t0, t0+120) [t0+120, t0+240) [t0+240, t0+360]
    b = api.read.get(
        "/api/v1/devices/h1/history/5", params={"from": t0, "to": t0 + 360, "interval": 120}
    ).json()
    assert b["mode"] == "buckets" and b["interval"] == 120
    got = [(x["count"], x["min"], x["max"], x["avg"], x["last"]) for x in b["buckets"]]
    assert got == [
        (2, 230.0, 231.0, pytest.approx(230.5), 231.0),
        (2, 229.0, 232.0, pytest.approx(230.5), 232.0),
        (2, 230.5, 231.5, pytest.approx(231.0), 231.5),
    ]
    assert [x["start"] for x in b["buckets"]] == [t0, t0 + 120, t0 + 240]
    # N buckets over the range; empty buckets are kept (count 0).
    b2 = api.read.get(
        "/api/v1/devices/h1/history/5", params={"from": t0 - 300, "to": t0 + 300, "buckets": 2}
    ).json()
    assert [(x["count"], x["last"]) for x in b2["buckets"]] == [(0, None), (6, 231.5)]
    # bool: 1/0
    sw = api.read.get(
        "/api/v1/devices/h1/history/switch", params={"from": t0, "to": t0 + 300, "buckets": 1}
    ).json()
    assert [(x["count"], x["min"], x["max"], x["avg"], x["last"]) for x in sw["buckets"]] == [
        (2, 0.0, 1.0, 0.5, 0.0)
    ]
    # ISO times are accepted (no offset = the configured zone).
    iso_from = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t0))
    assert (
        api.read.get("/api/v1/devices/h1/history/5", params={"from": iso_from, "to": t0 + 300}).json()[
            "total"
        ]
        == 6
    )


def test_history_of_phase_fields_and_refusals(api: Api) -> None:
    gw = api.gateway()
    gw.sync("p1")
    t0 = int(time.time()) - 600
    gw.report("p1", "30", {"voltage": "230.1", "current": "1.5", "power": "345"}, t=t0)
    gw.report("p1", "30", "CIsAK8MACWo=", t=t0 + 10)  # 218.7 V, 11.203 A, 2410 W
    params = {"from": t0, "to": t0 + 60}
    r = api.read.get("/api/v1/devices/p1/history/phase_a", params={**params, "field": "power"}).json()
    assert [x["value"] for x in r["items"]] == [345.0, 2410.0]
    b = api.read.get(
        "/api/v1/devices/p1/history/30", params={**params, "field": "voltage", "buckets": 1}
    ).json()
    assert [(x["count"], x["min"], x["max"], x["last"]) for x in b["buckets"]] == [(2, 218.7, 230.1, 218.7)]
    assert error_of(api.read.get("/api/v1/devices/p1/history/30", params={**params, "buckets": 1})) == (
        422,
        None,
    )
    assert error_of(api.read.get("/api/v1/devices/p1/history/16", params={**params, "buckets": 1})) == (
        400,
        2002,
    )
    assert error_of(api.read.get("/api/v1/devices/p1/history/5", params={**params, "field": "power"})) == (
        422,
        None,
    )
    assert error_of(api.read.get("/api/v1/devices/p1/history/999")) == (400, 2002)
    assert error_of(api.read.get("/api/v1/devices/zz/history/5")) == (404, 2003)
    assert error_of(api.read.get("/api/v1/devices/p1/history/5", params={"from": "yesterday"})) == (422, 1103)
    assert error_of(api.read.get("/api/v1/devices/p1/history/5", params={"from": t0, "to": t0 - 1})) == (
        422,
        1101,
    )
    assert error_of(
        api.read.get("/api/v1/devices/p1/history/5", params={**params, "buckets": 2, "interval": 10})
    ) == (422, None)


# --- auth ----------------------------------------------------------------------------------------


def test_token_scopes(api: Api) -> None:
    assert error_of(api.anon.get("/api/v1/devices")) == (401, None)
    assert api.anon.get("/api/v1/devices").headers["www-authenticate"] == "Bearer"
    assert error_of(api.anon.get("/metrics")) == (401, None)
    bad = httpx.get(f"{api.base}/api/v1/devices", headers={"Authorization": "Bearer mh_nope"})
    assert error_of(bad) == (401, None)
    assert api.anon.get("/healthz").status_code == 200
    assert api.anon.get("/openapi.json").status_code == 200
    assert api.read.get("/api/v1/vendors").status_code == 200
    # read tokens may not change anything
    assert error_of(api.read.post("/api/v1/vendors", json={"name": "x"})) == (403, None)
    assert error_of(api.read.post("/api/v1/devices/any/commands", json={"dp": 1, "value": True})) == (
        403,
        None,
    )
    # vendor usernames (gateway secrets) are for admin eyes only
    assert [v["username"] for v in api.read.get("/api/v1/vendors").json()["items"]] == [None]
    assert [v["username"] for v in api.admin.get("/api/v1/vendors").json()["items"]] == [api.vendor.username]
    # revoked: 401 at once
    revoke_token(api.hub.engine, "reader")
    assert error_of(api.read.get("/api/v1/vendors")) == (401, None)
    assert "revoked" in api.read.get("/api/v1/vendors").json()["error"]["message"]


def test_vendors_products_models(api: Api) -> None:
    r = api.admin.post("/api/v1/vendors", json={"name": "acme", "allowlist": True})
    assert r.status_code == 201 and r.json()["username"].startswith("mh_") and r.json()["allowlist"] is True
    assert error_of(api.admin.post("/api/v1/vendors", json={"name": "acme"})) == (409, None)
    assert api.admin.post("/api/v1/vendors/acme/disable").json()["enabled"] is False
    assert registry.get_vendor(api.hub.engine, "acme").enabled is False  # type: ignore[union-attr]
    assert api.admin.post("/api/v1/vendors/acme/enable").json()["enabled"] is True
    assert error_of(api.admin.post("/api/v1/vendors/nope/enable")) == (404, None)
    assert (
        api.admin.post("/api/v1/products", json={"product_id": "p-9", "model": "smart-meter"}).status_code
        == 201
    )
    assert error_of(api.admin.post("/api/v1/products", json={"product_id": "p-8", "model": "toaster"})) == (
        422,
        None,
    )
    products = api.read.get("/api/v1/products").json()["items"]
    assert [(p["product_id"], p["model"], p["devices"]) for p in products] == [("p-9", "smart-meter", 0)]
    model = api.read.get("/api/v1/models/smart-meter").json()
    dps = {dp["id"]: dp for dp in model["data_points"]}
    assert (dps[5]["unit"], dps[5]["scale"], dps[5]["access"], dps[5]["min"], dps[5]["max"]) == (
        "V",
        4,
        "rw",
        0,
        1000000000,
    )
    assert (dps[50]["unit"], dps[50]["display_unit"]) == ("kW", "kWh")
    assert [lb["label"] for lb in dps[20]["labels"]] == ["general", "serious", "urgent"]
    assert len(dps[19]["labels"]) == 14 and dps[3]["writable"] is False
    assert error_of(api.read.get("/api/v1/models/toaster")) == (404, None)


def test_health_and_metrics(api: Api) -> None:
    gw = api.gateway()
    gw.sync("x1")
    gw.report("x1", "5", 2300000)
    api.admin.post("/api/v1/devices/x1/commands", json={"dp": "switch", "value": True})
    health = api.anon.get("/healthz").json()
    assert health["status"] == "ok" and health["storage"]["ok"] and health["mqtt"]["connected_clients"] == 1
    r = api.read.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "meterhub_mqtt_connected_clients 1.0" in text
    assert 'meterhub_protocol_responses_total{code="0",kind="report"} 1.0' in text
    assert 'meterhub_protocol_responses_total{code="0",kind="sync"} 1.0' in text
    assert 'meterhub_devices{state="online"} 1.0' in text
    assert 'meterhub_command_duration_seconds_count{status="ok"} 1.0' in text
    assert "meterhub_storage_batches_total" in text and "meterhub_storage_queue_depth" in text
    assert "meterhub_mqtt_messages_received_total" in text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("meterhub_gc_", "meterhub_storage_commit_seconds_max"))
    }
    assert values["meterhub_storage_commit_seconds_max"] > 0
    assert values['meterhub_gc_collections_total{generation="0"}'] > 0  # this process has allocated plenty
    assert 0 < values['meterhub_gc_pause_seconds_max{generation="0"}'] < 5


def test_api_docs_need_no_other_host(api: Api) -> None:
    """/docs works offline: every script, style sheet and icon it references is served by meterhub."""
    import re

    page = api.anon.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""", page.text)
    refs = [a or b for a, b in urls]
    assert any(r.endswith("swagger-ui-bundle.js") for r in refs) and any(r.endswith(".css") for r in refs)
    assert not re.search(r"https?://", page.text), re.findall(r"https?://[^\s\"']+", page.text)
    for ref in refs:
        assert ref.startswith("/"), ref
        r = api.anon.get(ref)
        assert r.status_code == 200 and len(r.content) > 100, ref
    assert api.anon.get("/openapi.json").json()["info"]["title"] == "meterhub"


def test_csv_exports_of_a_devices_history_and_of_the_alarms(api: Api) -> None:
    """For spreadsheets: GET /devices/{cid}/history.csv (values in real units) and /alarms.csv."""
    import csv
    import io

    gw = api.gateway()
    gw.sync("csv-1")
    now = int(time.time())
    gw.report("csv-1", "5", 2301234, t=now - 60)
    gw.report("csv-1", "1", True, t=now - 30)
    gw.report("csv-1", "19", 1, t=now - 10)  # short_circuit_alarm: an alarm
    r = api.read.get("/api/v1/devices/csv-1/history.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="csv-1-history.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    by_code = {row["code"]: row for row in rows}
    assert by_code["voltage_current"]["value"] == "230.1234" and by_code["voltage_current"]["unit"] == "V"
    assert by_code["voltage_current"]["raw"] == "2301234" and by_code["switch"]["value"] == "True"
    assert [row["code"] for row in rows] == ["voltage_current", "switch", "fault"]  # by measurement time
    assert api.read.get("/api/v1/devices/nobody/history.csv").status_code == 404
    assert api.anon.get("/api/v1/devices/csv-1/history.csv").status_code == 401
    wait_for(lambda: api.read.get("/api/v1/alarms").json()["total"] >= 1)
    alarms = list(
        csv.DictReader(io.StringIO(api.read.get("/api/v1/alarms.csv", params={"cid": "csv-1"}).text))
    )
    assert alarms and alarms[0]["label"] == "short_circuit_alarm" and alarms[0]["state"] == "active"
    assert alarms[0]["cid"] == "csv-1" and alarms[0]["raised_at"]


def test_simple_get_latency(api: Api) -> None:
    """Light load: sequential GETs of the device list; prints the median for the report."""
    gw = api.gateway()
    for i in range(20):
        gw.sync(f"d{i:02}")
    samples = []
    for _ in range(100):
        started = time.perf_counter()
        assert api.read.get("/api/v1/devices", params={"limit": 20}).status_code == 200
        samples.append(time.perf_counter() - started)
    samples.sort()
    median, p95 = samples[50], samples[95]
    print(f"GET /api/v1/devices (20 devices): median {median * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms")
    assert median < 0.1


# --- the operator CLI, against the running server ------------------------------------------------


def test_operator_cli(api: Api, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from meterhub.cli_ops import cli

    gw = api.gateway()
    gw.sync("c1", device_name="Pump", install_location="Cellar")
    gw.report("c1", "5", 2301234)
    gw.report("c1", "19", 1)
    runner = CliRunner(
        env={"METERHUB_DATABASE_URL": api.hub.settings.database_url}
        if api.hub.settings.database_url
        else None
    )
    conn = ["--url", api.base, "--token", api.admin_token]

    def run(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("devices", *conn)
    assert out.splitlines()[0].split() == ["CID", "NAME", "GATEWAY", "ONLINE", "LAST", "SEEN", "LOCATION"]
    assert out.splitlines()[1].split()[:4] == ["c1", "Pump", "gw-api", "yes"]
    assert json.loads(run("devices", *conn, "--json"))["total"] == 1
    shown = run("show", "c1", *conn)
    assert "230.123 V" in shown and "voltage_current" in shown and "short_circuit_alarm" in shown
    hist = run("history", "c1", "voltage_current", "--since", "1h", *conn)
    assert "230.123" in hist
    gw.command_code = 0
    assert run("command", "c1", "switch", "true", *conn).startswith("ok: code 0")
    assert json.loads(run("command", "c1", "1", "false", *conn, "--json"))["value"] is False
    failed = runner.invoke(cli, ["command", "nobody", "1", "true", *conn])
    assert failed.exit_code == 1 and "HTTP 404" in failed.output and "code 2003" in failed.output
    energy_out = run("energy", "c1", "--month", time.strftime("%Y-%m"), *conn)
    assert "total:" in energy_out
    alarms_out = run("alarms", *conn)
    assert "short_circuit_alarm" in alarms_out
    alarm_id = json.loads(run("alarms", *conn, "--json"))["items"][0]["id"]
    assert "acknowledged by admin" in run("alarms", *conn, "ack", str(alarm_id))
    unreachable = runner.invoke(cli, ["devices", "--url", "http://127.0.0.1:1"])
    assert unreachable.exit_code == 1 and "cannot reach meterhub" in unreachable.output

    # tokens, on the hub's database directly
    data = ["--data-dir", str(api.hub.settings.data_dir)]
    token = run("token", "create", "ops", "--scope", "read", *data).strip().splitlines()[0]
    assert token.startswith("mh_")
    assert (
        httpx.get(f"{api.base}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).status_code
        == 200
    )
    listed = json.loads(run("token", "list", "--json", *data))
    assert [(t["name"], t["scope"], t["revoked"]) for t in listed] == [
        ("admin", "admin", False),
        ("ops", "read", False),
        ("reader", "read", False),
    ]
    assert "revoked" in run("token", "revoke", "ops", *data)
    assert (
        httpx.get(f"{api.base}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    dup = runner.invoke(cli, ["token", "create", "ops", "--scope", "admin", *data])
    assert dup.exit_code == 1 and "already exists" in dup.output


def test_cli_commands_take_real_units_and_raw_with_a_flag(api: Api) -> None:
    """``meterhub command D voltage_under 207`` sends 207 V (2070000 on the wire); ``--raw`` sends the
    wire form; a value the scale/step cannot represent is refused with the allowed values."""
    from click.testing import CliRunner

    from meterhub.cli_ops import cli

    gw = api.gateway()
    gw.sync("c-units")
    gw.status([("c-units", True)])
    gw.command_code = 0
    conn = ["--url", api.base, "--token", api.admin_token]
    runner = CliRunner()

    def sent(*args: str) -> Any:
        before = len(gw.commands)
        result = runner.invoke(cli, ["command", "c-units", *args, *conn], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ok: code 0"), result.output
        wait_for(lambda: len(gw.commands) > before)
        return gw.commands[-1]["param"]

    assert sent("voltage_under", "207") == {"id": "11", "value": 2070000}
    assert sent("voltage_under", "207.5 V") == {"id": "11", "value": 2075000}
    assert sent("leakage_warn_value", "30") == {"id": "13", "value": 300000}
    assert sent("voltage_under", "2070000", "--raw") == {"id": "11", "value": 2070000}
    assert sent("switch", "off") == {"id": "1", "value": False}
    bad = runner.invoke(cli, ["command", "c-units", "voltage_under", "207.00001", *conn])
    assert bad.exit_code == 2
    assert "not representable" in bad.output and "0 to 100000 V in steps of 0.0001 V" in bad.output
    wrong = runner.invoke(cli, ["command", "c-units", "voltage_under", "high", *conn])
    assert wrong.exit_code == 2 and "takes a number in V" in wrong.output
    assert runner.invoke(cli, ["command", "c-units", "switch", "maybe", *conn]).exit_code == 2


def test_a_gateways_last_seen_follows_its_messages_and_first_seen_is_kept(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]
) -> None:
    """A gateway reporting every 0.3 s: "last seen" moves with its messages (not its connect time),
    "first seen" is filled at its first connection and stays there across reconnections."""
    api = Api(hub_factory("protocol", presence_timeout=2.0), clients)
    try:
        gw = api.gateway("gw-seen")
        gw.sync("m-seen")

        def row() -> dict[str, Any]:
            return api.read.get("/api/v1/gateways/gw-seen").json()

        first = wait_for(lambda: row()["first_seen"])
        connected = row()["last_connected_at"]
        for _ in range(6):
            gw.status([("m-seen", True)])
            time.sleep(0.3)
        later = wait_for(lambda: (r := row())["last_seen"] > connected + 1.0 and r)
        assert later["first_seen"] == first and later["last_connected_at"] == connected
        gw.client.close()
        again = api.gateway("gw-seen")
        wait_for(lambda: row()["last_connected_at"] > connected)
        again.status([("m-seen", True)])
        assert row()["first_seen"] == first
    finally:
        api.close()


def test_every_cid_a_sync_accepts_is_addressable_in_the_api(api: Api) -> None:
    """A cid must work as one path segment of /api/v1/devices/{cid}: sync refuses (1101) a cid with
    '/', control characters, or that is '.' or '..'; every other cid works in every device path."""
    from urllib.parse import quote

    gw = api.gateway("gw-cids")
    refused = ["a/b", "/", "..", ".", "m\x00", "m\n", "m\x7f"]
    for cid in refused:
        answer = gw.ask("devices/sync", {"cid": cid, "product_id": "pid-meter"})
        assert answer["param"]["code"] == 1101, (cid, answer)
    odd = ["a..b", "...", "m 1", "a%2Fb", "a?b#c", "zähler-1", "a\\b", "😀", "a+b;c", "%", " x "]
    for cid in odd:
        gw.sync(cid)
        gw.report(cid, "5", 2300000)
    listed = {d["cid"] for d in api.read.get("/api/v1/devices", params={"limit": 100}).json()["items"]}
    assert listed == set(odd)
    for cid in odd:
        path = f"/api/v1/devices/{quote(cid, safe='')}"
        r = api.read.get(path)
        assert r.status_code == 200 and r.json()["cid"] == cid, (cid, r.text)
        for sub in ("/presence", "/history/5", "/commands", "/energy"):
            r = api.read.get(path + sub)
            assert r.status_code == 200, (cid, sub, r.text)
