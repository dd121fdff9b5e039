"""The group-commit writer against a real database (SQLite; PostgreSQL with METERHUB_TEST_DB=postgresql).

Several operations on the same row in one batch must end as if applied one by one, in order, although
the writer folds them into a few executemany statements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from conftest import TEST_DB, drop_postgres, fresh_postgres_url, storage_held
from meterhub.storage.database import (
    GroupCommitWriter,
    RowRefused,
    StorageError,
    create_db_engine,
    migrate,
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = fresh_postgres_url() if TEST_DB == "postgresql" else f"sqlite:///{tmp_path / 'writer.db'}"
    eng = create_db_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()
    if TEST_DB == "postgresql":
        drop_postgres(url)


def commit(engine: Engine, *groups: list[tuple[str, Any]]) -> None:
    """Submit the groups back to back (so they share a batch) and wait until all are committed."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        futures = [writer.write(ops) for ops in groups]  # queued before the thread starts: one batch
        writer.start()
        try:
            await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert writer.stats.batches == 1
        finally:
            writer.stop()

    asyncio.run(main())


def one(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).one()


def device(cid: str, at: float, **fields: Any) -> tuple[str, dict[str, Any]]:
    row = {"cid": cid, "gateway_id": "gw-1", "product_id": "p", "model": "smart-meter", "synced_at": at}
    row.update(last_seen=at, first_seen=at, online=False, **fields)
    return ("device", row)


def test_several_syncs_of_one_device_in_a_batch_end_as_if_applied_in_order(engine: Engine) -> None:
    commit(
        engine,
        [device("m-1", 100.0, device_name="first", mac_address="aa:bb")],
        [device("m-1", 101.0, device_name="second")],  # leaves mac_address out: kept
        [device("m-1", 102.0, install_location="roof")],
        [("presence", {"cid": "m-1", "online": True, "cause": "status", "at": 102.0})],
        [("presence", {"cid": "m-1", "online": False, "cause": "silence", "at": 103.0})],
        [("presence", {"cid": "m-1", "online": True, "cause": "report", "at": 104.0})],
    )
    row = one(
        engine,
        "SELECT device_name, mac_address, install_location, first_seen, synced_at, online "
        "FROM devices WHERE cid = 'm-1'",
    )
    assert tuple(row) == ("second", "aa:bb", "roof", 100.0, 102.0, True)
    assert one(engine, "SELECT count(*) FROM presence WHERE cid = 'm-1'")[0] == 3

    # a later batch: a sync without fields keeps them, presence goes offline
    commit(
        engine,
        [device("m-1", 200.0)],
        [("presence", {"cid": "m-1", "online": False, "cause": "gateway-disconnect", "at": 201.0})],
    )
    row = one(engine, "SELECT device_name, mac_address, first_seen, synced_at, online FROM devices")
    assert tuple(row) == ("second", "aa:bb", 100.0, 200.0, False)


def test_a_fleet_of_syncs_with_mixed_fields_is_stored_whole(engine: Engine) -> None:
    groups = []
    for i in range(600):
        fields = {"device_name": f"meter {i}"} if i % 3 else {"vendor_code": "v", "comm_type": "mqtt"}
        groups.append([device(f"m-{i}", 10.0 + i, **fields)])
        groups.append([("presence", {"cid": f"m-{i}", "online": i % 2 == 0, "cause": "status", "at": 20.0})])
    commit(engine, *groups)
    assert one(engine, "SELECT count(*) FROM devices")[0] == 600
    assert one(engine, "SELECT count(*) FROM devices WHERE online")[0] == 300
    assert one(engine, "SELECT count(*) FROM devices WHERE device_name IS NOT NULL")[0] == 400
    assert tuple(one(engine, "SELECT device_name, vendor_code FROM devices WHERE cid = 'm-3'")) == (None, "v")
    row = one(engine, "SELECT device_name, comm_type FROM devices WHERE cid = 'm-4'")
    assert tuple(row) == ("meter 4", None)


def test_connect_then_disconnect_of_a_gateway_in_one_batch(engine: Engine) -> None:
    connected = {"gateway_id": "gw-9", "connected": True, "client_address": "127.0.0.1:5000"}
    connected.update(last_connected_at=1.0, last_seen=1.0)
    commit(
        engine,
        [("gateway", connected)],
        [("gateway", {"gateway_id": "gw-9", "connected": False, "last_disconnected_at": 2.0})],
    )
    row = one(
        engine,
        "SELECT connected, client_address, last_connected_at, last_disconnected_at, last_seen "
        "FROM gateways WHERE gateway_id = 'gw-9'",
    )
    assert tuple(row) == (False, "127.0.0.1:5000", 1.0, 2.0, 1.0)


def test_after_a_failed_batch_clients_are_admitted_again_without_a_write(engine: Engine) -> None:
    """A failed batch turns new clients away (CONNACK 0x03) for ``retry_after`` s only: with nothing
    written meanwhile there is no proof either way, and a fleet turned away must get another try."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        writer.retry_after = 0.3
        writer.start()
        try:
            assert writer.admits_clients()
            with engine.begin() as conn:  # the database fails: a table it writes to is gone
                conn.execute(text("ALTER TABLE devices RENAME TO devices_gone"))
            with pytest.raises(StorageError):
                await asyncio.wait_for(writer.write([device("m-lost", 1.0)]), 10)
            with engine.begin() as conn:
                conn.execute(text("ALTER TABLE devices_gone RENAME TO devices"))
            assert (writer.healthy, writer.admits_clients()) == (False, False)
            await asyncio.sleep(0.4)
            assert (writer.healthy, writer.admits_clients()) == (False, True)
            await asyncio.wait_for(writer.write([device("m-ok", 1.0)]), 10)
            assert (writer.healthy, writer.admits_clients()) == (True, True)
        finally:
            writer.stop()

    asyncio.run(main())


def test_a_writer_past_its_high_water_mark_asks_for_a_pause_until_half_is_done(engine: Engine) -> None:
    """``on_pressure(True)`` when more than ``high_water`` groups are outstanding, ``on_pressure(False)``
    once no more than half of that is left; nothing is lost in between."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop(), high_water=10)
        events: list[tuple[bool, int]] = []
        writer.on_pressure = lambda pressed: events.append((pressed, writer.outstanding))
        writer.start()
        try:
            await asyncio.wait_for(writer.write([device("m-p", 1.0)]), 10)
            assert (writer.outstanding, events) == (0, [])
            with storage_held(engine):
                futures = [writer.write([("seen", {"cid": "m-p", "last_seen": 2.0 + i})]) for i in range(25)]
                assert events == [(True, 11)]
                assert (writer.pressed, writer.outstanding) == (True, 25)
                await asyncio.sleep(0.3)
                assert not any(f.done() for f in futures)  # the storage is held: nothing finishes
                assert events == [(True, 11)]
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            assert len(events) == 2 and events[1][0] is False and events[1][1] <= 5
            assert (writer.pressed, writer.outstanding, writer.stats.pressure_episodes) == (False, 0, 1)
        finally:
            writer.stop()
        assert one(engine, "select last_seen from devices where cid = 'm-p'")[0] == 26.0

    asyncio.run(main())


def test_a_group_the_database_refuses_fails_alone_and_storage_stays_healthy(engine: Engine) -> None:
    """The database refuses one group's data (here a device row without its required columns: a
    NOT NULL violation, on SQLite and PostgreSQL alike): the batch is split until that group is found;
    it alone fails (RowRefused, counted), its batch-mates are committed, and storage stays healthy, so
    new clients are still let in. Not a mock: the database's own constraint refuses the row."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        groups = [[device(f"m-{i}", float(i))] for i in range(9)]
        groups.insert(3, [("device", {"cid": "broken-1"})])
        groups.insert(7, [device("m-x", 1.0), ("device", {"cid": "broken-2"})])  # one bad op spoils its group
        futures = [writer.write(ops) for ops in groups]  # queued before the thread starts: one batch
        writer.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
            assert writer.stats.batches == 1 and writer.stats.batches_split == 1
        finally:
            writer.stop()
        refused = [i for i, r in enumerate(done) if r is not None]
        assert refused == [3, 7]
        assert all(isinstance(done[i], RowRefused) for i in refused)
        assert (writer.healthy, writer.admits_clients()) == (True, True)
        assert (writer.stats.rows_refused, writer.stats.failures) == (2, 2)

    asyncio.run(main())
    stored = {r[0] for r in rows_of(engine, "SELECT cid FROM devices")}
    assert stored == {f"m-{i}" for i in range(9)}  # m-x went with its group's refused op


def rows_of(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)).all())


def test_migration_0004_gives_existing_reports_their_digest(tmp_path: Path) -> None:
    """Reports stored before 0004 keep their data and get the digest a redelivery of them has now
    (raw objects' keys sorted), so a redelivery across the upgrade is still stored once; a reused
    request_id with other content is stored."""
    from alembic import command
    from alembic.config import Config

    from meterhub.storage import schema
    from meterhub.storage.database import MIGRATIONS_DIR

    url = fresh_postgres_url() if TEST_DB == "postgresql" else f"sqlite:///{tmp_path / 'old.db'}"
    eng = create_db_engine(url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
        old = [
            ("gw-1", "r-1", "m-1", "5", "2300000", 230.0, 1000.0, 1001.0),
            ("gw-1", "r-2", "m-1", "39", '{"b":1,"a":"x"}', None, 1000.5, 1001.0),
        ]
        with eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at) "
                    "VALUES (:g, :r, :c, :d, :v, :n, :t, :at)"
                ),
                [dict(zip(("g", "r", "c", "d", "v", "n", "t", "at"), row, strict=True)) for row in old],
            )
        migrate(eng)
        with eng.connect() as conn:
            got = conn.execute(text("SELECT request_id, value, digest FROM reports ORDER BY id")).all()
        assert [tuple(r) for r in got] == [
            ("r-1", "2300000", schema.report_digest("m-1", "5", "2300000", 1000.0)),
            ("r-2", '{"b":1,"a":"x"}', schema.report_digest("m-1", "39", '{"a":"x","b":1}', 1000.5)),
        ]

        async def main() -> None:
            writer = GroupCommitWriter(eng, asyncio.get_running_loop())
            writer.start()
            try:
                for value, t in (('{"a":"x","b":1}', 1000.5), ('{"a":"y","b":1}', 1000.5)):
                    digest = schema.report_digest("m-1", "39", value, t)
                    row = ("gw-1", "r-2", "m-1", "39", value, None, t, 2000.0, digest)
                    await asyncio.wait_for(writer.write([("report", row)]), 10)
            finally:
                writer.stop()

        asyncio.run(main())
        with eng.connect() as conn:
            values = conn.execute(
                text("SELECT value FROM reports WHERE request_id = 'r-2' ORDER BY id")
            ).all()
        assert [v[0] for v in values] == ['{"b":1,"a":"x"}', '{"a":"y","b":1}']  # redelivery skipped
    finally:
        eng.dispose()
        if TEST_DB == "postgresql":
            drop_postgres(url)


def report_row(i: int, cid: str = "m-1") -> tuple[Any, ...]:
    """A history row in the writer's column order (digest made unique by ``i``)."""
    return ("gw-1", f"r-{i}", cid, "5", "2300000", 230.0, 1000.0 + i, 2000.0 + i, f"digest-{i}")


def test_a_report_row_the_database_refuses_fails_alone_on_the_fast_path(engine: Engine) -> None:
    """Reports, latest values and last-seen go to the driver directly on SQLite (storage.sqlite_fast);
    a report row the database refuses there (a NULL request_id: NOT NULL) is still told from a failing
    database: that group alone fails with RowRefused, the others (history + latest) are committed."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        groups: list[list[tuple[str, Any]]] = [
            [("report", report_row(i)), ("latest", ("m-1", "5", "2300000", 230.0, 1000.0 + i, 2000.0))]
            for i in range(6)
        ]
        groups.insert(2, [("report", ("gw-1", None, "m-1", "5", "1", 1.0, 1.0, 1.0, "d-bad"))])
        futures = [writer.write(ops) for ops in groups]
        writer.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        finally:
            writer.stop()
        assert [i for i, r in enumerate(done) if r is not None] == [2]
        assert isinstance(done[2], RowRefused)
        assert (writer.healthy, writer.stats.rows_refused, writer.stats.batches_split) == (True, 1, 1)

    asyncio.run(main())
    assert sorted(r[0] for r in rows_of(engine, "SELECT request_id FROM reports")) == [
        f"r-{i}" for i in range(6)
    ]
    assert rows_of(engine, "SELECT t FROM latest_values") == [(1005.0,)]


def test_dense_writes_to_an_idle_writer_share_a_commit_sparse_ones_do_not_wait(engine: Engine) -> None:
    """The commit policy (GroupCommitWriter._run): a group that reaches an idle writer soon after its
    last commit (dense traffic) waits up to ``linger`` for company; one after a longer gap is committed
    at once. Here linger is 0.3 s so that the machine's timing cannot blur the two cases."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop(), linger=0.3)
        writer.start()
        try:
            await asyncio.sleep(0.4)  # idle for longer than linger: the next write is "sparse"
            started = time.monotonic()
            await asyncio.wait_for(writer.write([("report", report_row(0))]), 10)
            sparse_seconds = time.monotonic() - started
            assert writer.stats.batches == 1
            # dense: soon after that commit (well within linger), ten writes 10 ms apart -> one commit
            await asyncio.sleep(0.02)
            futures = []
            for i in range(1, 11):
                futures.append(writer.write([("report", report_row(i))]))
                await asyncio.sleep(0.01)
            await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert writer.stats.batches == 2, writer.stats.batches
        finally:
            writer.stop()
        assert sparse_seconds < 0.25, sparse_seconds  # not held for the linger

    asyncio.run(main())
    assert one(engine, "SELECT count(*) FROM reports")[0] == 11
