"""Alembic's environment for the store's migrations: runs the revisions in versions/.

Run through `gateway_core.migrations` (`gateway db upgrade`), which passes the connection to use
in ``config.attributes["connection"]``; `target_metadata` is the store's tables.
"""

from __future__ import annotations

from alembic import context

from gateway_core.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the gateway's migrations run through `gateway db upgrade` (or "
        "gateway_core.migrations.upgrade), which hands them a connection; not through the "
        "alembic command"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: batch operations copy the table instead.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
