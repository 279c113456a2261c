"""${message}

Revision ${up_revision}, after ${down_revision | comma,n}. Written by
`python -m gateway_core.migrations revision` (see "Changing the schema" in docs/architecture.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = "${up_revision}"
down_revision = "${down_revision}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
