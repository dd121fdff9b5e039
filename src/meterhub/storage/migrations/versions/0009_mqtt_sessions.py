"""persistent MQTT sessions (clean_session=0) stored, so they survive restarts and moves between nodes

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mqtt_sessions",
        sa.Column("client_id", sa.String(256), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("gen", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name="pk_mqtt_sessions"),
    )
    op.create_index("ix_mqtt_sessions_owner", "mqtt_sessions", ["owner", "updated_at"])
    op.create_index("ix_mqtt_sessions_expires_at", "mqtt_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_mqtt_sessions_expires_at", "mqtt_sessions")
    op.drop_index("ix_mqtt_sessions_owner", "mqtt_sessions")
    op.drop_table("mqtt_sessions")
