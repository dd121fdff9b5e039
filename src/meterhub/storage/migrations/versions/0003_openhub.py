"""open hub: applications, users, bindings, API tokens, link credentials

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "openhub_apps",
        sa.Column("access_id", sa.String(64), primary_key=True),
        sa.Column("secret", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("name", name="uq_openhub_apps_name"),
    )
    op.create_table(
        "openhub_users",
        sa.Column("uid", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("pw_md5", sa.String(128), nullable=False),
        sa.Column("pw_sha256", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("username", name="uq_openhub_users_username"),
    )
    op.create_table(
        "openhub_bindings",
        sa.Column("uid", sa.String(64), primary_key=True),
        sa.Column("cid", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_openhub_bindings_cid", "openhub_bindings", ["cid"])
    op.create_table(
        "openhub_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("refresh_hash", sa.String(64), nullable=False),
        sa.Column("access_id", sa.String(64), nullable=False),
        sa.Column("uid", sa.String(64)),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("refresh_expires_at", sa.Float(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("refresh_hash", name="uq_openhub_tokens_refresh_hash"),
    )
    op.create_table(
        "openhub_links",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("uid", sa.String(64), nullable=False),
        sa.Column("link_id", sa.String(128), nullable=False),
        sa.Column("link_type", sa.String(16), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password", sa.String(64), nullable=False),
        sa.Column("msg_version", sa.String(8), nullable=False),
        sa.Column("source_topic", sa.String(128), nullable=False),
        sa.Column("sink_topic", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_openhub_links_client_id", "openhub_links", ["client_id"])
    op.create_index("ix_openhub_links_uid", "openhub_links", ["uid"])


def downgrade() -> None:
    for table in ("openhub_links", "openhub_tokens", "openhub_bindings", "openhub_users", "openhub_apps"):
        op.drop_table(table)
