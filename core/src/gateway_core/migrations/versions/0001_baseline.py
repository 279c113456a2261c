"""Baseline: the clusters and workers tables, as made before migrations existed.

Revision 0001. A database made by a gateway without migrations (these two tables and no
``alembic_version``) is recognised as being at this revision and stamped, never re-created.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("scheduler_address", sa.Text(), nullable=False),
        sa.Column("dashboard_address", sa.Text(), nullable=False),
        sa.Column("api_address", sa.Text(), nullable=False),
        sa.Column("tls_cert", sa.LargeBinary(), nullable=False),
        sa.Column("tls_key", sa.LargeBinary(), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=False),
        sa.Column("stop_time", sa.BigInteger(), nullable=True),
        sa.Column("last_heartbeat", sa.Float(), nullable=True),
        sa.Column("worker_start_failures", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_clusters_username", "clusters", ["username"], unique=False)
    op.create_table(
        "workers",
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=False),
        sa.Column("stop_time", sa.BigInteger(), nullable=True),
        sa.Column("close_expected", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["cluster_name"], ["clusters.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("cluster_name", "name"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_clusters_username", table_name="clusters")
    op.drop_table("clusters")
