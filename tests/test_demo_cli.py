"""``meterhub demo`` (``make demo``): one admin token kept across runs, and SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import free_port, wait_for


def readme_examples(base: str, token: str) -> None:
    """The README's operator examples, as written there, against the running demo."""
    conn = ["--url", base, "--token", token]

    def cli(*args: str) -> str:
        argv = [sys.executable, "-m", "meterhub", *args, *conn]
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    wait_for(lambda: "sim-gw-001-m002" in cli("devices"), 30, 0.5)
    assert cli("command", "sim-gw-001-m002", "switch", "false").startswith("ok: code 0")
    assert cli("command", "sim-gw-001-m002", "voltage_under", "207").startswith("ok: code 0")
    assert "voltage_under" in cli("show", "sim-gw-001-m002")
    assert httpx.get(f"{base}/metrics").status_code == 401  # the README says /metrics needs a token
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert metrics.status_code == 200 and "meterhub_" in metrics.text


def run_demo_until_token(tmp_path: Path, n: int, check: bool = False) -> tuple[str, str, int]:
    """Start the demo, read its admin token, stop it with SIGTERM: (token, stderr, exit code)."""
    out, err = tmp_path / f"demo{n}.out", tmp_path / f"demo{n}.err"
    http, mqtt = free_port(), free_port()
    cmd = [sys.executable, "-m", "meterhub", "demo", "--data-dir", str(tmp_path / "data")]
    cmd += ["--http-port", str(http), "--mqtt-port", str(mqtt), "--gateways", "1", "--meters", "2"]
    cmd += ["--duration", "120"]
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env={**os.environ, "METERHUB_TIMEZONE": "UTC"})
    try:
        text = wait_for(lambda: "prepaid meter" in out.read_text() and out.read_text(), 60, 0.2)
        token = re.search(r"\(admin\): (mh_\S+)", text).group(1)
        if check:
            readme_examples(f"http://127.0.0.1:{http}", token)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    return token, err.read_text(), code


def test_the_demo_keeps_its_token_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    first, err1, code1 = run_demo_until_token(tmp_path, 1, check=True)
    assert code1 == 0, err1
    assert "Traceback" not in err1
    second, err2, code2 = run_demo_until_token(tmp_path, 2)
    assert code2 == 0 and "Traceback" not in err2, err2
    assert second == first
    assert (tmp_path / "data" / "demo-token").stat().st_mode & 0o077 == 0
