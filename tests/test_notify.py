"""Alarm notifications to real local servers: a webhook (stdlib HTTP server) that fails twice then
succeeds, one that always fails (dead letter), and e-mail to an aiosmtpd server over STARTTLS."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningHub, free_port, wait_for
from test_api import Api

IMMEDIATE = {"kind": "tune", "label": "*", "hysteresis": 0, "raise_after": 0, "clear_after": 0}
FAST = {"notify_backoff": 0.5, "notify_poll": 0.1, "notify_max_attempts": 3}


class Hooks:
    """Records every POST; /flaky answers 500 twice then 200, /down always 503."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict[str, str], bytes]] = []
        self.flaky_failures = 2
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hooks.seen.append((self.path, time.monotonic(), dict(self.headers), body))
                code = 503 if self.path == "/down" else 200
                if self.path == "/flaky" and hooks.flaky_failures > 0:
                    hooks.flaky_failures -= 1
                    code = 500
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[tuple[float, dict[str, str], dict[str, Any], bytes]]:
        return [(t, h, json.loads(b), b) for p, t, h, b in self.seen if p == path]


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.server.shutdown()
    h.server.server_close()


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Any) -> Iterator[Api]:
    a = Api(hub_factory("protocol", **FAST), clients)
    assert a.admin.post("/api/v1/alarm-rules", json=IMMEDIATE).status_code == 201
    yield a
    a.close()


def target(api: Api, **body: Any) -> dict[str, Any]:
    r = api.admin.post("/api/v1/notify/targets", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def log(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.read.get("/api/v1/notify/log", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_webhook_retries_with_backoff_then_dead_letter(api: Api, hooks: Hooks) -> None:
    flaky = target(api, name="ops", kind="webhook", config={"url": f"{hooks.url}/flaky", "secret": "s3cret"})
    assert flaky["config"]["secret"] == "***"  # never shown again
    target(
        api,
        name="broken",
        kind="webhook",
        events=["raise"],
        levels=["urgent"],
        config={"url": f"{hooks.url}/down", "secret": "k"},
    )
    gw = api.gateway()
    gw.sync("n1")
    t0 = int(time.time()) - 30
    gw.report("n1", "20", "urgent", t=t0)
    gw.report("n1", "19", ["fire_alarm"], t=t0 + 1)

    wait_for(lambda: len(hooks.posts("/flaky")) == 3, timeout=10)
    posts = hooks.posts("/flaky")
    gaps = [posts[1][0] - posts[0][0], posts[2][0] - posts[1][0]]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[1] > gaps[0], gaps  # 0.5 s, then 1 s (+ jitter)
    for n, (_, headers, body, raw) in enumerate(posts, start=1):
        expected = "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
        assert headers["X-Meterhub-Signature"] == expected
        assert headers["X-Meterhub-Timestamp"] == str(body["delivery"]["timestamp"])
        assert (body["event"], body["delivery"]["attempt"]) == ("raise", n)
        assert (body["alarm"]["label"], body["alarm"]["level"], body["alarm"]["cid"]) == (
            "fire_alarm",
            "urgent",
            "n1",
        )
    wait_for(lambda: [r["status"] for r in log(api, status="sent")] == ["sent"])
    (sent,) = log(api, status="sent")
    assert (sent["attempts"], sent["event"], sent["target_id"]) == (3, "raise", flaky["id"])

    # The broken target: three attempts, then a dead letter, listed in the API.
    wait_for(lambda: len(api.read.get("/api/v1/notify/dead").json()["items"]) == 1, timeout=10)
    (dead,) = api.read.get("/api/v1/notify/dead").json()["items"]
    assert (dead["attempts"], dead["last_error"], dead["status"]) == (3, "HTTP 503", "dead")
    assert len(hooks.posts("/down")) == 3

    # Clear: only the target that wants clears; a dead letter can be sent again.
    gw.report("n1", "19", 0, t=t0 + 2)
    wait_for(lambda: len(hooks.posts("/flaky")) == 4)
    assert hooks.posts("/flaky")[3][2]["event"] == "clear"
    assert api.read.post(f"/api/v1/notify/dead/{dead['id']}/retry").status_code == 403
    assert api.admin.post(f"/api/v1/notify/dead/{dead['id']}/retry").json()["status"] == "pending"
    wait_for(lambda: len(hooks.posts("/down")) == 6, timeout=10)
    assert api.admin.post("/api/v1/notify/dead/999/retry").status_code == 404


def test_target_mistakes_are_4xx(api: Api) -> None:
    post = api.admin.post
    r = post("/api/v1/notify/targets", json={"name": "x", "kind": "webhook", "config": {"url": "ftp://a"}})
    assert r.status_code == 422 and "url" in r.json()["error"]["message"]
    r = post("/api/v1/notify/targets", json={"name": "x", "kind": "email", "config": {"host": "h"}})
    assert r.status_code == 422 and "sender" in r.json()["error"]["message"]
    ok = {"name": "x", "kind": "webhook", "config": {"url": "http://127.0.0.1:1/", "secret": "k"}}
    assert post("/api/v1/notify/targets", json=ok).status_code == 201
    r = post("/api/v1/notify/targets", json=ok)
    assert r.status_code == 409 and "exists" in r.json()["error"]["message"]
    assert api.admin.delete("/api/v1/notify/targets/999").status_code == 404


def test_email_over_starttls(api: Api, tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    from meterhub.tools.devcert import make_dev_cert

    paths = make_dev_cert(tmp_path / "tls", ["localhost", "127.0.0.1"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(paths["cert"]), str(paths["key"]))
    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, _server: Any, session: Any, envelope: Any) -> str:
            received.append((envelope, session.authenticated))
            return "250 OK"

    def auth(_server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"hub", b"pw")
        return AuthResult(success=ok)

    port = free_port()
    smtp = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=port,
        tls_context=ctx,
        require_starttls=True,
        authenticator=auth,
        auth_require_tls=True,
    )
    smtp.start()
    try:
        cfg = {
            "host": "127.0.0.1",
            "port": port,
            "starttls": True,
            "username": "hub",
            "password": "pw",
            "sender": "meterhub@example.test",
            "to": ["ops@example.test"],
            "ca_file": str(paths["ca"]),
        }
        t = target(api, name="mail", kind="email", events=["raise"], config=cfg)
        assert t["config"]["password"] == "***"
        gw = api.gateway()
        gw.sync("e1")
        gw.report("e1", "19", ["surge_alarm"], t=int(time.time()) - 5)
        wait_for(lambda: len(received) == 1, timeout=10)
        envelope, authenticated = received[0]
        assert authenticated is True
        assert envelope.mail_from == "meterhub@example.test" and envelope.rcpt_tos == ["ops@example.test"]
        text = envelope.content.decode()
        assert "Subject: [meterhub] raise: surge_alarm (general) on e1" in text
        assert '"label": "surge_alarm"' in text
        wait_for(lambda: [r["status"] for r in log(api)] == ["sent"])
    finally:
        smtp.stop()


def test_a_pending_notification_survives_a_restart(tmp_path: Path, clients: Any) -> None:
    from conftest import make_settings

    port = free_port()  # nothing listens there yet: the first attempt fails
    settings = dict(notify_backoff=0.3, notify_poll=0.1, notify_max_attempts=20)
    first = RunningHub(make_settings(tmp_path / "data", **settings)).start()
    try:
        api = Api(first, clients)
        assert api.admin.post("/api/v1/alarm-rules", json=IMMEDIATE).status_code == 201
        target(api, name="later", kind="webhook", config={"url": f"http://127.0.0.1:{port}/x", "secret": "k"})
        gw = api.gateway()
        gw.sync("p1")
        gw.report("p1", "19", ["outage_alarm"], t=int(time.time()) - 5)
        wait_for(lambda: (log(api) or [{}])[0].get("attempts", 0) >= 1, timeout=10)
        gw.client.close()
        api.close()
    finally:
        first.stop()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_a: Any) -> None:
            pass

    got: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    second = RunningHub(make_settings(tmp_path / "data", **settings)).start()
    try:
        wait_for(lambda: len(got) == 1, timeout=10)
        assert got[0]["alarm"]["label"] == "outage_alarm" and got[0]["delivery"]["attempt"] >= 2
        from sqlalchemy import select

        from meterhub.storage import schema

        def statuses() -> list[str]:
            with second.engine.connect() as conn:
                return list(conn.execute(select(schema.notify_outbox.c.status)).scalars())

        wait_for(lambda: statuses() == ["sent"])
    finally:
        second.stop()
        server.shutdown()
        server.server_close()


def test_escalation_is_notified_once(api: Api, hooks: Hooks) -> None:
    target(
        api, name="esc", kind="webhook", events=["escalate"], config={"url": f"{hooks.url}/ok", "secret": "e"}
    )
    gw = api.gateway()
    gw.sync("x1")
    t0 = int(time.time()) - 30
    gw.report("x1", "20", "general", t=t0)
    gw.report("x1", "19", ["ov_cr"], t=t0 + 1)
    wait_for(lambda: api.read.get("/api/v1/alarms", params={"active": True}).json()["total"] == 1)
    gw.report("x1", "20", "serious", t=t0 + 2)  # up: escalated
    gw.report("x1", "20", "general", t=t0 + 3)  # down: no notification
    wait_for(lambda: len(hooks.posts("/ok")) == 1)
    time.sleep(0.5)
    ((_, _, body, _),) = hooks.posts("/ok")
    assert (body["event"], body["alarm"]["label"], body["alarm"]["level"]) == ("escalate", "ov_cr", "serious")


def test_two_nodes_never_send_one_notification_twice(shared_postgres: str, hooks: Hooks) -> None:
    """Two notifiers (two cluster nodes) on one PostgreSQL outbox: every row is sent exactly once."""
    import asyncio

    from sqlalchemy import insert, select

    from meterhub.core.notify import Notifier, create_target
    from meterhub.storage import schema
    from meterhub.storage.database import create_db_engine, migrate

    engine = create_db_engine(shared_postgres)
    migrate(engine)
    t = create_target(
        engine, {"name": "both", "kind": "webhook", "config": {"url": f"{hooks.url}/ok", "secret": "s"}}
    )
    now = time.time()
    rows = [
        {
            "target_id": t["id"],
            "alarm_id": i,
            "event": "raise",
            "payload": {"event": "raise", "alarm": {"id": i}},
            "status": "pending",
            "attempts": 0,
            "next_at": now,
            "created_at": now,
        }
        for i in range(1, 61)
    ]
    with engine.begin() as conn:
        conn.execute(insert(schema.notify_outbox), rows)

    async def main() -> None:
        a, b = Notifier(engine, "a", poll=0.05), Notifier(engine, "b", poll=0.05)
        await a.start()
        await b.start()
        try:
            await asyncio.gather(*(n.run_once() for n in (a, b) for _ in range(4)))
            while a.sent + b.sent < 60:
                await asyncio.sleep(0.05)
        finally:
            await a.stop()
            await b.stop()
        assert a.sent > 0 and b.sent > 0, (a.sent, b.sent)

    asyncio.run(asyncio.wait_for(main(), 30))
    sent_ids = sorted(body["alarm"]["id"] for _, _, body, _ in hooks.posts("/ok"))
    assert sent_ids == list(range(1, 61))
    with engine.connect() as conn:
        claimed = set(conn.execute(select(schema.notify_outbox.c.claimed_by)).scalars())
        statuses = set(conn.execute(select(schema.notify_outbox.c.status)).scalars())
    assert claimed == {"a", "b"} and statuses == {"sent"}
    engine.dispose()
