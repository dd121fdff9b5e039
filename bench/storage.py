"""The PostgreSQL storage layer (issue #12): writer paths, chart and energy queries at scale, disk.

Needs PostgreSQL on 127.0.0.1:5432 (``--pg`` to change). Two parts, each on databases of its own that
are dropped at the end:

``writer``: the same batches of reports (plus their latest-value upserts, 2 % redeliveries of the
previous batch) applied in one transaction each, as the group-commit writer does, through

- ``old``: today's path before #12 (schema at revision 0012, unpartitioned; executemany
  ``INSERT ... ON CONFLICT DO NOTHING`` and executemany latest upsert),
- ``unnest``: partitioned table; one ``unnest`` insert whose RETURNING marks late reports' rollup
  buckets dirty, one ``unnest`` latest upsert (meterhub.storage.pg_bulk.apply_reports_unnest),
- ``copy``: COPY into a temporary table, then the same INSERT ... SELECT (pg_bulk.apply_reports: what
  the writer uses),

in interleaved rounds (the order rotates); committed report rows/s per round, median and range. The
reports are on time (as a live fleet's are); after each round the rollup job
(meterhub.storage.rollups.materialize) folds the round into the rollups of the ``copy`` database:
its rows/s is reported too (it runs beside the writer, in its own transactions).

``queries``: reports generated with SQL ``generate_series`` (default ~22 million) into a database
of the newest schema (``--meters`` meters x 2 data points, voltage and the energy counter, every
``--step`` seconds back from now), rollups built from them, then p50/p95 over ``--repeat`` runs of
what the API does for one meter's chart of 1 hour / 1 day / 30 days (100 buckets, the resolution the
router picks) and for a fleet-wide daily energy over 7 days of ``--energy-meters`` meters
(meterhub.core.energy: from rollups with the raw tail, and from raw counter rows only; both must give
the same answer), plus disk bytes per stored report
(pg_total_relation_size of every partition of ``reports``, and of ``rollups``).

    .venv/bin/python bench/storage.py                 # both parts, ~20 min
    .venv/bin/python bench/storage.py --part writer   # ~2 min
    .venv/bin/python bench/storage.py --smoke         # seconds: tiny numbers, a check that it runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import Connection

from meterhub.api import queries
from meterhub.api.routers.devices import downsample
from meterhub.core import energy
from meterhub.storage import database, pg_bulk, rollups, schema
from meterhub.storage.database import create_db_engine, migrate

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
DAY = 86400


def fresh_database(pg: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{pg}/{name}"


def drop_database(pg: str, url: str) -> None:
    admin = create_engine(f"{pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def migrate_to(engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(database.MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


# --- writer ----------------------------------------------------------------------------------------

_OLD_REPORTS = (
    "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (gateway_id, request_id, digest) DO NOTHING"
)
_OLD_LATEST = (
    "INSERT INTO latest_values (cid, dp_id, value, num, t, received_at) VALUES (%s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (cid, dp_id) DO UPDATE SET value = excluded.value, num = excluded.num, t = excluded.t, "
    "received_at = excluded.received_at WHERE latest_values.t <= excluded.t"
)


def _newest(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    newest: dict[tuple[str, str], tuple[Any, ...]] = {}
    for r in rows:
        key = (r[2], r[3])
        if key not in newest or newest[key][6] <= r[6]:
            newest[key] = r
    return [(r[2], r[3], r[4], r[5], r[6], r[7]) for r in newest.values()]


def old_path(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.exec_driver_sql(_OLD_REPORTS, rows)
    conn.exec_driver_sql(_OLD_LATEST, _newest(rows))


def unnest_path(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    pg_bulk.apply_reports_unnest(conn, rows)
    pg_bulk.apply_latest(conn, _newest(rows))


def copy_path(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    pg_bulk.apply_reports(conn, rows)  # what the writer uses
    pg_bulk.apply_latest(conn, _newest(rows))


PATHS: dict[str, Callable[[Connection, list[tuple[Any, ...]]], None]] = {
    "old": old_path,
    "unnest": unnest_path,
    "copy": copy_path,
}


def make_batches(
    round_no: int, batches: int, size: int, meters: int, start: float
) -> list[list[tuple[Any, ...]]]:
    """``batches`` batches of ``size`` reports of ``meters`` meters (5 data points each), times moving
    forward a minute per meter and batch; 2 % of each batch redelivers rows of the previous one."""
    rng = random.Random(round_no)
    base = start + round_no * (batches * 60.0 + 600)  # after the previous round's rollup threshold
    out: list[list[tuple[Any, ...]]] = []
    prev: list[tuple[Any, ...]] = []
    for b in range(batches):
        rows = []
        for k in range(size - (size // 50 if prev else 0)):
            m = (b * size + k) % meters
            dp = ("5", "6", "7", "44", "18")[k % 5]
            num = rng.randint(0, 2_400_000)
            t = base + b * 60 + m * 0.001
            value = str(num)
            cid = f"bench-{m:06d}"
            rows.append(
                (
                    f"gw-{m // 10:05d}",
                    f"r{round_no}-{b}-{k}",
                    cid,
                    dp,
                    value,
                    float(num),
                    t,
                    t + 0.5,
                    schema.report_digest(cid, dp, value, t),
                )
            )
        if prev:
            rows += rng.sample(prev, size // 50)
        out.append(rows)
        prev = rows
    return out


def bench_writer(pg: str, rounds: int, batches: int, size: int, meters: int) -> dict[str, list[float]]:
    """Committed reports/s per path and round (and ``rollup job``: rows/s it folds)."""
    urls = {name: fresh_database(pg, "meterhub_bench_w") for name in PATHS}
    engines = {name: create_db_engine(url) for name, url in urls.items()}
    try:
        for name, eng in engines.items():
            if name == "old":
                migrate_to(eng, "0012")
            else:
                migrate(eng)
                rollups.materialize(eng, "UTC")  # the threshold the writer compares with
        rates: dict[str, list[float]] = {name: [] for name in [*PATHS, "rollup job"]}
        order = list(PATHS)
        start = time.time()
        for r in range(rounds):
            data = make_batches(r, batches, size, meters, start)
            stored = sum(len(b) for b in data)
            for name in order[r % len(order) :] + order[: r % len(order)]:
                apply, eng = PATHS[name], engines[name]
                started = time.perf_counter()
                for rows in data:
                    with eng.begin() as conn:
                        apply(conn, rows)
                rates[name].append(stored / (time.perf_counter() - started))
            started = time.perf_counter()
            newest = max(row[6] for rows in data for row in rows)
            run = rollups.materialize(engines["copy"], "UTC", now=newest + rollups.LAG + 300)
            assert run is not None and run["dirty"] == 0, run
            rates["rollup job"].append(stored / (time.perf_counter() - started))
        counts = set()
        for eng in engines.values():
            with eng.connect() as conn:
                counts.add(conn.exec_driver_sql("SELECT count(*) FROM reports").scalar())
        assert len(counts) == 1, f"the paths stored different row counts: {counts}"
        return rates
    finally:
        for eng in engines.values():
            eng.dispose()
        for url in urls.values():
            drop_database(pg, url)


# --- queries at scale --------------------------------------------------------------------------------


def generate(engine: Engine, meters: int, step: int, days: float, now: float) -> tuple[int, float]:
    """Reports for ``meters`` meters: dp 5 (voltage, num around 230 V) and dp 44 (a counter, raw
    integer value, 1 % resets) every ``step`` s over ``days`` days; rows and seconds it took."""
    started = time.perf_counter()
    points = int(days * DAY // step)
    per_chunk = max(1, points // 30)
    total = 0
    for first in range(0, points, per_chunk):
        last = min(points, first + per_chunk) - 1
        # dp 5: 220.0-239.9 V (raw tenths of mV... as stored: an integer, num the scaled value);
        # dp 44: a counter rising 25 raw units per step, back to 1000 every 10,000 steps (a reset)
        sql = (
            "INSERT INTO reports (gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest) "
            "SELECT 'gw-' || (m / 10), 'b' || m || '-' || k || '-' || d.dp, 'meter-' || m, d.dp, "
            "v.raw::text, v.raw::float8 / 10000, x.t, x.t + 1, md5(m || ':' || k || ':' || d.dp) "
            "FROM generate_series(0, %(meters)s::int - 1) m "
            "CROSS JOIN generate_series(%(first)s::int, %(last)s::int) k "
            "CROSS JOIN (VALUES ('5'), ('44')) d(dp) "
            "CROSS JOIN LATERAL (SELECT %(start)s::float8 + k * %(step)s::float8 + (m %% 60) AS t) x "
            "CROSS JOIN LATERAL (SELECT CASE WHEN d.dp = '5' THEN 2200000 + (m * 7 + k * 13) %% 200000 "
            "ELSE 1000 + (k %% 10000) * 25 END AS raw) v"
        )
        with engine.begin() as conn:
            res = conn.exec_driver_sql(
                sql,
                {"meters": meters, "first": first, "last": last, "start": now - days * DAY, "step": step},
            )
            total += res.rowcount or 0
        print(f"  generated {total:,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
    return total, time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm the cache: the charts of a dashboard are read again and again
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def chart(engine: Engine, cid: str, start: float, end: float, count: int, zone: ZoneInfo) -> list[Any]:
    """What GET /devices/{cid}/history/5?buckets=count does (the router's choice of resolution)."""
    width = (end - start) / count
    res = rollups.pick_resolution(end - start, width)
    if res is not None:
        aggs = queries.history_rollup_buckets(engine, cid, "5", start, end, width, count, res, zone)
        if aggs is not None:
            return aggs
    return downsample(
        queries.history_points(engine, cid, "5", start, end, False), start, end, width, count, None, zone
    )


def fleet_energy(
    engine: Engine, cids: list[str], days: int, zone: ZoneInfo, now: float, use_rollups: bool = True
) -> Any:
    import datetime as dt

    last = dt.datetime.fromtimestamp(now, zone).date()
    buckets = energy.buckets_for("day", last - dt.timedelta(days=days - 1), last, zone)
    with engine.connect() as conn:
        return energy.group_energy(conn, cids, "day", buckets, use_rollups=use_rollups)


def bench_queries(
    pg: str, meters: int, step: int, days: float, repeat: int, energy_meters: int
) -> dict[str, Any]:
    url = fresh_database(pg, "meterhub_bench")
    eng = create_db_engine(url)
    zone = ZoneInfo("UTC")
    out: dict[str, Any] = {}
    try:
        migrate(eng)
        now = time.time()
        with eng.begin() as conn:
            from meterhub.storage import partitions

            partitions.ensure(conn, partitions.REPORTS, now - days * DAY - DAY, now + DAY)
            partitions.ensure(conn, partitions.ROLLUPS, now - days * DAY - DAY, now + DAY)
        out["rows"], out["generate_s"] = generate(eng, meters, step, days, now)
        started = time.perf_counter()
        out["rollup_rows"] = rollups.rebuild(eng, "UTC", now=now)
        out["rollup_s"] = time.perf_counter() - started
        with eng.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            for table in ("reports", "rollups"):
                out[f"{table}_bytes"] = conn.exec_driver_sql(
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                    f"WHERE inhparent = '{table}'::regclass"
                ).scalar()
        rng = random.Random(1)
        for label, span in (("1 hour", 3600), ("1 day", DAY), ("30 days", 30 * DAY)):
            span = min(span, days * DAY)

            def one(span: float = span) -> None:
                cid = f"meter-{rng.randrange(meters)}"
                chart(eng, cid, now - span, now, 100, zone)

            out[f"chart {label}"] = timed(one, repeat)
        cids = [f"meter-{m}" for m in range(min(energy_meters, meters))]
        e_days = int(min(7, days))
        label = f"energy {len(cids)} meters x {e_days} days"
        got = fleet_energy(eng, cids, e_days, zone, now)
        assert got == fleet_energy(eng, cids, e_days, zone, now, use_rollups=False)  # the same answer
        out[f"{label} (rollups + raw tail)"] = timed(
            lambda: fleet_energy(eng, cids, e_days, zone, now), max(3, repeat // 10)
        )
        out[f"{label} (raw rows only)"] = timed(
            lambda: fleet_energy(eng, cids, e_days, zone, now, use_rollups=False), max(3, repeat // 10)
        )
        return out
    finally:
        eng.dispose()
        drop_database(pg, url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=PG)
    ap.add_argument("--part", choices=("writer", "queries", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--writer-meters", type=int, default=20_000)
    ap.add_argument("--meters", type=int, default=500)
    ap.add_argument("--step", type=int, default=120)
    ap.add_argument("--days", type=float, default=31.0)
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--energy-meters", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="tiny numbers: a check that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.batches, args.batch_size, args.writer_meters = 2, 2, 200, 100
        args.meters, args.step, args.days, args.repeat, args.energy_meters = 5, 3600, 2.0, 3, 3
    if args.part in ("writer", "both"):
        rates = bench_writer(args.pg, args.rounds, args.batches, args.batch_size, args.writer_meters)
        print(f"\n### writer: {args.rounds} rounds x {args.batches} batches x {args.batch_size} reports\n")
        print("| path | committed reports/s, median | range | vs old |")
        print("|---|---:|---|---:|")
        base = statistics.median(rates["old"])
        for name, values in rates.items():
            if name == "rollup job":
                med = statistics.median(values)
                print(
                    f"| rollup job (folds the round) | {med:,.0f} | {min(values):,.0f}-{max(values):,.0f} | |"
                )
                continue
            med = statistics.median(values)
            print(f"| {name} | {med:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {med / base:.2f}x |")
    if args.part in ("queries", "both"):
        res = bench_queries(args.pg, args.meters, args.step, args.days, args.repeat, args.energy_meters)
        rows = res["rows"]
        print(
            f"\n### queries: {rows:,} reports ({args.meters} meters x 2 dps, every {args.step} s, "
            f"{args.days} days), generated in {res['generate_s']:.0f} s; {res['rollup_rows']:,} rollup rows "
            f"built in {res['rollup_s']:.0f} s\n"
        )
        print("| query | p50 ms | p95 ms |")
        print("|---|---:|---:|")
        for key, value in res.items():
            if isinstance(value, tuple):
                print(f"| {key} | {value[0]:.1f} | {value[1]:.1f} |")
        for table in ("reports", "rollups"):
            size = res[f"{table}_bytes"]
            print(f"\ndisk, {table}: {size:,} bytes = {size / rows:.0f} bytes per stored report")


if __name__ == "__main__":
    main()
