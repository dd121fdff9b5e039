"""A device belongs to its vendor: another vendor's gateway cannot take it; an operator can move it.

Real hub (MQTT + HTTP), real paho gateways, real HTTP (httpx) and the real CLI (subprocess).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conftest import TEST_DB, RunningHub, drop_postgres, fresh_postgres_url, make_settings, wait_for
from meterhub.api.security import create_token
from meterhub.core.service import VENDOR_REFUSED
from meterhub.storage import registry
from test_protocol_e2e import Gateway, envelope


def rows(hub: RunningHub, sql: str, **params: Any) -> list[Any]:
    with hub.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params).all()]


@pytest.fixture
def hub(hub_factory) -> RunningHub:
    return hub_factory("protocol", presence_timeout=180.0)


@pytest.fixture
def vendors(hub: RunningHub) -> dict[str, registry.Vendor]:
    return {name: registry.add_vendor(hub.engine, name) for name in ("acme", "xeno")}


@pytest.fixture
def connect(hub: RunningHub, clients, vendors):
    def make(gw: str, vendor: str) -> Gateway:
        c = clients(hub.port, gw, vendors[vendor].username)
        rc, _ = c.connect()
        assert rc == 0
        c.subscribe(f"gateway_id/{gw}/#", 1)
        return Gateway(c)

    return make


def online(hub: RunningHub, cid: str) -> bool:
    return bool(rows(hub, "select online from devices where cid=:c", c=cid)[0][0])


def test_another_vendors_gateway_cannot_take_a_device(hub: RunningHub, connect, vendors, clients) -> None:
    a = connect("gw-a", "acme")
    x = connect("gw-x", "xeno")
    assert a.sync("m1")["param"]["code"] == 0
    assert a.report("m1", "1", True)["param"]["code"] == 0
    wait_for(lambda: online(hub, "m1"))

    rid = str(uuid.uuid4())
    refused = x.ask("devices/sync", envelope({"cid": "m1", "product_id": "pid-meter"}, request_id=rid))
    assert refused["request_id"] == rid
    assert refused["param"] == {"cid": "m1", "msg": VENDOR_REFUSED, "code": 400}
    assert VENDOR_REFUSED.startswith("tedge error: ")
    # a QoS 1 redelivery of the refused sync gets the same answer
    again = x.ask("devices/sync", envelope({"cid": "m1", "product_id": "pid-meter"}, request_id=rid))
    assert again["param"]["code"] == 400
    assert x.report("m1", "1", True)["param"]["code"] == 2003

    # A is undisturbed: the device is still A's, online, and A's reports are accepted
    assert a.report("m1", "1", False)["param"]["code"] == 0
    assert rows(hub, "select gateway_id, vendor_id from devices where cid='m1'") == [
        ("gw-a", vendors["acme"].id)
    ]
    assert rows(hub, "select count(*) from device_rebinds") == [(0,)]
    assert online(hub, "m1")
    assert rows(hub, "select count(*) from reports where cid='m1' and gateway_id='gw-x'") == [(0,)]
    assert hub.run(lambda: hub.hub.handler.stats["devices.vendor_refused"]) == 2

    # a device X syncs first is X's; A cannot take that one either
    assert x.sync("m2")["param"]["code"] == 0
    assert a.sync("m2")["param"]["code"] == 400
    assert rows(hub, "select gateway_id, vendor_id from devices where cid='m2'") == [
        ("gw-x", vendors["xeno"].id)
    ]


def test_ownership_survives_a_restart(tmp_path, clients) -> None:
    overrides: dict[str, Any] = {}
    if TEST_DB == "postgresql":
        overrides["database_url"] = fresh_postgres_url()
    settings = make_settings(tmp_path / "data", **overrides)
    try:
        first = RunningHub(settings).start()
        try:
            acme = registry.add_vendor(first.engine, "acme")
            xeno = registry.add_vendor(first.engine, "xeno")
            c = clients(first.port, "gw-a", acme.username)
            assert c.connect()[0] == 0
            c.subscribe("gateway_id/gw-a/#", 1)
            assert Gateway(c).sync("m1")["param"]["code"] == 0
            c.close()
        finally:
            first.stop()
        second = RunningHub(settings).start()
        try:
            c = clients(second.port, "gw-x", xeno.username)
            assert c.connect()[0] == 0
            c.subscribe("gateway_id/gw-x/#", 1)
            assert Gateway(c).sync("m1")["param"]["code"] == 400
            assert rows(second, "select gateway_id from devices where cid='m1'") == [("gw-a",)]
        finally:
            second.stop()
    finally:
        if "database_url" in overrides:
            drop_postgres(overrides["database_url"])


def test_rebinding_within_a_vendor_is_allowed_and_recorded(hub: RunningHub, connect, vendors) -> None:
    a1 = connect("gw-a1", "acme")
    a2 = connect("gw-a2", "acme")
    assert a1.sync("m1")["param"]["code"] == 0
    assert a2.sync("m1")["param"]["code"] == 0
    assert rows(hub, "select gateway_id, vendor_id from devices where cid='m1'") == [
        ("gw-a2", vendors["acme"].id)
    ]
    assert rows(hub, "select old_gateway_id, new_gateway_id, cause from device_rebinds") == [
        ("gw-a1", "gw-a2", "sync")
    ]
    assert a1.report("m1", "1", True)["param"]["code"] == 2003
    assert a2.report("m1", "1", True)["param"]["code"] == 0


def _cli(hub: RunningHub, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{hub.hub.http_port}"
    return subprocess.run(
        [sys.executable, "-m", "meterhub", *args, "--url", url, "--token", token],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_operator_moves_a_device_to_another_vendors_gateway(hub: RunningHub, connect, vendors) -> None:
    a = connect("gw-a", "acme")
    x = connect("gw-x", "xeno")
    assert a.sync("m1")["param"]["code"] == 0
    assert a.report("m1", "1", True)["param"]["code"] == 0
    wait_for(lambda: online(hub, "m1"))
    admin, _ = create_token(hub.engine, "ops", "admin")
    reader, _ = create_token(hub.engine, "viewer", "read")
    base = f"http://127.0.0.1:{hub.hub.http_port}"

    def move(cid: str, gateway_id: Any, token: str = admin) -> httpx.Response:
        return httpx.post(
            f"{base}/api/v1/devices/{cid}/move",
            json={"gateway_id": gateway_id},
            headers={"Authorization": f"Bearer {token}"},
        )

    # operators' mistakes: clear 4xx, nothing changes
    r = move("m1", "gw-x", reader)
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    r = move("nope", "gw-x")
    assert r.status_code == 404 and r.json()["error"]["code"] == 2003
    r = move("m1", "gw-nowhere")
    assert r.status_code == 404 and "gw-nowhere" in r.json()["error"]["message"]
    registry.set_gateway(hub.engine, "gw-orphan")  # registered, but of no vendor
    r = move("m1", "gw-orphan")
    assert r.status_code == 409 and "no vendor" in r.json()["error"]["message"]
    r = move("m1", "")
    assert r.status_code == 422
    assert rows(hub, "select gateway_id from devices where cid='m1'") == [("gw-a",)]
    assert rows(hub, "select count(*) from device_rebinds") == [(0,)]

    r = move("m1", "gw-x")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "cid": "m1",
        "old_gateway_id": "gw-a",
        "gateway_id": "gw-x",
        "vendor": "xeno",
        "moved": True,
    }
    assert rows(hub, "select gateway_id, vendor_id from devices where cid='m1'") == [
        ("gw-x", vendors["xeno"].id)
    ]
    assert rows(hub, "select old_gateway_id, new_gateway_id, cause from device_rebinds") == [
        ("gw-a", "gw-x", "operator")
    ]
    # offline until the new gateway reports it
    assert rows(hub, "select online, cause from presence where cid='m1' order by id")[-1] == (0, "moved")
    assert not online(hub, "m1")
    # the in-memory state moved too: the old gateway is refused at once, the new one accepted
    assert a.report("m1", "1", False)["param"]["code"] == 2003
    assert a.sync("m1")["param"]["code"] == 400
    assert x.report("m1", "1", False)["param"]["code"] == 0
    wait_for(lambda: online(hub, "m1"))
    assert x.sync("m1")["param"]["code"] == 0
    # moving it where it is changes nothing
    r = move("m1", "gw-x")
    assert r.status_code == 200 and r.json()["moved"] is False
    assert rows(hub, "select count(*) from device_rebinds") == [(1,)]

    # the CLI does the same through the API
    out = _cli(hub, admin, "move", "m1", "gw-a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "m1 moved from gw-x to gw-a (vendor acme)"
    assert rows(hub, "select gateway_id, vendor_id from devices where cid='m1'") == [
        ("gw-a", vendors["acme"].id)
    ]
    assert a.report("m1", "1", True)["param"]["code"] == 0
    assert x.report("m1", "1", True)["param"]["code"] == 2003
    out = _cli(hub, admin, "move", "m1", "gw-nowhere")
    assert out.returncode == 1
    assert "HTTP 404" in out.stderr and "gw-nowhere" in out.stderr and "Traceback" not in out.stderr
    out = _cli(hub, reader, "move", "m1", "gw-x")
    assert out.returncode == 1 and "HTTP 403" in out.stderr


def test_the_move_endpoint_is_in_openapi(hub: RunningHub) -> None:
    spec = httpx.get(f"http://127.0.0.1:{hub.hub.http_port}/openapi.json").json()
    op = spec["paths"]["/api/v1/devices/{cid}/move"]["post"]
    assert {"200", "404", "409", "403"} <= set(op["responses"])
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("DeviceMoveIn")


def test_migration_gives_existing_devices_their_gateways_vendor(tmp_path) -> None:
    from alembic import command
    from alembic.config import Config

    from meterhub.storage.database import MIGRATIONS_DIR, create_db_engine, migrate

    engine = create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            text(
                "insert into vendors (id, name, username, enabled, allowlist_enabled, created_at) "
                "values (7, 'old', 'mh_old', 1, 0, :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "insert into gateways (gateway_id, vendor_id, enabled, allowed, connected) values "
                "('gw-1', 7, 1, 0, 0), ('gw-2', null, 1, 0, 0)"
            )
        )
        for cid, gw in (("d1", "gw-1"), ("d2", "gw-2"), ("d3", "gw-gone")):
            conn.execute(
                text(
                    "insert into devices (cid, gateway_id, product_id, model, online, first_seen, "
                    "last_seen, synced_at, device_name) "
                    "values (:c, :g, 'p', 'smart-meter', 0, :t, :t, :t, :c)"
                ),
                {"c": cid, "g": gw, "t": now},
            )
        conn.execute(
            text(
                "insert into device_rebinds (cid, old_gateway_id, new_gateway_id, at) "
                "values ('d1', 'x', 'gw-1', :t)"
            ),
            {"t": now},
        )
    migrate(engine)
    with engine.connect() as conn:
        got = conn.execute(
            text("select cid, gateway_id, vendor_id, device_name from devices order by cid")
        ).all()
        rebinds = conn.execute(text("select cid, cause from device_rebinds")).all()
    engine.dispose()
    assert [tuple(r) for r in got] == [
        ("d1", "gw-1", 7, "d1"),
        ("d2", "gw-2", None, "d2"),
        ("d3", "gw-gone", None, "d3"),
    ]
    assert [tuple(r) for r in rebinds] == [("d1", "sync")]
