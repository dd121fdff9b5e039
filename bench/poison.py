"""One gateway sending reports PostgreSQL cannot store, and everybody else trying to connect.

Starts meterhub (in this process, on a fresh PostgreSQL database on 127.0.0.1:5432 unless
``--database-url`` is given, MQTT on a free 127.0.0.1 port), lets one gateway send ``--poison-rate``
reports per second whose request_id holds a NUL (valid JSON: ``"\\u0000"``), and meanwhile makes
``--attempts`` honest CONNECTs from other gateways, ``--attempt-interval`` s apart. Prints how many got
CONNACK 0, and what the poison reports were answered. Bounded in time (~attempts x interval + 5 s).

    .venv/bin/python bench/poison.py                         # this tree
    PYTHONPATH=/path/to/old/src .venv/bin/python bench/poison.py   # another version of meterhub
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import create_engine, text

from meterhub.app import Hub
from meterhub.config import load_settings
from meterhub.core.auth import gateway_password
from meterhub.storage import registry

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def fresh_database() -> str:
    name = f"meterhub_poison_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{PG}/{name}"


def drop_database(url: str) -> None:
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def client(port: int, client_id: str, username: str) -> tuple[mqtt.Client, Any]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(username, gateway_password(client_id, username))
    connacks: Any = collections.deque()
    c.on_connect = lambda _c, _u, _f, rc, _p: connacks.append(rc)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    return c, connacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--poison-rate", type=float, default=2.0, help="NUL reports per second")
    ap.add_argument("--attempts", type=int, default=40, help="honest connection attempts")
    ap.add_argument("--attempt-interval", type=float, default=0.25, help="seconds between attempts")
    ap.add_argument("--database-url", default=None, help="default: a fresh PostgreSQL database")
    ap.add_argument(
        "--kind",
        choices=("nul", "constraint"),
        default="nul",
        help="nul: request_ids with a NUL; constraint: request_ids 'poison-N' that a CHECK constraint "
        "installed on the reports table refuses (a row the database refuses but no validator can know)",
    )
    args = ap.parse_args()

    url = args.database_url or fresh_database()
    data = Path(tempfile.mkdtemp(prefix="meterhub-poison-"))
    settings = load_settings(
        None, data_dir=data, database_url=url, mqtt_host="127.0.0.1", mqtt_port=0, http_port=None
    )
    hub = Hub(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(hub.start(), loop).result(30)
    try:
        port = hub.mqtt_port
        vendor = registry.add_vendor(hub.engine, "poison-bench")
        if args.kind == "constraint":
            with hub.engine.begin() as conn:
                conn.execute(
                    text("ALTER TABLE reports ADD CONSTRAINT poison CHECK (request_id NOT LIKE 'poison-%')")
                )
        bad, _ = client(port, "gw-poison", vendor.username)
        answers: collections.Counter[int] = collections.Counter()
        bad.on_message = lambda _c, _u, msg: answers.update([json.loads(msg.payload)["param"]["code"]])
        time.sleep(0.5)
        bad.subscribe("gateway_id/gw-poison/#", 1)
        sync = {"t": int(time.time()), "request_id": "s-1", "param": {"cid": "poison-m1", "product_id": "p"}}
        bad.publish("gateway_id/gw-poison/devices/sync", json.dumps(sync), 1).wait_for_publish(5)
        stop = threading.Event()

        def poison() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                doc = {
                    "t": int(time.time()),
                    "request_id": f"p-{i}\u0000" if args.kind == "nul" else f"poison-{i}",
                    "param": {"cid": "poison-m1", "id": "5", "value": 2300000 + i},
                }
                bad.publish("gateway_id/gw-poison/properties/report", json.dumps(doc), 1)
                stop.wait(1.0 / args.poison_rate)

        sender = threading.Thread(target=poison, daemon=True)
        sender.start()
        time.sleep(1.0)
        accepted = refused = timeouts = 0
        others = []
        for n in range(args.attempts):
            c, connacks = client(port, f"gw-honest-{n}", vendor.username)
            others.append(c)
            deadline = time.monotonic() + 5
            while not connacks and time.monotonic() < deadline:
                time.sleep(0.01)
            if not connacks:
                timeouts += 1
            elif connacks[0] == 0:
                accepted += 1
            else:
                refused += 1
            c.disconnect()
            c.loop_stop()
            time.sleep(args.attempt_interval)
        stop.set()
        sender.join(5)
        time.sleep(0.5)
        bad.disconnect()
        bad.loop_stop()
        print(
            f"poison ({args.kind}) reports/s: {args.poison_rate:g}; "
            f"answers to the poison gateway by code: {dict(answers)}"
        )
        print(
            f"honest connection attempts: {args.attempts}; accepted (CONNACK 0): {accepted}; "
            f"refused: {refused}; no answer: {timeouts}"
        )
    finally:
        asyncio.run_coroutine_threadsafe(hub.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if args.database_url is None:
            drop_database(url)


if __name__ == "__main__":
    main()
