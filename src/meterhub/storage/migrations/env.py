"""Alembic environment: runs against the connection meterhub hands over (see storage.database.migrate)."""

from __future__ import annotations

from alembic import context

from meterhub.storage.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic` command line: use the configured URL
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    connection = engine.connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
