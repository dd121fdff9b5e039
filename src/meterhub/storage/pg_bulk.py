"""The PostgreSQL write path of the group-commit writer: one statement per batch and table.

Reports go in as nine ``unnest`` arrays in one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (the
dedupe key (gateway_id, request_id, digest, t) includes the partition key; a redelivery is skipped in
any process). Its ``RETURNING`` (only the rows stored) feeds, in the same statement, the dirty marks of
late reports: rows below the rollup job's threshold mark their 5-minute bucket in ``rollup_dirty``
(meterhub.storage.rollups; reports on time are rolled up in bulk by the job). Measured against COPY
into a temporary table followed by the same INSERT ... SELECT (docs/benchmarks.md, "storage"): see
docs/decisions.md for the choice. Latest values: one ``unnest`` upsert.

Errors stay SQLAlchemy's (statements run through ``exec_driver_sql``), so the writer still tells a
refused row (split the batch) from a failing database.
"""

from __future__ import annotations

from typing import Any

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


def apply_reports(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Store the reports and mark the late ones' rollup buckets dirty, in one statement."""
    conn.exec_driver_sql(REPORTS_UNNEST_SQL, tuple(report_arrays(rows)))


def apply_reports_copy(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """The alternative measured by bench/storage.py: COPY into a temporary staging table, then the
    same INSERT ... SELECT ON CONFLICT from it (COPY itself cannot skip conflicting rows)."""
    conn.exec_driver_sql(
        "CREATE TEMP TABLE IF NOT EXISTS reports_stage (gateway_id varchar, request_id varchar, "
        "cid varchar, dp_id varchar, value text, num float8, t float8, received_at float8, digest varchar) "
        "ON COMMIT DELETE ROWS"
    )
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY reports_stage {_REPORT_COLUMNS} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    conn.exec_driver_sql(REPORTS_STAGED_SQL)


def apply_latest(conn: Connection, newest: list[tuple[Any, ...]]) -> None:
    """Latest values ``(cid, dp_id, value_json, num, t, received_at)``, one per data point."""
    c, d, v, num, t, rec = zip(*newest, strict=True)
    conn.exec_driver_sql(LATEST_SQL, (list(c), list(d), list(v), _floats(num), _floats(t), _floats(rec)))
