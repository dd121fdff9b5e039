"""Time series storage (issue #12): partitions, migration of existing data, rollups, retention.

PostgreSQL-only behaviour (partitions, rollups) runs in the PostgreSQL pass (``METERHUB_TEST_DB=
postgresql``, Makefile PG_SUITES); the SQLite pass runs what applies there (migration, bounded
retention delete, the history API on raw rows).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from conftest import TEST_DB, Client, RunningHub, drop_postgres, fresh_postgres_url
from meterhub.api import queries
from meterhub.api.routers.devices import downsample
from meterhub.core import energy
from meterhub.storage import maintenance, partitions, pg_bulk, rollups, schema
from meterhub.storage.database import MIGRATIONS_DIR, GroupCommitWriter, create_db_engine, migrate
from test_api import Api
from test_protocol_e2e import Gateway, envelope

BERLIN = ZoneInfo("Europe/Berlin")
DAY = 86400
pg_only = pytest.mark.skipif(
    TEST_DB != "postgresql", reason="PostgreSQL partitions and rollups: run in the PostgreSQL pass"
)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    url = fresh_postgres_url() if TEST_DB == "postgresql" else f"sqlite:///{tmp_path / 'ts.db'}"
    yield url
    if TEST_DB == "postgresql":
        drop_postgres(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_db_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


def rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params).all()]


def report_row(
    cid: str, dp: str, value: int, t: float, request_id: str, gw: str = "gw-ts"
) -> tuple[Any, ...]:
    stored = str(value)
    return (gw, request_id, cid, dp, stored, float(value), t, t, schema.report_digest(cid, dp, stored, t))


def write(engine: Engine, *groups: list[tuple[str, Any]]) -> None:
    """Through the real group-commit writer; each group answered only after its commit."""

    async def main() -> None:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        writer.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(writer.write(g) for g in groups)), 30)
        finally:
            writer.stop()

    asyncio.run(main())


def day_name(t: float) -> str:
    return partitions.partition_name(partitions.REPORTS, t // DAY * DAY)


# --- partition routing, through real MQTT reports ------------------------------------------------


@pg_only
def test_old_future_and_redelivered_reports_land_once_in_their_day_partitions(
    shared_postgres: str, hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]
) -> None:
    """A report 29 days old and one 4 minutes ahead (the protocol allows 5 minutes of skew) go to the
    partitions of their own days; the old one redelivered to another node (which never saw it) is
    answered 0 and stored once: the unique index holds across nodes."""
    from meterhub.storage import registry

    one = hub_factory("protocol", database_url=shared_postgres)
    vendor = registry.add_vendor(one.engine, "ts-vendor")

    def gateway_on(node: RunningHub) -> Gateway:
        c = clients(node.port, "gw-ts", vendor.username)
        assert c.connect()[0] == 0
        c.subscribe("gateway_id/gw-ts/#", 1)
        return Gateway(c)

    g1 = gateway_on(one)
    assert g1.sync("m-ts")["param"]["code"] == 0
    now = int(time.time())
    old_t, ahead_t = now - 29 * DAY, now + 240
    old = envelope({"cid": "m-ts", "id": "5", "value": 2300000}, t=old_t, request_id="r-old")
    ahead = envelope({"cid": "m-ts", "id": "5", "value": 2310000}, t=ahead_t, request_id="r-ahead")
    assert g1.ask("properties/report", old)["param"]["code"] == 0
    assert g1.ask("properties/report", ahead)["param"]["code"] == 0
    g1.client.close()
    two = hub_factory("protocol", database_url=shared_postgres)
    g2 = gateway_on(two)
    assert g2.ask("properties/report", old)["param"]["code"] == 0  # redelivery, answered 0
    got = rows(two.engine, "SELECT tableoid::regclass::text, request_id, t FROM reports ORDER BY t")
    assert got == [(day_name(old_t), "r-old", float(old_t)), (day_name(ahead_t), "r-ahead", float(ahead_t))]
    # late (below the rollup job's threshold): its bucket was marked dirty, the job counts it once
    assert rollups.materialize(two.engine, "UTC")["dirty"] == 1
    assert rows(
        two.engine, "SELECT res, n FROM rollups WHERE bucket <= :t AND bucket_end > :t ORDER BY res", t=old_t
    ) == [
        (300, 1),
        (3600, 1),
        (86400, 1),
    ]


@pg_only
def test_a_report_beyond_the_partitions_waits_in_the_default_one_and_moves_when_its_day_is_made(
    engine: Engine,
) -> None:
    """Storage level: a row for a day without a partition is not lost (default partition); when the
    maintenance job creates that day it moves in, and a redelivery after the move is still skipped."""
    far = time.time() + 20 * DAY
    row = report_row("m-far", "5", 100, far, "r-far")
    write(engine, [("report", row)])
    assert rows(engine, "SELECT tableoid::regclass::text FROM reports") == [("reports_default",)]
    job = maintenance.StorageMaintenance(engine, zone="UTC", raw_days=90, rollup_days=None, interval=3600)
    job.run_once(now=far)
    assert job.stats.last_error is None
    assert rows(engine, "SELECT tableoid::regclass::text FROM reports") == [(day_name(far),)]
    write(engine, [("report", row)])  # the redelivery, after the partition boundary moved
    assert rows(engine, "SELECT count(*) FROM reports") == [(1,)]
    job.run_rollups(now=far + 3600)
    assert rows(engine, "SELECT sum(n) FROM rollups WHERE res = 300") == [(1,)]


@pg_only
def test_a_report_postgresql_refuses_fails_alone_through_the_copy_path(engine: Engine) -> None:
    """A report with a NUL in its request_id (PostgreSQL text cannot hold it) in a batch with others:
    COPY's error is a refused row as SQLAlchemy classes it, so the batch is split, that group alone
    fails (RowRefused), the others are stored, and storage stays healthy."""
    from meterhub.storage.database import RowRefused

    now = time.time()

    async def main() -> list[Any]:
        writer = GroupCommitWriter(engine, asyncio.get_running_loop())
        groups = [[("report", report_row("m-n", "5", i, now + i, f"n-{i}"))] for i in range(6)]
        groups.insert(2, [("report", report_row("m-n", "5", 99, now, "bad\x00id"))])
        futures = [writer.write(g) for g in groups]  # queued before the thread starts: one batch
        writer.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
            assert writer.stats.batches_split == 1 and writer.healthy
        finally:
            writer.stop()
        return done

    done = asyncio.run(main())
    assert [i for i, r in enumerate(done) if r is not None] == [2]
    assert isinstance(done[2], RowRefused)
    assert sorted(r[0] for r in rows(engine, "SELECT request_id FROM reports")) == [
        f"n-{i}" for i in range(6)
    ]


# --- migration of an existing database -------------------------------------------------------------


def test_migration_to_partitions_keeps_existing_reports_and_their_dedupe(db_url: str) -> None:
    """A database at 0012 with reports (one 400 days old, others today) upgraded to head: every row
    kept with its id, on PostgreSQL each in its day's partition; a redelivery of an old report is
    still skipped, new rows get new ids; the first maintenance run builds their rollups."""
    from alembic import command
    from alembic.config import Config

    eng = create_db_engine(db_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0012")
        now = time.time()
        old = [
            report_row("m-1", "5", 2300000, now - 400 * DAY, "r-1"),
            report_row("m-1", "5", 2310000, now - 60, "r-2"),
            report_row("m-2", "5", 2320000, now - 30, "r-3"),
        ]
        cols = ("g", "r", "c", "d", "v", "n", "t", "at", "dg")
        with eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at, "
                    "digest) "
                    "VALUES (:g, :r, :c, :d, :v, :n, :t, :at, :dg)"
                ),
                [dict(zip(cols, row, strict=True)) for row in old],
            )
        before = rows(eng, "SELECT id, request_id, t, value FROM reports ORDER BY id")
        migrate(eng)
        assert rows(eng, "SELECT id, request_id, t, value FROM reports ORDER BY id") == before
        if TEST_DB == "postgresql":
            assert rows(eng, "SELECT tableoid::regclass::text FROM reports ORDER BY id") == [
                (day_name(r[6]),) for r in old
            ]
        write(eng, [("report", old[0])], [("report", report_row("m-1", "5", 2330000, now, "r-4"))])
        after = rows(eng, "SELECT id, request_id FROM reports ORDER BY id")
        assert [r[1] for r in after] == ["r-1", "r-2", "r-3", "r-4"]
        assert after[-1][0] > before[-1][0]
        if TEST_DB == "postgresql":
            job = maintenance.StorageMaintenance(eng, zone="UTC", raw_days=None, rollup_days=None, interval=1)
            job.run_once(now=now + 3600)
            assert job.stats.rollup_rebuilds == 1
            assert rows(eng, "SELECT res, sum(n) FROM rollups GROUP BY res ORDER BY res") == [
                (300, 4),
                (3600, 4),
                (86400, 4),
            ]
    finally:
        eng.dispose()


# --- rollups equal the raw aggregates --------------------------------------------------------------

# Oct 23-27 2026 around Berlin's DST end (Oct 25 has 25 hours)
SPAN_START = dt.datetime(2026, 10, 23, 20, tzinfo=BERLIN).timestamp()
SPAN = 4 * DAY


def expected_rollups(
    raw: list[tuple[int, str, str, float, float]], zone: ZoneInfo
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """From raw rows (id, cid, dp_id, num, t): per (res, cid, dp_id, bucket) (bucket_end, n, min, max,
    last by (t, id), sum, first by (t, id), its t, "never decreases in (t, id) order")."""
    groups: dict[tuple[Any, ...], list[tuple[float, int, float]]] = {}
    ends: dict[tuple[Any, ...], float] = {}
    for id_, cid, dp, num, t in raw:
        for res in (300, 3600, 86400):
            if res == 86400:
                day = dt.datetime.fromtimestamp(t, zone).date()
                b = dt.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
                e = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=zone).timestamp()
            else:
                b = math.floor(t / res) * res
                e = b + res
            key = (res, cid, dp, float(b))
            groups.setdefault(key, []).append((t, id_, num))
            ends[key] = float(e)
    out = {}
    for key, pts in groups.items():
        nums = [p[2] for p in pts]
        ordered = [p[2] for p in sorted(pts)]
        mono = all(b >= a for a, b in itertools.pairwise(ordered))
        first = min(pts)
        out[key] = (
            ends[key],
            len(pts),
            min(nums),
            max(nums),
            max(pts)[2],
            sum(nums),
            first[2],
            first[0],
            mono,
        )
    return out


def stored_rollups(engine: Engine) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    got = rows(
        engine,
        "SELECT res, cid, dp_id, bucket, bucket_end, n, lo, hi, last, total, first, first_t, mono "
        "FROM rollups",
    )
    return {r[:4]: r[4:] for r in got}


def assert_same(
    got: dict[tuple[Any, ...], tuple[Any, ...]], want: dict[tuple[Any, ...], tuple[Any, ...]]
) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g[:5] == w[:5], key
        assert g[5] == pytest.approx(w[5], rel=1e-12, abs=1e-9), key
        assert g[6:] == w[6:], key


def assert_avg(got: float | None, want: float | None) -> None:
    """Averages: equal up to float rounding (sums are added in another order), None alike."""
    assert (got is None) == (want is None)
    if want is not None:
        assert got == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    """One PostgreSQL database for the hypothesis examples (emptied before each)."""
    if TEST_DB != "postgresql":
        pytest.skip("PostgreSQL rollups: run in the PostgreSQL pass")
    url = fresh_postgres_url()
    eng = create_db_engine(url)
    migrate(eng)
    with eng.begin() as conn:
        partitions.ensure(conn, partitions.REPORTS, SPAN_START - 2 * DAY, SPAN_START + SPAN + 2 * DAY)
        partitions.ensure(conn, partitions.ROLLUPS, SPAN_START - 2 * DAY, SPAN_START + SPAN + 2 * DAY)
    yield eng
    eng.dispose()
    drop_postgres(url)


readings = st.lists(
    st.tuples(
        st.sampled_from(["m-a", "m-b"]),
        st.sampled_from(["44", "5"]),
        st.floats(0, SPAN, allow_nan=False).map(lambda x: round(SPAN_START + x, 3)),
        # a cumulative counter with resets (drops to near 0) and glitches, and plain values
        st.one_of(st.integers(0, 50), st.integers(1_000_000, 1_000_500)),
    ),
    min_size=1,
    max_size=120,
)


@pg_only
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=readings, seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 40))
def test_rollups_equal_the_raw_aggregates(pg_engine: Engine, data: list[Any], seed: int, batch: int) -> None:
    """Random reports (two meters, a counter with resets, the DST-end day in Berlin), written in random
    batches, out of order, a third of them redelivered (some in the same batch as the original), the
    rollup job running in between (so many arrive late, below its threshold): every rollup row equals
    the aggregate of the stored raw rows of its bucket, and a rebuild gives the same table."""
    eng = pg_engine
    with eng.begin() as conn:
        conn.exec_driver_sql("TRUNCATE reports, rollups, rollup_dirty, storage_state")
    rng = random.Random(seed)
    unique = [report_row(c, d, v, t, f"r-{i}") for i, (c, d, v, t) in enumerate(data)]
    sent = unique + [rng.choice(unique) for _ in range(len(unique) // 3)]
    rng.shuffle(sent)
    # the job runs now and then, its clock moving forward: later batches hold late reports
    clock = sorted(SPAN_START + rng.uniform(-3600, SPAN) for _ in range(len(sent) // batch + 1))
    for k, i in enumerate(range(0, len(sent), batch)):
        with eng.begin() as conn:
            pg_bulk.apply_reports(conn, sent[i : i + batch])
        if rng.random() < 0.5:
            rollups.materialize(eng, "Europe/Berlin", now=clock[k])
    rollups.materialize(eng, "Europe/Berlin", now=SPAN_START + SPAN + DAY)
    raw = rows(eng, "SELECT id, cid, dp_id, num, t FROM reports")
    assert len(raw) == len({(r[0], r[1], r[8], r[6]) for r in unique})  # redeliveries stored once
    want = expected_rollups(raw, BERLIN)
    assert_same(stored_rollups(eng), want)
    assert rows(eng, "SELECT count(*) FROM rollup_dirty") == [(0,)]
    rollups.rebuild(eng, "Europe/Berlin", now=SPAN_START + SPAN + DAY)
    assert_same(stored_rollups(eng), want)


@pg_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.floats(0, SPAN - 7 * 3600),
    length=st.floats(6 * 3600, 3 * DAY),
    count=st.integers(1, 60),
    res=st.sampled_from(rollups.RESOLUTIONS),
)
def test_history_buckets_from_rollups_equal_those_from_raw_rows(
    pg_engine: Engine, start: float, length: float, count: int, res: int
) -> None:
    """For any range, bucket count and resolution (Berlin days across the DST end included) the rollup
    path (whole rollup buckets + raw edges) answers what the raw rows alone answer: counts, min, max,
    last exactly, averages up to float rounding."""
    eng = pg_engine
    if not rows(eng, "SELECT 1 FROM reports WHERE cid = 'h-1' LIMIT 1"):
        with eng.begin() as conn:
            conn.exec_driver_sql("TRUNCATE reports, rollups, rollup_dirty")
            rng = random.Random(7)
            data = [
                report_row("h-1", "5", rng.randint(-500, 500), SPAN_START + rng.uniform(0, SPAN), f"h-{i}")
                for i in range(3000)
            ]
            pg_bulk.apply_reports(conn, data)
            conn.exec_driver_sql("DELETE FROM storage_state")
        # rolled up to 70 % of the span: charts across that point read raw rows above it
        rollups.rebuild(eng, "Europe/Berlin", now=SPAN_START + 0.7 * SPAN)
    lo = SPAN_START + start
    hi = min(lo + length, SPAN_START + SPAN)
    width = (hi - lo) / count
    got = queries.history_rollup_buckets(eng, "h-1", "5", lo, hi, width, count, res, BERLIN)
    assert got is not None
    points = queries.history_points(eng, "h-1", "5", lo, hi, False)
    want = downsample(points, lo, hi, width, count, None, BERLIN)
    assert [(a.n, a.lo, a.hi, a.last) for a in got] == [
        (b["count"], b["min"], b["max"], b["last"]) for b in want
    ]
    for a, b in zip(got, want, strict=True):
        assert_avg(a.total / a.n if a.n else None, b["avg"])


# --- energy from rollups equals energy from raw rows -------------------------------------------------


def counter_row(cid: str, dp: str, raw: int, t: float, request_id: str) -> tuple[Any, ...]:
    """A stored report as the writer stores it: ``num`` is the scaled value (dp 44/45: scale 4)."""
    stored = str(raw)
    return ("gw-e", request_id, cid, dp, stored, raw / 10_000, t, t, schema.report_digest(cid, dp, stored, t))


# one step of a meter's cumulative counter: a gap (s) and what happens
counter_steps = st.lists(
    st.tuples(
        st.floats(1, 6 * 3600, allow_nan=False),
        st.sampled_from(["up", "up", "up", "up", "flat", "reset", "glitch", "rebase", "late"]),
        st.integers(0, 20_000),
    ),
    min_size=0,
    max_size=60,
)


def counter_series(steps: list[tuple[float, str, int]], t0: float) -> list[tuple[float, int]]:
    """(t, raw) readings of a counter from ``steps``: increases, repeats, resets to near 0, a single
    low reading (glitch), a 20 % drop (rebase), and a reading with the time of an earlier one (late)."""
    t, value, out = t0, 5_000_000, []
    for gap, kind, amount in steps:
        t += gap
        if kind == "up":
            value += amount
        elif kind == "reset":
            value = amount // 100
        elif kind == "glitch":
            out.append((round(t, 3), value // 3))
            t += 60
            value += amount
        elif kind == "rebase":
            value = value * 4 // 5
        elif kind == "late" and out:  # same t as a reading before: a report buffered and sent twice
            out.append((out[-1][0], value + amount))
            continue
        out.append((round(t, 3), value))
    return out


@pg_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    meters=st.lists(counter_steps, min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 30),
    first_day=st.integers(0, 3),
    days=st.integers(1, 3),
    hour_start=st.integers(0, 80),
    hours=st.integers(1, 30),
)
def test_energy_from_rollups_equals_energy_from_raw_rows(
    pg_engine: Engine,
    meters: list[list[tuple[float, str, int]]],
    seed: int,
    batch: int,
    first_day: int,
    days: int,
    hour_start: int,
    hours: int,
) -> None:
    """Random counters (resets, glitches, rebases, repeats, late and out-of-order reports, the DST-end
    day in Berlin), written in random batches with the rollup job running in between and a clock that
    stops inside the span (so the newest readings are above the rollups and some rollups are dirty):
    energy per day, per month and per hour, per device and for the group, from rollups equals the raw
    rows' answer (the same numbers, reading counts, the meter's own daily value and events)."""
    eng = pg_engine
    with eng.begin() as conn:
        conn.exec_driver_sql("TRUNCATE reports, rollups, rollup_dirty, storage_state")
    rng = random.Random(seed)
    start = SPAN_START - 3 * 3600
    sent = []
    for m, steps in enumerate(meters):
        for i, (t, raw) in enumerate(counter_series(steps, start + rng.uniform(0, 6 * 3600))):
            if t < SPAN_START + SPAN + DAY:
                sent.append(counter_row(f"e-{m}", "44", raw, t, f"e-{m}-{i}"))
                if rng.random() < 0.3:
                    sent.append(counter_row(f"e-{m}", "45", raw % 100_000, t, f"d-{m}-{i}"))
    rng.shuffle(sent)
    stop = SPAN_START + rng.uniform(SPAN / 2, SPAN + 2 * DAY)
    clock = sorted(SPAN_START + rng.uniform(-3600, stop - SPAN_START) for _ in range(len(sent) // batch + 1))
    rollups.rebuild(eng, "Europe/Berlin", now=clock[0])
    for k, i in enumerate(range(0, len(sent), batch)):
        with eng.begin() as conn:
            pg_bulk.apply_reports(conn, sent[i : i + batch])
        if rng.random() < 0.5:
            rollups.materialize(eng, "Europe/Berlin", now=clock[k])
    if rng.random() < 0.7:
        rollups.materialize(eng, "Europe/Berlin", now=stop)
    day0 = dt.datetime.fromtimestamp(SPAN_START, BERLIN).date() + dt.timedelta(days=first_day - 1)
    asks = [
        ("day", energy.buckets_for("day", day0, day0 + dt.timedelta(days=days - 1), BERLIN)),
        ("month", energy.buckets_for("month", day0, day0, BERLIN)),
        (
            "hour",
            energy.hour_buckets(math.floor(SPAN_START / 3600) * 3600 + hour_start * 3600, hours, BERLIN),
        ),
    ]
    cids = [f"e-{m}" for m in range(len(meters))]
    with eng.connect() as conn:
        for period, buckets in asks:
            for cid in cids:
                got = energy.device_energy(conn, cid, period, buckets)
                want = energy.device_energy(conn, cid, period, buckets, cover=False)
                assert got == want, (period, cid)
            assert energy.group_energy(conn, cids, period, buckets) == energy.group_energy(
                conn, cids, period, buckets, use_rollups=False
            )


@pg_only
def test_energy_reads_rollups_for_a_plain_counter_and_raw_rows_around_a_drop(pg_engine: Engine) -> None:
    """The rollup path is really taken for a counter that only rises, and left for the device whose
    counter drops (a glitch inside a day); both answer what the raw rows give."""
    eng = pg_engine
    with eng.begin() as conn:
        conn.exec_driver_sql("TRUNCATE reports, rollups, rollup_dirty, storage_state")
    day0 = dt.datetime.fromtimestamp(SPAN_START, BERLIN).date() + dt.timedelta(days=1)
    buckets = energy.buckets_for("day", day0, day0 + dt.timedelta(days=2), BERLIN)
    t0 = buckets[0].start
    plain = [counter_row("p", "44", 1_000_000 + 100 * k, t0 + 600 * k, f"p-{k}") for k in range(400)]
    glitchy = [
        counter_row("g", "44", 1_000_000 + 100 * k if k != 200 else 10, t0 + 600 * k, f"g-{k}")
        for k in range(400)
    ]
    with eng.begin() as conn:
        pg_bulk.apply_reports(conn, plain + glitchy)
    rollups.rebuild(eng, "Europe/Berlin", now=buckets[1].end + 7200)  # the last day partly above
    bounds = [b.start for b in buckets] + [buckets[-1].end]
    with eng.connect() as conn:
        cover = energy.rollup_cover(conn, bounds)
        assert cover is not None and cover.res == 86400 and cover.end == buckets[1].end
        plain_series = energy._series_from_rollups(conn, "p", "44", bounds, None, cover)
        assert plain_series is not None
        # two days of rollups (Oct 25 has 25 hours: 150 readings) stand in as 2 readings each, plus the
        # raw rows of the third day
        assert len(plain_series[0]) == 2 + 2 + (400 - 144 - 150)
        assert energy._series_from_rollups(conn, "g", "44", bounds, None, cover) is None
        for cid in ("p", "g"):
            got = energy.device_energy(conn, cid, "day", buckets)
            assert got == energy.device_energy(conn, cid, "day", buckets, cover=False)
        p = energy.device_energy(conn, "p", "day", buckets)
        assert p.consumption == [1.43, 1.5, 1.06]
        assert p.readings == [144, 150, 106]


def test_the_history_api_over_a_month_answers_what_the_raw_rows_give(
    hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]
) -> None:
    """Through the real API over 30 days of one meter (every 10 minutes), daily and hourly charts: on
    PostgreSQL from rollups, on SQLite from raw rows; both equal the raw computation."""
    api = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    try:
        gw = api.gateway()
        gw.sync("h-api")
        now = time.time()
        t0 = now - 30 * DAY
        rng = random.Random(3)
        data = [
            report_row("h-api", "5", rng.randint(2200000, 2400000), t0 + i * 600, f"q-{i}", gw="gw-api")
            for i in range(30 * 144)
        ]
        hub = api.hub
        writer = hub.hub.writer

        async def put() -> None:
            await asyncio.gather(*(writer.write([("report", r)]) for r in data))

        hub.call(put(), timeout=120)
        if TEST_DB == "postgresql":  # the rollup job's next run (every rollup_interval s), now
            assert hub.hub.storage_maintenance.run_rollups() is not None
        for params in ({"buckets": 30}, {"interval": 3600}, {"buckets": 7}):
            r = api.read.get("/api/v1/devices/h-api/history/5", params={"from": t0, "to": now, **params})
            assert r.status_code == 200, r.text
            body = r.json()
            width = body["interval"]
            count = len(body["buckets"])
            points = queries.history_points(hub.engine, "h-api", "5", t0, now, False)
            want = downsample(points, t0, now, width, count, None, BERLIN)
            for b, w in zip(body["buckets"], want, strict=True):
                assert (b["count"], b["min"], b["max"], b["last"], b["start"]) == (
                    w["count"],
                    w["min"],
                    w["max"],
                    w["last"],
                    w["start"],
                )
                assert_avg(b["avg"], w["avg"])
            assert sum(b["count"] for b in body["buckets"]) == len(data)
    finally:
        api.close()


# --- retention -------------------------------------------------------------------------------------


@pg_only
def test_retention_drops_exactly_the_expired_partitions(engine: Engine) -> None:
    """Raw reports kept 40 days, rollups 45: a run drops the partitions whose whole range is older
    and nothing else (the day holding the cutoff stays); strays in the default partition older than
    the cutoff are deleted; what it did shows in the job's stats."""
    now = time.time()
    with engine.begin() as conn:
        partitions.ensure(conn, partitions.REPORTS, now - 60 * DAY, now)
        partitions.ensure(conn, partitions.ROLLUPS, now - 120 * DAY, now)
    ages = [59, 45, 41, 40.5, 39, 1]
    write(
        engine,
        *[[("report", report_row("m-r", "5", i, now - a * DAY, f"ret-{i}"))] for i, a in enumerate(ages)],
    )
    with engine.begin() as conn:  # a stray, older than any partition
        conn.exec_driver_sql(
            "INSERT INTO reports_default (gateway_id, request_id, cid, dp_id, value, num, t, received_at, "
            "digest) "
            "VALUES ('g', 'stray', 'm-r', '5', '1', 1, %s, %s, 'x')",
            (now - 200 * DAY, now),
        )
    rollups.ensure_zone(engine, "UTC", now)  # the first run's build (it may add partitions for the stray)
    before = {spec: _parts(engine, spec) for spec in partitions.SPECS}
    job = maintenance.StorageMaintenance(engine, zone="UTC", raw_days=40, rollup_days=45, interval=3600)
    job.run_once(now=now)
    assert job.stats.last_error is None
    cuts = {partitions.REPORTS: now - 40 * DAY, partitions.ROLLUPS: now - 45 * DAY}
    dropped = 0
    for spec, cut in cuts.items():
        after = _parts(engine, spec)
        gone = {p.name for p in before[spec]} - {p.name for p in after}
        assert gone == {p.name for p in before[spec] if p.hi <= cut}, spec
        assert gone and all(p.hi > cut for p in after) and min(p.lo for p in after) <= cut
        dropped += len(gone)
    assert job.stats.partitions_dropped == dropped
    # rows of the day holding the cutoff stay (a partition goes only once all of it has expired)
    cut_day = cuts[partitions.REPORTS] // DAY * DAY
    want = sorted(f"ret-{i}" for i, a in enumerate(ages) if now - a * DAY >= cut_day)
    assert sorted(r[0] for r in rows(engine, "SELECT request_id FROM reports")) == want
    assert job.stats.oldest_partition == min(p.lo for p in _parts(engine, partitions.REPORTS))


def _parts(engine: Engine, spec: partitions.Spec) -> list[partitions.Partition]:
    with engine.connect() as conn:
        return partitions.partitions(conn, spec)


def test_sqlite_deletes_expired_reports_in_bounded_chunks(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: expired raw rows go in short chunks (here of 7), everything younger stays."""
    if TEST_DB == "postgresql":
        pytest.skip("the SQLite delete: the PostgreSQL pass drops partitions instead")
    monkeypatch.setattr(maintenance, "SQLITE_CHUNK", 7)
    now = time.time()
    old = [[("report", report_row("m-s", "5", i, now - 100 * DAY - i, f"o-{i}"))] for i in range(30)]
    young = [[("report", report_row("m-s", "5", i, now - 80 * DAY + i, f"y-{i}"))] for i in range(5)]
    write(engine, *old, *young)
    job = maintenance.StorageMaintenance(engine, zone="UTC", raw_days=90, rollup_days=None, interval=3600)
    job.run_once(now=now)
    assert job.stats.rows_deleted == 30
    assert sorted(r[0] for r in rows(engine, "SELECT request_id FROM reports")) == sorted(
        f"y-{i}" for i in range(5)
    )
    assert job.stats.oldest_report == pytest.approx(now - 80 * DAY)


def test_retention_and_partitions_show_in_healthz_and_metrics(hub_factory: Callable[..., RunningHub]) -> None:
    hub = hub_factory("protocol", retention_raw_days=60)
    base = f"http://127.0.0.1:{hub.hub.http_port}"
    health = httpx.get(f"{base}/healthz").json()
    ret = health["storage"]["retention"]
    assert ret["retention_raw_days"] == 60
    assert ret["retention_rollup_days"] is None
    assert ret["runs"] >= 1 and ret["last_error"] is None
    if TEST_DB == "postgresql":
        assert ret["partitions"] >= partitions.BEHIND_DAYS
        assert ret["oldest_partition"] <= time.time() - partitions.BEHIND_DAYS * DAY + DAY
    from meterhub.api.security import create_token

    token, _ = create_token(hub.engine, "metrics-" + uuid.uuid4().hex[:6], "read")
    text_ = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert "meterhub_storage_retention_raw_days 60.0" in text_
    assert "meterhub_storage_partitions_dropped_total 0.0" in text_
