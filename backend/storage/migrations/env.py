"""Alembic environment: always run programmatically by `backend.storage.migrate` on a connection it opened
(and locked); `alembic` on the command line is not needed to run Tandem."""

from __future__ import annotations

from alembic import context

from backend.storage.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through backend.storage.migrate.upgrade(url), which locks the database")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
