"""Embedding one shard: read and tokenize ahead, run the model batch by batch, write behind.

Stages, overlapped:

* a prefetch thread reads the next chunk of the shard's cells from the data file (in the
  store's cell order) and tokenizes it, in worker processes when ``workers > 0``;
* the calling thread batches the chunk by sequence length and runs the model (hooks pool every
  block inside the hook); on the CPU, ``streams`` threads each run whole batches on the run's
  torch threads per batch (one for new runs), so the batches run side by side instead of one
  batch at a time with its operations split over the threads;
* a writer thread writes the finished chunk to TileDB (durably) and only then advances the
  shard's watermark in the catalog.

Each cell's tokens depend only on ``(seed, cell_idx)``, and chunks start at multiples of the
run's chunk size whichever shard they belong to, so the batches (and thus every bit) of a run
are the same whatever the number of workers, the order shards are taken in, or where a killed
worker's shard was resumed. A batch's numbers depend on the torch threads it runs on (the run pins
that count), not on how many batches run at once.

Why streams: an operation split over threads ends when its slowest thread ends. On a CPU shared
with other busy processes, one descheduled thread stalls every split operation of a forward pass
(thousands per chunk), and the run time swings with the scheduler (``bench/contention.py``: 29-45 s
for 5,000 cells split over two threads under load, 33-35 s as two streams, and faster idle too).
Each stream holds one batch's activations, so a CPU ingest holds ``streams`` batches at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import resource
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sclstore.store import Backend, RunInfo
from sclstore.store.errors import IngestError
from sclstore.store.shards import ShardLease

from .adapter import GeneMapping, ModelAdapter
from .lifecycle import signals_blocked, worker_setup
from .source import CountsSource

__all__ = ["embed_shard", "peak_rss_bytes", "start_workers", "stream_count"]

logger = logging.getLogger(__name__)
_DONE = object()


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _tokenize(tokenizer: Any, counts: Any, cell_idx: np.ndarray, seed: int, totals: np.ndarray | None = None) -> list[Any]:
    if totals is None:
        return tokenizer.tokenize(counts, cell_idx, seed=seed)
    return tokenizer.tokenize(counts, cell_idx, seed=seed, totals=totals)


def _worker_init(parent_pid: int) -> None:
    """Single-threaded torch and BLAS in a tokenizer worker, which dies with its parent.

    A forked child must not enter the OpenMP pool its parent already started (libgomp hangs);
    like torch's DataLoader workers, each worker runs its ops on one thread. It exits when its
    parent dies by any signal and ignores SIGINT/SIGTERM, which the parent handles by shutting the
    pool down (:func:`.lifecycle.worker_setup`).
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
        with signals_blocked():  # the workers start (the first submit) with them blocked, until they ignore them
            futs = [pool.submit(os.getpid) for _ in range(workers)]
        for fut in futs:
            fut.result()
    return pool


class _Prefetch:
    """Reads and tokenizes chunks ahead of the model, in a thread (+ worker processes)."""

    def __init__(
        self, source: CountsSource, order: np.ndarray, offset: int, mapping: GeneMapping, tokenizer: Any,
        chunks: Sequence[tuple[int, int]], seed: int, workers: int,
    ) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._pool = start_workers(workers)
        self._args = (source, order, offset, mapping, tokenizer, chunks, seed, workers)
        self._thread = threading.Thread(target=self._run, name="sclstore-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        source, order, offset, mapping, tokenizer, chunks, seed, workers = self._args
        try:
            for lo, hi in chunks:
                if self._stop.is_set():
                    return
                rows = order[lo - offset : hi - offset]
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

    def __init__(self, commit: Callable[[int, dict[str, np.ndarray], list[int] | None], None], unembeddable: Sequence[int]) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.unembeddable: list[int] = list(unembeddable)
        self._commit = commit
        self._thread = threading.Thread(target=self._run, name="sclstore-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE or self.error is not None:
                return
            lo, block, skipped = item
            try:
                if skipped:
                    self.unembeddable.extend(skipped)
                self._commit(lo, block, self.unembeddable if skipped else None)
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


def _embed_chunk(
    adapter: ModelAdapter, records: list[Any], *, layers: Sequence[int], pools: Sequence[str],
    batch_size: int, device: torch.device, progress: Any = None, streams: cf.ThreadPoolExecutor | None = None,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Embed one chunk: batches of similar length, results back in the chunk's cell order.

    Records marked ``embeddable=False`` are not run through the model: their rows are NaN and
    their global cell indices are returned as the second element. With ``streams`` (CPU only)
    the batches are run by its threads, side by side; each writes its own rows.

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
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if streams is not None and not cuda and len(batches) > 1:
        _run_streams(streams, adapter, records, batches, out, layers=layers, pools=pools, device=device, progress=progress)
        return out, skipped
    pending: list[tuple[np.ndarray, dict[str, torch.Tensor]]] = []
    for idx in batches:
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


def _run_streams(
    streams: cf.ThreadPoolExecutor, adapter: ModelAdapter, records: list[Any], batches: list[np.ndarray], out: dict[str, np.ndarray],
    *, layers: Sequence[int], pools: Sequence[str], device: torch.device, progress: Any,
) -> None:
    """Run the batches on the stream threads; progress advances here, in the calling thread."""

    def one(idx: np.ndarray) -> int:
        pooled = adapter.embed(adapter.collate([records[i] for i in idx]).to(device), layers=layers, pools=pools)
        _collect(out, [(idx, pooled)])  # disjoint rows per batch
        return len(idx)

    futures = [streams.submit(one, idx) for idx in batches]
    try:
        for fut in futures:
            n = fut.result()
            if progress is not None:
                progress.advance(n)
    finally:  # on an error (or an interrupt) no batch of this chunk is left to run
        for fut in futures:
            fut.cancel()
        cf.wait(futures)


def stream_count(threads: int, threads_per_batch: int | None) -> int:
    """Batches embedded at once on the CPU: the process's threads over the run's threads per batch (>= 1)."""
    return max(1, threads // max(1, threads_per_batch or threads))


def _collect(out: dict[str, np.ndarray], pending: list[tuple[np.ndarray, dict[str, torch.Tensor]]]) -> None:
    for idx, pooled in pending:
        for pool, tensor in pooled.items():
            out[pool][:, idx, :] = tensor.float().cpu().numpy()
    pending.clear()


def embed_shard(
    backend: Backend, run: RunInfo, lease: ShardLease, *, adapter: ModelAdapter, source: CountsSource, mapping: GeneMapping,
    layers: Sequence[int], pools: Sequence[str], batch_size: int, chunk_cells: int, seed: int, device: torch.device,
    workers: int, progress: Any = None, stop: threading.Event | None = None, spans: list[float] | None = None, streams: int = 1,
) -> int:
    """Embed a claimed shard from its watermark to its end; returns the cells embedded.

    On the CPU, ``streams > 1`` threads run batches side by side, each on this process's current
    torch thread count (the run's threads per batch, set by the caller).

    Reads only the shard's rows of the obs index. ``stop`` (SIGTERM in service mode) ends the
    shard early at a chunk boundary; the caller releases it. ``spans`` gets the seconds from the
    first chunk's arrival to the last chunk's embedding: the rest of the call (obs rows, thread
    start-up, the pipeline's fill and drain) is per-shard overhead.

    Raises
    ------
    LeaseHeldError
        If the shard is taken over or cancelled meanwhile (detected at the next chunk).
    """
    shard = lease.shard
    start = shard.watermark
    if (start % chunk_cells and start < shard.hi) or shard.lo % chunk_cells:
        raise IngestError(f"run {run.id} shard {shard.idx} [{shard.lo}, {shard.hi}) at {start} is not aligned to chunks of {chunk_cells}")
    if start >= shard.hi:
        return 0
    chunks = [(lo, min(lo + chunk_cells, shard.hi)) for lo in range(start, shard.hi, chunk_cells)]
    order = backend.cell_order_range(run.dataset_id, start, shard.hi)
    t0 = time.perf_counter()
    written = [0]

    def commit(lo: int, block: dict[str, np.ndarray], unembeddable: list[int] | None) -> None:
        n = next(iter(block.values())).shape[1]
        written[0] += n
        rate = written[0] / max(time.perf_counter() - t0, 1e-9)
        backend.write_shard_block(run, lease, lo, block, unembeddable=unembeddable, cells_per_s=round(rate, 3),
                                  peak_rss=peak_rss_bytes())

    prefetch = _Prefetch(source, order, start, mapping, adapter.tokenizer, chunks, seed, workers)
    writer = _Writer(commit, [c for c in shard.unembeddable if c < start])
    first: float | None = None
    pool = (cf.ThreadPoolExecutor(streams, thread_name_prefix="sclstore-stream", initializer=torch.set_num_threads,
                                  initargs=(torch.get_num_threads(),))
            if streams > 1 and device.type == "cpu" else None)
    try:
        for lo, records in prefetch:
            first = time.perf_counter() if first is None else first
            writer.check()
            lease.check()
            block, skipped = _embed_chunk(adapter, records, layers=layers, pools=pools, batch_size=batch_size,
                                          device=device, progress=progress, streams=pool)
            writer.put(lo, block, skipped)
            if stop is not None and stop.is_set():
                break
        if spans is not None and first is not None:
            spans.append(time.perf_counter() - first)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        prefetch.close()
    return written[0]
