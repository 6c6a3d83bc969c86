"""The persistence layer: a store location (arrays) plus a catalog database, and the one
transaction story that ties them: array first, catalog row second.

``Backend`` opens or creates a store and composes its focused parts, each usable on its own:

- :class:`~sclstore.store.array_store.ArrayStore`: run arrays at the store's location;
- :class:`~sclstore.store.datasets.DatasetRepository`: datasets and their obs indexes;
- :class:`~sclstore.store.model_registry.ModelRepository`: model checkpoints;
- :class:`~sclstore.store.runs.RunRepository`: runs (array, then catalog row) and readers;
- :class:`~sclstore.store.run_writer.RunWriter`: leases, block writes, completion, failure;
- :class:`~sclstore.store.results_cache.ResultCache`: cached evaluations and intermediates.

Its public methods delegate to them (one translation of catalog and array errors, by the class
decorator). ``Backend`` knows nothing of models, queries or metrics; :class:`sclstore.Store`
composes it with ingest, query and eval.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.engine import Engine

from . import catalog as catalogdb
from ._translate import translate_errors
from .array_store import ArrayStore
from .config import ArraySpec, StoreSettings
from .creating import check_empty_or_store, check_store_path, creation_lock, write_marker
from .datasets import DatasetRepository
from .errors import InvalidInputError, SclstoreError, StoreExistsError, StoreNotFoundError
from .info import DatasetInfo, ModelInfo, RunInfo
from .lease import Lease
from .location import MARKER, StoreLocation
from .model_registry import ModelRepository
from .models import utcnow
from .obs_index import ObsIndex
from .readonly import read_only_reason, refuse_write
from .results_cache import ResultCache
from .run_writer import RunWriter
from .runs import RunRepository
from .shards import ShardLease, ShardQueue

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import sqlalchemy as sa

    from . import arrays

__all__ = ["MARKER", "Backend", "cache_key"]

logger = logging.getLogger(__name__)


def stores_below(root: Path, depth: int = 2, limit: int = 200) -> list[Path]:
    """Stores in subfolders of ``root`` (at most ``depth`` levels, ``limit`` folders looked at),
    for the hint when ``--store`` names a folder above a store."""
    found: list[Path] = []
    level = [root]
    seen = 0
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                seen += 1
                if seen > limit:
                    return found
                if (child / MARKER).is_file():
                    found.append(child)
                else:
                    nxt.append(child)
        level = nxt
    return found


STORE_FORMAT_VERSION = 1


def cache_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (the run and evaluation cache keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@translate_errors
class Backend:
    """An open store: its location (URI + TileDB context), its catalog engine and its settings.

    Use :meth:`open` (or :meth:`create`); close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, location: StoreLocation, catalog_url: str, engine: Engine) -> None:
        self.location = location
        self.array_store = ArrayStore(location)
        self.catalog_url = catalog_url
        self.engine = engine
        self.datasets = DatasetRepository(engine)
        self.models = ModelRepository(engine)
        self.runs = RunRepository(engine, self.array_store)
        settings = location.settings
        self.shards = ShardQueue(engine, ttl_s=settings.lease_ttl_s, heartbeat_s=settings.heartbeat_s)
        """The runs' shard queue (:mod:`sclstore.store.shards`)."""
        self.writer = RunWriter(engine, self.array_store, self.runs, shards=self.shards)
        self.results = ResultCache(engine)

    @property
    def settings(self) -> StoreSettings:
        """The store's settings (leases are taken with these)."""
        return self.writer.settings

    @settings.setter
    def settings(self, value: StoreSettings) -> None:
        self.writer.settings = value

    @property
    def read_only(self) -> str | None:
        """Why this process cannot write the store (``None``: it can); set by :meth:`open`."""
        return self.results.read_only

    @read_only.setter
    def read_only(self, reason: str | None) -> None:
        self.results.read_only = reason

    # ------------------------------------------------------------------ opening
    @property
    def root(self) -> Path:
        """The local store folder (a remote store has none: use ``location.uri``)."""
        path = self.location.path
        if path is None:
            raise InvalidInputError(f"store {self.location.uri} is not a local folder")
        return path

    @staticmethod
    def default_catalog(root: str | os.PathLike[str] | StoreLocation) -> str:
        """The SQLite catalog inside a local store.

        Raises
        ------
        InvalidInputError
            For a remote store (an SQLite file cannot live on object storage).
        """
        loc = root if isinstance(root, StoreLocation) else None
        uri = loc.uri if loc is not None else os.fspath(cast("str | os.PathLike[str]", root))
        if (loc is not None and not loc.is_local) or (loc is None and "://" in uri and not uri.startswith("file://")):
            msg = (f"store {uri} is remote and SQLite cannot live there: pass --catalog (or $SCLSTORE_CATALOG) "
                   "with a PostgreSQL URL, e.g. postgresql+psycopg://user@host/db")
            raise InvalidInputError(msg)
        return f"sqlite:///{(Path(uri) / 'catalog.sqlite').resolve()}"

    @classmethod
    def create(cls, path: str | os.PathLike[str], catalog: str | None = None, *, settings: StoreSettings | None = None) -> Backend:
        """Create a store (or open an existing one) and bring its catalog to the newest schema."""
        if "://" not in os.fspath(path):
            check_store_path(Path(path).expanduser())
        loc = StoreLocation(path, settings)
        url = catalog or cls.default_catalog(loc)
        catalogdb.parse_url(url)  # a bad URL is refused before anything is created
        marker = loc.join(MARKER)
        payload = {"format": "sclstore", "version": STORE_FORMAT_VERSION, "created_at": utcnow().isoformat()}
        root = loc.path  # None for a remote store
        lock: Any = contextlib.nullcontext()
        created_root = not loc.is_dir(loc.uri)
        if root is not None:
            if root.exists() and not root.is_dir():
                raise StoreExistsError(f"{root} exists and is not a folder: choose another --store path")
            if (root / MARKER).is_file():
                reason = read_only_reason(root, None if catalog else root / "catalog.sqlite")
                if reason is not None:
                    raise refuse_write(reason)
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreExistsError(f"cannot create store folder {root}: {exc.strerror}; choose a --store path you can write") from None
            lock = creation_lock(root)  # concurrent creators of one new local store: one at a time
        with lock:
            try:
                if root is not None:
                    check_empty_or_store(root, root / MARKER)
                else:
                    loc.check_creatable(MARKER)
            except StoreExistsError:
                inside = stores_below(root) if root is not None else []
                if inside:
                    raise StoreExistsError(f"{loc.uri} is not an sclstore store, but {inside[0]} is: pass --store {inside[0]}") from None
                raise
            had_marker = loc.is_file(marker)
            loc.mkdir(loc.uri)
            loc.mkdir(loc.join("arrays"))
            try:
                engine = catalogdb.make_engine(url)
            except SclstoreError:
                if not had_marker:
                    loc.remove_dir(loc.uri if created_root else loc.join("arrays"))
                raise
            catalogdb.upgrade(engine)
            if not had_marker:
                if root is not None:
                    write_marker(root / MARKER, payload)  # exclusive: exactly one creator writes it
                else:
                    loc.write_text(marker, json.dumps(payload))
        return cls(loc, url, engine)

    @classmethod
    def open(cls, path: str | os.PathLike[str], catalog: str | None = None, *, settings: StoreSettings | None = None) -> Backend:
        """Open an existing store; the catalog must be at this code's schema revision.

        Raises
        ------
        StoreNotFoundError
            If ``path`` is not a store.
        SchemaVersionError
            If the catalog needs ``sclstore db upgrade`` or a newer sclstore.
        CatalogConnectionError
            If the catalog database cannot be reached.
        """
        if "://" not in os.fspath(path):
            check_store_path(Path(path).expanduser())
        loc = StoreLocation(path, settings)
        url = catalog or cls.default_catalog(loc)
        if not loc.is_file(loc.join(MARKER)):
            inside = stores_below(Path(loc.uri)) if loc.is_local else []
            if inside:
                more = f" (and {len(inside) - 1} more)" if len(inside) > 1 else ""
                msg = f"{loc.uri} is not an sclstore store, but {inside[0]} is{more}: pass --store {inside[0]}"
            else:
                msg = f"{loc.uri} is not an sclstore store (no {MARKER}): run `sclstore init --store {loc.uri}` or pass the right --store"
            raise StoreNotFoundError(msg)
        root = loc.path
        read_only = read_only_reason(root, None if catalog else root / "catalog.sqlite") if root is not None else None
        engine = catalogdb.make_engine(url, read_only=read_only)
        try:
            catalogdb.check_schema(engine, url)
        except SclstoreError:
            engine.dispose()
            raise
        backend = cls(loc, url, engine)
        backend.read_only = read_only
        if read_only is not None:
            logger.info("%s: opened for reading only", read_only)
        return backend

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def array_path(self, uri: str) -> str:
        """Absolute array location of a catalog ``array_uri`` (stored relative to the store)."""
        return self.location.resolve(uri)

    # ------------------------------------------------------------------ datasets
    def find_dataset(self, content_hash: str) -> DatasetInfo | None:
        """The dataset with this content hash, or ``None`` (see :meth:`DatasetRepository.find`)."""
        return self.datasets.find(content_hash)

    def register_dataset(
        self,
        *,
        name: str,
        content_hash: str,
        obs: pd.DataFrame,
        n_vars: int,
        source_path: str | None,
        cluster_by: Sequence[str] = (),
    ) -> DatasetInfo:
        """Register a dataset and its obs table (see :meth:`DatasetRepository.register`)."""
        return self.datasets.register(name=name, content_hash=content_hash, obs=obs, n_vars=n_vars,
                                      source_path=source_path, cluster_by=cluster_by)

    def get_dataset(self, dataset: int | str) -> DatasetInfo:
        """A dataset by id or name (see :meth:`DatasetRepository.get`)."""
        return self.datasets.get(dataset)

    def list_datasets(self) -> list[DatasetInfo]:
        return self.datasets.list_all()

    def obs_index(self, dataset: int | DatasetInfo) -> ObsIndex:
        """The obs index of a dataset (cell selection; cached per backend, datasets are immutable)."""
        return self.datasets.obs_index(dataset)

    def obs_table(self, dataset_id: int) -> sa.Table:
        """The SQLAlchemy Table of a dataset's obs (cached per backend)."""
        return self.datasets.obs_index(dataset_id).table

    def read_obs(self, dataset_id: int, cells: np.ndarray | None = None) -> pd.DataFrame:
        """Obs of a dataset in ``cell_idx`` order with original names and dtypes (+ ``src_idx``)."""
        return self.datasets.obs_index(dataset_id).frame(cells)

    def cell_order(self, dataset_id: int) -> np.ndarray:
        """``src_idx`` of every cell in ``cell_idx`` order: where each stored cell sits in the source file."""
        return self.datasets.obs_index(dataset_id).cell_order()

    def cell_order_range(self, dataset_id: int, lo: int, hi: int) -> np.ndarray:
        """``src_idx`` of cells ``lo..hi-1`` only (what a shard's worker reads)."""
        return self.datasets.obs_index(dataset_id).src_range(lo, hi)

    # ------------------------------------------------------------------ models
    def register_model(
        self, *, family: str, name: str, checkpoint_hash: str, n_layers: int, d_model: int, config: dict[str, Any]
    ) -> ModelInfo:
        """Register a model checkpoint (idempotent on family + checkpoint hash)."""
        return self.models.register(family=family, name=name, checkpoint_hash=checkpoint_hash, n_layers=n_layers,
                                    d_model=d_model, config=config)

    def list_models(self) -> list[ModelInfo]:
        return self.models.list_all()

    def get_model(self, model_id: int) -> ModelInfo:
        """A model by id (cached: model rows never change)."""
        return self.models.get(model_id)

    # ------------------------------------------------------------------ runs
    def get_run(self, run: int | str) -> RunInfo:
        """A run by id, ``"7"``, or ``"dataset/model"`` name pair (see :meth:`RunRepository.get`)."""
        return self.runs.get(run)

    def list_runs(self, *, dataset: str | None = None, model: str | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, optionally filtered by dataset name, model name and status."""
        return self.runs.list_all(dataset=dataset, model=model, status=status)

    def find_run(self, key: str) -> RunInfo | None:
        return self.runs.find(key)

    def create_run(
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
        ``sclstore work`` process claim them (see :meth:`RunRepository.create`).
        """
        return self.runs.create(dataset=dataset, model=model, key=key, params=params, layers=layers, spec=spec,
                                plan=plan, shared=shared)

    def acquire(self, run_id: int, *, wait: bool, poll_s: float = 1.0) -> Lease | None:
        """Lease a run for writing; ``None`` means it is complete (see :meth:`RunWriter.acquire`)."""
        return self.writer.acquire(run_id, wait=wait, poll_s=poll_s)

    def write_block(
        self, run: RunInfo, lease: Lease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None,
    ) -> None:
        """Write cells ``start..`` of every slot, durably, then advance the watermark."""
        self.writer.write_block(run, lease, start, block, unembeddable=unembeddable)

    def complete(self, run: RunInfo, lease: Lease, stats: dict[str, Any]) -> RunInfo:
        """Consolidate the array (see :meth:`ArrayStore.full_consolidation`), then mark the run complete."""
        return self.writer.complete(run, lease, stats)

    def write_shard_block(
        self, run: RunInfo, lease: ShardLease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None, cells_per_s: float | None = None, peak_rss: int | None = None,
    ) -> None:
        """Write cells ``start..`` of a claimed shard durably, then advance the shard's watermark."""
        self.writer.write_shard_block(run, lease, start, block, unembeddable=unembeddable, cells_per_s=cells_per_s,
                                      peak_rss=peak_rss)

    def finalise_run(self, run_id: int, stats: dict[str, Any] | None = None) -> RunInfo | None:
        """Finalise a run whose shards are all done; exactly one process does it (see
        :meth:`RunWriter.finalise_run`)."""
        return self.writer.finalise_run(run_id, stats)

    def mark_failed(self, run_id: int, error: str) -> None:
        """Mark an active run failed (an ingest that stopped; an identical ingest resumes it)."""
        self.writer.mark_failed(run_id, error)

    def fail(self, run: RunInfo, lease: Lease, error: str) -> None:
        """Mark a run failed (its written prefix stays; an identical ingest resumes it)."""
        self.writer.fail(run, lease, error)

    def open_reader(self, run: int | RunInfo) -> arrays.ArrayReader:
        """A reader over a complete run's array (see :meth:`RunRepository.open_reader`)."""
        return self.runs.open_reader(run)

    # ------------------------------------------------------------------ verify
    def verify(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Check that each complete run's array exists with the catalog's shape, encoding and extent.

        Returns one report per checked run: ``{"run", "ok", "problems": [...], "direct_reads"}``
        (see :func:`sclstore.store.verify.verify_run`).
        """
        runs = [self.runs.get(run)] if run is not None else self.runs.list_all(status="complete")
        return [self.array_store.verify(info) for info in runs]

    # ------------------------------------------------------------------ caches
    def get_evaluation(self, run_id: int, task: str, params_hash: str) -> dict[str, Any] | None:
        return self.results.get_evaluation(run_id, task, params_hash)

    def put_evaluation(self, run_id: int, task: str, params_hash: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        self.results.put_evaluation(run_id, task, params_hash, params, result)

    def list_evaluations(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Cached evaluations (without their results), oldest first."""
        return self.results.list_evaluations(run_id)

    def get_evaluation_by_id(self, evaluation_id: int) -> dict[str, Any]:
        """The stored result of one evaluation; NotFoundError names how to list them."""
        return self.results.get_evaluation_by_id(evaluation_id)

    def get_intermediate(self, key_hash: str) -> bytes | None:
        return self.results.get_intermediate(key_hash)

    def put_intermediate(self, kind: str, key_hash: str, params: dict[str, Any], payload: bytes) -> None:
        self.results.put_intermediate(kind, key_hash, params, payload)
