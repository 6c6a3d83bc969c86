"""The persistence layer: a store folder (arrays) plus a catalog database, and the one
transaction story that ties them: array first, catalog row second.

``Backend`` knows nothing of models, queries or metrics; :class:`sclstore.Store` composes it
with ingest, query and eval.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, joinedload

from . import catalog as catalogdb
from ._lazy import lazy_module
from ._translate import translate_errors
from .array_store import ArrayStore
from .config import ArraySpec, StoreSettings, validate_name
from .creating import check_empty_or_store, check_store_path, creation_lock, write_marker
from .errors import (
    DatasetError,
    InvalidInputError,
    LeaseHeldError,
    NotFoundError,
    RunNotFoundError,
    SclstoreError,
    StoreExistsError,
    StoreNotFoundError,
)
from .info import DatasetInfo, ModelInfo, RunInfo
from .lease import Lease, try_acquire
from .location import StoreLocation
from .models import Dataset, Evaluation, Intermediate, Model, Run, utcnow
from .obs import (
    build_obs_table,
    check_obs_width,
    infer_obs_schema,
    insert_obs,
    obs_table_name,
    unindexable_columns,
)
from .obs_index import ObsIndex
from .readonly import read_only_reason, refuse_write
from .shards import ShardLease, ShardQueue

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from . import arrays
else:  # loaded on first use: listing runs needs neither numpy, pandas nor TileDB
    np = lazy_module("numpy")
    pd = lazy_module("pandas")
    arrays = lazy_module("sclstore.store.arrays")

__all__ = ["MARKER", "Backend", "cache_key"]

logger = logging.getLogger(__name__)
MARKER = "sclstore.json"


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


class _AlreadyRegistered(Exception):
    """Internal: another process registered the same dataset first."""


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
        self.settings = location.settings
        self._obs_md = sa.MetaData()
        # complete runs and registered datasets never change: look them up in the catalog once
        self._complete_runs: dict[int, RunInfo] = {}
        self._datasets: dict[int | str, DatasetInfo] = {}
        self.read_only: str | None = None
        """Why this process cannot write the store (``None``: it can); set by :meth:`open`."""
        self._obs_indexes: dict[int, ObsIndex] = {}
        self.shards = ShardQueue(engine, ttl_s=self.settings.lease_ttl_s, heartbeat_s=self.settings.heartbeat_s)
        """The runs' shard queue (:mod:`sclstore.store.shards`)."""

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
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Dataset).where(Dataset.content_hash == content_hash))
            return None if row is None else DatasetInfo.from_row(row)

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
        """Register a dataset and its typed obs table in one transaction (or return the existing one).

        Cells are ordered by ``cluster_by`` columns (stable), so filters on them become few
        contiguous cell ranges; ``cell_idx`` is the position in that order.

        Raises
        ------
        DatasetError
            If the name is taken by other data, the same data was registered with another
            ``cluster_by``, a ``cluster_by`` column is missing, or obs is unusable.
        """
        validate_name(name, what="dataset")
        existing = self.find_dataset(content_hash)
        if existing is not None:
            if cluster_by and tuple(cluster_by) != existing.cluster_by:
                msg = (
                    f"this data is already registered as {existing.name!r} with cells ordered by "
                    f"{list(existing.cluster_by)}; omit --cluster-by or pass --cluster-by {','.join(existing.cluster_by) or '(none)'}"
                )
                raise DatasetError(msg)
            return existing
        if obs.shape[0] == 0:
            raise DatasetError("the dataset has no cells: nothing to ingest")
        schema = infer_obs_schema(obs)
        check_obs_width(len(schema), self.engine.dialect.name)
        missing = [c for c in cluster_by if c not in set(map(str, obs.columns))]
        if missing:
            msg = f"--cluster-by column(s) {missing} not in obs; obs columns are: {', '.join(map(str, obs.columns))}"
            raise DatasetError(msg)
        if cluster_by:
            keys = pd.DataFrame({c: obs[c].to_numpy() for c in cluster_by})
            order = keys.reset_index(drop=True).sort_values(list(cluster_by), kind="mergesort", na_position="last").index.to_numpy()
        else:
            order = np.arange(obs.shape[0])
        tname = obs_table_name(content_hash)
        table = build_obs_table(tname, schema, sa.MetaData(), unindexed=unindexable_columns(obs, schema))
        try:
            with catalogdb.write_tx(self.engine) as conn:
                if conn.execute(sa.select(Dataset.id).where(Dataset.content_hash == content_hash)).first() is not None:
                    raise _AlreadyRegistered
                taken = conn.execute(sa.select(Dataset.id).where(Dataset.name == name)).first()
                if taken is not None:
                    msg = f"dataset name {name!r} is already used by other data: pass another --name"
                    raise DatasetError(msg)
                insert_obs(conn, table, obs, schema, order)
                conn.execute(
                    sa.insert(Dataset).values(
                        name=name,
                        content_hash=content_hash,
                        n_obs=int(obs.shape[0]),
                        n_vars=int(n_vars),
                        source_path=source_path,
                        obs_table=tname,
                        obs_schema=[c.to_json() for c in schema],
                        cluster_by=list(cluster_by),
                        created_at=utcnow(),
                    )
                )
        except (_AlreadyRegistered, sa.exc.IntegrityError, sa.exc.ProgrammingError):
            again = self.find_dataset(content_hash)  # a concurrent registration won
            if again is None:
                raise
            return again
        info = self.find_dataset(content_hash)
        assert info is not None
        logger.info("registered dataset %s (%d cells, %d obs columns)", name, info.n_obs, len(schema))
        return info

    def get_dataset(self, dataset: int | str) -> DatasetInfo:
        """A dataset by id or name."""
        cached = self._datasets.get(dataset)
        if cached is not None:
            return cached
        with Session(self.engine) as s:
            cond = Dataset.id == dataset if isinstance(dataset, int) else Dataset.name == str(dataset)
            row = s.scalar(sa.select(Dataset).where(cond))
            if row is None:
                names = s.scalars(sa.select(Dataset.name).order_by(Dataset.id)).all()
                raise NotFoundError(f"no dataset {dataset!r}; datasets: {', '.join(names) or '(none: ingest one first)'}")
            info = DatasetInfo.from_row(row)
        self._datasets[info.id] = self._datasets[info.name] = info
        return info

    def list_datasets(self) -> list[DatasetInfo]:
        with Session(self.engine) as s:
            return [DatasetInfo.from_row(r) for r in s.scalars(sa.select(Dataset).order_by(Dataset.id))]

    def obs_index(self, dataset: int | DatasetInfo) -> ObsIndex:
        """The obs index of a dataset (cell selection; cached per backend, datasets are immutable)."""
        info = dataset if isinstance(dataset, DatasetInfo) else self.get_dataset(dataset)
        index = self._obs_indexes.get(info.id)
        if index is None:
            index = self._obs_indexes[info.id] = ObsIndex(self.engine, info, ObsIndex.build_table(info, self._obs_md))
        return index

    def obs_table(self, dataset_id: int) -> sa.Table:
        """The SQLAlchemy Table of a dataset's obs (cached per backend)."""
        return self.obs_index(dataset_id).table

    def read_obs(self, dataset_id: int, cells: np.ndarray | None = None) -> pd.DataFrame:
        """Obs of a dataset in ``cell_idx`` order with original names and dtypes (+ ``src_idx``)."""
        return self.obs_index(dataset_id).frame(cells)

    def cell_order(self, dataset_id: int) -> np.ndarray:
        """``src_idx`` of every cell in ``cell_idx`` order: where each stored cell sits in the source file."""
        return self.obs_index(dataset_id).cell_order()

    def cell_order_range(self, dataset_id: int, lo: int, hi: int) -> np.ndarray:
        """``src_idx`` of cells ``lo..hi-1`` only (what a shard's worker reads)."""
        return self.obs_index(dataset_id).src_range(lo, hi)

    # ------------------------------------------------------------------ models
    def register_model(
        self, *, family: str, name: str, checkpoint_hash: str, n_layers: int, d_model: int, config: dict[str, Any]
    ) -> ModelInfo:
        """Register a model checkpoint (idempotent on family + checkpoint hash)."""
        cond = sa.and_(Model.family == family, Model.checkpoint_hash == checkpoint_hash)
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Model).where(cond))
            if row is not None:
                return ModelInfo.from_row(row)
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(
                    sa.insert(Model).values(
                        family=family, name=name, checkpoint_hash=checkpoint_hash, n_layers=n_layers,
                        d_model=d_model, config=config, created_at=utcnow(),
                    )
                )
        except sa.exc.IntegrityError:
            pass  # registered concurrently
        with Session(self.engine) as s:
            return ModelInfo.from_row(s.scalars(sa.select(Model).where(cond)).one())

    def list_models(self) -> list[ModelInfo]:
        with Session(self.engine) as s:
            return [ModelInfo.from_row(r) for r in s.scalars(sa.select(Model).order_by(Model.id))]

    # ------------------------------------------------------------------ runs
    def _run_query(self) -> sa.Select[Run]:
        return sa.select(Run).options(joinedload(Run.dataset), joinedload(Run.model))

    def _info(self, row: Run) -> RunInfo:
        return RunInfo.from_row(row, self.array_path(row.array_uri))

    def get_run(self, run: int | str) -> RunInfo:
        """A run by id, ``"7"``, or ``"dataset/model"`` name pair.

        Raises
        ------
        RunNotFoundError
            Listing the runs that exist, or the candidates when a name pair is ambiguous.
        """
        if isinstance(run, int) or (isinstance(run, str) and run.strip().isdigit()):
            cached = self._complete_runs.get(int(run))
            if cached is not None:
                return cached
        with Session(self.engine) as s:
            if isinstance(run, int) or (isinstance(run, str) and run.strip().isdigit()):
                row = s.scalar(self._run_query().where(Run.id == int(run)))
                if row is None:
                    raise RunNotFoundError(f"no run {run}; runs: {self._run_list_text(s)}")
                info = self._info(row)
                if info.status == "complete":
                    self._complete_runs[info.id] = info
                return info
            if not isinstance(run, str) or "/" not in run:
                raise RunNotFoundError(f"run {run!r} is neither an id nor 'dataset/model'; runs: {self._run_list_text(s)}")
            ds, model = run.split("/", 1)
            rows = s.scalars(
                self._run_query().join(Run.dataset).join(Run.model).where(Dataset.name == ds, Model.name == model).order_by(Run.id)
            ).unique().all()
            if not rows:
                raise RunNotFoundError(f"no run {run!r}; runs: {self._run_list_text(s)}")
            complete = [r for r in rows if r.status == "complete"]
            if len(complete if complete else rows) > 1:
                cands = ", ".join(f"{r.id} ({r.status}, layers {r.layers[0]}..{r.layers[-1]}, pools {','.join(r.pools)})" for r in rows)
                raise RunNotFoundError(f"{run!r} matches several runs: {cands}; pass the run id")
            return self._info((complete or rows)[0])

    def _run_list_text(self, s: Session) -> str:
        rows = s.scalars(self._run_query().order_by(Run.id)).unique().all()
        if not rows:
            return "(none: ingest a dataset first)"
        return ", ".join(f"{r.id}={r.dataset.name}/{r.model.name} ({r.status})" for r in rows)

    def list_runs(self, *, dataset: str | None = None, model: str | None = None, status: str | None = None) -> list[RunInfo]:
        """Runs, optionally filtered by dataset name, model name and status."""
        stmt = self._run_query().join(Run.dataset).join(Run.model).order_by(Run.id)
        if dataset is not None:
            stmt = stmt.where(Dataset.name == dataset)
        if model is not None:
            stmt = stmt.where(Model.name == model)
        if status is not None:
            stmt = stmt.where(Run.status == status)
        with Session(self.engine) as s:
            return [self._info(r) for r in s.scalars(stmt).unique().all()]

    def find_run(self, key: str) -> RunInfo | None:
        with Session(self.engine) as s:
            row = s.scalar(self._run_query().where(Run.cache_key == key))
            return None if row is None else self._info(row)

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
        ``sclstore work`` process claim them.
        """
        found = self.find_run(key)
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
        found = self.find_run(key)
        assert found is not None
        return found

    def acquire(self, run_id: int, *, wait: bool, poll_s: float = 1.0) -> Lease | None:
        """Lease a run for writing. ``None`` means the run is (or became) complete.

        Raises
        ------
        LeaseHeldError
            If another live process holds it and ``wait`` is false.
        """
        st = self.settings
        while True:
            lease = try_acquire(self.engine, run_id, ttl_s=st.lease_ttl_s, heartbeat_s=st.heartbeat_s)
            if lease is not None:
                return lease
            info = self.get_run(run_id)
            if info.status == "complete":
                return None
            if not wait:
                age = time.time() - (info.heartbeat_at or 0)
                msg = (
                    f"run {run_id} is being written by {info.lease_host} pid {info.lease_pid} "
                    f"(heartbeat {age:.0f} s ago): wait for it, or rerun once its lease expires ({st.lease_ttl_s:.0f} s)"
                )
                raise LeaseHeldError(msg)
            time.sleep(poll_s)

    def _owned_update(self, lease: Lease, **values: Any) -> None:
        with catalogdb.write_tx(self.engine) as conn:
            res = conn.execute(
                sa.update(Run).where(Run.id == lease.run_id, Run.lease_owner == lease.owner).values(heartbeat_at=time.time(), **values)
            )
        if res.rowcount != 1:
            lease.lost.set()
            raise LeaseHeldError(f"lost the lease on run {lease.run_id} to another process; it will finish the run")

    def write_block(
        self, run: RunInfo, lease: Lease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None,
    ) -> None:
        """Write cells ``start..`` of every slot, durably, then advance the watermark.

        ``unembeddable`` is the run's full list of cells so far that the model could not embed
        (their rows are NaN); it is recorded with the watermark when given.
        """
        if lease.lost.is_set():
            raise LeaseHeldError(f"lost the lease on run {run.id} to another process; it will finish the run")
        n = next(iter(block.values())).shape[1]
        self.array_store.write(run, start, block)
        extra = {} if unembeddable is None else {"unembeddable": [int(c) for c in unembeddable]}
        self._owned_update(lease, watermark=start + n, **extra)

    def complete(self, run: RunInfo, lease: Lease, stats: dict[str, Any]) -> RunInfo:
        """Consolidate the array (see :meth:`ArrayStore.full_consolidation`), then mark the run complete."""
        self.array_store.finalise(run)
        self._owned_update(lease, status="complete", stats=stats, finished_at=utcnow(),
                           lease_owner=None, lease_host=None, lease_pid=None)
        lease.release()
        return self.get_run(run.id)

    def write_shard_block(
        self, run: RunInfo, lease: ShardLease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None, cells_per_s: float | None = None, peak_rss: int | None = None,
    ) -> None:
        """Write cells ``start..`` of a claimed shard durably, then advance the shard's watermark."""
        lease.check()
        n = next(iter(block.values())).shape[1]
        self.array_store.write(run, start, block)
        self.shards.advance(lease, start + n, cells=n, unembeddable=unembeddable, cells_per_s=cells_per_s, peak_rss=peak_rss)

    def finalise_run(self, run_id: int, stats: dict[str, Any] | None = None) -> RunInfo | None:
        """Finalise a run whose shards are all done; exactly one process does it.

        The finaliser is whoever wins the run's lease; it consolidates the array (or checks its
        disjoint fragments), gathers the shards' unembeddable cells and marks the run complete.
        Returns the run this call completed, or ``None`` when it is complete already, another
        process is finalising it, or shards are left.
        """
        st = self.settings
        lease = try_acquire(self.engine, run_id, ttl_s=st.lease_ttl_s, heartbeat_s=st.heartbeat_s)
        if lease is None:
            return None
        try:
            shards = self.shards.shards(run_id)
            if not shards or any(s.status != "done" for s in shards):
                lease.release()
                return None
            run = self.get_run(run_id)
            unembeddable = sorted({c for s in shards for c in s.unembeddable})
            t0 = min((s.claimed_at for s in shards if s.claimed_at), default=None)
            t1 = max((s.finished_at for s in shards if s.finished_at), default=None)
            seconds = round(t1 - t0, 3) if t0 and t1 else None
            workers = sorted({f"{s.lease_host}:{s.lease_pid}" for s in shards if s.lease_host})
            summary = {"shards": len(shards), "workers": len(workers), "devices": sorted({s.device for s in shards if s.device}),
                       "peak_rss_bytes": max((s.peak_rss or 0 for s in shards), default=0), "unembeddable_cells": len(unembeddable),
                       "wall_seconds": seconds, "cells_per_s": round(run.n_cells / seconds, 2) if seconds else None}
            self.array_store.finalise(run)
            self._owned_update(lease, status="complete", stats={**summary, **(stats or {})}, finished_at=utcnow(),
                               unembeddable=unembeddable, watermark=run.n_cells, lease_owner=None, lease_host=None, lease_pid=None)
        except BaseException:
            lease.release()
            raise
        lease.release()
        logger.info("run %s complete: %d shard(s), %s cells/s", run_id, len(shards), summary["cells_per_s"])
        return self.get_run(run_id)

    def mark_failed(self, run_id: int, error: str) -> None:
        """Mark an active run failed (an ingest that stopped; an identical ingest resumes it)."""
        with contextlib.suppress(sa.exc.SQLAlchemyError), catalogdb.write_tx(self.engine) as conn:
            conn.execute(sa.update(Run).where(Run.id == run_id, Run.status.in_(("queued", "running")))
                         .values(status="failed", error=error[:2000]))

    def fail(self, run: RunInfo, lease: Lease, error: str) -> None:
        """Mark a run failed (its written prefix stays; an identical ingest resumes it)."""
        try:
            self._owned_update(lease, status="failed", error=error[:2000], lease_owner=None, lease_host=None, lease_pid=None)
        except (LeaseHeldError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("could not mark run %s failed: %s", run.id, catalogdb.first_line(exc))
        lease.release()

    def open_reader(self, run: int | RunInfo) -> arrays.ArrayReader:
        """A reader over a complete run's array (pass a ``RunInfo`` to skip the catalog lookup).

        Raises
        ------
        InvalidInputError
            If the run is not complete.
        """
        info = run if isinstance(run, RunInfo) else self.get_run(run)
        run_id = info.id
        if info.status != "complete":
            msg = f"run {run_id} is {info.status} ({info.watermark}/{info.n_cells} cells): rerun the same ingest to finish it"
            raise InvalidInputError(msg)
        return self.array_store.reader(info)

    # ------------------------------------------------------------------ verify
    def verify(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Check that each complete run's array exists with the catalog's shape, encoding and extent.

        Returns one report per checked run: ``{"run", "ok", "problems": [...], "direct_reads"}``
        (see :func:`sclstore.store.verify.verify_run`).
        """
        runs = [self.get_run(run)] if run is not None else self.list_runs(status="complete")
        return [self.array_store.verify(info) for info in runs]

    # ------------------------------------------------------------------ caches
    def get_evaluation(self, run_id: int, task: str, params_hash: str) -> dict[str, Any] | None:
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Evaluation).where(Evaluation.run_id == run_id, Evaluation.task == task, Evaluation.params_hash == params_hash))
            return None if row is None else dict(row.result)

    def put_evaluation(self, run_id: int, task: str, params_hash: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        if self.read_only is not None:  # the result is still returned; only its cache entry is lost
            logger.warning("%s: %s result not cached", self.read_only, task)
            return
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(sa.insert(Evaluation).values(run_id=run_id, task=task, params_hash=params_hash,
                                                          params=params, result=result, created_at=utcnow()))
        except sa.exc.IntegrityError:
            pass  # stored concurrently by an identical evaluation

    def list_evaluations(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Cached evaluations (without their results), oldest first."""
        cols = (Evaluation.id, Evaluation.run_id, Evaluation.task, Evaluation.params_hash, Evaluation.params, Evaluation.created_at)
        stmt = sa.select(*cols).order_by(Evaluation.id)
        if run_id is not None:
            stmt = stmt.where(Evaluation.run_id == run_id)
        with Session(self.engine) as s:
            return [{"id": r.id, "run": r.run_id, "task": r.task, "params_hash": r.params_hash, "params": dict(r.params),
                     "created_at": r.created_at.isoformat() if r.created_at else None} for r in s.execute(stmt)]

    def get_evaluation_by_id(self, evaluation_id: int) -> dict[str, Any]:
        """The stored result of one evaluation; NotFoundError names how to list them."""
        with Session(self.engine) as s:
            row = s.get(Evaluation, int(evaluation_id))
            if row is None:
                raise NotFoundError(f"no cached evaluation {evaluation_id}; list them with `sclstore ls evals`")
            return dict(row.result)

    def get_intermediate(self, key_hash: str) -> bytes | None:
        with Session(self.engine) as s:
            return s.scalar(sa.select(Intermediate.payload).where(Intermediate.key_hash == key_hash))

    def put_intermediate(self, kind: str, key_hash: str, params: dict[str, Any], payload: bytes) -> None:
        if self.read_only is not None:
            logger.info("%s: %s intermediate not cached", self.read_only, kind)
            return
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(sa.insert(Intermediate).values(kind=kind, key_hash=key_hash, params=params,
                                                            payload=payload, created_at=utcnow()))
        except sa.exc.IntegrityError:
            pass
