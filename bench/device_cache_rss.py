"""Resident memory of a node started on a database of many devices (generated with SQL, not MQTT).

    python bench/device_cache_rss.py --devices 200000 --database-url postgresql+psycopg://...

Fills the database (if it has fewer devices), starts ``meterhub serve`` on it with free ports, waits
for ``/healthz`` and a few seconds more, prints the server's VmRSS, and stops it. Run it with another
``PYTHONPATH`` to measure another version of meterhub on the same database.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from sqlalchemy import func, insert, select

from meterhub.storage import registry, schema
from meterhub.storage.database import create_db_engine, migrate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, devices: int, per_gateway: int = 100) -> None:
    engine = create_db_engine(url, sqlite_synchronous="NORMAL")
    migrate(engine)
    with engine.connect() as conn:
        have = conn.execute(select(func.count()).select_from(schema.devices)).scalar() or 0
    if have >= devices:
        return
    vendor = registry.add_vendor(engine, f"bench-{os.getpid()}")
    now = time.time()
    rows = [
        {
            "cid": f"rss-{i:07d}",
            "gateway_id": f"rss-gw-{i // per_gateway:05d}",
            "product_id": "pid-meter",
            "model": "smart-meter",
            "device_name": f"meter {i}",
            "online": False,
            "first_seen": now,
            "last_seen": now,
            "synced_at": now,
            "vendor_id": vendor.id,
        }
        for i in range(have, devices)
    ]
    with engine.begin() as conn:
        for k in range(0, len(rows), 10_000):
            conn.execute(insert(schema.devices), rows[k : k + 10_000])
    engine.dispose()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=200_000)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after /healthz")
    args = ap.parse_args()
    fill(args.database_url, args.devices)
    http = free_port()
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "meterhub", "serve", "--data-dir", data]
        cmd += ["--database-url", args.database_url, "--mqtt-port", str(free_port())]
        cmd += ["--http-port", str(http)]
        env = {**os.environ, "METERHUB_HTTP_HOST": "127.0.0.1", "METERHUB_MQTT_HOST": "127.0.0.1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit("server did not become healthy")
            time.sleep(args.settle)
            print(f"devices={args.devices} rss_mib={rss_kib(proc.pid) / 1024:.1f}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
