"""The ingest pipeline: one forward pass per cell, every kept layer pooled, streamed to the store.

Stages, overlapped:

* a prefetch thread reads the next chunk of cells from the .h5ad (in the store's cell order)
  and tokenizes it, in worker processes when ``workers > 0``;
* the main thread batches the chunk by sequence length and runs the model (hooks pool every
  block inside the hook);
* a writer thread writes the finished chunk to TileDB (fsynced) and only then advances the
  run's watermark in the catalog.

Each cell's tokens depend only on ``(seed, cell_idx)`` and chunks start at fixed boundaries, so
a run killed at any moment resumes from its watermark and ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from sclstore.store import ArraySpec, Backend, IngestConfig, RunInfo, parse_layers, validate_name
from sclstore.store.errors import DatasetError, IngestError, InvalidInputError, LeaseHeldError
from sclstore.store.hashcache import rehashing

from .adapter import GeneMapping, ModelAdapter, resolve_precision
from .anndata_source import is_anndata, open_source, source_provenance
from .gene_check import check_unique_tokens
from .hints import amend_counts_error, amend_gene_error
from .lifecycle import worker_setup
from .models import load_adapter
from .progress import make_progress
from .run_key import pin_resumed, run_key
from .source import CountsSource

__all__ = ["IngestResult", "ingest", "resolve_device"]

logger = logging.getLogger(__name__)
_DONE = object()


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest`` call did."""

    run_id: int
    dataset: str
    model: str
    cache_hit: bool
    cells: int
    cells_embedded: int
    layers: tuple[int, ...]
    pools: tuple[str, ...]
    seconds: float
    cells_per_s: float
    gene_mapping: dict[str, Any]
    device: str

    @property
    def id(self) -> int:
        """The run id (``store.ingest(...).id``)."""
        return self.run_id

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["pools"] = list(self.pools)
        return d


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-_") or "dataset"
    return stem[:128]


def _tokenize(tokenizer: Any, counts: Any, cell_idx: np.ndarray, seed: int, totals: np.ndarray | None = None) -> list[Any]:
    if totals is None:
        return tokenizer.tokenize(counts, cell_idx, seed=seed)
    return tokenizer.tokenize(counts, cell_idx, seed=seed, totals=totals)


def _worker_init(parent_pid: int) -> None:
    """Single-threaded torch and BLAS in a tokenizer worker, which dies with its parent.

    A forked child must not enter the OpenMP pool its parent already started (libgomp hangs);
    like torch's DataLoader workers, each worker runs its ops on one thread. It exits when its
    parent dies by any signal and leaves SIGINT/SIGTERM handling to the parent
    (:func:`.lifecycle.worker_setup`).
    """
    from threadpoolctl import threadpool_limits

    worker_setup(parent_pid)
    torch.set_num_threads(1)
    threadpool_limits(limits=1)


def start_workers(workers: int) -> cf.ProcessPoolExecutor | None:
    """A warmed-up pool of tokenizer processes (None for ``workers == 0``).

    On Linux the workers are forked (instant, like torch's DataLoader workers); elsewhere they
    are spawned, which costs a fresh interpreter importing torch per worker.
    """
    if workers <= 0:
        return None
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method), initializer=_worker_init,
                                  initargs=(os.getpid(),))
    with warnings.catch_warnings():
        # TileDB warns about fork after a context exists; the workers only tokenize (numpy/torch)
        # and never touch TileDB, so its internal threads and locks are irrelevant to them.
        warnings.filterwarnings("ignore", message="TileDB is a multithreading library")
        for fut in [pool.submit(os.getpid) for _ in range(workers)]:
            fut.result()
    return pool


class _Prefetch:
    """Reads and tokenizes chunks ahead of the model, in a thread (+ worker processes)."""

    def __init__(
        self, source: CountsSource, order: np.ndarray, mapping: GeneMapping, tokenizer: Any,
        chunks: Sequence[tuple[int, int]], seed: int, workers: int,
    ) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._pool = start_workers(workers)
        self._args = (source, order, mapping, tokenizer, chunks, seed, workers)
        self._thread = threading.Thread(target=self._run, name="sclstore-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        source, order, mapping, tokenizer, chunks, seed, workers = self._args
        try:
            for lo, hi in chunks:
                if self._stop.is_set():
                    return
                rows = order[lo:hi]
                full = source.take(rows)
                counts = full[:, mapping.var_index].tocsr()
                totals = (tokenizer.cell_totals(full, source.obs.iloc[rows])
                          if getattr(tokenizer, "needs_cell_totals", False) else None)
                cell_idx = np.arange(lo, hi, dtype=np.int64)
                if self._pool is None:
                    records = _tokenize(tokenizer, counts, cell_idx, seed, totals)
                else:
                    step = max(1, -(-(hi - lo) // workers))
                    futs = [self._pool.submit(_tokenize, tokenizer, counts[i : i + step], cell_idx[i : i + step], seed,
                                              None if totals is None else totals[i : i + step])
                            for i in range(0, hi - lo, step)]
                    records = [r for f in futs for r in f.result()]
                self._put((lo, records))
            self._put(_DONE)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[int, list[Any]]]:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Writes finished chunks (array first, then the watermark) in a background thread."""

    def __init__(self, backend: Backend, run: RunInfo, lease: Any, progress: Any) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.unembeddable: list[int] = [c for c in run.unembeddable if c < run.watermark]
        self._args = (backend, run, lease, progress)
        self._thread = threading.Thread(target=self._run, name="sclstore-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backend, run, lease, _ = self._args  # progress advances per batch in _embed_chunk
        while True:
            item = self._q.get()
            if item is _DONE or self.error is not None:
                return
            lo, block, skipped = item
            try:
                if skipped:
                    self.unembeddable.extend(skipped)
                backend.write_block(run, lease, lo, block, unembeddable=self.unembeddable if skipped else None)
            except BaseException as exc:
                self.error = exc

    def put(self, lo: int, block: dict[str, np.ndarray], skipped: Sequence[int] = ()) -> None:
        self.check()
        self._q.put((lo, block, list(skipped)))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self._q.put(_DONE)
        self._thread.join()
        self.check()

    def abort(self) -> None:
        """Stop after the chunk being written (if any); used when the model side failed."""
        if self.error is None:
            self.error = IngestError("ingest aborted")
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(_DONE)
        self._thread.join(timeout=60)


def _storage_params(adapter: ModelAdapter, source: CountsSource) -> dict[str, Any]:
    """Cache-key parameters for how the counts are stored, for tokenizers whose output depends on it."""
    out: dict[str, Any] = {}
    if source.stored_entries and source.stored_layout != "canonical":
        out["stored_layout"] = source.stored_layout
    storage = getattr(adapter.tokenizer, "storage_key", None)
    if callable(storage) and storage() is not None:
        out["counts_storage"] = storage()
    return out


def _embed_chunk(
    adapter: ModelAdapter, records: list[Any], *, layers: Sequence[int], pools: Sequence[str],
    batch_size: int, device: torch.device, progress: Any = None,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Embed one chunk: batches of similar length, results back in the chunk's cell order.

    Records marked ``embeddable=False`` are not run through the model: their rows are NaN and
    their global cell indices are returned as the second element.

    On CUDA each batch is collated into pinned memory and copied without blocking, and the
    pooled results stay on the GPU until the chunk is done: the host never waits for a batch,
    so it collates batch k+1 while the GPU runs batch k, and synchronises once per chunk.
    """
    n = len(records)
    lengths = np.array([adapter.tokenizer.seq_len(r) for r in records])
    ok = np.array([getattr(r, "embeddable", True) for r in records], dtype=bool)
    order = np.lexsort((np.arange(n), lengths))
    skipped: list[int] = []
    if not ok.all():
        order = order[ok[order]]
        skipped = [int(records[i].cell_idx) for i in np.flatnonzero(~ok)]
    out = {p: np.empty((len(layers), n, adapter.d_model), dtype=np.float32) for p in pools}
    if skipped:
        for arr in out.values():
            arr[:, ~ok, :] = np.nan
        if progress is not None:
            progress.advance(len(skipped))
    cuda = device.type == "cuda"
    pending: list[tuple[np.ndarray, dict[str, torch.Tensor]]] = []
    for b in range(0, n, batch_size):
        idx = order[b : b + batch_size]
        batch = adapter.collate([records[i] for i in idx])
        if cuda:
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=cuda)
        pending.append((idx, adapter.embed(batch, layers=layers, pools=pools)))
        if not cuda:  # on the CPU there is nothing to overlap: copy now, hold one batch at a time
            _collect(out, pending)
        if progress is not None:  # per batch (on CUDA: per batch queued), so small ingests move too
            progress.advance(len(idx))
    _collect(out, pending)  # on CUDA: one device-to-host synchronisation per chunk
    return out, skipped


def _collect(out: dict[str, np.ndarray], pending: list[tuple[np.ndarray, dict[str, torch.Tensor]]]) -> None:
    for idx, pooled in pending:
        for pool, tensor in pooled.items():
            out[pool][:, idx, :] = tensor.float().cpu().numpy()
    pending.clear()


def ingest(
    backend: Backend, path: str | os.PathLike[str] | Any, config: IngestConfig, *, adapter: ModelAdapter | None = None,
    source_label: str | None = None,
) -> IngestResult:
    """Embed every cell of an .h5ad file (or an AnnData) with every kept layer, into ``backend``.

    Everything that can be wrong with the input is checked before the store is touched. A
    completed identical run is a cache hit that loads no weights; an interrupted one resumes.

    Parameters
    ----------
    backend
        The open store.
    path
        The .h5ad file with raw counts, or an ``anndata.AnnData`` (in memory or backed): the
        same checks and content hash; the catalog records ``in-memory`` (or the backing file)
        as its source, and the default dataset name is ``anndata-<hash prefix>``.
    config
        Model, layers, pools, dtype and the other ingest options.
    adapter
        A ready adapter (tests, custom models); by default built from ``config.model`` and
        ``config.checkpoint``.
    source_label
        What the catalog records as the source instead of the path / ``in-memory`` (e.g. a
        SOMA URI and its obs filter).

    Returns
    -------
    IngestResult

    Raises
    ------
    InvalidInputError, DatasetError, CheckpointError
        On bad input, before anything is written.
    LeaseHeldError
        If another process is ingesting the same run and ``config.wait`` is false.
    """
    t0 = time.perf_counter()
    in_memory = is_anndata(path)
    if not in_memory and not isinstance(path, (str, os.PathLike)):
        open_source(path)  # raises: names what was passed
    if not in_memory:
        path = Path(path).expanduser()
    name = config.name or (None if in_memory else validate_name(_default_name(cast("Path", path)), what="dataset"))
    device = resolve_device(config.device)
    if adapter is None:
        adapter = load_adapter(config.model, config.checkpoint, max_genes=config.max_genes, options=dict(config.model_options))
    with open_source(path, counts_layer=config.counts_layer, gene_column=config.gene_column) as source:
        try:
            mapping = adapter.map_genes(source.gene_ids)
        except InvalidInputError as exc:
            if config.gene_column is not None:
                raise
            raise InvalidInputError(amend_gene_error(str(exc), getattr(source, "var", None))) from None
        check_unique_tokens(source.gene_ids, mapping)
        adapter.observe_source(dense=source.dense, dtype=source.dtype)
        source.stored_entries = bool(getattr(adapter.tokenizer, "reads_stored_entries", False))
        adapter.check_obs(source.obs)  # e.g. Geneformer's obs['n_counts'], before anything is written
        layers = parse_layers(config.layers, adapter.n_layers)
        pools = tuple(config.pools) if config.pools else tuple(adapter.default_pools)
        unknown = [p for p in pools if p not in adapter.supported_pools]
        if unknown:
            raise InvalidInputError(f"pool(s) {unknown} not available for {adapter.family}; choose from {', '.join(adapter.supported_pools)}")
        with rehashing(config.rehash):
            try:
                content_hash = source.content_hash()
            except DatasetError as exc:
                raise type(exc)(amend_counts_error(str(exc), source)) from None
            checkpoint_hash = adapter.checkpoint_hash
        name = name or f"anndata-{content_hash[:10]}"
        precision = resolve_precision(config.precision, adapter.official_precision, device)
        adapter.precision = precision
        derived = run_key(config, content_hash=content_hash, checkpoint_hash=checkpoint_hash, mapping=mapping,
                          adapter_description=adapter.describe(), precision=precision,
                          resolved={"model": adapter.family, "checkpoint": checkpoint_hash, "layers": list(layers),
                                    "pools": list(pools), "counts_layer": source.counts_key, "precision": precision,
                                    "model_options": sorted(adapter.effective_options().items())},
                          storage=_storage_params(adapter, source))
        key, params = derived.key, derived.params
        hit = backend.find_run(key)
        if hit is not None and hit.status == "complete":
            logger.info("cache hit: run %s already holds this extraction", hit.id)
            return _result(hit, cache_hit=True, embedded=0, t0=t0, device=device, mapping=mapping)
        # the whole checkpoint (headers, tensor names and shapes against the config) is checked
        # by loading it strictly, before the first catalog write
        adapter.load(device)
        dataset = backend.register_dataset(name=name, content_hash=content_hash, obs=source.obs, n_vars=source.n_vars,
                                           source_path=source_label or source_provenance(source), cluster_by=config.cluster_by)
        model = backend.register_model(family=adapter.family, name=adapter.name, checkpoint_hash=adapter.checkpoint_hash,
                                       n_layers=adapter.n_layers, d_model=adapter.d_model, config=adapter.describe())
        spec = ArraySpec(n_layers=len(layers), n_cells=dataset.n_obs, dim=adapter.d_model, pools=pools, dtype=config.dtype)
        run = backend.create_run(dataset=dataset, model=model, key=key, params=params, layers=layers, spec=spec)
        lease = backend.acquire(run.id, wait=config.wait)
        if lease is None:  # finished by another process while we waited
            return _result(backend.get_run(run.id), cache_hit=True, embedded=0, t0=t0, device=device, mapping=mapping)
        try:
            run = backend.get_run(run.id)
            start = run.watermark
            pinned = pin_resumed(run, config, start)
            chunk_cells, batch_size = pinned["chunk_cells"], pinned["batch_size"]
            order = backend.cell_order(dataset.id)
            chunks = [(lo, min(lo + chunk_cells, run.n_cells)) for lo in range(start, run.n_cells, chunk_cells)]
            if start % chunk_cells and start < run.n_cells:
                raise IngestError(f"run {run.id} watermark {start} is not a chunk boundary of {chunk_cells}")
            logger.info("run %s: embedding cells %d..%d of %d on %s", run.id, start, run.n_cells, run.n_cells, device)
            prefetch = _Prefetch(source, order, mapping, adapter.tokenizer, chunks, config.seed, config.workers)
            with make_progress(f"ingest {name}", total=run.n_cells, done=start, enabled=config.progress) as progress:
                writer = _Writer(backend, run, lease, progress)
                try:
                    for lo, records in prefetch:
                        writer.check()
                        block, skipped = _embed_chunk(adapter, records, layers=layers, pools=pools,
                                                      batch_size=batch_size, device=device, progress=progress)
                        writer.put(lo, block, skipped)
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
                finally:
                    prefetch.close()
            elapsed = time.perf_counter() - t0
            embedded = run.n_cells - start
            if writer.unembeddable:
                logger.warning("%d cells have no gene the model knows; stored as NaN and recorded in run %s",
                               len(writer.unembeddable), run.id)
            stats = {"gene_mapping": mapping.stats(), "seconds": round(elapsed, 3), "device": str(device),
                     "unembeddable_cells": len(writer.unembeddable),
                     "cells_per_s": round(embedded / elapsed, 2) if elapsed > 0 else None, "resumed_from": start}
            run = backend.complete(run, lease, stats)
        except LeaseHeldError:
            raise
        except BaseException as exc:
            backend.fail(run, lease, f"{type(exc).__name__}: {exc}")
            raise
    return _result(run, cache_hit=False, embedded=embedded, t0=t0, device=device, mapping=mapping)


def _result(run: RunInfo, *, cache_hit: bool, embedded: int, t0: float, device: torch.device, mapping: GeneMapping) -> IngestResult:
    secs = time.perf_counter() - t0
    return IngestResult(
        run_id=run.id, dataset=run.dataset_name, model=run.model_name, cache_hit=cache_hit, cells=run.n_cells,
        cells_embedded=embedded, layers=run.layers, pools=run.pools, seconds=round(secs, 3),
        cells_per_s=round(embedded / secs, 2) if secs > 0 and embedded else 0.0,
        gene_mapping=mapping.stats(), device=str(device),
    )
