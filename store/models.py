"""The catalog schema: SQLAlchemy 2.0 typed ORM.

Schema changes happen only through the Alembic migrations in :mod:`sclstore.migrations`; a test
checks that these models and the migrations agree. Per-dataset obs tables are data, not schema:
they are built at registration by :mod:`sclstore.store.obs` and ignored by migrations.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["RUN_STATUSES", "Base", "Dataset", "Evaluation", "Intermediate", "Model", "Run", "RunShard", "utcnow"]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("queued", "running", "complete", "failed", "cancelled")
SHARD_STATUSES = ("queued", "claimed", "done", "failed", "cancelled")


def utcnow() -> dt.datetime:
    """Timezone-aware now, stored by both backends."""
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012 (SQLAlchemy reads it as is)


class Dataset(Base):
    """One registered cell x gene matrix, identified by the hash of its content."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    n_obs: Mapped[int] = mapped_column(BigInteger)
    n_vars: Mapped[int] = mapped_column(BigInteger)
    source_path: Mapped[str | None] = mapped_column(Text)
    obs_table: Mapped[str] = mapped_column(String(64), unique=True)
    obs_schema: Mapped[list[Any]] = mapped_column(JSON)
    """``[{"name": obs column, "column": SQL column, "kind": "category|string|int|float|bool"}]``."""
    cluster_by: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="dataset")


class Model(Base):
    """One model checkpoint (family + content hash of its weights and configs)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("family", "checkpoint_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), index=True)
    checkpoint_hash: Mapped[str] = mapped_column(String(64))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="model")


class Run(Base):
    """One extraction: every kept layer of one model over one dataset, in one TileDB array."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    layers: Mapped[list[Any]] = mapped_column(JSON)
    pools: Mapped[list[Any]] = mapped_column(JSON)
    dim: Mapped[int] = mapped_column(Integer)
    n_cells: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(16))
    encoding_type: Mapped[str] = mapped_column(String(32))
    encoding_version: Mapped[str] = mapped_column(String(16))
    array_uri: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_host: Mapped[str | None] = mapped_column(String(255))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    lease_boot_id: Mapped[str | None] = mapped_column(String(64))
    """Boot id of the lease holder's host (``/proc/sys/kernel/random/boot_id``)."""
    lease_pidns: Mapped[str | None] = mapped_column(String(64))
    """The lease holder's pid namespace (``readlink /proc/self/ns/pid``)."""
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    unembeddable: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    """Cell indices (store order) the model could not embed (no gene token); their rows hold NaN."""
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    """What a worker needs to embed the run's shards (source, checkpoint, options, pinned numerics)."""
    shared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))
    """Whether any ``sclstore work`` process may claim its shards (False: only the ingesting process,
    e.g. for an in-memory AnnData)."""

    dataset: Mapped[Dataset] = relationship(back_populates="runs")
    model: Mapped[Model] = relationship(back_populates="runs")


class Evaluation(Base):
    """A cached evaluation result of one run."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("run_id", "task", "params_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    task: Mapped[str] = mapped_column(String(32))
    params_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Intermediate(Base):
    """A costly intermediate result (e.g. pseudobulk DE of a dataset), keyed by its inputs."""

    __tablename__ = "intermediates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunShard(Base):
    """A contiguous, chunk-aligned cell range ``[lo, hi)`` of a run, claimed by one worker at a time."""

    __tablename__ = "run_shards"
    __table_args__ = (UniqueConstraint("run_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    lo: Mapped[int] = mapped_column(BigInteger)
    hi: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)
    watermark: Mapped[int] = mapped_column(BigInteger)
    """Cells ``lo..watermark-1`` are written durably; a takeover resumes here."""
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_host: Mapped[str | None] = mapped_column(String(255))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    lease_boot_id: Mapped[str | None] = mapped_column(String(64))
    lease_pidns: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(String(64))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    """The run's pinned numerics, which every worker of this shard must use (batch composition,
    resume points, precision)."""
    chunk_cells: Mapped[int | None] = mapped_column(Integer)
    precision: Mapped[str | None] = mapped_column(String(8))
    cpu_threads: Mapped[int | None] = mapped_column(Integer)
    """On the CPU the thread count changes the last bits of a forward pass: a CPU run pins it."""
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    cells_per_s: Mapped[float | None] = mapped_column(Float)
    peak_rss: Mapped[int | None] = mapped_column(BigInteger)
    unembeddable: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    error: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
