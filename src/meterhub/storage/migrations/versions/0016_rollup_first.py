"""rollups: first reading of each bucket and whether the bucket's numbers never decrease

``first`` / ``first_t`` / ``first_id``: the number of the earliest report of the bucket by (t, id);
``mono``: true when the bucket's numbers, in (t, id) order, never decrease. With them energy is
computed from rollups (meterhub.core.energy). Existing rows get NULL (energy reads raw rows for
them), and ``storage_state.rollup_zone`` is cleared so the next start rebuilds every rollup.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_NEW = (
    ("first", sa.Float()),
    ("first_t", sa.Float()),
    ("first_id", sa.BigInteger()),
    ("mono", sa.Boolean()),
)


def upgrade() -> None:
    for name, type_ in _NEW:
        op.add_column("rollups", sa.Column(name, type_, nullable=True))
    op.execute("DELETE FROM storage_state WHERE name = 'rollup_zone'")


def downgrade() -> None:
    for name, _ in reversed(_NEW):
        op.drop_column("rollups", name)
