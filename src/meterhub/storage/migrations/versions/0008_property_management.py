"""property management: sites, buildings, units, meter assignments, tenants, occupancies, tariffs,
prepaid accounts and top-ups, audit log, site-scoped tokens

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_site_at", "audit_log", ["site_id", "at"], unique=False)
    op.create_table(
        "meter_info",
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("location", sa.String(length=255), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("cid", name=op.f("pk_meter_info")),
    )
    op.create_table(
        "prepaid_topups",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.Text(), nullable=False),
        sa.Column("balance_after", sa.Text(), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prepaid_topups")),
    )
    op.create_index(op.f("ix_prepaid_topups_cid"), "prepaid_topups", ["cid"], unique=False)
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("tariff_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("name", name=op.f("uq_sites_name")),
    )
    op.create_table(
        "buildings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_buildings_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_buildings")),
        sa.UniqueConstraint("site_id", "name", name="uq_buildings_site_name"),
    )
    op.create_index(op.f("ix_buildings_site_id"), "buildings", ["site_id"], unique=False)
    op.create_table(
        "prepaid_accounts",
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("balance", sa.Text(), nullable=False),
        sa.Column("low_threshold", sa.Text(), nullable=False),
        sa.Column("grace", sa.Text(), nullable=False),
        sa.Column("charged_t", sa.Float(), nullable=True),
        sa.Column("low_alarm", sa.Boolean(), nullable=False),
        sa.Column("switch_wanted", sa.Boolean(), nullable=True),
        sa.Column("switch_state", sa.Boolean(), nullable=True),
        sa.Column("command_attempts", sa.Integer(), nullable=False),
        sa.Column("last_command_at", sa.Float(), nullable=True),
        sa.Column("last_command_status", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_prepaid_accounts_site_id_sites")),
        sa.PrimaryKeyConstraint("cid", name=op.f("pk_prepaid_accounts")),
    )
    op.create_index(op.f("ix_prepaid_accounts_site_id"), "prepaid_accounts", ["site_id"], unique=False)
    op.create_table(
        "tariffs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_tariffs_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tariffs")),
        sa.UniqueConstraint("site_id", "name", name="uq_tariffs_site_name"),
    )
    op.create_index(op.f("ix_tariffs_site_id"), "tariffs", ["site_id"], unique=False)
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=True),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_tenants_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_index(op.f("ix_tenants_site_id"), "tenants", ["site_id"], unique=False)
    op.create_table(
        "tariff_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tariff_id", sa.Integer(), nullable=False),
        sa.Column("effective_from", sa.String(length=10), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tariff_id"], ["tariffs.id"], name=op.f("fk_tariff_versions_tariff_id_tariffs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tariff_versions")),
        sa.UniqueConstraint("tariff_id", "effective_from", name="uq_tariff_versions_tariff_from"),
    )
    op.create_index(op.f("ix_tariff_versions_tariff_id"), "tariff_versions", ["tariff_id"], unique=False)
    op.create_table(
        "units",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("building_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("tariff_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["building_id"], ["buildings.id"], name=op.f("fk_units_building_id_buildings")
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_units_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_units")),
        sa.UniqueConstraint("building_id", "name", name="uq_units_building_name"),
    )
    op.create_index(op.f("ix_units_building_id"), "units", ["building_id"], unique=False)
    op.create_index(op.f("ix_units_site_id"), "units", ["site_id"], unique=False)
    op.create_table(
        "meter_assignments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cid", sa.String(length=128), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("start_t", sa.Float(), nullable=False),
        sa.Column("end_t", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_meter_assignments_site_id_sites")),
        sa.ForeignKeyConstraint(["unit_id"], ["units.id"], name=op.f("fk_meter_assignments_unit_id_units")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meter_assignments")),
    )
    op.create_index(op.f("ix_meter_assignments_cid"), "meter_assignments", ["cid"], unique=False)
    op.create_index(op.f("ix_meter_assignments_site_id"), "meter_assignments", ["site_id"], unique=False)
    op.create_index(op.f("ix_meter_assignments_unit_id"), "meter_assignments", ["unit_id"], unique=False)
    op.create_table(
        "occupancies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("start_t", sa.Float(), nullable=False),
        sa.Column("end_t", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_occupancies_tenant_id_tenants")),
        sa.ForeignKeyConstraint(["unit_id"], ["units.id"], name=op.f("fk_occupancies_unit_id_units")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_occupancies")),
    )
    op.create_index(op.f("ix_occupancies_tenant_id"), "occupancies", ["tenant_id"], unique=False)
    op.create_index(op.f("ix_occupancies_unit_id"), "occupancies", ["unit_id"], unique=False)

    op.create_table(
        "api_token_sites",
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_api_token_sites_site_id_sites")),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_api_token_sites_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("token_id", "site_id", name=op.f("pk_api_token_sites")),
    )


def downgrade() -> None:
    op.drop_table("api_token_sites")
    op.drop_index(op.f("ix_occupancies_unit_id"), table_name="occupancies")
    op.drop_index(op.f("ix_occupancies_tenant_id"), table_name="occupancies")
    op.drop_table("occupancies")
    op.drop_index(op.f("ix_meter_assignments_unit_id"), table_name="meter_assignments")
    op.drop_index(op.f("ix_meter_assignments_site_id"), table_name="meter_assignments")
    op.drop_index(op.f("ix_meter_assignments_cid"), table_name="meter_assignments")
    op.drop_table("meter_assignments")
    op.drop_index(op.f("ix_units_site_id"), table_name="units")
    op.drop_index(op.f("ix_units_building_id"), table_name="units")
    op.drop_table("units")
    op.drop_index(op.f("ix_tariff_versions_tariff_id"), table_name="tariff_versions")
    op.drop_table("tariff_versions")
    op.drop_index(op.f("ix_tenants_site_id"), table_name="tenants")
    op.drop_table("tenants")
    op.drop_index(op.f("ix_tariffs_site_id"), table_name="tariffs")
    op.drop_table("tariffs")
    op.drop_index(op.f("ix_prepaid_accounts_site_id"), table_name="prepaid_accounts")
    op.drop_table("prepaid_accounts")
    op.drop_index(op.f("ix_buildings_site_id"), table_name="buildings")
    op.drop_table("buildings")
    op.drop_table("sites")
    op.drop_index(op.f("ix_prepaid_topups_cid"), table_name="prepaid_topups")
    op.drop_table("prepaid_topups")
    op.drop_table("meter_info")
    op.drop_index("ix_audit_log_site_at", table_name="audit_log")
    op.drop_table("audit_log")
