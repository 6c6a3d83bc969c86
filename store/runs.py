"""The run repository: ``runs`` rows and their arrays, created array first, catalog row second.

A run is looked up by id, ``"7"`` or a ``"dataset/model"`` name pair; complete runs never change,
so their lookups by id are cached. Writing a run (leases, blocks, completion) is
:class:`~sclstore.store.run_writer.RunWriter`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, joinedload

from . import catalog as catalogdb
from ._lazy import lazy_module
from ._translate import translate_errors
from .array_store import ArrayStore
from .config import ArraySpec
from .errors import InvalidInputError, RunNotFoundError
from .info import DatasetInfo, ModelInfo, RunInfo
from .models import Dataset, Model, Run, utcnow

if TYPE_CHECKING:
    from . import arrays
else:  # loaded on first use: listing runs needs neither numpy nor TileDB
    arrays = lazy_module("sclstore.store.arrays")

__all__ = ["RunRepository"]


@translate_errors
class RunRepository:
    """Runs in one catalog, their arrays in one :class:`ArrayStore`.

    Parameters
    ----------
    engine
        The catalog engine (private to the store layer).
    array_store
        Where the runs' arrays live; ``array_uri`` in the catalog is relative to its location.
    """

    def __init__(self, engine: Engine, array_store: ArrayStore) -> None:
        self.engine = engine
        self.array_store = array_store
        # complete runs never change: look them up in the catalog once
        self._complete: dict[int, RunInfo] = {}

    def _query(self) -> sa.Select[Run]:
        return sa.select(Run).options(joinedload(Run.dataset), joinedload(Run.model))

    def _info(self, row: Run) -> RunInfo:
        return RunInfo.from_row(row, self.array_store.location.resolve(row.array_uri))

    def get(self, run: int | str) -> RunInfo:
        """A run by id, ``"7"``, or ``"dataset/model"`` name pair.

        Raises
        ------
        RunNotFoundError
            Listing the runs that exist, or the candidates when a name pair is ambiguous.
        """
        by_id = isinstance(run, int) or (isinstance(run, str) and run.strip().isdigit())
        if by_id:
            cached = self._complete.get(int(run))
            if cached is not None:
                return cached
        with Session(self.engine) as s:
            if by_id:
                row = s.scalar(self._query().where(Run.id == int(run)))
                if row is None:
                    raise RunNotFoundError(f"no run {run}; runs: {self._list_text(s)}")
                info = self._info(row)
                if info.status == "complete":
                    self._complete[info.id] = info
                return info
            if not isinstance(run, str) or "/" not in run:
                raise RunNotFoundError(f"run {run!r} is neither an id nor 'dataset/model'; runs: {self._list_text(s)}")
            ds, model = run.split("/", 1)
            rows = s.scalars(
                self._query().join(Run.dataset).join(Run.model).where(Dataset.name == ds, Model.name == model).order_by(Run.id)
            ).unique().all()
            if not rows:
                raise RunNotFoundError(f"no run {run!r}; runs: {self._list_text(s)}")
            complete = [r for r in rows if r.status == "complete"]
            if len(complete if complete else rows) > 1:
                cands = ", ".join(f"{r.id} ({r.status}, layers {r.layers[0]}..{r.layers[-1]}, pools {','.join(r.pools)})" for r in rows)
                raise RunNotFoundError(f"{run!r} matches several runs: {cands}; pass the run id")
            return self._info((complete or rows)[0])

    def _list_text(self, s: Session) -> str:
        rows = s.scalars(self._query().order_by(Run.id)).unique().all()
        if not rows:
            return "(none: ingest a dataset first)"
        return ", ".join(f"{r.id}={r.dataset.name}/{r.model.name} ({r.status})" for r in rows)

    def list_all(self, *, dataset: str | None = None, model: str | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, optionally filtered by dataset name, model name and status."""
        stmt = self._query().join(Run.dataset).join(Run.model).order_by(Run.id)
        if dataset is not None:
            stmt = stmt.where(Dataset.name == dataset)
        if model is not None:
            stmt = stmt.where(Model.name == model)
        if status is not None:
            stmt = stmt.where(Run.status == status)
        with Session(self.engine) as s:
            return [self._info(r) for r in s.scalars(stmt).unique().all()]

    def find(self, key: str) -> RunInfo | None:
        """The run with this cache key, or ``None``."""
        with Session(self.engine) as s:
            row = s.scalar(self._query().where(Run.cache_key == key))
            return None if row is None else self._info(row)

    def create(
        self,
        *,
        dataset: DatasetInfo,
        model: ModelInfo,
        key: str,
        params: dict[str, Any],
        layers: Sequence[int],
        spec: ArraySpec,
        plan: dict[str, Any] | None = None,
        shared: bool = False,
    ) -> RunInfo:
        """Create a run's array, then its catalog row (or return the run with this cache key).

        ``plan`` is what a worker needs to embed the run's shards; ``shared`` lets any
        ``sclstore work`` process claim them. A failure to write the row removes the array
        again; when a concurrent process created the same run first, its run is returned and
        this array is removed.
        """
        found = self.find(key)
        if found is not None:
            return found
        rel, uri = self.array_store.new_array_uri()
        meta = {"dataset": dataset.name, "dataset_hash": dataset.content_hash, "model": model.name,
                "family": model.family, "checkpoint_hash": model.checkpoint_hash, "cache_key": key}
        self.array_store.create(uri, spec, layers=layers, meta=meta)
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(
                    sa.insert(Run).values(
                        dataset_id=dataset.id, model_id=model.id, cache_key=key, params=params,
                        layers=[int(x) for x in layers], pools=list(spec.pools), dim=spec.dim,
                        n_cells=spec.n_cells, dtype=spec.dtype, encoding_type=arrays.ENCODING_TYPE,
                        encoding_version=arrays.ENCODING_VERSION, array_uri=rel, status="queued",
                        watermark=0, stats={}, created_at=utcnow(), plan=plan or {}, shared=shared,
                    )
                )
        except sa.exc.IntegrityError:
            self.array_store.remove(uri)  # another process created the run first
        except BaseException:
            self.array_store.remove(uri)
            raise
        found = self.find(key)
        assert found is not None
        return found

    def open_reader(self, run: int | RunInfo) -> arrays.ArrayReader:
        """A reader over a complete run's array (pass a ``RunInfo`` to skip the catalog lookup).

        Raises
        ------
        InvalidInputError
            If the run is not complete.
        """
        info = run if isinstance(run, RunInfo) else self.get(run)
        if info.status != "complete":
            msg = f"run {info.id} is {info.status} ({info.watermark}/{info.n_cells} cells): rerun the same ingest to finish it"
            raise InvalidInputError(msg)
        return self.array_store.reader(info)
