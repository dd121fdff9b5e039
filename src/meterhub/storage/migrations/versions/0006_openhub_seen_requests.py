"""open hub: signed requests already seen (replay protection across nodes)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "openhub_seen_requests",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_openhub_seen_requests_expires_at", "openhub_seen_requests", ["expires_at"])


def downgrade() -> None:
    op.drop_table("openhub_seen_requests")
