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

__all__ = ["Store", "default_catalog", "default_store_path", "open_store"]


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
        """The local store folder.

        Raises
        ------
        InvalidInputError
            For a store on object storage (use :attr:`uri`).
        """
        return self.backend.root

    @property
    def uri(self) -> str:
        """The store's location: an absolute folder path or a URI such as ``s3://bucket/prefix``."""
        return self.backend.location.uri

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
        return f"Store({self.uri!r})"

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
        self, data: str | os.PathLike[str] | Any, model: str, checkpoint: str | None = None, *, threads: int | str | None = None,
        **options: Any,
    ) -> Any:
        """Embed every cell of an .h5ad file (or an AnnData) with every layer of a model.

        Parameters
        ----------
        data
            .h5ad file with raw counts (``X`` or ``counts_layer``), or an ``anndata.AnnData``
            in memory or backed (same checks; its content hash makes the file and the loaded
            object one dataset; the catalog records ``in-memory`` or the backing file).
        model
            Model family: ``tahoe-x1``, ``scfoundation``, ``scgpt``, ``geneformer`` or ``sclstore-tiny``.
        checkpoint
            Local checkpoint folder (not needed for ``sclstore-tiny``).
        threads
            Threads for the model (default: the thread policy, see :meth:`thread_policy`).
        **options
            Any :class:`~sclstore.store.IngestConfig` field (``pools``, ``layers``, ``dtype``,
            ``batch_size``, ``device``, ``cluster_by``, ``seed``, ...). For a SOMA Experiment URI
            (``*.soma``, needs ``sclstore[soma]``): ``obs_filter`` (a SOMA value filter such as
            ``"cell_type == 'B cell'"``), ``soma_measurement`` (default ``RNA``) and ``soma_x``
            (the X layer with raw counts; default ``raw``, ``counts`` or ``data``).

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
        from sclstore.store.readonly import refuse_write

        if self.backend.read_only is not None:  # before reading any input
            raise refuse_write(self.backend.read_only)

        from sclstore.ingest.soma_source import is_soma_uri, read_soma, soma_label

        runtime.apply(policy)
        soma = {k: options.pop(k) for k in ("obs_filter", "soma_measurement", "soma_x") if k in options}
        label = None
        if is_soma_uri(data):
            uri = str(data)
            data = read_soma(uri, obs_filter=soma.get("obs_filter"), measurement=soma.get("soma_measurement") or "RNA",
                             x_name=soma.get("soma_x"))
            label = soma_label(uri, soma.get("obs_filter"))
            if not options.get("name"):
                options["name"] = Path(uri.rstrip("/")).stem or None
        elif soma.get("obs_filter"):
            from sclstore.store.errors import InvalidInputError

            raise InvalidInputError(f"obs_filter applies to SOMA Experiments; {data!r} is not one")
        sharding = {k: options.pop(k) for k in ("devices", "executor", "ray_address", "ray_cpus") if k in options}
        config = IngestConfig(model=model, checkpoint=checkpoint, **options)
        return ingest(self.backend, data, config, source_label=label, **sharding)

    # ------------------------------------------------------------------ the ingest service
    def submit(
        self, data: str | os.PathLike[str], model: str, checkpoint: str | None = None, *, threads: int | str | None = None,
        **options: Any,
    ) -> Any:
        """Plan a run for workers anywhere: hash, register, create the run and its shards (no embedding).

        ``options`` are :class:`~sclstore.store.IngestConfig` fields; ``device`` names the
        workers' device (it sets the run's precision and need not exist here); ``shard_cells``
        sizes the shards (default 16 chunks). A CPU run pins one torch thread per batch; each
        worker runs as many batches at once as its own thread policy allows (see
        :meth:`thread_policy`). ``threads`` applies the policy to this process's planning. Returns a
        ``SubmitResult`` (``.id``: the run id).
        """
        policy = runtime.configure(threads)
        from sclstore.ingest.pipeline import submit

        runtime.apply(policy)  # torch is loaded now: planning (hashing, the model load) runs under the policy
        return submit(self.backend, data, IngestConfig(model=model, checkpoint=checkpoint, **options))

    def work(
        self, runs: Any = None, *, device: str = "auto", forever: bool = False, threads: int | str | None = None,
        workers: int = 1, batch_size: int | None = None, precision: str | None = None, progress: Any = None,
        stop: Any = None, poll_s: float = 1.0,
    ) -> Any:
        """Be a worker: claim shards of ``runs`` (default: any shared run), embed, finalise.

        Returns once nothing is left in scope (``forever``: when ``stop``, a ``threading.Event``,
        is set). ``batch_size``/``precision`` only check: a run pinned to others is refused.
        Returns a ``WorkReport``.
        """
        runtime.apply(runtime.decide(threads))
        from sclstore.ingest.worker import work

        ids = None if runs is None else [self.run(r).id for r in ([runs] if isinstance(runs, (int, str)) else runs)]
        return work(self.backend, runs=ids, device=device, forever=forever, batch_size=batch_size, precision=precision,
                    workers=workers, progress=progress, stop=stop, poll_s=poll_s)

    def status(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Shards queued/claimed/done, per-worker cells/s, ETA and stale leases, per run (default: unfinished runs)."""
        runs = [self.run(run)] if run is not None else [r for r in self.runs() if r.status != "complete"]
        return [self.backend.shards.status(r) for r in runs]

    def cancel(self, run: int | str) -> int:
        """Cancel a run: workers stop at their next chunk; returns the shards cancelled. An identical ingest resumes it."""
        return self.backend.shards.cancel(self.run(run).id)

    def query(self, sql: str, *, memory_budget: int | None = None) -> Any:
        """Run a slice query over the ``embeddings`` virtual table.

        Rows come in the store's cell order (``cluster_by`` changes it); ``res.src_idx`` holds
        each cell's row in the ingested AnnData and is queryable (``WHERE src_idx < 100``,
        ``ORDER BY src_idx``). ``res.to_anndata()`` and file exports put rows back in the
        input order (pass ``order="store"`` to keep the store's).

        Examples
        --------
        >>> res = store.query("SELECT * FROM embeddings WHERE run = 1 AND layer = 3")  # doctest: +SKIP
        >>> res.embeddings.shape                                                         # doctest: +SKIP
        """
        from sclstore.query import execute_query

        return execute_query(self.backend, sql, memory_budget=memory_budget)

    def attach(
        self,
        adata: Any,
        run: int | str,
        *,
        layers: list[int] | tuple[int, ...] | None = None,
        pools: list[str] | tuple[str, ...] | None = None,
        memory_budget: int | None = None,
    ) -> list[str]:
        """Write a run's embeddings into ``adata.obsm``, aligned by ``obs_names`` (in place).

        Keys are ``X_<model>_L<layer>_<pool>`` (layer zero-padded, e.g. ``X_tahoe-x1_L07_cls``),
        the same as :meth:`QueryResult.to_anndata` writes. Every cell of ``adata`` must be stored
        (any order, any subset); provenance goes to ``adata.uns["sclstore"]``.

        Returns
        -------
        list of str
            The obsm keys written.

        Raises
        ------
        InvalidInputError
            If a cell is not stored or obs names repeat.

        Examples
        --------
        >>> store.attach(adata, run=1, layers=[4, 8], pools=["cls"])     # doctest: +SKIP
        ['X_sclstore-tiny_L04_cls', 'X_sclstore-tiny_L08_cls']
        """
        from sclstore.query.attach import attach

        return attach(self.backend, adata, run, layers=layers, pools=pools, memory_budget=memory_budget)

    def export(
        self,
        sql: str,
        path: str | os.PathLike[str],
        *,
        order: str = "input",
        with_counts: bool = False,
        counts_from: Any = None,
        into: str | os.PathLike[str] | None = None,
        memory_budget: int | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Run a query and write it to ``path`` (``.h5ad .npy .npz .parquet .csv`` or ``.soma``).

        Rows follow the ingested AnnData (``order="input"``) unless the query has an ORDER BY
        or ``order="store"``. ``with_counts`` (``.h5ad``; always for ``.soma``) adds the cells'
        raw counts as ``X`` and the genes as ``var``, read from the file recorded at ingest (or
        ``counts_from``: a path or AnnData). ``uns["sclstore"]`` records run, model, checkpoint
        hash, layers, pools, cache key and sclstore version. ``into``: see ``query --into``.
        An existing ``path`` is refused unless ``overwrite`` (the CLI's ``--force``).

        Returns
        -------
        dict
            The result summary plus ``path``.
        """
        from sclstore.exports import open_counts, write_soma
        from sclstore.query import open_query, query_to_file

        if str(path).rstrip("/").endswith(".soma"):
            if Path(path).exists() and not overwrite:
                from sclstore.store.errors import OutputError

                raise OutputError(f"output {str(path)!r} already exists: pass --force (overwrite=True) to replace it, or choose another name")
            res = open_query(self.backend, sql, memory_budget=memory_budget)
            with open_counts(res, counts_from) as src:
                return write_soma(res, path, counts_from=src, order=order)
        if not (with_counts or counts_from is not None):
            return query_to_file(self.backend, sql, path, memory_budget=memory_budget, order=order, into=into, overwrite=overwrite)
        opened: list[Any] = []

        def factory(res: Any) -> Any:
            opened.append(open_counts(res, counts_from))
            return opened[-1]

        try:
            return query_to_file(self.backend, sql, path, memory_budget=memory_budget, order=order, into=into, counts_from=factory,
                                 overwrite=overwrite)
        finally:
            for src in opened:
                src.close()

    def to_soma(self, sql: str, uri: str | os.PathLike[str], *, order: str = "input", counts_from: Any = None) -> dict[str, Any]:
        """Write a query's cells as a SOMA Experiment: obs, counts (``X/data``), var and one ``obsm``
        array per (pool, layer) (needs ``sclstore[soma]``). See :meth:`export`."""
        if not str(uri).rstrip("/").endswith(".soma"):
            from sclstore.store.errors import InvalidInputError

            raise InvalidInputError(f"a SOMA export path ends in .soma, got {str(uri)!r}")
        return self.export(sql, uri, order=order, counts_from=counts_from)

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

    def evaluate(self, task: str, run: int | str, *, threads: int | str | None = None, **options: Any) -> Any:
        """Score every stored layer of a run on any registered task.

        Parameters
        ----------
        task
            ``trajectory``, ``perturbation``, ``diagnostics``, ``celltype`` or a plugin's task
            (entry-point group ``sclstore.tasks``).
        run
            Run id or ``dataset/model``.
        **options
            Fields of the task's config (e.g. ``label_key="cell_type"``), ``n_jobs`` (capped at
            the thread policy's threads), ``progress``, and ``counts_path``.
        threads
            Threads for the metrics (default: the thread policy, see :meth:`thread_policy`).

        Returns
        -------
        EvalReport
            Cached in the catalog; a repeated identical call reads no embedding.
        """
        policy = runtime.configure(threads)
        from sclstore.eval.runner import run_task

        runtime.apply(policy)
        _cap_jobs(policy, options)
        return run_task(self.backend, run, task, **options)

    def evaluations(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Cached evaluations (of one run, or all): id, run, task, parameters, created time."""
        run_id = self.backend.get_run(run).id if run is not None else None
        return self.backend.list_evaluations(run_id)

    def evaluation(self, evaluation_id: int) -> Any:
        """One cached evaluation, reloaded as an :class:`~sclstore.eval.report.EvalReport`."""
        from sclstore.eval.report import EvalReport

        return EvalReport.from_json(self.backend.get_evaluation_by_id(evaluation_id), cached=True)

    def report(self, run: int | str, out_html: str | os.PathLike[str]) -> Path:
        """Write a self-contained HTML report of every cached evaluation of a run (no Python needed to read it)."""
        from sclstore.eval.html import write_run_report

        return write_run_report(self, self.backend.get_run(run), out_html)


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
        Store folder or URI (``s3://bucket/prefix``, any TileDB VFS scheme); default
        ``$SCLSTORE_STORE`` or ``./sclstore-data``. A remote store needs ``catalog``.
    catalog
        SQLAlchemy URL of the catalog; default ``$SCLSTORE_CATALOG`` or an SQLite file inside
        the store. ``postgresql+psycopg://user:pass@host/db`` for a shared lab store.
    create
        Create the store if ``path`` does not hold one yet.
    settings
        Process-level knobs; ``settings.tiledb_config`` (endpoint, region, credentials, ...)
        goes over ``sclstore.toml``'s ``[tiledb]`` table inside or beside the store.

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

    root = os.fspath(path if path is not None else default_store_path())
    url = catalog if catalog is not None else default_catalog()
    if create:
        try:
            return Store(Backend.open(root, url, settings=settings))
        except StoreNotFoundError:
            return Store(Backend.create(root, url, settings=settings))
    return Store(Backend.open(root, url, settings=settings))
