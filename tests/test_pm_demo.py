"""``meterhub demo`` (what ``make demo`` runs) puts its simulated meters in a demo site: within the
first minute there are bills for its tenants and a prepaid balance that falls with consumption."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx

from conftest import free_port, wait_for


def test_the_demo_shows_bills_and_a_falling_prepaid_balance(tmp_path: Path) -> None:
    http, mqtt = free_port(), free_port()
    out = tmp_path / "demo.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterhub",
                "demo",
                "--data-dir",
                str(tmp_path / "data"),
                "--http-port",
                str(http),
                "--mqtt-port",
                str(mqtt),
                "--interval",
                "0.5",
                "--gateways",
                "1",
                "--duration",
                "90",
            ],
            stdout=f,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "METERHUB_TIMEZONE": "UTC"},
        )
    try:
        text = wait_for(
            lambda: "prepaid meter" in out.read_text() and out.read_text(), timeout=40, interval=0.2
        )
        token = re.search(r"\(admin\): (mh_\S+)", text).group(1)
        cid = re.search(r"prepaid meter (\S+)", text).group(1)
        month = re.search(r"--month (\d{4}-\d{2})", text).group(1)
        api = httpx.Client(base_url=f"http://127.0.0.1:{http}", headers={"Authorization": f"Bearer {token}"})
        first = Decimal(api.get(f"/api/v1/meters/{cid}/prepaid").json()["balance_exact"])
        assert first <= Decimal("0.10")

        def fallen() -> Decimal | None:
            b = Decimal(api.get(f"/api/v1/meters/{cid}/prepaid").json()["balance_exact"])
            return b if b < first else None

        assert wait_for(fallen, timeout=30, interval=0.5) < first
        sites = api.get("/api/v1/sites").json()
        assert [s["name"] for s in sites] == ["Demo Court"]
        bills = api.get(f"/api/v1/sites/{sites[0]['id']}/bills", params={"month": month}).json()["bills"]
        assert [b["tenant"]["name"] for b in bills] == [
            "Alice Martin",
            "Bob Chen",
            "Carla Rossi",
            "Café Luna",
        ]
        assert all(b["preview"] and Decimal(b["total"]) > 0 for b in bills)
        assert any(Decimal(b["kwh_total"]) > 0 for b in bills)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
