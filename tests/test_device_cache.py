"""The bounded device cache: a node holds the devices of the gateways it serves, not the fleet.

A real hub on a database filled with SQL before it starts (devices synced "in an earlier run"),
real paho gateways over loopback.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from conftest import TEST_DB, RunningHub, drop_postgres, fresh_postgres_url, wait_for
from meterhub.core.service import VENDOR_REFUSED
from meterhub.protocol.errors import ErrorCode
from meterhub.storage import registry, schema
from meterhub.storage.database import create_db_engine, migrate
from test_protocol_e2e import Gateway, envelope

GATEWAYS = 200
PER_GATEWAY = 100  # 20,000 devices


def gw_name(i: int) -> str:
    return f"gw-{i:04d}"


def cid_of(i: int, j: int) -> str:
    return f"m-{i:04d}-{j:03d}"


def add_devices(engine: Any, vendor_id: int, gateways: range, per_gateway: int) -> None:
    now = time.time() - 3600
    rows = [
        {
            "cid": cid_of(i, j),
            "gateway_id": gw_name(i),
            "product_id": "pid-meter",
            "model": "smart-meter",
            "online": False,
            "first_seen": now,
            "last_seen": now,
            "synced_at": now,
            "vendor_id": vendor_id,
        }
        for i in gateways
        for j in range(per_gateway)
    ]
    with engine.begin() as conn:
        for k in range(0, len(rows), 5000):
            conn.execute(insert(schema.devices), rows[k : k + 5000])


@pytest.fixture
def fleet_db(tmp_path: Path):
    """A migrated database with two vendors and 20,000 devices of acme's 200 gateways."""
    url = fresh_postgres_url() if TEST_DB == "postgresql" else f"sqlite:///{tmp_path / 'fleet.db'}"
    engine = create_db_engine(url, sqlite_synchronous="NORMAL")
    migrate(engine)
    vendors = {name: registry.add_vendor(engine, name) for name in ("acme", "xeno")}
    add_devices(engine, vendors["acme"].id, range(GATEWAYS), PER_GATEWAY)
    engine.dispose()
    yield url, vendors
    if TEST_DB == "postgresql":
        drop_postgres(url)


@pytest.fixture
def start(fleet_db, hub_factory, clients):
    url, vendors = fleet_db

    def make(**overrides: Any) -> tuple[RunningHub, Any]:
        hub = hub_factory("protocol", database_url=url, presence_timeout=180.0, **overrides)

        def connect(gw: str, vendor: str = "acme") -> Gateway:
            c = clients(hub.port, gw, vendors[vendor].username)
            rc, _ = c.connect()
            assert rc == 0
            c.subscribe(f"gateway_id/{gw}/#", 1)
            return Gateway(c)

        return hub, connect

    return make


def cached(hub: RunningHub) -> dict[str, Any]:
    """The service's devices in memory: {cid: (gateway, online)}."""
    return hub.run(lambda: {c: (d.gateway_id, d.online) for c, d in hub.hub.handler.devices.items()})


def count(hub: RunningHub, sql: str, **params: Any) -> int:
    with hub.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def test_start_holds_no_devices_and_a_connecting_gateway_is_answered_at_once(start) -> None:
    hub, connect = start()
    assert count(hub, "select count(*) from devices") == GATEWAYS * PER_GATEWAY
    assert cached(hub) == {}  # nothing in memory for gateways that are not connected

    gw = connect(gw_name(7))  # synced in an earlier run: no sync now, a report at once
    answer = gw.report(cid_of(7, 3), "1", True)
    assert answer["param"]["code"] == 0
    assert count(hub, "select count(*) from reports where cid=:c", c=cid_of(7, 3)) == 1
    # its devices are loaded on connect, and only its devices
    wait_for(lambda: len(cached(hub)) == PER_GATEWAY)
    mem = cached(hub)
    assert set(mem) == {cid_of(7, j) for j in range(PER_GATEWAY)}
    assert mem[cid_of(7, 3)] == (gw_name(7), True)
    assert sum(online for _, online in mem.values()) == 1
    for j in (0, 50, 99):
        assert gw.report(cid_of(7, j), "1", False)["param"]["code"] == 0
    # another gateway's device stays a 2003 for this gateway, and is not a reason to cache more
    assert gw.report(cid_of(8, 0), "1", True)["param"]["code"] == ErrorCode.DEVICE_NOT_EXIST
    assert gw.report("never-synced", "1", True)["param"]["code"] == ErrorCode.DEVICE_NOT_EXIST


def test_evicted_devices_of_a_connected_gateway_still_work(start) -> None:
    hub, connect = start(device_cache_max=30)
    gw = connect(gw_name(3))
    wait_for(lambda: hub.run(lambda: hub.hub.handler.cache.lookups) >= 1)
    mem = cached(hub)
    assert 0 < len(mem) <= 30
    missing = [cid_of(3, j) for j in range(PER_GATEWAY) if cid_of(3, j) not in mem]
    assert len(missing) >= 70
    for cid in missing[:5]:
        assert gw.report(cid, "1", True)["param"]["code"] == 0
    assert count(hub, "select count(*) from reports where gateway_id=:g", g=gw_name(3)) == 5
    mem = cached(hub)
    assert all(mem[cid] == (gw_name(3), True) for cid in missing[:5])  # online: never evicted
    assert len(mem) <= 30
    # status for a device not in memory is applied too
    other = next(c for c in missing[5:] if c not in mem)
    gw.send("devices/status", envelope([{"cid": other, "status": True}]))
    wait_for(lambda: count(hub, "select count(*) from devices where cid=:c and online", c=other) == 1)
    # a command for a device only in the database is not "device not exist"
    result = hub.call(hub.hub.handler.send_command(missing[-1], "1", True, timeout=1))
    assert (result.status, result.code) == ("rejected", ErrorCode.DEVICE_OFFLINE)


def test_the_bound_holds_under_many_gateways(start) -> None:
    hub, connect = start(device_cache_max=150)
    gateways = {i: connect(gw_name(i)) for i in range(12)}  # 1,200 devices behind them
    sizes = []
    for i, gw in gateways.items():
        assert gw.report(cid_of(i, i), "1", True)["param"]["code"] == 0
        sizes.append(len(cached(hub)))
    wait_for(lambda: hub.run(lambda: not hub.hub.handler.cache._gateways))
    sizes.append(len(cached(hub)))
    assert max(sizes) <= 150
    mem = cached(hub)
    assert all(mem[cid_of(i, i)] == (gw_name(i), True) for i in gateways)
    assert hub.run(lambda: hub.hub.handler.cache.evicted) > 0
    assert count(hub, "select count(*) from devices where online") == len(gateways)


def test_another_vendor_cannot_take_a_device_that_is_only_in_the_database(start, fleet_db) -> None:
    hub, connect = start()
    acme = fleet_db[1]["acme"].id
    assert cid_of(5, 1) not in cached(hub)
    x = connect("gw-xeno", "xeno")
    rid = str(uuid.uuid4())
    refused = x.ask(
        "devices/sync", envelope({"cid": cid_of(5, 1), "product_id": "pid-meter"}, request_id=rid)
    )
    assert refused["param"] == {"cid": cid_of(5, 1), "msg": VENDOR_REFUSED, "code": 400}
    with hub.engine.connect() as conn:
        row = conn.execute(
            text("select gateway_id, vendor_id from devices where cid=:c"), {"c": cid_of(5, 1)}
        ).one()
    assert tuple(row) == (gw_name(5), acme)
    assert count(hub, "select count(*) from device_rebinds") == 0
    assert x.report(cid_of(5, 1), "1", True)["param"]["code"] == ErrorCode.DEVICE_NOT_EXIST
    # the owner's gateway syncs it as before (a known device: no rebind)
    a = connect(gw_name(5))
    assert a.sync(cid_of(5, 1))["param"]["code"] == 0
    assert count(hub, "select count(*) from device_rebinds") == 0


def test_a_device_stored_after_start_is_not_new_to_a_sync(start, fleet_db) -> None:
    """Written by someone else after this node started (another node, an import): not in memory."""
    hub, connect = start()
    acme = fleet_db[1]["acme"].id
    x = connect("gw-xeno", "xeno")
    add_devices(hub.engine, acme, range(900, 901), 1)
    refused = x.ask("devices/sync", envelope({"cid": cid_of(900, 0), "product_id": "pid-meter"}))
    assert refused["param"] == {"cid": cid_of(900, 0), "msg": VENDOR_REFUSED, "code": 400}
    assert count(hub, "select count(*) from devices where gateway_id='gw-xeno'") == 0


def test_a_stored_device_of_a_model_this_node_does_not_know_still_refuses_another_vendor(
    start, fleet_db
) -> None:
    """A stored device whose model name this node does not know: another vendor's gateway is still
    refused and the row is left as it was (the sync's batched lookup answers with the owner when the
    row cannot be loaded)."""
    hub, connect = start(default_model=None)
    acme = fleet_db[1]["acme"].id
    registry.add_product(hub.engine, "pid-meter", "smart-meter")
    with hub.engine.begin() as conn:
        conn.execute(text("update devices set model='no-such-model' where cid=:c"), {"c": cid_of(7, 3)})
    x = connect("gw-xeno", "xeno")
    refused = x.ask("devices/sync", envelope({"cid": cid_of(7, 3), "product_id": "pid-meter"}))
    assert refused["param"] == {"cid": cid_of(7, 3), "msg": VENDOR_REFUSED, "code": 400}
    with hub.engine.connect() as conn:
        row = conn.execute(
            text("select gateway_id, vendor_id, model from devices where cid=:c"), {"c": cid_of(7, 3)}
        ).one()
    assert tuple(row) == (gw_name(7), acme, "no-such-model")
