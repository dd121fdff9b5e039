"""How long storing N offline persistent MQTT sessions takes (meterhub.mqtt.session_store).

N sessions, each with one subscription and ``--queued`` QoS 1 messages of 200 bytes queued while
offline, are saved at once and flushed through the group-commit writer: wall time until committed,
and the event loop's CPU for it (``to_dict`` and JSON, the part that runs on the loop).

    .venv/bin/python bench/session_store.py                       # SQLite in a temp dir
    .venv/bin/python bench/session_store.py --database-url postgresql+psycopg://postgres@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from meterhub.core.auth import gateway_principal
from meterhub.mqtt.session import Session
from meterhub.mqtt.session_store import SessionStore
from meterhub.storage.database import GroupCommitWriter, create_db_engine, migrate


async def run(url: str, n: int, queued: int) -> None:
    engine = create_db_engine(url, sqlite_synchronous="FULL")
    migrate(engine)
    writer = GroupCommitWriter(engine, asyncio.get_running_loop())
    writer.start()
    store = SessionStore(engine, writer, "bench")
    sessions = []
    for i in range(n):
        cid = f"gw-{i:06d}"
        s = Session(cid, gateway_principal(cid, "v", 1), clean=False)
        s.subscriptions[f"gateway_id/{cid}/#"] = 1
        sessions.append(s)
    for s in sessions:
        for k in range(queued):
            s.send(f"gateway_id/{s.client_id}/commands", b"x" * 200 + str(k).encode(), 1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for s in sessions:
        store.save(s)
    await store.flush()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    t0 = time.perf_counter()
    loaded = await store.load(sessions[n // 2].client_id)
    load_ms = (time.perf_counter() - t0) * 1000
    assert loaded is not None and len(loaded[1]["queue"]) == queued
    print(
        f"{engine.dialect.name}: {n} sessions x {queued} queued: stored in {wall:.2f} s wall "
        f"(process CPU {cpu:.2f} s, writer batches {writer.stats.batches}); one load {load_ms:.1f} ms"
    )
    writer.stop()
    engine.dispose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database-url")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--queued", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        asyncio.run(run(url, args.n, args.queued))


if __name__ == "__main__":
    main()
