"""The PostgreSQL write path of the group-commit writer: one statement per batch and table.

Reports are COPYed into a temporary staging table (``reports_stage``, emptied at every commit) and
moved with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (COPY itself cannot skip conflicts;
the dedupe key (gateway_id, request_id, digest, t) includes the partition key; a redelivery is skipped
in any process). Its ``RETURNING`` (only the rows stored) feeds, in the same statement, the dirty
marks of late reports: rows below the rollup job's threshold mark their 5-minute bucket in
``rollup_dirty`` (meterhub.storage.rollups; reports on time are rolled up in bulk by the job).
The alternative, the same INSERT from nine ``unnest`` arrays (:func:`apply_reports_unnest`), was
measured on the same batches (bench/storage.py, docs/benchmarks.md E): COPY was as fast or faster in
every run, so it is the one used. Latest values: one ``unnest`` upsert.

Errors are SQLAlchemy's (statements run through ``exec_driver_sql``; COPY's psycopg errors are wrapped
in the matching SQLAlchemy class), so the writer still tells a refused row (split the batch) from a
failing database.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from meterhub.storage import rollups

_REPORT_ARRAYS = (
    "unnest(%s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], %s::text[], "
    "%s::float8[], %s::float8[], %s::float8[], %s::varchar[])"
)
_REPORT_COLUMNS = "(gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest)"


def _insert_reports(source: str) -> str:
    return (
        f"WITH ins AS (INSERT INTO reports {_REPORT_COLUMNS} SELECT * FROM {source} "
        "ON CONFLICT (gateway_id, request_id, digest, t) DO NOTHING RETURNING cid, dp_id, num, t) "
        "INSERT INTO rollup_dirty (cid, dp_id, bucket) SELECT DISTINCT cid, dp_id, floor(t / 300) * 300 "
        "FROM ins WHERE num IS NOT NULL AND t < (SELECT value::float8 FROM storage_state "
        f"WHERE name = '{rollups.THRESHOLD_KEY}') ON CONFLICT DO NOTHING"
    )


REPORTS_UNNEST_SQL = _insert_reports(_REPORT_ARRAYS)
REPORTS_STAGED_SQL = _insert_reports("reports_stage")

LATEST_SQL = (
    "INSERT INTO latest_values (cid, dp_id, value, num, t, received_at) "
    "SELECT * FROM unnest(%s::varchar[], %s::varchar[], %s::text[], %s::float8[], %s::float8[], "
    "%s::float8[]) "
    "ON CONFLICT (cid, dp_id) DO UPDATE SET value = excluded.value, num = excluded.num, t = excluded.t, "
    "received_at = excluded.received_at WHERE latest_values.t <= excluded.t"
)


def _floats(values: Any) -> list[float | None]:
    return [None if x is None else float(x) for x in values]


def report_arrays(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows ``(gateway_id, request_id, cid, dp_id, value_json, num, t, received_at, digest)`` as the
    nine column arrays of :data:`REPORTS_UNNEST_SQL` (numbers as floats: one array type each)."""
    g, r, c, d, v, num, t, rec, dig = zip(*rows, strict=True)
    return [list(g), list(r), list(c), list(d), list(v), _floats(num), _floats(t), _floats(rec), list(dig)]


_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS reports_stage (gateway_id varchar, request_id varchar, "
    "cid varchar, dp_id varchar, value text, num float8, t float8, received_at float8, digest varchar) "
    "ON COMMIT DELETE ROWS"
)
_COPY_SQL = f"COPY reports_stage {_REPORT_COLUMNS} FROM STDIN"


def apply_reports(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Store the reports (COPY into the staging table, then one INSERT ... SELECT) and mark the late
    ones' rollup buckets dirty."""
    conn.exec_driver_sql(_STAGE_DDL)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(_COPY_SQL) as copy:
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:  # as SQLAlchemy would raise it: DataError etc. (a refused row)
        raise sa_exc.DBAPIError.instance(_COPY_SQL, None, exc, psycopg.Error) from exc
    finally:
        cursor.close()
    conn.exec_driver_sql(REPORTS_STAGED_SQL)


def apply_reports_unnest(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """The alternative measured by bench/storage.py: the same INSERT from nine ``unnest`` arrays."""
    conn.exec_driver_sql(REPORTS_UNNEST_SQL, tuple(report_arrays(rows)))


def apply_latest(conn: Connection, newest: list[tuple[Any, ...]]) -> None:
    """Latest values ``(cid, dp_id, value_json, num, t, received_at)``, one per data point."""
    c, d, v, num, t, rec = zip(*newest, strict=True)
    conn.exec_driver_sql(LATEST_SQL, (list(c), list(d), list(v), _floats(num), _floats(t), _floats(rec)))
