"""Failed-login budgets and short bans (meterhub.core.throttle) over real MQTT connections."""

from __future__ import annotations

import httpx
import pytest

import mqttraw
from conftest import RunningHub, wait_for
from meterhub.api.security import create_token
from meterhub.core.auth import gateway_password
from meterhub.core.throttle import LoginThrottle, source_of
from meterhub.openhub import store
from meterhub.storage import registry


def connack(hub: RunningHub, cid: str, username: str, password: str, source: str = "127.0.0.1") -> int:
    """The CONNACK return code for one CONNECT sent from ``source`` (a loopback address)."""
    raw = mqttraw.RawClient(hub.port, source=source)
    try:
        raw.send(mqttraw.connect(cid, username, password))
        kind, body = raw.read_packet()
        assert kind == 0x20 and len(body) == 2
        return body[1]
    finally:
        raw.close()


def test_wrong_passwords_ban_the_client_id_but_not_other_clients_or_sources(hub_factory, clients) -> None:
    hub = hub_factory("echo", login_fail_budget_client=50, login_fail_budget_source=0, login_ban_seconds=2.0)
    vendor = registry.add_vendor(hub.engine, "acme")
    user, good = vendor.username, gateway_password("gw-victim", vendor.username)
    auth = hub.hub.mqtt.authenticator
    lookups = auth.lookups
    for i in range(50):
        assert connack(hub, "gw-victim", user, f"{i:032x}") == 0x04
    assert auth.lookups - lookups == 50  # every one of them was checked...
    # ...and now the right password is refused too, without a lookup
    assert connack(hub, "gw-victim", user, good) == 0x04
    assert connack(hub, "gw-victim", user, good) == 0x04
    assert auth.lookups - lookups == 50
    assert hub.stats["auth.failed"] == 50 and hub.stats["auth.banned.client"] == 1
    assert hub.stats["auth.throttled.client"] == 2
    # another client id from the same address logs in meanwhile (paho)
    other = clients(hub.port, "gw-bystander", user)
    assert other.connect()[0] == 0
    # the same client id from an address that never failed is checked and let in (no lock-out)
    assert connack(hub, "gw-victim", user, good, source="127.0.0.2") == 0x00
    # once the ban is over, the banned address gets in with the right password
    wait_for(lambda: connack(hub, "gw-victim", user, good) == 0x00, timeout=5, interval=0.3)
    assert hub.stats["auth.throttled.client"] >= 2


def test_source_budget_bans_an_address_and_nobody_else(hub_factory, clients) -> None:
    hub = hub_factory("echo", login_fail_budget_client=0, login_fail_budget_source=10, login_ban_seconds=2.0)
    vendor = registry.add_vendor(hub.engine, "acme")
    user = vendor.username
    for i in range(10):  # ten different client ids, one wrong password each, all from 127.0.0.2
        assert connack(hub, f"gw-guess-{i}", user, "0" * 32, source="127.0.0.2") == 0x04
    fresh = "gw-fresh"
    assert connack(hub, fresh, user, gateway_password(fresh, user), source="127.0.0.2") == 0x04
    assert hub.stats["auth.banned.source"] == 1 and hub.stats["auth.throttled.source"] == 1
    # other addresses are not slowed: correct logins from 127.0.0.1 (raw and paho) pass at once
    assert connack(hub, fresh, user, gateway_password(fresh, user)) == 0x00
    assert clients(hub.port, "gw-paho", user).connect()[0] == 0
    assert hub.stats["auth.throttled.source"] == 1
    wait_for(
        lambda: connack(hub, "gw-x", user, gateway_password("gw-x", user), source="127.0.0.2") == 0,
        timeout=5,
        interval=0.3,
    )


def test_open_hub_link_logins_are_throttled_too(hub_factory) -> None:
    hub = hub_factory("protocol", http_port=0, login_fail_budget_client=5, login_ban_seconds=30)
    uid = store.add_user(hub.engine, "alice", "pw")
    link = store.issue_link(hub.engine, uid, "l1", "mqtt", "2.0", 7200)
    for _ in range(5):
        assert connack(hub, link.client_id, link.username, "x" * 32) == 0x04
    assert connack(hub, link.client_id, link.username, link.password) == 0x04  # banned
    assert connack(hub, link.client_id, link.username, link.password, source="127.0.0.2") == 0x00
    token, _ = create_token(hub.engine, "ops", "read")
    metrics = httpx.get(
        f"http://127.0.0.1:{hub.hub.http_port}/metrics", headers={"Authorization": f"Bearer {token}"}
    ).text
    assert 'meterhub_mqtt_events_total{event="auth.banned.client"} 1.0' in metrics
    assert 'meterhub_mqtt_events_total{event="auth.throttled.client"} 1.0' in metrics


def test_tracking_is_bounded_and_windows_reset() -> None:
    now = [1000.0]
    t = LoginThrottle(
        window=60, client_budget=3, source_budget=0, ban_seconds=10, max_tracked=100, clock=lambda: now[0]
    )
    for i in range(1000):
        t.failed(f"c{i}", f"10.0.{i // 256}.{i % 256}:1234")
    assert t.tracked == (100, 100)  # the oldest are forgotten
    # failures spread over windows never add up to a ban
    for _ in range(5):
        t.failed("slow", "10.9.9.9:1")
        t.failed("slow", "10.9.9.9:1")
        now[0] += 61
    assert t.refusal("slow", "10.9.9.9:2") is None
    t.failed("fast", "10.9.9.9:1")
    t.failed("fast", "10.9.9.9:1")
    t.failed("fast", "10.9.9.9:1")
    assert t.refusal("fast", "10.9.9.9:5") is not None  # any port of the failing address
    assert t.refusal("fast", "10.9.9.8:5") is None  # another address: checked as usual
    now[0] += 10
    assert t.refusal("fast", "10.9.9.9:5") is None  # the ban is over
    assert source_of("[::1]:5") == "::1" and source_of("::1:5") == "::1" and source_of("x") == "x"


@pytest.mark.parametrize("field", ["login_fail_budget_client", "login_fail_budget_source"])
def test_budget_settings_refuse_negative_values(field: str) -> None:
    from pydantic import ValidationError

    from meterhub.config import load_settings

    with pytest.raises(ValidationError, match=field):
        load_settings(**{field: -1})
    assert getattr(load_settings(**{field: 0}), field) == 0
