"""runs.unembeddable: cells the model could not embed

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 14:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the run-level list of unembeddable cells (empty for existing runs)."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("unembeddable", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    """Drop the list."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("unembeddable")
