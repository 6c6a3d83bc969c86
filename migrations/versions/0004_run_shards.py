"""run_shards: runs split into cell ranges that workers claim; runs.plan and runs.shared

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the shard queue; every unfinished run becomes one shard resuming at its watermark."""
    op.create_table(
        "run_shards",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", name="fk_run_shards_run_id_runs"), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("lo", sa.BigInteger(), nullable=False),
        sa.Column("hi", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_host", sa.String(255)),
        sa.Column("lease_pid", sa.Integer()),
        sa.Column("lease_boot_id", sa.String(64)),
        sa.Column("lease_pidns", sa.String(64)),
        sa.Column("heartbeat_at", sa.Float()),
        sa.Column("device", sa.String(64)),
        sa.Column("batch_size", sa.Integer()),
        sa.Column("chunk_cells", sa.Integer()),
        sa.Column("precision", sa.String(8)),
        sa.Column("cpu_threads", sa.Integer()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("cells_per_s", sa.Float()),
        sa.Column("peak_rss", sa.BigInteger()),
        sa.Column("unembeddable", sa.JSON(), nullable=False, server_default=sa.text("'[]'")),
        sa.Column("error", sa.Text()),
        sa.Column("claimed_at", sa.Float()),
        sa.Column("finished_at", sa.Float()),
        sa.PrimaryKeyConstraint("id", name="pk_run_shards"),
        sa.UniqueConstraint("run_id", "idx", name="uq_run_shards_run_id"),
    )
    op.create_index("ix_run_shards_run_id", "run_shards", ["run_id"])
    op.create_index("ix_run_shards_status", "run_shards", ["status"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("plan", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false()))
    runs = sa.table("runs", sa.column("id", sa.Integer()), sa.column("n_cells", sa.BigInteger()),
                    sa.column("watermark", sa.BigInteger()), sa.column("status", sa.String()), sa.column("params", sa.JSON()))
    shards = sa.table("run_shards", sa.column("run_id", sa.Integer()), sa.column("idx", sa.Integer()),
                      sa.column("lo", sa.BigInteger()), sa.column("hi", sa.BigInteger()),
                      sa.column("status", sa.String()), sa.column("watermark", sa.BigInteger()),
                      sa.column("attempts", sa.Integer()), sa.column("batch_size", sa.Integer()),
                      sa.column("chunk_cells", sa.Integer()), sa.column("precision", sa.String()))
    conn = op.get_bind()
    rows = conn.execute(sa.select(runs.c.id, runs.c.n_cells, runs.c.watermark, runs.c.params)
                        .where(runs.c.status != "complete")).all()
    if rows:
        conn.execute(sa.insert(shards), [{"run_id": r.id, "idx": 0, "lo": 0, "hi": r.n_cells, "status": "queued",
                                          "watermark": r.watermark, "attempts": 0, "batch_size": (r.params or {}).get("batch_size"),
                                          "chunk_cells": (r.params or {}).get("chunk_cells"),
                                          "precision": (r.params or {}).get("precision")} for r in rows])


def downgrade() -> None:
    """Drop the shard queue and the run columns."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("shared")
        batch.drop_column("plan")
    op.drop_index("ix_run_shards_status", table_name="run_shards")
    op.drop_index("ix_run_shards_run_id", table_name="run_shards")
    op.drop_table("run_shards")
