"""reports: partitioned by measurement time on PostgreSQL; the dedupe key includes ``t``

PostgreSQL: a unique index on a partitioned table must include the partition key, so the dedupe key
becomes (gateway_id, request_id, digest, t) (the digest already covers ``t``: the same reports are
redeliveries as before) and the primary key (id, t). The existing table is renamed, a partitioned
``reports`` (daily ranges of ``t`` in UTC, plus ``reports_default``) is created with partitions for
every day that has rows and for the window the protocol accepts around now, the rows are moved, the
old table dropped, the id sequence kept. All in this one migration's transaction.

SQLite keeps one table: the unique constraint gets ``t`` as well (same key on every database) and an
index on ``t`` for the bounded retention delete (on PostgreSQL a BRIN index on ``t``, for the rollup
job's time windows).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import datetime as dt
import time

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_DAY = 86400
#: Frozen copies of meterhub.storage.partitions' window at this revision.
_BEHIND_DAYS = 31
_AHEAD_DAYS = 3

_COLUMNS = (
    "id bigint NOT NULL DEFAULT nextval('reports_id_seq'::regclass), "
    "gateway_id varchar(128) NOT NULL, request_id varchar(128) NOT NULL, cid varchar(128) NOT NULL, "
    "dp_id varchar(16) NOT NULL, value text NOT NULL, num double precision, t double precision NOT NULL, "
    "received_at double precision NOT NULL, digest varchar(32) NOT NULL"
)
_ALL = "id, gateway_id, request_id, cid, dp_id, value, num, t, received_at, digest"


def _name(day: int) -> str:
    return "reports_p" + dt.datetime.fromtimestamp(day * _DAY, dt.UTC).strftime("%Y%m%d")


def _upgrade_postgresql() -> None:
    conn = op.get_bind()
    run = conn.exec_driver_sql
    run("ALTER TABLE reports RENAME TO reports_unpartitioned")
    run("ALTER TABLE reports_unpartitioned RENAME CONSTRAINT pk_reports TO pk_reports_unpartitioned")
    run(
        "ALTER TABLE reports_unpartitioned RENAME CONSTRAINT uq_reports_gateway_request_digest "
        "TO uq_reports_unpartitioned_digest"
    )
    run("ALTER INDEX ix_reports_cid_dp_t RENAME TO ix_reports_unpartitioned_cid_dp_t")
    run(f"CREATE TABLE reports ({_COLUMNS}) PARTITION BY RANGE (t)")
    run("ALTER TABLE reports ADD CONSTRAINT pk_reports PRIMARY KEY (id, t)")
    run(
        "ALTER TABLE reports ADD CONSTRAINT uq_reports_gateway_request_digest "
        "UNIQUE (gateway_id, request_id, digest, t)"
    )
    run("CREATE INDEX ix_reports_cid_dp_t ON reports (cid, dp_id, t)")
    # a time range across all meters (the rollup job's window): BRIN, tiny, rows come in t order
    run("CREATE INDEX ix_reports_t ON reports USING brin (t)")
    run("CREATE TABLE reports_default PARTITION OF reports DEFAULT")
    today = int(time.time() // _DAY)
    days = set(range(today - _BEHIND_DAYS, today + _AHEAD_DAYS + 1))
    days.update(
        int(d) for (d,) in conn.exec_driver_sql("SELECT DISTINCT floor(t / 86400) FROM reports_unpartitioned")
    )
    for day in sorted(days):
        run(
            f"CREATE TABLE {_name(day)} PARTITION OF reports "
            f"FOR VALUES FROM ({day * _DAY}) TO ({(day + 1) * _DAY})"
        )
    run(f"INSERT INTO reports ({_ALL}) SELECT {_ALL} FROM reports_unpartitioned")
    run("ALTER SEQUENCE reports_id_seq OWNED BY reports.id")
    run("DROP TABLE reports_unpartitioned")
    run("ANALYZE reports")


def _downgrade_postgresql() -> None:
    conn = op.get_bind()
    run = conn.exec_driver_sql
    run("ALTER TABLE reports RENAME TO reports_partitioned")
    for name in ("pk_reports", "uq_reports_gateway_request_digest"):
        run(f"ALTER TABLE reports_partitioned RENAME CONSTRAINT {name} TO {name}_partitioned")
    run("ALTER INDEX ix_reports_cid_dp_t RENAME TO ix_reports_cid_dp_t_partitioned")
    run(f"CREATE TABLE reports ({_COLUMNS})")
    run("ALTER TABLE reports ADD CONSTRAINT pk_reports PRIMARY KEY (id)")
    run(f"INSERT INTO reports ({_ALL}) SELECT {_ALL} FROM reports_partitioned")
    run(
        "ALTER TABLE reports ADD CONSTRAINT uq_reports_gateway_request_digest "
        "UNIQUE (gateway_id, request_id, digest)"
    )
    run("CREATE INDEX ix_reports_cid_dp_t ON reports (cid, dp_id, t)")
    run("ALTER SEQUENCE reports_id_seq OWNED BY reports.id")
    run("DROP TABLE reports_partitioned CASCADE")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
        return
    with op.batch_alter_table("reports") as batch:
        batch.drop_constraint("uq_reports_gateway_request_digest", type_="unique")
        batch.create_unique_constraint(
            "uq_reports_gateway_request_digest", ["gateway_id", "request_id", "digest", "t"]
        )
        batch.create_index("ix_reports_t", ["t"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _downgrade_postgresql()
        return
    with op.batch_alter_table("reports") as batch:
        batch.drop_index("ix_reports_t")
        batch.drop_constraint("uq_reports_gateway_request_digest", type_="unique")
        batch.create_unique_constraint(
            "uq_reports_gateway_request_digest", ["gateway_id", "request_id", "digest"]
        )
