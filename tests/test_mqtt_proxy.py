"""The MQTT listener with ``proxy_protocol`` on: the PROXY header's source is the client's address for
authentication (login throttling per source), the stored gateway address, the report card and logs."""

from __future__ import annotations

import json
import time

import httpx

import mqttraw
from conftest import wait_for
from meterhub.api.security import create_token
from meterhub.core.auth import gateway_password
from meterhub.mqtt.proxy_protocol import encode_v1, encode_v2
from meterhub.storage import registry

BALANCER = ("127.0.0.1", 21883)  # the destination a balancer names (not used by the server)


def _connack(hub, cid: str, user: str, password: str, header: bytes) -> int:
    raw = mqttraw.RawClient(hub.port)
    try:
        raw.send(header + mqttraw.connect(cid, user, password))
        kind, body = raw.read_packet()
        assert kind == 0x20 and len(body) == 2
        return body[1]
    finally:
        raw.close()


def test_the_gateway_address_comes_from_the_proxy_header(hub_factory) -> None:
    hub = hub_factory(proxy_protocol=True)
    vendor = registry.add_vendor(hub.engine, "acme")
    token, _ = create_token(hub.engine, "ops", "admin")
    gw, user = "gw-behind-lb", vendor.username
    raw = mqttraw.RawClient(hub.port)
    header = encode_v2(("192.0.2.44", 50123), BALANCER)
    # header and CONNECT in separate writes, the header itself split: the reader collects them
    raw.send(header[:7])
    time.sleep(0.05)
    raw.send(header[7:])
    time.sleep(0.05)
    raw.send(mqttraw.connect(gw, user, gateway_password(gw, user)))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    assert hub.run(lambda: dict(hub.hub.mqtt.connected_clients())) == {gw: "192.0.2.44:50123"}
    raw.send(mqttraw.subscribe(1, f"gateway_id/{gw}/#"))
    assert raw.read_packet()[0] == 0x90
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": "m-1", "product_id": "p"}}
    raw.send(mqttraw.publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
    with httpx.Client(
        base_url=f"http://127.0.0.1:{hub.hub.http_port}", headers={"Authorization": f"Bearer {token}"}
    ) as api:
        wait_for(lambda: api.get(f"/api/v1/gateways/{gw}").json().get("client_address") == "192.0.2.44:50123")
        card = api.get(f"/api/v1/gateways/{gw}/conformance").json()
        assert card["client_address"] == "192.0.2.44:50123" and card["connected"] is True
    assert hub.stats["proxy_protocol.accepted"] == 1
    raw.close()


def test_login_throttle_counts_per_proxied_source(hub_factory) -> None:
    """Every connection comes from the balancer's one address; the ban still falls on one client."""
    hub = hub_factory(
        "echo",
        proxy_protocol=True,
        login_fail_budget_client=0,
        login_fail_budget_source=3,
        login_ban_seconds=30,
    )
    vendor = registry.add_vendor(hub.engine, "acme")
    user = vendor.username
    attacker = encode_v2(("192.0.2.66", 40000), BALANCER)
    for i in range(3):
        assert _connack(hub, f"gw-guess-{i}", user, "0" * 32, attacker) == 0x04
    good = "gw-good"
    # the attacker's address is banned now, even with a right password...
    assert _connack(hub, good, user, gateway_password(good, user), attacker) == 0x04
    assert hub.stats["auth.banned.source"] == 1
    # ...and another client behind the same balancer (same socket address 127.0.0.1) is not
    other = encode_v2(("192.0.2.67", 40001), BALANCER)
    assert _connack(hub, good, user, gateway_password(good, user), other) == 0x00
    # v1 text headers count the same way
    v1 = encode_v1(("192.0.2.66", 40002), BALANCER)
    assert _connack(hub, good, user, gateway_password(good, user), v1) == 0x04


def test_connections_without_a_valid_header_are_closed_and_counted(hub_factory) -> None:
    hub = hub_factory("echo", proxy_protocol=True)
    vendor = registry.add_vendor(hub.engine, "acme")
    user = vendor.username
    # a plain MQTT client on the PROXY port: closed at once, no CONNACK
    raw = mqttraw.RawClient(hub.port)
    raw.send(mqttraw.connect("gw-direct", user, gateway_password("gw-direct", user)))
    assert raw.closed_within(2.0) is not None
    raw.close()
    assert hub.stats["proxy_protocol.refused.no-header"] == 1
    # a broken v2 header (version 3)
    raw = mqttraw.RawClient(hub.port)
    raw.send(b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12))
    assert raw.closed_within(2.0) is not None
    raw.close()
    assert hub.stats["proxy_protocol.refused.bad-version"] == 1
    # a connection that goes before its header is complete (a balancer's plain TCP check)
    raw = mqttraw.RawClient(hub.port)
    raw.send(b"\r\n\r\n")
    raw.close()
    wait_for(lambda: hub.stats["proxy_protocol.closed_before_header"] == 1)
    assert hub.stats["proxy_protocol.accepted"] == 0
    assert hub.stats["connack.0"] == 0


def test_local_command_is_accepted_as_the_balancers_own_connection(hub_factory) -> None:
    hub = hub_factory("echo", proxy_protocol=True)
    vendor = registry.add_vendor(hub.engine, "acme")
    user, gw = vendor.username, "gw-local"
    raw = mqttraw.RawClient(hub.port, source="127.0.0.3")
    raw.send(encode_v2(local=True) + mqttraw.connect(gw, user, gateway_password(gw, user)))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    peer = hub.run(lambda: dict(hub.hub.mqtt.connected_clients()))[gw]
    assert peer.startswith("127.0.0.3:")  # the socket's own address stands
    assert hub.stats["proxy_protocol.local"] == 1
    raw.close()


def test_without_the_setting_a_proxy_header_is_a_protocol_error(hub_factory) -> None:
    hub = hub_factory("echo")
    raw = mqttraw.RawClient(hub.port)
    raw.send(encode_v2(("192.0.2.1", 1), BALANCER))
    assert raw.closed_within(2.0) is not None
    raw.close()
    assert hub.stats["proxy_protocol.accepted"] == 0
    assert sum(v for k, v in hub.stats.items() if k.startswith("protocol_error.")) == 1
