"""gateways' conformance records stored, so the report card follows a gateway to any node

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conformance_records",
        sa.Column("gateway_id", sa.String(128), nullable=False),
        sa.Column("record", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("gateway_id", name="pk_conformance_records"),
    )


def downgrade() -> None:
    op.drop_table("conformance_records")
