"""``meterhub demo`` (``make demo``): one admin token kept across runs, SIGTERM stops it cleanly, and
the first start backfills a week of simulated history (marked simulated) that a second start keeps
as it is."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, func, select

from conftest import free_port, wait_for
from meterhub.storage import schema
from meterhub.tools.backfill import PREFIX


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


def history(tmp_path: Path) -> dict[str, object]:
    """What the demo's database holds of the backfilled history."""
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'meterhub.db'}")
    r, a = schema.reports, schema.alarms
    simulated = r.c.request_id.like(PREFIX + "%")
    with engine.connect() as conn:
        count, first, last = conn.execute(
            select(func.count(), func.min(r.c.t), func.max(r.c.t)).where(simulated)
        ).one()
        per_dp = dict(
            conn.execute(select(r.c.dp_id, func.count()).where(simulated).group_by(r.c.dp_id)).all()
        )
        alarms = [row.details for row in conn.execute(select(a.c.details).order_by(a.c.id))]
        registers = {
            cid: [
                row.num
                for row in conn.execute(
                    select(r.c.num).where(r.c.cid == cid, r.c.dp_id == "44").order_by(r.c.t)
                )
            ]
            for cid in ("sim-gw-001-m001", "sim-gw-001-m002")
        }
    engine.dispose()
    return {
        "count": count,
        "first": first,
        "last": last,
        "per_dp": per_dp,
        "alarms": alarms,
        "registers": registers,
    }


def test_the_demo_keeps_its_token_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    started = time.time()
    first, err1, code1 = run_demo_until_token(tmp_path, 1, check=True)
    assert code1 == 0, err1
    assert "Traceback" not in err1
    out1 = (tmp_path / "demo1.out").read_text()
    assert re.search(
        r"backfilled a week of simulated history in \d+\.\d s: 12096 reports, 6 past alarms", out1
    )
    h1 = history(tmp_path)
    # 2 meters x 7 days x 96 readings (15 min) x 9 data points, ending where the live meters start
    assert h1["count"] == 2 * 7 * 96 * 9
    assert set(h1["per_dp"]) == {"3", "5", "7", "10", "30", "31", "32", "44", "50"}
    assert started - 7 * 86400 - 900 <= h1["first"] <= started - 7 * 86400 + 900
    assert h1["last"] <= started
    simulated = [d for d in h1["alarms"] if d and d.get("simulated")]
    assert len(simulated) == 6

    second, err2, code2 = run_demo_until_token(tmp_path, 2)
    assert code2 == 0 and "Traceback" not in err2, err2
    assert second == first
    assert (tmp_path / "data" / "demo-token").stat().st_mode & 0o077 == 0
    assert "backfilled at the first start (kept)" in (tmp_path / "demo2.out").read_text()
    h2 = history(tmp_path)
    assert (h2["count"], h2["first"], h2["last"], h2["per_dp"]) == (
        h1["count"],
        h1["first"],
        h1["last"],
        h1["per_dp"],
    )
    assert len([d for d in h2["alarms"] if d and d.get("simulated")]) == 6
    # Each meter's energy register never falls: history, first run, second run (it continues).
    for cid, register in h2["registers"].items():
        assert len(register) > 672, cid
        assert all(b >= a for a, b in itertools.pairwise(register)), cid
