"""cluster mode: nodes with heartbeats, gateway ownership (owner node + session generation), id blocks

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("version", sa.String(32)),
        sa.Column("mqtt_port", sa.Integer()),
        sa.Column("http_port", sa.Integer()),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float()),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("links", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
    )
    op.create_table(
        "id_blocks",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("next", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_id_blocks"),
    )
    with op.batch_alter_table("gateways") as batch:
        batch.add_column(sa.Column("owner_node", sa.String(128)))
        batch.add_column(sa.Column("session_gen", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_gateways_owner_node", ["owner_node"])


def downgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.drop_index("ix_gateways_owner_node")
        batch.drop_column("session_gen")
        batch.drop_column("owner_node")
    op.drop_table("id_blocks")
    op.drop_table("nodes")
