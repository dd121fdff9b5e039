"""Open hub: signed HTTP API, expiring link credentials, encrypted fan-out, Tuya's own SDK unchanged."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

import mqttraw
from conftest import RunningHub, close_paho, refuse_marked_reports, wait_for
from meterhub.config import load_settings
from meterhub.model.loader import builtin_model
from meterhub.openhub import crypto, http, store
from meterhub.openhub.client import OpenHubClient, OpenHubClientError, decode_message
from meterhub.storage import registry

REPO = Path(__file__).resolve().parent.parent
TUYA_VENV = Path(os.environ.get("METERHUB_TUYA_VENV", REPO / ".cache" / "tuya-venv"))


@pytest.fixture
def hub(hub_factory) -> RunningHub:
    return hub_factory("protocol", http_port=0, ws_port=0)


class World:
    """A hub with an application, two users, their meters and a gateway reporting for them."""

    def __init__(self, hub: RunningHub, clients: Any) -> None:
        self.hub = hub
        engine = hub.engine
        self.app = store.create_app(engine, "energy-app")
        self.alice = store.add_user(engine, "alice", "alice-pw")
        self.bob = store.add_user(engine, "bob", "bob-pw")
        store.bind(engine, self.alice, "meter-a")
        store.bind(engine, self.bob, "meter-b")
        hub.call(hub.hub.openhub.fanout.refresh_bindings())
        vendor = registry.add_vendor(engine, "acme")
        self.gw = clients(hub.port, "gw-oh", vendor.username)
        assert self.gw.connect()[0] == 0
        self.gw.subscribe("gateway_id/gw-oh/#")
        for cid in ("meter-a", "meter-b"):
            self.gateway_send("devices/sync", {"cid": cid, "product_id": "pk-meter", "device_name": cid})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.hub.http_port}"

    def client(self) -> OpenHubClient:
        return OpenHubClient(self.endpoint, self.app.access_id, self.app.secret)

    def gateway_send(self, kind: str, param: Any, expect_answer: bool = True) -> None:
        msg = {"t": int(time.time()), "request_id": str(uuid.uuid4()), "param": param}
        self.gw.publish(f"gateway_id/gw-oh/{kind}", json.dumps(msg))
        if expect_answer:
            answer = json.loads(self.gw.get().payload)
            assert answer["param"]["code"] == 0, answer

    def report(self, cid: str, dp: str, value: Any) -> None:
        self.gateway_send("properties/report", {"cid": cid, "id": dp, "value": value})

    def online(self, cid: str, status: bool = True) -> None:
        self.gateway_send("devices/status", [{"cid": cid, "status": status}], expect_answer=False)

    def links_of(self, uid: str) -> int:
        return self.hub.run(lambda: len(self.hub.hub.openhub.fanout.links.get(uid, {})))


@pytest.fixture
def world(hub: RunningHub, clients) -> World:
    return World(hub, clients)


def subscriber(
    world: World, uid: str, link_type: str = "mqtt", version: str = "2.0", link_id: str | None = None
) -> tuple[mqtt.Client, queue.Queue[Any], dict[str, Any]]:
    """A paho client on a link's credentials, subscribed to its source topic."""
    api = world.client()
    api.project_login()
    cfg = api.config(uid, link_id or f"link-{uuid.uuid4().hex[:6]}", link_type, version)
    url = cfg["url"]
    transport = "websockets" if url.startswith("ws") else "tcp"
    got: queue.Queue[Any] = queue.Queue()
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=cfg["client_id"],
        transport=transport,
        protocol=mqtt.MQTTv311,
    )
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    c.username_pw_set(cfg["username"], cfg["password"])
    subacks: queue.Queue[Any] = queue.Queue()
    c.on_message = lambda _c, _u, m: got.put(m)
    c.on_subscribe = lambda _c, _u, _m, rcs, _p: subacks.put(rcs)
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    c.connect(host, int(port))
    c.loop_start()
    c.subscribe(cfg["source_topic"]["device"], 1)
    assert subacks.get(timeout=5)[0].value == 1
    wait_for(lambda: world.links_of(uid) >= 1)
    return c, got, cfg


def next_event(got: queue.Queue[Any], cfg: dict[str, Any], version: str = "2.0") -> dict[str, Any]:
    msg = got.get(timeout=5)
    return decode_message(msg.payload, crypto.key_from_password(cfg["password"]), version)


# --- crypto --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_crypto_round_trip_and_tamper(version: str) -> None:
    key = crypto.key_from_password("abcdefgh0123456789ABCDEFxyz")
    assert key == b"0123456789ABCDEF"
    data = crypto.encrypt(version, key, b'{"hello": "meter"}', 1700000000123)
    assert crypto.decrypt(version, key, data, 1700000000123) == b'{"hello": "meter"}'
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt(version, b"X" * 16, data, 1700000000123)
    if version == "2.0":  # the time is authenticated
        with pytest.raises(crypto.DecryptError):
            crypto.decrypt(version, key, data, 1700000000124)
        raw = __import__("base64").b64decode(data)
        assert int.from_bytes(raw[:4], "big") == 12 and len(raw) == 4 + 12 + len(b'{"hello": "meter"}') + 16


# --- events over MQTT and WebSocket --------------------------------------------------------------


@pytest.mark.parametrize("link_type", ["mqtt", "websocket"])
def test_link_receives_encrypted_reports_and_presence(world: World, link_type: str) -> None:
    c, got, cfg = subscriber(world, world.alice, link_type)
    if link_type == "websocket":
        assert cfg["url"].startswith("ws://127.0.0.1:") and cfg["url"].endswith("/mqtt")
    else:
        assert cfg["url"] == f"tcp://127.0.0.1:{world.hub.port}"
    world.online("meter-a")
    event = next_event(got, cfg)
    assert event["protocol"] == 20
    assert event["data"]["devId"] == "meter-a" and event["data"]["bizCode"] == "online"
    assert event["data"]["productKey"] == "pk-meter" and event["data"]["bizData"]["devId"] == "meter-a"
    world.report("meter-a", "5", 2301234)
    event = next_event(got, cfg)
    assert event["protocol"] == 4
    data = event["data"]
    assert (data["devId"], data["productKey"]) == ("meter-a", "pk-meter")
    status = data["status"][0]
    assert status["code"] == "voltage_current" and status["value"] == 2301234 and status["5"] == 2301234
    assert abs(status["t"] / 1000 - time.time()) < 10
    close_paho(c)


def test_a_report_the_database_refuses_is_never_an_event(world: World) -> None:
    """Applications hear of a report only once it is stored: one the database refuses (here a
    constraint on its request_id, the database's own refusal) is answered 500 and reaches no link."""
    refuse_marked_reports(world.hub.engine)
    c, got, cfg = subscriber(world, world.alice)
    world.online("meter-a")
    assert next_event(got, cfg)["data"]["bizCode"] == "online"
    refused = {
        "t": int(time.time()),
        "request_id": "poison-1",
        "param": {"cid": "meter-a", "id": "5", "value": 1111},
    }
    world.gw.publish("gateway_id/gw-oh/properties/report", json.dumps(refused))
    answer = json.loads(world.gw.get().payload)
    assert (answer["request_id"], answer["param"]["code"]) == ("poison-1", 500), answer
    world.report("meter-a", "5", 2222)
    event = next_event(got, cfg)
    assert event["protocol"] == 4 and event["data"]["status"][0]["value"] == 2222
    time.sleep(0.3)
    assert got.empty()
    close_paho(c)


def test_users_only_see_their_own_devices(world: World) -> None:
    ca, got_a, cfg_a = subscriber(world, world.alice)
    cb, got_b, cfg_b = subscriber(world, world.bob)
    world.report("meter-b", "1", True)  # bob's meter (goes online too)
    world.report("meter-a", "1", False)
    seen_a = [next_event(got_a, cfg_a)["data"]["devId"] for _ in range(2)]
    assert seen_a == ["meter-a", "meter-a"]  # online event + report, never meter-b
    seen_b = [next_event(got_b, cfg_b)["data"]["devId"] for _ in range(2)]
    assert seen_b == ["meter-b", "meter-b"]
    with pytest.raises(queue.Empty):
        got_a.get(timeout=0.5)
    # bob's key does not open alice's messages
    world.report("meter-a", "1", True)
    msg = got_a.get(timeout=5)
    with pytest.raises(crypto.DecryptError):
        decode_message(msg.payload, crypto.key_from_password(cfg_b["password"]), "2.0")
    for c in (ca, cb):
        close_paho(c)


def test_acl_other_topics_and_sink_refused(world: World) -> None:
    c, _got, cfg = subscriber(world, world.alice)
    subacks: queue.Queue[Any] = queue.Queue()
    c.on_subscribe = lambda _c, _u, _m, rcs, _p: subacks.put(rcs)
    c.subscribe("openhub/in/#", 1)
    assert subacks.get(timeout=5)[0].value == 0x80
    c.subscribe("gateway_id/gw-oh/#", 1)
    assert subacks.get(timeout=5)[0].value == 0x80
    info = c.publish(cfg["sink_topic"]["device"], b'{"cmd": 1}', 1)
    info.wait_for_publish(5)
    wait_for(lambda: world.hub.stats["rejected.publish_acl"] >= 1)
    close_paho(c)


def test_name_update_event(world: World) -> None:
    c, got, cfg = subscriber(world, world.alice)
    world.gateway_send("devices/sync", {"cid": "meter-a", "product_id": "pk-meter", "device_name": "Kitchen"})
    event = next_event(got, cfg)
    assert event["protocol"] == 20 and event["data"]["bizCode"] == "nameUpdate"
    assert event["data"]["bizData"]["name"] == "Kitchen"
    close_paho(c)


# --- credentials ---------------------------------------------------------------------------------


def test_expiry_closes_and_renewal_takes_over(world: World) -> None:
    hub = world.hub
    api = world.client()
    api.project_login()
    # credentials issued 7197 s ago with the default 7200 s validity: 3 s left
    ttl = int(hub.settings.openhub_link_ttl)
    link = store.issue_link(
        hub.engine, world.alice, "renewing-link", "mqtt", "2.0", ttl, time.time() - ttl + 3
    )
    cfg = {"client_id": link.client_id, "username": link.username, "password": link.password}
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect(cfg["client_id"], cfg["username"], cfg["password"]))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    closed = raw.closed_within(6)
    assert closed is not None, "connection outlived its credentials"
    assert hub.stats["closed.expired"] == 1
    # the expired password is refused with 0x05: Tuya's SDK then asks for a new configuration
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect(cfg["client_id"], cfg["username"], cfg["password"]))
    assert raw.read_packet() == (0x20, b"\x00\x05")
    # a new configuration: new password, same client id; a second connection takes over the first
    cfg2 = api.config(world.alice, "renewing-link")
    assert cfg2["client_id"] == cfg["client_id"] and cfg2["password"] != cfg["password"]
    assert ttl - 5 <= cfg2["expire_time"] <= ttl
    first = mqttraw.RawClient(hub.port)
    first.send(mqttraw.connect(cfg2["client_id"], cfg2["username"], cfg2["password"]))
    assert first.read_packet() == (0x20, b"\x00\x00")
    second = mqttraw.RawClient(hub.port)
    second.send(mqttraw.connect(cfg2["client_id"], cfg2["username"], cfg2["password"]))
    assert second.read_packet() == (0x20, b"\x00\x00")
    assert first.closed_within(2) is not None
    wrong = mqttraw.RawClient(hub.port)
    wrong.send(mqttraw.connect(cfg2["client_id"], cfg2["username"], "x" * 32))
    assert wrong.read_packet() == (0x20, b"\x00\x04")


def test_link_ttl_below_what_tuyas_sdk_needs_is_refused() -> None:
    """tuya-iot-py-sdk sleeps expire_time - 60 s before renewing: shorter credentials kill its thread."""
    with pytest.raises(ValidationError, match="openhub_link_ttl"):
        load_settings(openhub_link_ttl=100)
    assert load_settings(openhub_link_ttl=store.LINK_MIN_EXPIRE).openhub_link_ttl == 300


def test_config_near_expiry_gives_fresh_credentials_the_sdk_can_live_with(hub_factory, clients) -> None:
    hub = hub_factory("protocol", http_port=0, openhub_link_ttl=400)
    world = World(hub, clients)
    api = world.client()
    api.project_login()
    now = time.time()
    # 250 s left: more than half of 400, but under the 300 s the SDK is always given -> a fresh one
    old = store.issue_link(hub.engine, world.alice, "near-expiry", "mqtt", "2.0", 400, now - 150)
    cfg = api.config(world.alice, "near-expiry")
    assert cfg["password"] != old.password and cfg["client_id"] == old.client_id
    assert 395 <= cfg["expire_time"] <= 400
    # 320 s left: kept (more than half and more than 300 s)
    kept = store.issue_link(hub.engine, world.alice, "kept", "mqtt", "2.0", 400, now - 80)
    cfg = api.config(world.alice, "kept")
    assert cfg["password"] == kept.password and 300 <= cfg["expire_time"] <= 320
    # every answer leaves the SDK's renewal thread a positive sleep of minutes
    assert min(api.config(world.alice, f"l{i}")["expire_time"] for i in range(3)) - 60 >= 240


def test_password_is_stable_within_validity(world: World) -> None:
    api = world.client()
    api.project_login()
    a = api.config(world.alice, "stable")
    b = api.config(world.alice, "stable")
    other = api.config(world.alice, "another-link")
    assert a["password"] == b["password"] and a["client_id"] == b["client_id"]
    assert other["client_id"] != a["client_id"]
    assert a["sink_topic"] == {"device": f"openhub/out/{a['client_id']}"}


def test_signature_token_and_permission_errors(world: World) -> None:
    api = world.client()
    bad = OpenHubClient(world.endpoint, world.app.access_id, "not-the-secret")
    with pytest.raises(OpenHubClientError) as err:
        bad.project_login()
    assert err.value.code == 1004
    unknown = OpenHubClient(world.endpoint, "nobody", "x")
    with pytest.raises(OpenHubClientError) as err:
        unknown.project_login()
    assert err.value.code == 1005
    # a user token can only ask for its own uid
    uid = api.user_login("alice", "alice-pw")
    assert uid == world.alice
    with pytest.raises(OpenHubClientError) as err:
        api.config(world.bob, "x")
    assert err.value.code == 1106
    with pytest.raises(OpenHubClientError) as err:
        api.user_login("alice", "wrong")
    assert err.value.code == 1106
    # an expired token: 1010, which makes Tuya's SDK log in again
    expired = store.issue_token(world.hub.engine, world.app.access_id, world.alice, 60, now=time.time() - 120)
    api.access_token = expired.access_token
    with pytest.raises(OpenHubClientError) as err:
        api.config(world.alice, "x")
    assert err.value.code == 1010
    api.access_token = "garbage"
    with pytest.raises(OpenHubClientError) as err:
        api.config(world.alice, "x")
    assert err.value.code == 1011
    # the document's action answers with topics as strings
    api.project_login()
    result = api.request(
        "POST",
        "/v1.0/open-hub/action",
        {"action": "device.openHubConfig", "uid": world.alice, "link_id": "doc"},
    )
    assert isinstance(result["source_topic"], str) and result["url"].startswith("tcp://")


# --- replayed requests ---------------------------------------------------------------------------


def signed_post(
    endpoint: str, app: store.App, token: str, path: str, body: dict[str, Any], nonce: str | None = None
) -> tuple[dict[str, str], bytes]:
    """Headers and body of one signed POST, built by hand the way tuya-iot-py-sdk 0.6.6 does."""
    data = json.dumps(body).encode()
    t = str(int(time.time() * 1000))
    to_sign = http.string_to_sign("POST", path, [], data)
    headers = {
        "client_id": app.access_id,
        "sign": http.make_sign(app.secret, app.access_id, token, t, to_sign, nonce or ""),
        "sign_method": "HMAC-SHA256",
        "access_token": token,
        "t": t,
        "Content-Type": "application/json",
    }
    if nonce is not None:
        headers["nonce"] = nonce
    return headers, data


def test_replayed_config_call_is_refused_with_tuyas_error(world: World) -> None:
    api = world.client()
    api.user_login("alice", "alice-pw")
    path = "/v1.0/iot-03/open-hub/access-config"
    body = {"uid": world.alice, "link_id": "replayed", "link_type": "mqtt", "msg_encrypted_version": "2.0"}
    headers, data = signed_post(world.endpoint, world.app, api.access_token, path, body)
    with httpx.Client(base_url=world.endpoint) as h:
        first = h.post(path, content=data, headers=headers)
        assert first.status_code == 200 and first.json()["success"] is True
        assert len(first.json()["result"]["password"]) == 32
        again = h.post(path, content=data, headers=headers)  # the same bytes, seconds later
        assert again.status_code == 200
        answer = again.json()
        assert answer["success"] is False and "result" not in answer
        assert (answer["code"], answer["msg"]) == (1113, "do not repeat the operation in a short time")
        # a nonce is single-use too, even under a new signature (new t)
        time.sleep(0.002)
        headers, data = signed_post(world.endpoint, world.app, api.access_token, path, body, nonce="n-1")
        assert h.post(path, content=data, headers=headers).json()["success"] is True
        time.sleep(0.002)
        headers2, data = signed_post(world.endpoint, world.app, api.access_token, path, body, nonce="n-1")
        assert headers2["sign"] != headers["sign"]
        assert h.post(path, content=data, headers=headers2).json()["code"] == 1113
        # the nonce is part of the signature: changing it alone breaks the signature
        headers2["nonce"] = "n-2"
        assert h.post(path, content=data, headers=headers2).json()["code"] == 1004
    # a fresh signature for the same call is fine (what every SDK call does)
    assert (
        api.config(world.alice, "replayed", version="2.0")["password"] == first.json()["result"]["password"]
    )


def test_replay_sent_to_another_node_is_refused(shared_postgres: str, hub_factory) -> None:
    """Two nodes on one PostgreSQL database (only there do nodes share a database: an embedded
    SQLite database is locked to one server): a request accepted by one is refused by the other."""
    first_node = hub_factory("protocol", http_port=0, database_url=shared_postgres)
    other = hub_factory("protocol", http_port=0, database_url=shared_postgres)
    app = store.create_app(first_node.engine, "energy-app")
    path = "/v1.0/token"
    headers = signed_get_headers(app, path, [("grant_type", "1")])
    endpoint = f"http://127.0.0.1:{first_node.hub.http_port}"
    first = httpx.get(endpoint + path, params={"grant_type": "1"}, headers=headers).json()
    assert first["success"] is True and first["result"]["access_token"]
    other_endpoint = f"http://127.0.0.1:{other.hub.http_port}"
    replay = httpx.get(other_endpoint + path, params={"grant_type": "1"}, headers=headers).json()
    assert (replay["success"], replay["code"]) == (False, 1113)
    assert other.run(lambda: other.hub.openhub.replay.stats["replay.refused"]) == 1
    assert first_node.run(lambda: first_node.hub.openhub.replay.stats["replay.refused"]) == 0


def test_seen_requests_expire_and_are_purged_in_bounded_batches(world: World) -> None:
    engine = world.hub.engine
    now = time.time()
    for i in range(25):
        assert store.remember_request(engine, [store.seen_key("sign", "app", f"s{i}")], now - 100 + i)
    assert not store.remember_request(engine, [store.seen_key("sign", "app", "s3")], now + 600)
    keep = store.seen_key("sign", "app", "live")
    assert store.remember_request(engine, [keep], now + 600)
    assert store.purge_seen_requests(engine, now, limit=10) == 10
    assert store.purge_seen_requests(engine, now, limit=10) == 10
    assert store.purge_seen_requests(engine, now, limit=10) == 5
    assert store.purge_seen_requests(engine, now, limit=10) == 0
    assert not store.remember_request(engine, [keep], now + 600)  # the live one stays
    assert store.remember_request(engine, [store.seen_key("sign", "app", "s3")], now + 600)  # purged


def signed_get_headers(app: store.App, path: str, query: list[tuple[str, str]]) -> dict[str, str]:
    """Headers of a signed token call (no access token), built by hand like the SDK's."""
    t = str(int(time.time() * 1000))
    to_sign = http.string_to_sign("GET", path, query, b"")
    sign = http.make_sign(app.secret, app.access_id, "", t, to_sign)
    return {"client_id": app.access_id, "sign": sign, "sign_method": "HMAC-SHA256", "t": t}


def test_storage_failure_answers_in_tuyas_shape(world: World) -> None:
    """If the seen-requests table cannot be written, the request fails (never accepted unrecorded)
    with Tuya's 500 shape, HTTP 200, rather than a bare HTTP 500."""
    from sqlalchemy import text

    with world.hub.engine.begin() as conn:
        conn.execute(text("DROP TABLE openhub_seen_requests"))
    headers = signed_get_headers(world.app, "/v1.0/token", [("grant_type", "1")])
    response = httpx.get(world.endpoint + "/v1.0/token", params={"grant_type": "1"}, headers=headers)
    assert response.status_code == 200
    answer = response.json()
    assert (answer["success"], answer["code"]) == (False, 500) and "result" not in answer


def test_stalled_subscriber_does_not_block_reports(hub_factory, clients) -> None:
    hub = hub_factory(
        "protocol", http_port=0, max_queued=50, write_buffer_high=32 * 1024, slow_client_timeout=1.0
    )
    world = World(hub, clients)
    api = world.client()
    api.project_login()
    cfg = api.config(world.alice, "stalled")
    raw = mqttraw.RawClient(hub.port)
    raw.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    raw.send(mqttraw.connect(cfg["client_id"], cfg["username"], cfg["password"]))
    assert raw.read_packet()[0] == 0x20
    raw.send(mqttraw.subscribe(1, cfg["source_topic"]["device"], 1))
    assert raw.read_packet()[0] == 0x90
    wait_for(lambda: world.links_of(world.alice) == 1)
    # Flood the link with 20,000 events (about 10 MB) while the subscriber reads nothing...
    fanout = hub.hub.openhub.fanout
    dp = builtin_model().get("2")  # breaker_id, a string: make each message large
    event = {"cid": "meter-a", "dp": dp, "value": "x" * 255, "t": time.time(), "product_id": "pk"}
    hub.run(lambda: [fanout.on_event("report", event) for _ in range(20_000)])
    # ...reports are still answered and the subscriber's queue stays bounded.
    for i in range(50):
        world.report("meter-a", "5", 2300000 + i)
    queued, inflight = hub.run(
        lambda: (
            len(hub.hub.mqtt.sessions[cfg["client_id"]].queue or ()),
            len(hub.hub.mqtt.sessions[cfg["client_id"]].inflight),
        )
    )
    assert queued <= 50 and inflight <= 32  # bounded: the never-acknowledging subscriber loses the oldest
    assert hub.stats["publish.out_dropped_queue_full"] >= 19_000
    assert hub.run(lambda: fanout.stats["fanout.sent.protocol4"]) == 20_050
    raw.close()


# --- Tuya's own SDK ------------------------------------------------------------------------------


def tuya_python() -> Path:
    """A virtualenv with tuya-iot-py-sdk 0.6.6 and paho-mqtt < 2 (the SDK needs the 1.x API)."""
    python = TUYA_VENV / "bin" / "python"
    marker = TUYA_VENV / ".ready"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TUYA_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "tuya-iot-py-sdk==0.6.6", "paho-mqtt<2"], check=True
        )
        marker.touch()
    return python


@pytest.mark.parametrize("auth", ["custom", "smart_home"])
def test_tuya_sdk_unchanged(world: World, auth: str) -> None:
    python = tuya_python()
    proc = subprocess.Popen(
        [
            str(python),
            str(REPO / "tests" / "tuya" / "sdk_listener.py"),
            world.endpoint,
            world.app.access_id,
            world.app.secret,
            "alice",
            "alice-pw",
            auth,
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        login = json.loads(proc.stdout.readline())["login"]
        assert login["success"] is True and login["result"]["uid"] == world.alice, login
        wait_for(lambda: world.links_of(world.alice) == 1, timeout=10)
        world.online("meter-a")
        world.report("meter-a", "44", 123456)
        world.report("meter-b", "44", 1)  # bob's: must not arrive
        messages = [json.loads(proc.stdout.readline()) for _ in range(2)]
    finally:
        proc.kill()
        proc.wait(5)
    by_protocol = {m["protocol"]: m for m in messages}
    assert set(by_protocol) == {4, 20}
    assert by_protocol[20]["data"]["bizCode"] == "online" and by_protocol[20]["data"]["devId"] == "meter-a"
    status = by_protocol[4]["data"]["status"][0]
    assert by_protocol[4]["data"]["devId"] == "meter-a"
    assert (status["code"], status["value"], status["44"]) == ("electric_total", 123456, 123456)


# --- operator API and the tail command -----------------------------------------------------------


def test_users_api_binding_and_tail_command(world: World) -> None:
    import httpx

    from meterhub.api.security import create_token

    token, _ = create_token(world.hub.engine, "ops", "admin")
    http = httpx.Client(base_url=world.endpoint, headers={"Authorization": f"Bearer {token}"})
    carol = http.post("/api/v1/users", json={"username": "carol", "password": "pw"})
    assert carol.status_code == 201 and carol.json()["devices"] == []
    uid = carol.json()["uid"]
    assert http.put(f"/api/v1/users/{uid}/devices/meter-b").status_code == 204
    assert http.put("/api/v1/users/nobody/devices/meter-b").status_code == 404
    users = {u["username"]: u for u in http.get("/api/v1/users").json()}
    assert users["carol"]["devices"] == ["meter-b"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterhub", "tail", "--uid", uid, "--url", world.endpoint, "--count", "2"],
        env={**os.environ, "METERHUB_ACCESS_ID": world.app.access_id, "METERHUB_SECRET": world.app.secret},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: world.links_of(uid) == 1, timeout=10)
        world.report("meter-a", "1", True)  # not carol's
        world.report("meter-b", "1", True)  # online (20) + report (4)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["protocol"], e["data"]["devId"]) for e in events] == [(20, "meter-b"), (4, "meter-b")], err
    assert http.delete(f"/api/v1/users/{uid}/devices/meter-b").status_code == 204
    assert http.delete(f"/api/v1/users/{uid}/devices/meter-b").status_code == 404
