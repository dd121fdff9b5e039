"""The gateway SDK against a real meterhub (MQTT server, protocol service, SQLite) over loopback.

Each test runs the SDK in its own asyncio loop (``asyncio.run``) while the hub runs in its background
thread; calls into the hub that wait for the SDK go through ``asyncio.to_thread`` so the SDK's loop
keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from conftest import RunningHub, free_port, wait_for
from meterhub.model import builtin_model
from meterhub.protocol.messages import encode_response
from meterhub.protocol.topics import commands_topic
from meterhub.sdk import (
    Gateway,
    GatewayConnectError,
    InvalidValue,
    ReportDropped,
    gateway_password,
    to_real,
    to_wire,
)
from meterhub.storage import registry
from meterhub.tools.devcert import make_dev_cert
from meterhub.transport import Principal, Southbound

MODEL = builtin_model("smart-meter")


@pytest.fixture
def hub(hub_factory: Callable[..., RunningHub]) -> RunningHub:
    return hub_factory("protocol", presence_timeout=1.0)


@pytest.fixture
def username(hub: RunningHub) -> str:
    return registry.add_vendor(hub.engine, "sdk-vendor").username


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def make_gateway(hub: RunningHub, username: str, gw_id: str = "sdk-gw", **kw: Any) -> Gateway:
    kw.setdefault("reconnect_base", 0.05)
    kw.setdefault("reconnect_cap", 0.3)
    kw.setdefault("response_timeout", 5.0)
    return Gateway("127.0.0.1", hub.port, gw_id, username, **kw)


def rows(hub: RunningHub, sql: str, **params: Any) -> list[Any]:
    with hub.engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def latest(hub: RunningHub, cid: str) -> dict[str, tuple[Any, Any]]:
    found = rows(hub, "SELECT dp_id, value, num FROM latest_values WHERE cid = :cid", cid=cid)
    return {r.dp_id: (json.loads(r.value), r.num) for r in found}


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


# --- values: pure conversions --------------------------------------------------------------------


def test_real_values_to_wire_and_back() -> None:
    dp = MODEL.by_code
    assert to_wire(dp("voltage_current"), 230.1) == 2301000
    assert to_wire(dp("voltage_current"), 230) == 2300000
    assert to_wire(dp("cur_current"), 5123.4) == 51234000  # the document's unit is mA
    assert to_wire(dp("temp_current"), 36.55) == 3655  # scale 2
    assert to_wire(dp("switch_times"), 7) == 7  # scale 0
    assert to_wire(dp("switch"), False) is False
    assert to_wire(dp("alarm_level"), "serious") == "serious"
    assert to_wire(dp("fault"), ["ov_vol", "short_circuit_alarm"]) == 0b1001
    assert to_wire(dp("fault"), []) == 0
    assert to_wire(dp("breaker_id"), "BRK-1") == "BRK-1"
    phase = {"voltage": 218.7, "current": 11.203, "power": 2410}
    assert to_wire(dp("phase_a"), phase) == "CIsAK8MACWo="  # CLARIFICATIONS.md's own example
    assert to_wire(dp("phase_a"), phase, phase_encoding="object") == {
        "voltage": 218.7,
        "current": 11.203,
        "power": 2410.0,
    }
    assert to_wire(dp("phase_a"), base64.b64decode("CIsAK8MACWo=")) == "CIsAK8MACWo="
    assert to_wire(dp("voltage_current"), "2301000", raw=True) == "2301000"
    assert to_real(dp("voltage_current"), 2301000) == 230.1
    assert to_real(dp("switch_times"), 3) == 3
    assert to_real(dp("fault"), ["ov_vol"]) == ["ov_vol"]


@pytest.mark.parametrize(
    ("dp", "value", "code"),
    [
        ("voltage_current", -1.0, 1101),
        ("voltage_current", 100_001.0, 1101),
        ("voltage_current", "230", 1103),
        ("voltage_current", True, 1103),
        ("voltage_current", float("nan"), 1101),
        ("switch", "yes", 1103),
        ("alarm_level", "catastrophic", 1101),
        ("fault", ["not_a_fault"], 1101),
        ("fault", 1 << 14, 1101),
        ("phase_a", {"voltage": 230.0, "current": 1.0}, 1101),
        ("phase_a", {"voltage": 7000.0, "current": 1.0, "power": 1.0}, 1101),  # > 2 bytes of 0.1 V
        ("phase_a", b"\x00" * 7, 1101),
        ("phase_a", 12, 1103),
        ("breaker_id", "x" * 256, 1101),
        ("no_such_dp", 1, 2002),
        (99, 1, 2002),
    ],
)
def test_values_the_server_would_refuse_raise_locally(dp: Any, value: Any, code: int) -> None:
    gw = Gateway("127.0.0.1", 1, "gw-local", "user")
    with pytest.raises(InvalidValue) as info:
        gw.report_nowait("meter-1", dp, value)
    assert info.value.code == code
    assert isinstance(info.value, ValueError)
    assert gw.buffered == 0  # nothing queued


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="gateway_id"):
        Gateway("127.0.0.1", 1, "gw/with/slash", "user")
    with pytest.raises(ValueError, match="username"):
        Gateway("127.0.0.1", 1, "gw", "")
    gw = Gateway("127.0.0.1", 1, "gw", "user")
    with pytest.raises(ValueError, match="future"):
        gw.report_nowait("m", "switch", True, t=time.time() + 3600)
    with pytest.raises(ValueError, match="30 days"):
        gw.report_nowait("m", "switch", True, t=time.time() - 31 * 86400)
    assert gateway_password("gw", "user") == hashlib.md5(b"gwuser").hexdigest()


def test_sdk_does_not_import_the_server() -> None:
    code = (
        "import sys, meterhub.sdk\n"
        "bad = {'sqlalchemy', 'pydantic', 'pydantic_settings', 'structlog', 'alembic', 'uvloop'}\n"
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- against a real server -------------------------------------------------------------------------


def test_sync_and_typed_reports_are_stored_scaled(hub: RunningHub, username: str) -> None:
    cid = "meter-typed"

    async def main() -> None:
        async with make_gateway(hub, username) as gw:
            assert gw.connected
            assert await gw.sync(cid, "sdk-product", device_name="Kitchen") == 0
            assert await gw.report(cid, "voltage_current", 230.1) == 0
            assert await gw.report(cid, 7, 5123.4) == 0  # by id; mA
            assert await gw.report(cid, "switch", True) == 0
            assert await gw.report(cid, "alarm_level", "serious") == 0
            assert await gw.report(cid, "fault", ["ov_vol", "overload_alarm"]) == 0
            phase = {"voltage": 218.7, "current": 11.203, "power": 2410, "electricity": 12.5}
            assert await gw.report(cid, "phase_a", phase) == 0  # binary (the gateway's default)
            assert await gw.report(cid, "phase_b", phase, phase_encoding="object") == 0
            assert await gw.report(cid, "temp_current", 36.55) == 0
            assert gw.stats.acked == 8 and gw.stats.sent == 8 and not gw.stats.errors
            assert len(gw.stats.latencies) == 8
            # a device never synced: the server's own answer comes back as the code
            assert await gw.report("meter-unknown", "switch", True) == 2003
            assert gw.stats.errors[2003] == 1

    run(main())
    values = latest(hub, cid)
    assert values["5"] == (2301000, 230.1)
    assert values["7"] == (51234000, 5123.4)
    assert values["1"] == (True, 1.0)
    assert values["20"] == ("serious", None)
    assert values["19"] == (["overload_alarm", "ov_vol"], None)
    assert values["30"][0] == {"voltage": 218.7, "current": 11.203, "power": 2410.0, "electricity": None}
    assert values["31"][0] == {"voltage": 218.7, "current": 11.203, "power": 2410.0, "electricity": 12.5}
    assert values["10"] == (3655, 36.55)
    device = rows(hub, "SELECT gateway_id, device_name FROM devices WHERE cid = :cid", cid=cid)
    assert [tuple(r) for r in device] == [("sdk-gw", "Kitchen")]


def test_bad_credentials_fail_start_with_a_clear_error(hub: RunningHub) -> None:
    async def main() -> None:
        gw = make_gateway(hub, "not-a-vendor")
        with pytest.raises(GatewayConnectError, match="bad user name or password") as info:
            await gw.start(timeout=5)
        assert info.value.code in (4, 0x86)

    run(main())


def test_reconnects_after_the_server_drops_it(hub: RunningHub, username: str) -> None:
    cid = "meter-reconnect"

    async def main() -> None:
        async with make_gateway(hub, username, "gw-reconnect") as gw:
            assert await gw.sync(cid, "p") == 0
            assert await asyncio.to_thread(hub.run, lambda: hub.hub.mqtt.disconnect("gw-reconnect"))
            await until(lambda: gw.stats.reconnects == 1 and gw.connected)
            assert await gw.report(cid, "voltage_current", 229.5) == 0
            assert gw.stats.syncs >= 2  # re-synced on reconnection
            # an abrupt client-side loss (no DISCONNECT packet), then a quiet period
            assert gw.drop(offline_for=0.3)
            await until(lambda: not gw.connected)
            await until(lambda: gw.stats.reconnects == 2 and gw.connected)

    run(main())
    assert latest(hub, cid)["5"] == (2295000, 229.5)


def test_reports_made_offline_arrive_after_reconnect_with_their_original_t(
    hub: RunningHub, username: str
) -> None:
    cid = "meter-buffered"
    gw_id = "gw-buffered"
    hour_ago = int(time.time()) - 3600

    async def main() -> None:
        async with make_gateway(hub, username, gw_id) as gw:
            assert await gw.sync(cid, "p") == 0
            # the operator disables the gateway and kicks it: reconnections are refused (0x05)
            await asyncio.to_thread(registry.set_gateway, hub.engine, gw_id, enabled=False)
            await asyncio.to_thread(hub.run, lambda: hub.hub.mqtt.disconnect(gw_id))
            await until(lambda: not gw.connected)
            waiter = asyncio.ensure_future(gw.report(cid, "voltage_current", 231.0, t=hour_ago, timeout=10))
            await asyncio.sleep(0)  # queued first
            for i in range(1, 5):
                gw.report_nowait(cid, "electric_total", 100.0 + i, t=hour_ago + i)
            await asyncio.sleep(0.5)  # several refused reconnection attempts
            assert not gw.connected and not waiter.done() and gw.buffered == 5
            await asyncio.to_thread(registry.set_gateway, hub.engine, gw_id, enabled=True)
            assert await waiter == 0
            await gw.wait_idle(5)
            assert gw.stats.acked == 5 and not gw.stats.errors and gw.stats.reconnects == 1

    run(main())
    stored = rows(
        hub,
        "SELECT dp_id, num, t AS at FROM reports WHERE cid = :cid AND dp_id IN ('44', '5') ORDER BY id",
        cid=cid,
    )
    assert [(r.dp_id, r.num, r.at) for r in stored] == [
        ("5", 231.0, hour_ago),
        ("44", 101.0, hour_ago + 1),
        ("44", 102.0, hour_ago + 2),
        ("44", 103.0, hour_ago + 3),
        ("44", 104.0, hour_ago + 4),
    ]


def test_a_full_buffer_drops_the_oldest_reports() -> None:
    async def main() -> None:
        gw = Gateway("127.0.0.1", 1, "gw-full", "user", buffer_size=3)  # never started: all buffered
        first = asyncio.ensure_future(gw.report("m", "switch", True))
        await asyncio.sleep(0)
        ids = [gw.report_nowait("m", "voltage_current", 230.0 + i) for i in range(4)]
        assert gw.buffered == 3 and gw.stats.dropped == 2
        with pytest.raises(ReportDropped):
            await first
        assert [json.loads(item.payload)["request_id"] for item in gw._outbox] == ids[1:]

    run(main())


def test_commands_reach_the_handler_in_real_units(hub: RunningHub, username: str) -> None:
    cid = "meter-cmd"
    svc = hub.hub.handler
    seen: list[tuple[str, str, Any]] = []

    async def main() -> None:
        async with make_gateway(hub, username, "gw-cmd") as gw:

            @gw.on_command
            async def handle(cid: str, dp: Any, value: Any) -> int:
                seen.append((cid, dp.code, value))
                return 1101 if dp.code == "power_limit" else 0

            assert await gw.sync(cid, "p") == 0
            await until(lambda: hub.run(lambda: svc.devices[cid].online))
            result = await asyncio.to_thread(hub.call, svc.send_command(cid, "switch", False))
            assert (result.status, result.code, result.msg) == ("ok", 0, "success")
            result = await asyncio.to_thread(hub.call, svc.send_command(cid, "current_max", 405000))
            assert result.status == "ok"
            result = await asyncio.to_thread(hub.call, svc.send_command(cid, 48, 10))
            assert (result.status, result.code, result.msg) == ("failed", 1101, "params range invalid")
            assert gw.stats.commands == {0: 2, 1101: 1}

    run(main())
    assert seen == [(cid, "switch", False), (cid, "current_max", 40.5), (cid, "power_limit", 0.001)]
    statuses = rows(hub, "SELECT status, code FROM commands WHERE cid = :cid ORDER BY created_at", cid=cid)
    assert [tuple(r) for r in statuses] == [("ok", 0), ("ok", 0), ("failed", 1101)]


def test_invalid_commands_are_answered_without_calling_the_handler(hub: RunningHub, username: str) -> None:
    cid = "meter-badcmd"
    gw_id = "gw-badcmd"
    called: list[Any] = []

    def publish(param: dict[str, Any], to: str = cid) -> None:
        payload = json.dumps(
            {"t": int(time.time()), "cid": to, "request_id": f"r-{time.monotonic()}", "param": param}
        )
        hub.run(lambda: hub.hub.mqtt.publish(gw_id, commands_topic(gw_id), payload.encode(), 1))

    async def main() -> None:
        async with make_gateway(hub, username, gw_id) as gw:
            gw.command_handler = lambda *a: called.append(a)  # type: ignore[assignment,return-value]
            assert await gw.sync(cid, "p") == 0
            before = hub.run(lambda: hub.stats.copy())
            await asyncio.to_thread(publish, {"id": "99", "value": 1})  # unknown dp
            await asyncio.to_thread(publish, {"id": "3", "value": 1})  # report-only
            await asyncio.to_thread(publish, {"id": "1", "value": "maybe"})  # wrong type
            await asyncio.to_thread(publish, {"id": "6", "value": -5})  # out of range
            await asyncio.to_thread(publish, {"id": "6", "value": None})  # null
            await asyncio.to_thread(publish, {})  # empty
            await asyncio.to_thread(publish, {"id": "1", "value": True}, "meter-unknown")  # not synced
            await until(lambda: sum(gw.stats.commands.values()) == 7)
            assert gw.stats.commands == {2002: 2, 1103: 1, 1101: 1, 1102: 1, 1100: 1, 2003: 1}
            # each answer reached the server (as answers to commands it never sent)
            await until(
                lambda: hub.run(lambda: hub.stats["publish.in"]) - before["publish.in"] >= 7,
            )

    run(main())
    assert called == []


def test_commands_without_a_handler_are_not_supported(hub: RunningHub, username: str) -> None:
    cid = "meter-nohandler"

    async def main() -> None:
        async with make_gateway(hub, username, "gw-nohandler") as gw:
            assert await gw.sync(cid, "p") == 0
            await until(lambda: hub.run(lambda: hub.hub.handler.devices[cid].online))
            result = await asyncio.to_thread(hub.call, hub.hub.handler.send_command(cid, "switch", True))
            assert (result.status, result.code) == ("failed", 2002)

    run(main())


def test_heartbeats_keep_devices_online_and_set_online_is_published(hub: RunningHub, username: str) -> None:
    # presence_timeout is 1 s on this hub: without heartbeats the devices would go offline
    svc = hub.hub.handler

    def online(cid: str) -> bool:
        return bool(hub.run(lambda: svc.devices[cid].online))

    async def main() -> None:
        async with make_gateway(hub, username, "gw-beat", status_interval=0.25) as gw:
            assert await gw.sync("meter-b1", "p") == 0
            assert await gw.sync("meter-b2", "p") == 0
            await until(lambda: online("meter-b1") and online("meter-b2"))
            await asyncio.sleep(2.0)  # twice the presence timeout, no reports at all
            assert online("meter-b1") and online("meter-b2")
            gw.set_online("meter-b2", False)
            await until(lambda: not online("meter-b2"), timeout=2)
            await asyncio.sleep(0.6)
            assert online("meter-b1") and not online("meter-b2")
            gw.set_online("meter-b2", True)
            await until(lambda: online("meter-b2"), timeout=2)
            assert gw.stats.statuses >= 8
            with pytest.raises(KeyError):
                gw.set_online("never-synced", True)

    run(main())
    expected = [(1, "status"), (0, "status"), (1, "status"), (0, "gateway-disconnect")]
    sql = "SELECT online, cause FROM presence WHERE cid = 'meter-b2' ORDER BY at"
    wait_for(lambda: [tuple(r) for r in rows(hub, sql)] == expected)


def test_tls_with_the_servers_ca(hub_factory: Callable[..., RunningHub], tmp_path: Path) -> None:
    paths = make_dev_cert(tmp_path / "tls", ["localhost", "127.0.0.1"])
    hub = hub_factory("protocol", tls_port=free_port(), tls_cert=paths["cert"], tls_key=paths["key"])
    user = registry.add_vendor(hub.engine, "tls-vendor").username

    async def main() -> None:
        gw = Gateway("127.0.0.1", hub.hub.tls_port, "gw-tls", user, tls_ca=paths["ca"], response_timeout=5)
        async with gw:
            assert await gw.sync("meter-tls", "p") == 0
            assert await gw.report("meter-tls", "power_current", 1234.5) == 0
        # a server certificate the gateway cannot verify: no connection
        untrusted = Gateway(
            "127.0.0.1",
            hub.hub.tls_port,
            "gw-tls2",
            user,
            tls_ca=make_dev_cert(tmp_path / "other", ["127.0.0.1"])["ca"],
        )
        with pytest.raises(TimeoutError, match="certificate verify failed"):
            await untrusted.start(timeout=1.0)

    run(main())
    assert latest(hub, "meter-tls")["3"] == (12345000, 1234.5)


def test_a_burst_survives_connection_losses_and_is_stored_exactly_once(
    hub: RunningHub, username: str
) -> None:
    cid = "meter-burst"
    gw_id = "gw-burst"
    n = 3000

    async def main() -> None:
        async with make_gateway(hub, username, gw_id, max_pending=300) as gw:
            assert await gw.sync(cid, "p") == 0
            base = time.time() - 600
            for i in range(n):
                gw.report_nowait(cid, "electric_total", i / 10, t=base + i / 10)
            await until(lambda: gw.stats.acked > 300)
            await asyncio.to_thread(hub.run, lambda: hub.hub.mqtt.disconnect(gw_id))  # server side
            await until(lambda: gw.stats.reconnects == 1 and gw.stats.acked > 1500, timeout=10)
            gw.drop()  # client side, mid-stream
            await until(lambda: gw.stats.reconnects == 2 and gw.connected, timeout=10)
            await gw.wait_idle(15)
            assert gw.stats.acked == n and not gw.stats.errors and gw.stats.dropped == 0
            assert gw.stats.resent > 0  # unanswered reports went again after each loss

    run(main())
    stored = rows(
        hub,
        "SELECT COUNT(*) AS n, COUNT(DISTINCT request_id) AS d, MAX(num) AS top FROM reports WHERE cid=:c",
        c=cid,
    )
    assert tuple(stored[0]) == (n, n, (n - 1) / 10)


# --- a server slower than the SDK's response timeout ----------------------------------------------


class SlowSyncServer:
    """Application handler for meterhub's MQTT server: answers every devices/sync with code 0 after
    ``answer_after`` s and acknowledges it (PUBACK) after ``ack_after`` s, like a server whose storage
    is busy with a whole fleet re-syncing at once."""

    def __init__(self, southbound: Southbound, answer_after: float, ack_after: float) -> None:
        self.southbound = southbound
        self.answer_after = answer_after
        self.ack_after = ack_after
        self.syncs = 0

    def client_connected(self, principal: Principal, peer: str) -> None:
        pass

    def client_disconnected(self, principal: Principal, reason: str) -> None:
        pass

    def message(self, principal: Principal, topic: str, payload: bytes) -> Any:
        if not topic.endswith("/devices/sync"):
            return None
        self.syncs += 1
        request = json.loads(payload)
        answer = encode_response(request["request_id"], request["param"]["cid"], 0, time.time())
        asyncio.get_running_loop().call_later(
            self.answer_after, self.southbound.publish, principal.client_id, topic + "/response", answer, 1
        )
        return asyncio.ensure_future(asyncio.sleep(self.ack_after))


def test_sync_answers_slower_than_the_response_timeout_still_count(
    echo_hub: RunningHub, vendor: registry.Vendor
) -> None:
    """The PUBACK and the answer both come after ``response_timeout``: sync() with a longer timeout
    gets the answer, and a re-sync after a reconnection waits instead of dropping the connection."""
    mqtt = echo_hub.hub.mqtt
    assert mqtt is not None
    slow = SlowSyncServer(mqtt, answer_after=0.8, ack_after=0.5)
    echo_hub.run(lambda: setattr(mqtt, "handler", slow))

    async def main() -> None:
        gw = Gateway("127.0.0.1", echo_hub.port, "gw-slow", vendor.username, response_timeout=0.2)
        gw.reconnect_base, gw.reconnect_cap = 0.05, 0.3
        await gw.start(timeout=5)
        try:
            assert await gw.sync("m-slow", "p", timeout=5) == 0
            assert gw.devices == {"m-slow": True}
            assert await asyncio.to_thread(echo_hub.run, lambda: mqtt.disconnect("gw-slow"))
            await until(lambda: gw.stats.connects == 2 and gw.connected, timeout=10)
            await asyncio.sleep(1.5)  # a timed-out re-sync would have dropped the connection by now
            assert (gw.stats.connects, gw.connected, slow.syncs) == (2, True, 2)
        finally:
            await gw.close(flush_timeout=0)

    run(main())


# --- a server that goes away: quiet reconnection ---------------------------------------------------

_SDK_UNDER_KILL = """
import asyncio, logging, sys, time
from meterhub.sdk import Gateway
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
port, user, outages = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

async def main():
    gw = Gateway("127.0.0.1", port, "gw-kill", user, reconnect_base=0.05, reconnect_cap=0.2)
    await gw.start(timeout=20)
    assert await gw.sync("m-kill", "p") == 0
    print("READY", flush=True)
    i = seen = 0
    while seen < outages:  # report as fast as the window allows while the server dies
        gw.report_nowait("m-kill", "voltage_current", 220 + i % 10)
        i += 1
        await (asyncio.sleep(0.002) if i % 50 == 0 else asyncio.sleep(0))
        if gw.stats.reconnects > seen and gw.connected:
            seen = gw.stats.reconnects
            print("UP", seen, flush=True)
    await gw.wait_idle(20)
    print("DONE", gw.stats.reconnects, gw.stats.acked, flush=True)
    await gw.close()

asyncio.run(main())
"""


def test_killing_the_server_under_the_sdk_prints_no_traceback(tmp_path: Path) -> None:
    """The server is stopped (SIGTERM) and killed (SIGKILL) under a busy gateway: it reconnects each
    time with one warning line per outage and nothing else on stderr (no asyncio callback traceback)."""
    from conftest import cli_add_vendor

    data = tmp_path / "data"
    user = cli_add_vendor(data, "kill-vendor")
    mqtt_port, http_port = free_port(), free_port()
    serve = [sys.executable, "-m", "meterhub", "serve", "--data-dir", str(data)]
    serve += ["--mqtt-port", str(mqtt_port), "--http-port", str(http_port)]
    log = (tmp_path / "serve.log").open("wb")

    def start_server() -> subprocess.Popen[bytes]:
        return subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", mqtt_port)) == 0

    signals = [15, 9, 15]
    server = start_server()
    wait_for(listening, 20)
    sdk = subprocess.Popen(
        [sys.executable, "-c", _SDK_UNDER_KILL, str(mqtt_port), user, str(len(signals))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sdk.stdout is not None
        assert sdk.stdout.readline().strip() == "READY"
        for n, sig in enumerate(signals, 1):
            time.sleep(0.5)  # reports in flight
            server.send_signal(sig)
            server.wait(20)
            time.sleep(0.3)  # the gateway retries against a closed port meanwhile
            server = start_server()
            assert sdk.stdout.readline().split() == ["UP", str(n)]
        out, err = sdk.communicate(timeout=60)
    finally:
        sdk.kill()
        server.terminate()
        server.wait(20)
    assert sdk.returncode == 0, err
    assert out.split()[:2] == ["DONE", str(len(signals))]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Exception in callback" not in err, err
    warnings = [line for line in lines if not line.startswith("INFO ")]
    assert len(warnings) == len(signals), err
    assert all("lost its connection" in w and "reconnecting" in w for w in warnings), err
