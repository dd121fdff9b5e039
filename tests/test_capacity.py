"""Running out of file descriptors: a `meterhub serve` process under a low open-files limit."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import httpx

import mqttraw
from conftest import cli_add_vendor, free_port, wait_for
from meterhub.core.auth import gateway_password
from meterhub.mqtt.server import FD_RESERVE

OPEN_FILES = 400  # the server may hold OPEN_FILES - FD_RESERVE = 144 MQTT connections


def test_connections_past_the_open_files_limit_are_refused_and_the_api_keeps_working(tmp_path: Path) -> None:
    data = tmp_path / "data"
    username = cli_add_vendor(data, "fdco")
    mqtt_port, http_port = free_port(), free_port()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))

    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "meterhub", "serve", "--data-dir", str(data)),
            *("--mqtt-port", str(mqtt_port), "--http-port", str(http_port), "--log-level", "WARNING"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=low_limit,
    )
    clients: list[mqttraw.RawClient] = []
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server died"
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=30)
        allowed = OPEN_FILES - FD_RESERVE
        codes = []
        for i in range(allowed + 20):
            cid = f"fd-{i}"
            client = mqttraw.RawClient(mqtt_port)
            clients.append(client)
            client.send(mqttraw.connect(cid, username, gateway_password(cid, username)))
            kind, body = client.read_packet()
            assert kind == 0x20
            codes.append(body[1])
        assert codes == [0x00] * allowed + [0x03] * 20
        assert healthy()  # descriptors are left for the API
    finally:
        for client in clients:
            client.close()
        proc.kill()
        stderr = proc.communicate(timeout=10)[1].decode()
    assert "the open-files limit caps MQTT connections" in stderr


def test_the_young_gc_threshold_covers_what_back_pressure_keeps_alive() -> None:
    """``meterhub serve`` sizes the young generation from ``max_queued_writes`` (bounded both ways)."""
    from meterhub.core import gcwatch

    assert gcwatch.young_threshold_for(20_000) == 500_000
    assert gcwatch.young_threshold_for(100) == gcwatch.YOUNG_THRESHOLD
    assert gcwatch.young_threshold_for(10**9) == gcwatch.YOUNG_THRESHOLD_MAX
