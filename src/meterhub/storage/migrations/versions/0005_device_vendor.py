"""devices belong to a vendor; rebinds record their cause

Revision ID: 0005
Revises: 0004

``devices.vendor_id``: the vendor that owns the device. Existing devices get the vendor of the gateway
they are bound to (NULL when that gateway has none; the next sync then claims it).
``device_rebinds.cause``: ``sync`` (a gateway of the same vendor synced it) or ``operator`` (an
explicit move); existing rows were all syncs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vendor_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE devices SET vendor_id = "
        "(SELECT gateways.vendor_id FROM gateways WHERE gateways.gateway_id = devices.gateway_id)"
    )
    with op.batch_alter_table("device_rebinds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cause", sa.String(length=16), nullable=True))
    op.execute("UPDATE device_rebinds SET cause = 'sync'")


def downgrade() -> None:
    with op.batch_alter_table("device_rebinds", schema=None) as batch_op:
        batch_op.drop_column("cause")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("vendor_id")
