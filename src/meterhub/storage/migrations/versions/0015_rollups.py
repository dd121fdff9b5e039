"""rollups: 5-minute, hourly and daily aggregates per data point; rollup_dirty; storage_state

``rollups`` holds per (res, cid, dp_id, bucket) the count, sum, min, max and last of the reports'
numbers (see meterhub.storage.rollups). On PostgreSQL it is partitioned by ``bucket`` (30-day ranges
from the epoch, plus ``rollups_default``). The rollup job fills it from the committed reports;
``rollup_dirty`` holds the 5-minute buckets late reports changed. It is rebuilt from the raw rows when
``storage_state.rollup_zone`` differs from the configured time zone (the first start after this
migration: existing reports get their rollups then).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import datetime as dt
import time

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

#: Frozen copy of meterhub.storage.partitions' rollup partition width at this revision.
_WIDTH = 30 * 86400


def _date(start: int) -> str:
    return dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y%m%d")


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("res", sa.Integer(), nullable=False),
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("dp_id", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("bucket_end", sa.Float(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("lo", sa.Float(), nullable=False),
        sa.Column("hi", sa.Float(), nullable=False),
        sa.Column("last", sa.Float(), nullable=False),
        sa.Column("last_t", sa.Float(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "storage_state",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_storage_state")),
    )
    op.create_table(
        "rollup_dirty",
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("dp_id", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("cid", "dp_id", "bucket", name=op.f("pk_rollup_dirty")),
    )
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        op.create_table(
            "rollups",
            *_columns(),
            sa.PrimaryKeyConstraint("res", "cid", "dp_id", "bucket", name=op.f("pk_rollups")),
        )
        return
    run = conn.exec_driver_sql
    run(
        "CREATE TABLE rollups (res integer NOT NULL, cid varchar(128) NOT NULL, dp_id varchar(16) NOT NULL, "
        "bucket double precision NOT NULL, bucket_end double precision NOT NULL, n bigint NOT NULL, "
        "total double precision NOT NULL, lo double precision NOT NULL, hi double precision NOT NULL, "
        "last double precision NOT NULL, last_t double precision NOT NULL, last_id bigint NOT NULL, "
        "CONSTRAINT pk_rollups PRIMARY KEY (res, cid, dp_id, bucket)) PARTITION BY RANGE (bucket)"
    )
    run("CREATE TABLE rollups_default PARTITION OF rollups DEFAULT")
    low = conn.exec_driver_sql("SELECT min(t) FROM reports").scalar()
    now = time.time()
    first = int((min(low, now) if low is not None else now) - 31 * 86400) // _WIDTH
    last = int(now + 3 * 86400) // _WIDTH
    for k in range(first, last + 1):
        run(
            f"CREATE TABLE rollups_p{_date(k * _WIDTH)} PARTITION OF rollups "
            f"FOR VALUES FROM ({k * _WIDTH}) TO ({(k + 1) * _WIDTH})"
        )


def downgrade() -> None:
    op.drop_table("rollup_dirty")
    op.drop_table("rollups")
    op.drop_table("storage_state")
