"""SIGTERM drain (meterhub.mqtt.drain, Hub.drain): stop accepting and reading, answer what was read,
then close; `meterhub serve` of the embedded default exits 0 after it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import create_engine, select

import mqttraw
from conftest import free_port, storage_held, wait_for
from meterhub.core.auth import gateway_password
from meterhub.storage import registry, schema
from meterhub.storage.database import migrate


def _report(gw: str, cid: str, rid: str, pid: int) -> bytes:
    body = {"t": int(time.time()), "request_id": rid, "param": {"cid": cid, "id": "5", "value": 2_301_234}}
    return mqttraw.publish(f"gateway_id/{gw}/properties/report", json.dumps(body).encode(), 1, pid)


def _request_ids(engine, cid: str) -> list[str]:
    r = schema.reports
    with engine.connect() as conn:
        return [x.request_id for x in conn.execute(select(r.c.request_id).where(r.c.cid == cid)).all()]


def test_drain_answers_what_was_read_and_reads_nothing_more(hub_factory) -> None:
    hub = hub_factory(drain_timeout=20)
    vendor = registry.add_vendor(hub.engine, "acme")
    gw, m, user = "gw-drain", "gw-drain-m1", vendor.username
    raw = mqttraw.RawClient(hub.port, timeout=10)
    raw.send(mqttraw.connect(gw, user, gateway_password(gw, user)))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    raw.send(mqttraw.subscribe(1, f"gateway_id/{gw}/#"))
    assert raw.read_packet()[0] == 0x90
    sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": m, "product_id": "p"}}
    raw.send(mqttraw.publish(f"gateway_id/{gw}/devices/sync", json.dumps(sync).encode(), 1, 2))
    while raw.read_packet()[0] & 0xF0 != 0x30:  # PUBACK, then the sync response
        pass
    with storage_held(hub.engine):
        raw.send(_report(gw, m, "r-read", 5))  # read, waiting for its commit
        time.sleep(0.3)
        drain = asyncio.run_coroutine_threadsafe(hub.hub.drain(), hub.loop)
        time.sleep(0.3)
        raw.send(_report(gw, m, "r-late", 6))  # sent after the drain began: not read
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection(("127.0.0.1", hub.port), timeout=1).close()
        time.sleep(0.3)
        assert not drain.done()  # waits for the report it read
    packets = []
    with pytest.raises(ConnectionError):
        while True:
            packets.append(raw.read_packet())
    assert (0x40, (5).to_bytes(2, "big")) in packets  # the PUBACK of the report read
    answers = [p for p in packets if p[0] & 0xF0 == 0x30]
    assert len(answers) == 1
    body = answers[0][1]
    n = int.from_bytes(body[:2], "big")
    answer = json.loads(body[2 + n + (2 if answers[0][0] & 0x06 else 0) :])
    assert (answer["request_id"], answer["param"]["code"]) == ("r-read", 0)
    assert (0x40, (6).to_bytes(2, "big")) not in packets  # the late one: never acknowledged
    drain.result(10)
    assert _request_ids(hub.engine, m) == ["r-read"]
    assert hub.stats["drain.closed"] == 1 and hub.stats["drain.unfinished"] == 0
    raw.close()


def test_sigterm_of_the_embedded_default_exits_0(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    engine = create_engine(f"sqlite:///{data / 'meterhub.db'}")
    migrate(engine)
    vendor = registry.add_vendor(engine, "acme")
    engine.dispose()
    mqtt_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterhub",
            "serve",
            "--data-dir",
            str(data),
            "--mqtt-port",
            str(mqtt_port),
            "--http-port",
            str(http_port),
        ],
        env={**os.environ, "METERHUB_MQTT_HOST": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, interval=0.1)
        gw, user = "gw-term", vendor.username
        raw = mqttraw.RawClient(mqtt_port)
        raw.send(mqttraw.connect(gw, user, gateway_password(gw, user)))
        assert raw.read_packet() == (0x20, b"\x00\x00")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
        assert raw.closed_within(2.0) is not None
        text = log.read_text()
        assert "mqtt drained" in text and "Traceback" not in text
        raw.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
