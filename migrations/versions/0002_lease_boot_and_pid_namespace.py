"""lease holder's boot id and pid namespace

A lease holder on this host is judged dead from its pid only when it ran under the same boot
and in the same pid namespace (containers and pods share host names but not pids).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 14:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the catalog schema."""
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_boot_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_pidns", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("lease_pidns")
        batch_op.drop_column("lease_boot_id")
