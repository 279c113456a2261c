"""Cluster sharing: the users and groups a cluster is shared with (NULL: no one).

Revision 0003, after 0002. Written by
`python -m gateway_core.migrations revision` (see "Changing the schema" in docs/architecture.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite alters a table by copying it; PostgreSQL adds the columns in place.
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shared_users", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("shared_groups", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.drop_column("shared_groups")
        batch_op.drop_column("shared_users")
