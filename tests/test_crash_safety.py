"""kill -9 while gateways report: every report answered with code 0 must be in the database."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import Client, cli_add_vendor, free_port, wait_for
from meterhub.core.auth import gateway_password


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterhub",
            "serve",
            "--data-dir",
            str(data),
            "--mqtt-port",
            str(port),
            "--http-port",
            str(free_port()),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server died"
            return False

    wait_for(listening, timeout=20)
    return proc


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Server processes started by the test; all killed at the end, whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_kill_9_loses_no_acknowledged_report(tmp_path: Path, servers: list[subprocess.Popen[bytes]]) -> None:
    data = tmp_path / "data"
    username = cli_add_vendor(data, "crashco")
    port = free_port()
    proc = start_server(data, port)
    servers.append(proc)
    acked: set[str] = set()
    client = Client(port, "gw-crash", username, gateway_password("gw-crash", username))
    assert client.connect()[0] == 0
    client.subscribe("gateway_id/gw-crash/#")
    client.publish(
        "gateway_id/gw-crash/devices/sync",
        json.dumps(
            {"t": int(time.time()), "request_id": "sync-1", "param": {"cid": "meter-1", "product_id": "p"}}
        ),
    )
    assert json.loads(client.get().payload)["param"]["code"] == 0

    def collect() -> None:
        while True:
            try:
                msg = client.get(timeout=3)
            except Exception:
                return
            answer = json.loads(msg.payload)
            if answer["param"]["code"] == 0:
                acked.add(answer["request_id"])

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    sent = 0
    stop_at = time.monotonic() + 20
    while time.monotonic() < stop_at:
        for _ in range(50):
            payload = {
                "t": int(time.time()),
                "request_id": str(uuid.uuid4()),
                "param": {"cid": "meter-1", "id": "5", "value": 2300000 + sent},
            }
            client.c.publish("gateway_id/gw-crash/properties/report", json.dumps(payload), qos=1)
            sent += 1
        time.sleep(0.01)
        if len(acked) >= 500:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    collector.join(10)
    client.c.loop_stop()
    assert len(acked) >= 500, f"only {len(acked)} of {sent} reports answered before the kill"

    proc = start_server(data, port)  # restart: migrations and recovery run on the same files
    servers.append(proc)
    try:
        engine = create_engine(f"sqlite:///{data / 'meterhub.db'}")
        with engine.connect() as conn:
            stored = {r[0] for r in conn.execute(text("select request_id from reports"))}
        engine.dispose()
        missing = acked - stored
        assert not missing, f"{len(missing)} acknowledged reports lost of {len(acked)}"
    finally:
        proc.terminate()
        proc.wait(10)
