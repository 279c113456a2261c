"""Worker groups: each worker's group (NULL: default) and the counts wanted per named group.

Revision 0005, after 0004. Written by
`python -m gateway_core.migrations revision` (see "Changing the schema" in docs/architecture.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite alters a table by copying it; PostgreSQL adds the columns in place.
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_counts", sa.JSON(), nullable=True))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("group")
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.drop_column("group_counts")
