"""One server per embedded database: a second ``meterhub serve`` (or ``demo``) on the same data
directory exits at once with one line and changes nothing; a port in use is one line too.

Real ``meterhub serve`` processes, a real paho gateway, real HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import (
    Client,
    RunningHub,
    cli_add_vendor,
    drop_postgres,
    free_port,
    fresh_postgres_url,
    make_settings,
    wait_for,
)
from meterhub.core.auth import gateway_password
from meterhub.storage.lock import DataDirInUse, ServerLock, lock_path_for


def meterhub(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterhub", *args], capture_output=True, text=True, timeout=timeout
    )


def serve_args(data: Path, mqtt_port: int, http_port: int) -> list[str]:
    return [
        *("serve", "--data-dir", str(data)),
        *("--mqtt-port", str(mqtt_port), "--http-port", str(http_port)),
    ]


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_server(data: Path, procs: list[subprocess.Popen[str]]) -> tuple[subprocess.Popen[str], int, int]:
    mqtt_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterhub", *serve_args(data, mqtt_port, http_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "METERHUB_MQTT_HOST": "127.0.0.1"},
    )
    procs.append(proc)

    def healthy() -> bool:
        assert proc.poll() is None, "the server died"
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=30, interval=0.1)
    return proc, mqtt_port, http_port


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failed command's stderr, which must be exactly one ``Error: ...`` line."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def presence_rows(data: Path) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(data / "meterhub.db")) as conn:
        return conn.execute("select cid, online, cause from presence order by id").fetchall()


def test_a_second_server_on_the_same_data_dir_exits_at_once_and_changes_nothing(
    tmp_path: Path, servers: list[subprocess.Popen[str]]
) -> None:
    data = tmp_path / "data"
    first, mqtt_port, http_port = start_server(data, servers)
    # offline CLI commands keep working on the data directory of a running server
    username = cli_add_vendor(data, "acme")
    token = meterhub("token", "create", "viewer", "--scope", "read", "--data-dir", str(data)).stdout.split()[
        0
    ]
    gw = Client(mqtt_port, "gw-1", username, gateway_password("gw-1", username))
    try:
        assert gw.connect()[0] == 0
        gw.subscribe("gateway_id/gw-1/#")
        t = int(time.time())
        sync = {"t": t, "request_id": "r1", "param": {"cid": "m1", "product_id": "p1"}}
        gw.publish("gateway_id/gw-1/devices/sync", json.dumps(sync))
        assert json.loads(gw.get().payload)["param"]["code"] == 0
        status = {"t": t, "request_id": "r2", "param": [{"cid": "m1", "status": True}]}
        gw.publish("gateway_id/gw-1/devices/status", json.dumps(status))
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {token}"}
        )
        wait_for(lambda: api.get("/api/v1/devices/m1").json()["presence"]["online"] is True)
        before = presence_rows(data)
        assert before == [("m1", 1, "status")]

        # the README's "Connect a gateway" step while a server runs: a second serve, other ports
        started = time.monotonic()
        second = meterhub(*serve_args(data, free_port(), free_port()), timeout=60)
        elapsed = time.monotonic() - started
        line = one_line_error(second)
        assert "in use by another meterhub server" in line and f"pid {first.pid}" in line
        assert str(data.resolve() / "meterhub.db") in line
        assert elapsed < 30  # it did not wait for the lock (a generous bound: it is a subprocess start)

        # nothing changed: the first server's device is still online, in its API and in the database
        assert presence_rows(data) == before
        assert api.get("/api/v1/devices/m1").json()["presence"]["online"] is True
        with contextlib.closing(sqlite3.connect(data / "meterhub.db")) as conn:
            assert conn.execute("select online from devices where cid='m1'").fetchall() == [(1,)]
        # and it still serves its gateway
        report = {"t": int(time.time()), "request_id": "r3", "param": {"cid": "m1", "id": "1", "value": True}}
        gw.publish("gateway_id/gw-1/properties/report", json.dumps(report))
        assert json.loads(gw.get().payload)["param"]["code"] == 0

        # demo on that data directory: refused the same way, and it adds no vendor or token
        demo = meterhub("demo", "--data-dir", str(data), "--mqtt-port", str(free_port()), "--duration", "1")
        assert "in use by another meterhub server" in one_line_error(demo)
        with contextlib.closing(sqlite3.connect(data / "meterhub.db")) as conn:
            assert conn.execute("select name from vendors").fetchall() == [("acme",)]
            assert conn.execute("select count(*) from api_tokens").fetchall() == [(1,)]
        api.close()
    finally:
        gw.close()

    # a server killed with -9 leaves no stale lock: the next one starts
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    third, _, third_http = start_server(data, servers)
    assert httpx.get(f"http://127.0.0.1:{third_http}/healthz").status_code == 200
    third.terminate()
    assert third.wait(20) == 0


def test_a_port_in_use_is_one_line_and_touches_nothing(
    tmp_path: Path, servers: list[subprocess.Popen[str]]
) -> None:
    _, mqtt_port, http_port = start_server(tmp_path / "first", servers)
    other = tmp_path / "other"
    for args, what, port in (
        (serve_args(other, mqtt_port, free_port()), "MQTT", mqtt_port),
        (serve_args(other, free_port(), http_port), "HTTP", http_port),
    ):
        line = one_line_error(meterhub(*args))
        assert f"cannot listen for {what} on" in line and f":{port}: Address already in use" in line
    # it failed before touching a database
    assert not (other / "meterhub.db").exists()


def test_the_lock_is_only_for_sqlite_and_exclusive_even_within_a_process(tmp_path: Path) -> None:
    assert lock_path_for("postgresql+psycopg://postgres@127.0.0.1/x") is None
    assert lock_path_for("sqlite:///:memory:") is None
    db = tmp_path / "d" / "meterhub.db"
    path = lock_path_for(f"sqlite:///{db}")
    assert path == db.with_name("meterhub.db.lock")
    outer, inner = ServerLock(path), ServerLock(path)
    outer.acquire()
    outer.acquire()  # taking it again is a no-op
    with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
        inner.acquire()
    child = "from meterhub.storage.lock import ServerLock, DataDirInUse\n" + (
        f"l = ServerLock(__import__('pathlib').Path({str(path)!r}))\n"
        "try:\n    l.acquire()\nexcept DataDirInUse as e:\n    print('busy', e)\nelse:\n    print('free')\n"
    )
    check = [sys.executable, "-c", child]
    assert subprocess.run(check, capture_output=True, text=True, timeout=30).stdout.startswith("busy")
    outer.release()
    assert subprocess.run(check, capture_output=True, text=True, timeout=30).stdout.strip() == "free"
    inner.acquire()
    inner.release()


def test_nodes_sharing_postgresql_are_not_locked_out(tmp_path: Path) -> None:
    """Cluster nodes share one PostgreSQL database (even with the same data directory): no lock."""
    url = fresh_postgres_url()
    hubs: list[RunningHub] = []
    try:
        for _ in range(2):
            hubs.append(RunningHub(make_settings(tmp_path / "data", database_url=url)).start())
        assert all(h.hub.http_port for h in hubs)
        assert not list((tmp_path / "data").glob("*.lock"))
    finally:
        for h in hubs:
            h.stop()
        drop_postgres(url)


def test_in_process_hubs_on_one_sqlite_database_are_refused(tmp_path: Path) -> None:
    first = RunningHub(make_settings(tmp_path / "data")).start()
    try:
        second = RunningHub(make_settings(tmp_path / "data"))
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            second.start()  # which closes its loop again
    finally:
        first.stop()
    third = RunningHub(make_settings(tmp_path / "data")).start()  # released by the first one's stop
    third.stop()
