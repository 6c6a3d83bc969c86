"""Read-only value objects describing what a store holds."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .obs_column import ObsColumn

if TYPE_CHECKING:  # the ORM rows (or any object with their attributes: see store/listing.py)
    from .models import Dataset, Model, Run

__all__ = ["DatasetInfo", "ModelInfo", "RunInfo"]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset."""

    id: int
    name: str
    content_hash: str
    n_obs: int
    n_vars: int
    source_path: str | None
    obs_table: str
    obs_schema: tuple[ObsColumn, ...]
    cluster_by: tuple[str, ...]
    created_at: str | None

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetInfo:
        return cls(
            id=row.id,
            name=row.name,
            content_hash=row.content_hash,
            n_obs=int(row.n_obs),
            n_vars=int(row.n_vars),
            source_path=row.source_path,
            obs_table=row.obs_table,
            obs_schema=tuple(ObsColumn.from_json(c) for c in row.obs_schema),
            cluster_by=tuple(row.cluster_by),
            created_at=_iso(row.created_at),
        )

    def column(self, name: str) -> ObsColumn:
        """The obs column called ``name`` (KeyError-style NotFoundError otherwise)."""
        for col in self.obs_schema:
            if col.name == name:
                return col
        from .errors import NotFoundError

        have = ", ".join(c.name for c in self.obs_schema) or "(none)"
        raise NotFoundError(f"dataset {self.name!r} has no obs column {name!r}; it has: {have}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["obs_schema"] = [c.to_json() for c in self.obs_schema]
        d["cluster_by"] = list(self.cluster_by)
        return d


@dataclass(frozen=True)
class ModelInfo:
    """A registered model checkpoint."""

    id: int
    family: str
    name: str
    checkpoint_hash: str
    n_layers: int
    d_model: int
    config: dict[str, Any]

    @classmethod
    def from_row(cls, row: Model) -> ModelInfo:
        return cls(row.id, row.family, row.name, row.checkpoint_hash, row.n_layers, row.d_model, dict(row.config))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunInfo:
    """One extraction run. Slot ``i`` of its array holds layer ``layers[i]``."""

    id: int
    dataset_id: int
    dataset_name: str
    model_id: int
    model_name: str
    family: str
    layers: tuple[int, ...]
    n_model_layers: int
    pools: tuple[str, ...]
    dim: int
    n_cells: int
    dtype: str
    status: str
    watermark: int
    array_uri: str
    cache_key: str
    params: dict[str, Any]
    stats: dict[str, Any]
    encoding_type: str
    encoding_version: str
    lease_owner: str | None
    lease_host: str | None
    lease_pid: int | None
    heartbeat_at: float | None
    error: str | None
    created_at: str | None
    finished_at: str | None
    unembeddable: tuple[int, ...] = ()
    """Cells (store order) the model could not embed: NaN rows, skipped by evaluation."""
    plan: dict[str, Any] = field(default_factory=dict)
    """What a worker needs to embed the run's shards (see :mod:`sclstore.ingest.plan`)."""
    shared: bool = False
    """Whether any ``sclstore work`` process may claim its shards."""

    @classmethod
    def from_row(cls, row: Run, array_uri: str) -> RunInfo:
        return cls(
            id=row.id,
            dataset_id=row.dataset_id,
            dataset_name=row.dataset.name,
            model_id=row.model_id,
            model_name=row.model.name,
            family=row.model.family,
            layers=tuple(int(x) for x in row.layers),
            n_model_layers=int(row.model.n_layers),
            pools=tuple(row.pools),
            dim=int(row.dim),
            n_cells=int(row.n_cells),
            dtype=row.dtype,
            status=row.status,
            watermark=int(row.watermark),
            array_uri=array_uri,
            cache_key=row.cache_key,
            params=dict(row.params),
            stats=dict(row.stats or {}),
            encoding_type=row.encoding_type,
            encoding_version=row.encoding_version,
            lease_owner=row.lease_owner,
            lease_host=row.lease_host,
            lease_pid=row.lease_pid,
            heartbeat_at=row.heartbeat_at,
            error=row.error,
            created_at=_iso(row.created_at),
            finished_at=_iso(row.finished_at),
            unembeddable=tuple(int(x) for x in (row.unembeddable or ())),
            plan=dict(row.plan or {}),
            shared=bool(row.shared),
        )

    @property
    def label(self) -> str:
        """``dataset/model``, the human name of a run."""
        return f"{self.dataset_name}/{self.model_name}"

    def slot(self, layer: int) -> int:
        """Array slot of a stored layer."""
        try:
            return self.layers.index(layer)
        except ValueError:
            from .errors import NotFoundError

            raise NotFoundError(f"layer {layer} is not stored in run {self.id}; stored layers: {list(self.layers)}") from None

    def depth(self, layer: int) -> float:
        return layer / self.n_model_layers if self.n_model_layers else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["pools"] = list(self.pools)
        return d
