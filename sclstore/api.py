"""The public ``Store``: the persistence layer composed with ingest, query and eval."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sclstore.store import runtime
from sclstore.store.config import IngestConfig, StoreSettings
from sclstore.store.errors import StoreNotFoundError

if TYPE_CHECKING:  # the persistence layer (SQLAlchemy, TileDB, pandas) loads when a store opens
    from sclstore.store.backend import Backend
    from sclstore.store.info import DatasetInfo, ModelInfo, RunInfo
    from sclstore.store.runtime import ThreadPolicy

__all__ = ["Store", "open_store", "default_store_path", "default_catalog"]


def default_store_path() -> str:
    """``$SCLSTORE_STORE``, else ``./sclstore-data``."""
    return os.environ.get("SCLSTORE_STORE") or "sclstore-data"


def default_catalog() -> str | None:
    """``$SCLSTORE_CATALOG``, else None (an SQLite file inside the store)."""
    return os.environ.get("SCLSTORE_CATALOG") or None


class Store:
    """A layer-wise embedding store: TileDB arrays indexed by a SQL catalog.

    Open one with :func:`open_store`. Every operation is a method: :meth:`ingest`,
    :meth:`query`, :meth:`evaluate_trajectory`, :meth:`evaluate_perturbation`, :meth:`runs`,
    :meth:`verify`. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # ---------------------------------------------------------------- lifecycle
    @property
    def path(self) -> Path:
        """The store folder."""
        return self.backend.root

    @property
    def catalog_url(self) -> str:
        return self.backend.catalog_url

    def close(self) -> None:
        """Release the catalog connections."""
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---------------------------------------------------------------- contents
    def datasets(self) -> list[DatasetInfo]:
        """Registered datasets."""
        return self.backend.list_datasets()

    def models(self) -> list[ModelInfo]:
        """Registered model checkpoints."""
        return self.backend.list_models()

    def runs(self, *, status: str | None = None) -> list[RunInfo]:
        """Extraction runs (optionally only those with ``status``)."""
        return self.backend.list_runs(status=status)

    def run(self, run: int | str) -> RunInfo:
        """One run by id or ``dataset/model``."""
        return self.backend.get_run(run)

    def verify(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Check catalog <-> array consistency of every complete run (or one run)."""
        return self.backend.verify(run)

    # ---------------------------------------------------------------- work
    @staticmethod
    def thread_policy(threads: int | str | None = None, *, workers: int = 1) -> ThreadPolicy:
        """The thread policy a model or evaluation call would run under (nothing is applied).

        See :mod:`sclstore.store.runtime`: CPUs allowed (affinity, cgroup quota, Slurm) divided
        among ``workers``, unless ``threads``, ``$SCLSTORE_THREADS`` or the user's
        ``OMP_NUM_THREADS``/... say otherwise.
        """
        return runtime.decide(threads, workers=workers)

    def ingest(
        self, data: str | os.PathLike[str], model: str, checkpoint: str | None = None, *, threads: int | str | None = None,
        **options: Any,
    ) -> Any:
        """Embed every cell of an .h5ad file with every layer of a model.

        Parameters
        ----------
        data
            .h5ad file with raw counts (``X`` or ``counts_layer``).
        model
            Model family: ``tahoe-x1``, ``scfoundation``, ``scgpt``, ``geneformer`` or ``sclstore-tiny``.
        checkpoint
            Local checkpoint folder (not needed for ``sclstore-tiny``).
        threads
            Threads for the model (default: the thread policy, see :meth:`thread_policy`).
        **options
            Any :class:`~sclstore.store.IngestConfig` field (``pools``, ``layers``, ``dtype``,
            ``batch_size``, ``device``, ``cluster_by``, ``seed``, ...).

        Returns
        -------
        IngestResult
            With ``.id`` (the run id), cache-hit flag, timings and gene-mapping stats.

        Examples
        --------
        >>> store = sclstore.open_store("lab-store")                    # doctest: +SKIP
        >>> run = store.ingest("pbmc.h5ad", model="sclstore-tiny")     # doctest: +SKIP
        """
        policy = runtime.configure(threads)  # before torch loads: OpenMP starts passive and right-sized
        from sclstore.ingest.pipeline import ingest

        runtime.apply(policy)
        config = IngestConfig(model=model, checkpoint=checkpoint, **options)
        return ingest(self.backend, data, config)

    def query(self, sql: str, *, memory_budget: int | None = None) -> Any:
        """Run a slice query over the ``embeddings`` virtual table.

        Examples
        --------
        >>> res = store.query("SELECT * FROM embeddings WHERE run = 1 AND layer = 3")  # doctest: +SKIP
        >>> res.embeddings.shape                                                         # doctest: +SKIP
        """
        from sclstore.query import execute_query

        return execute_query(self.backend, sql, memory_budget=memory_budget)

    def evaluate_trajectory(self, run: int | str, *, threads: int | str | None = None, **options: Any) -> Any:
        """Score every stored layer on trajectory inference (see :mod:`sclstore.eval`)."""
        policy = runtime.configure(threads)
        from sclstore.eval.runner import evaluate_trajectory

        runtime.apply(policy)
        _cap_jobs(policy, options)
        return evaluate_trajectory(self.backend, run, **options)

    def evaluate_perturbation(self, run: int | str, *, threads: int | str | None = None, **options: Any) -> Any:
        """Score every stored layer on perturbation response, per condition (see :mod:`sclstore.eval`)."""
        policy = runtime.configure(threads)
        from sclstore.eval.runner import evaluate_perturbation

        runtime.apply(policy)
        _cap_jobs(policy, options)
        return evaluate_perturbation(self.backend, run, **options)


def _cap_jobs(policy: ThreadPolicy, options: dict[str, Any]) -> None:
    """Parallel jobs of an evaluation (``n_jobs`` / ``jobs``) capped at the policy's threads."""
    for key in ("n_jobs", "jobs"):
        if options.get(key) is not None and int(options[key]) > 1:
            options[key] = policy.cap_jobs(int(options[key]))


def open_store(
    path: str | os.PathLike[str] | None = None,
    catalog: str | None = None,
    *,
    create: bool = False,
    settings: StoreSettings | None = None,
) -> Store:
    """Open a store (``create=True`` makes it, and upgrades its catalog, when needed).

    Parameters
    ----------
    path
        Store folder; default ``$SCLSTORE_STORE`` or ``./sclstore-data``.
    catalog
        SQLAlchemy URL of the catalog; default ``$SCLSTORE_CATALOG`` or an SQLite file inside
        the store. ``postgresql+psycopg://user:pass@host/db`` for a shared lab store.
    create
        Create the store if ``path`` does not hold one yet.

    Raises
    ------
    StoreNotFoundError
        If ``path`` is not a store and ``create`` is false.
    SchemaVersionError
        If the catalog needs ``sclstore db upgrade`` (or a newer sclstore).
    CatalogConnectionError
        If the catalog cannot be reached.
    """
    from sclstore.store.backend import Backend

    root = Path(path if path is not None else default_store_path())
    url = catalog if catalog is not None else default_catalog()
    if create:
        try:
            return Store(Backend.open(root, url, settings=settings))
        except StoreNotFoundError:
            return Store(Backend.create(root, url, settings=settings))
    return Store(Backend.open(root, url, settings=settings))
