"""The do-it-yourself pipeline meterhub replaces: a generic broker plus an aiomqtt worker doing the work.

This is what a user would reasonably write to run the edge protocol on mosquitto, without heroics:
one asyncio process (uvloop) with one aiomqtt client subscribed (QoS 1) to
``gateway_id/+/properties/report`` and ``gateway_id/+/devices/sync``, iterating ``client.messages``:

- decode the JSON with the standard library (``json.loads``);
- ``devices/sync``: remember the device (cid -> gateway), upsert it in ``devices``, answer code 0 on
  ``.../devices/sync/response`` after the commit;
- ``properties/report``: the device must have been synced by this gateway (else 2003), the data point
  must exist (else 2002) and the value must pass ``builtin_model("smart-meter").get(dp).coerce(value)``
  (else that error's code, answered at once); then the history row and the latest value go to SQLite
  and code 0 is published on ``.../properties/report/response`` **after the commit**;
- SQLite (the standard ``sqlite3`` module, one dedicated thread): WAL, ``synchronous=FULL``, the same
  tables and indexes meterhub uses for reports (``reports`` with a unique (gateway_id, request_id) index
  so a QoS 1 redelivery is stored once; ``latest_values`` upserted, never over a newer ``t``);
  ``executemany`` per batch; a batch is committed when its first message is ``--batch-ms`` (50) old or
  it holds ``--batch-max`` (1000) messages;
- responses: QoS 1, encoded with ``meterhub.protocol.messages.encode_response`` (the same bytes
  meterhub sends), published with ``await client.publish`` for every message of a committed batch at
  once (``asyncio.gather``) in a task, so receiving goes on meanwhile.

Settings a user would have to find (documented, not heroics): ``max_inflight_messages=200`` for the
responses, and aiomqtt's ``pending_calls_threshold`` raised so it does not log a warning for every
response of a batch. Nothing else is tuned: no shared subscriptions, no multiprocessing, no msgspec.

What it does not do that meterhub does: ``devices/status`` (presence) and ``commands`` are not handled,
there is no response dedupe for redelivered requests (the unique index keeps the table right), no
product registry or per-product models, no authentication of gateways (mosquitto is configured open).

Stops on SIGTERM/SIGINT and then writes ``--stats-file`` (JSON): counters and how many reports were
committed per 0.1 s of CLOCK_MONOTONIC (``buckets``), so a benchmark can count the ones committed in
its measurement window. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt

from meterhub.model.errors import ValueRejected
from meterhub.model.loader import builtin_model
from meterhub.protocol.messages import encode_response

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    cid TEXT PRIMARY KEY, gateway_id TEXT NOT NULL, product_id TEXT, device_name TEXT, synced_at REAL
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, gateway_id TEXT NOT NULL, request_id TEXT NOT NULL,
    cid TEXT NOT NULL, dp_id TEXT NOT NULL, value TEXT NOT NULL, num REAL, t REAL NOT NULL,
    received_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_reports_gateway_request ON reports (gateway_id, request_id);
CREATE INDEX IF NOT EXISTS ix_reports_cid_dp_t ON reports (cid, dp_id, t);
CREATE TABLE IF NOT EXISTS latest_values (
    cid TEXT NOT NULL, dp_id TEXT NOT NULL, value TEXT NOT NULL, num REAL, t REAL NOT NULL,
    received_at REAL NOT NULL, PRIMARY KEY (cid, dp_id)
);
"""
INSERT_REPORT = (
    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gateway_id, request_id) DO NOTHING"
)
UPSERT_LATEST = (
    "INSERT INTO latest_values (cid, dp_id, value, num, t, received_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (cid, dp_id) DO UPDATE SET value = excluded.value, num = excluded.num, t = excluded.t, "
    "received_at = excluded.received_at WHERE latest_values.t <= excluded.t"
)
UPSERT_DEVICE = (
    "INSERT INTO devices (cid, gateway_id, product_id, device_name, synced_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (cid) DO UPDATE SET gateway_id = excluded.gateway_id, product_id = excluded.product_id, "
    "device_name = excluded.device_name, synced_at = excluded.synced_at"
)

log = logging.getLogger("worker")


class Store:
    """SQLite used from one thread only (the executor has a single worker)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> dict[str, str]:
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        return {cid: gw for cid, gw in self.db.execute("SELECT cid, gateway_id FROM devices")}

    def commit(self, devices: list[tuple[Any, ...]], reports: list[tuple[Any, ...]]) -> None:
        db = self.db
        assert db is not None
        db.execute("BEGIN")
        try:
            if devices:
                db.executemany(UPSERT_DEVICE, devices)
            if reports:
                db.executemany(INSERT_REPORT, reports)
                db.executemany(UPSERT_LATEST, [(r[2], r[3], r[4], r[5], r[6], r[7]) for r in reports])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def numeric(dp: Any, value: Any) -> float | None:
    if dp.type == "value":
        return float(dp.scaled(value))
    if dp.type == "bool":
        return 1.0 if value else 0.0
    return None


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = builtin_model("smart-meter")
        self.store = Store(args.db)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self.devices: dict[str, str] = {}
        # The open batch: rows to store and the responses to send once they are committed.
        self.batch_devices: list[tuple[Any, ...]] = []
        self.batch_reports: list[tuple[Any, ...]] = []
        self.batch_answers: list[tuple[str, bytes, str]] = []  # (topic, payload, kind)
        self.batch_started = 0.0
        self.have_batch = asyncio.Event()
        self.batch_full = asyncio.Event()
        self.stats: Counter[str] = Counter()
        self.buckets: Counter[int] = Counter()  # reports committed per 0.1 s of CLOCK_MONOTONIC
        self.publishers: set[asyncio.Task[None]] = set()

    # --- receiving -----------------------------------------------------------------------------

    def handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "gateway_id":
            self.stats["ignored"] += 1
            return
        gw, kind = parts[1], parts[2] + "/" + parts[3]
        now = time.time()
        try:
            msg = json.loads(message.payload)  # type: ignore[arg-type]
            request_id = msg["request_id"]
            param = msg["param"]
        except (ValueError, KeyError, TypeError):
            self.stats["bad_json"] += 1
            return
        if kind == "devices/sync":
            cid = param.get("cid")
            if not isinstance(cid, str) or not cid:
                self.answer_now(client, gw, kind, request_id, cid, 1100)
                return
            self.devices[cid] = gw
            row = (cid, gw, param.get("product_id"), param.get("device_name"), now)
            self.add(
                kind, (f"gateway_id/{gw}/devices/sync/response", encode_response(request_id, cid, 0, now))
            )
            self.batch_devices.append(row)
            self.stats["sync"] += 1
            return
        if kind != "properties/report":
            self.stats["ignored"] += 1
            return
        cid = param.get("cid")
        if self.devices.get(cid) != gw:
            self.answer_now(client, gw, kind, request_id, cid, 2003)
            return
        dp = self.model.get(param.get("id"))
        if dp is None:
            self.answer_now(client, gw, kind, request_id, cid, 2002)
            return
        try:
            value = dp.coerce(param.get("value"))
        except ValueRejected as exc:
            self.answer_now(client, gw, kind, request_id, cid, int(exc.code))
            return
        t = msg.get("t")
        if not isinstance(t, (int, float)):
            self.answer_now(client, gw, kind, request_id, cid, 1001)
            return
        if t > 1e11:  # milliseconds
            t = t / 1000
        self.stats["report"] += 1
        self.batch_reports.append(
            (gw, request_id, cid, dp.id_str, json.dumps(value), numeric(dp, value), float(t), now)
        )
        self.add(
            kind,
            (f"gateway_id/{gw}/properties/report/response", encode_response(request_id, cid, 0, now)),
        )

    def add(self, kind: str, answer: tuple[str, bytes]) -> None:
        if not self.batch_answers:
            self.batch_started = time.monotonic()
            self.have_batch.set()
        self.batch_answers.append((answer[0], answer[1], kind))
        if len(self.batch_answers) >= self.args.batch_max:
            self.batch_full.set()

    def answer_now(
        self, client: aiomqtt.Client, gw: str, kind: str, request_id: str, cid: Any, code: int
    ) -> None:
        self.stats[f"{kind}.code.{code}"] += 1
        payload = encode_response(request_id, cid if isinstance(cid, str) else None, code, time.time())
        self.spawn(self.publish(client, [(f"gateway_id/{gw}/{kind}/response", payload, kind)]))

    # --- committing and answering --------------------------------------------------------------

    async def committer(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        window = self.args.batch_ms / 1000
        while True:
            await self.have_batch.wait()
            left = self.batch_started + window - time.monotonic()
            if left > 0 and not self.batch_full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.batch_full.wait(), left)
            devices, reports, answers = self.batch_devices, self.batch_reports, self.batch_answers
            self.batch_devices, self.batch_reports, self.batch_answers = [], [], []
            self.have_batch.clear()
            self.batch_full.clear()
            await loop.run_in_executor(self.executor, self.store.commit, devices, reports)
            self.stats["commits"] += 1
            self.stats["reports_committed"] += len(reports)
            self.stats["devices_committed"] += len(devices)
            self.buckets[int(time.monotonic() * 10)] += len(reports)
            self.spawn(self.publish(client, answers))

    async def publish(self, client: aiomqtt.Client, answers: list[tuple[str, bytes, str]]) -> None:
        await asyncio.gather(*(client.publish(topic, payload, qos=1) for topic, payload, _ in answers))
        self.stats["responses"] += len(answers)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.publishers.add(task)
        task.add_done_callback(self.publishers.discard)

    # --- main ----------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.devices = await loop.run_in_executor(self.executor, self.store.open)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with aiomqtt.Client(
            "127.0.0.1",
            self.args.port,
            identifier=self.args.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            max_inflight_messages=200,
        ) as client:
            client.pending_calls_threshold = 1_000_000
            await client.subscribe([("gateway_id/+/properties/report", 1), ("gateway_id/+/devices/sync", 1)])
            if self.args.ready_file:
                Path(self.args.ready_file).touch()
            committer = asyncio.ensure_future(self.committer(client))

            async def receive() -> None:
                async for message in client.messages:
                    try:
                        self.handle(client, message)
                    except Exception:
                        self.stats["errors"] += 1
                        log.exception("failed to handle a message on %s", message.topic)

            receiver = asyncio.ensure_future(receive())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({receiver, committer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiver, committer, stopper):
                task.cancel()
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    log.error("worker task failed: %r", task.exception())
                    self.stats["fatal"] += 1
        self.executor.submit(self.store.close).result()
        self.executor.shutdown()

    def write_stats(self) -> None:
        if self.args.stats_file:
            Path(self.args.stats_file).write_text(
                json.dumps(
                    {"stats": dict(self.stats), "buckets": {str(k): v for k, v in self.buckets.items()}}
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="the broker's port on 127.0.0.1")
    ap.add_argument("--db", required=True, help="SQLite database file")
    ap.add_argument("--client-id", default="meter-worker")
    ap.add_argument("--batch-ms", type=float, default=50.0, help="commit a batch this old (ms)")
    ap.add_argument("--batch-max", type=int, default=1000, help="... or holding this many messages")
    ap.add_argument("--ready-file", default=None, help="touched once subscribed")
    ap.add_argument("--stats-file", default=None, help="JSON counters written on exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = Worker(args)
    try:
        import uvloop

        uvloop.run(worker.run())
    finally:
        worker.write_stats()


if __name__ == "__main__":
    main()
