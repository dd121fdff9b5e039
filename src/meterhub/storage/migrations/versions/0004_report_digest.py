"""reports: a content digest, unique with (gateway_id, request_id)

A report is a redelivery only when gateway, request_id and content are the same: a reused request_id
with other content (gateways that restart their request counter) is another report, stored. Existing
rows get their digest computed from their columns (the same formula as ``schema.report_digest``).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import hashlib
import struct

import msgspec
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_CHUNK = 5000


def _sorted_json(value_json: str) -> str:
    """The stored value as meterhub writes it from this revision on: object keys sorted."""
    try:
        return msgspec.json.encode(msgspec.json.decode(value_json), order="sorted").decode()
    except (msgspec.DecodeError, msgspec.EncodeError, ValueError):
        return value_json


def _digest(cid: str, dp_id: str, value_json: str, t: float) -> str:
    # Frozen copy of meterhub.storage.schema.report_digest at this revision.
    head = f"{cid}\x00{dp_id}\x00{value_json}\x00".encode("utf-8", "surrogatepass")
    return hashlib.md5(head + struct.pack("<d", float(t)), usedforsecurity=False).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=32), nullable=True))
    conn = op.get_bind()
    reports = sa.table(
        "reports",
        sa.column("id", sa.BigInteger()),
        sa.column("cid", sa.String()),
        sa.column("dp_id", sa.String()),
        sa.column("value", sa.Text()),
        sa.column("t", sa.Float()),
        sa.column("digest", sa.String()),
    )
    last = None
    while True:  # in chunks by id, so a long history does not sit in memory at once
        query = sa.select(reports.c.id, reports.c.cid, reports.c.dp_id, reports.c.value, reports.c.t)
        if last is not None:
            query = query.where(reports.c.id > last)
        chunk = conn.execute(query.order_by(reports.c.id).limit(_CHUNK)).all()
        if not chunk:
            break
        conn.execute(
            sa.update(reports)
            .where(reports.c.id == sa.bindparam("b_id"))
            .values(digest=sa.bindparam("b_digest")),
            [
                {"b_id": id_, "b_digest": _digest(cid, dp_id, _sorted_json(value), t)}
                for id_, cid, dp_id, value, t in chunk
            ],
        )
        last = chunk[-1][0]
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.alter_column("digest", existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_constraint("uq_reports_gateway_request", type_="unique")
        batch_op.create_unique_constraint(
            "uq_reports_gateway_request_digest", ["gateway_id", "request_id", "digest"]
        )


def downgrade() -> None:
    # Reports that reused a request_id would break the old unique constraint: keep the first of each.
    conn = op.get_bind()
    conn.execute(
        sa.text(
            "DELETE FROM reports WHERE id NOT IN "
            "(SELECT min(id) FROM reports GROUP BY gateway_id, request_id)"
        )
    )
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_constraint("uq_reports_gateway_request_digest", type_="unique")
        batch_op.create_unique_constraint("uq_reports_gateway_request", ["gateway_id", "request_id"])
        batch_op.drop_column("digest")
