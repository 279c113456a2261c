"""Replica sync: when each cluster and worker row last changed (by the database's clock).

Revision 0004, after 0003. Written by
`python -m gateway_core.migrations revision` (see "Changing the schema" in docs/architecture.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before this revision (and by a SQLite store) carry no stamp.
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changed", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_clusters_changed"), ["changed"], unique=False)
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changed", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_workers_changed"), ["changed"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_changed"))
        batch_op.drop_column("changed")
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clusters_changed"))
        batch_op.drop_column("changed")
