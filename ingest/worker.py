"""A worker: claim shards from the catalog, embed them, finalise runs whose last shard is done.

The same loop serves every executor: ``sclstore work`` (a Slurm array task, a Kubernetes pod, the
long-lived service with ``--forever``), the processes ``sclstore ingest --devices`` starts, the Ray
actors of ``--executor ray``, and the in-process worker of a plain ``sclstore ingest``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from sclstore.store import Backend, runtime
from sclstore.store.errors import (
    CatalogConnectionError,
    DatasetError,
    InvalidInputError,
    LeaseHeldError,
    ModelError,
    SclstoreError,
)

from .embed import embed_shard, peak_rss_bytes, stream_count
from .lifecycle import Interrupted
from .plan import NumericsRefused, RunContext, check_numerics, open_context, resolve_device

__all__ = ["WorkReport", "work"]

logger = logging.getLogger(__name__)

_OUTAGE = (CatalogConnectionError, sa.exc.OperationalError, sa.exc.InterfaceError)
"""The catalog is unreachable mid-shard (raw from the shard queue, translated from the backend)."""

_FATAL = (InvalidInputError, DatasetError, ModelError)
"""Errors no other worker gets past (bad input, wrong checkpoint): the run fails at once."""


@dataclass
class WorkReport:
    """What one worker did.

    ``seconds`` splits into ``startup_seconds`` (opening each run: model, data file, gene
    mapping), ``embedding_seconds`` (in each shard, from its first chunk's arrival to its last
    chunk's embedding) and the rest, ``coordination_seconds``: claims, "done", finalisation, the
    obs rows and pipeline fill and drain of every shard, and waiting for other workers' shards.
    """

    shards: int = 0
    cells: int = 0
    seconds: float = 0.0
    runs_finalised: list[int] = field(default_factory=list)
    peak_rss_bytes: int = 0
    device: str = ""
    startup_seconds: float = 0.0
    embedding_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        coordination = max(0.0, self.seconds - self.startup_seconds - self.embedding_seconds)
        return {"shards": self.shards, "cells": self.cells, "seconds": round(self.seconds, 3),
                "cells_per_s": round(self.cells / self.seconds, 2) if self.seconds > 0 else None,
                "runs_finalised": self.runs_finalised, "peak_rss_bytes": self.peak_rss_bytes, "device": self.device,
                "startup_seconds": round(self.startup_seconds, 3), "embedding_seconds": round(self.embedding_seconds, 3),
                "coordination_seconds": round(coordination, 3)}


class _Outage:
    """Backoff and one log line per catalog outage (service mode)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.delay = 1.0

    def hit(self, exc: BaseException) -> float:
        if self.since is None:
            self.since = time.time()
            logger.warning("catalog unreachable (%s); retrying with backoff", str(exc).splitlines()[0][:200])
        self.delay = min(self.delay * 2, 60.0)
        return self.delay

    def ok(self) -> None:
        if self.since is not None:
            logger.warning("catalog reachable again after %.0f s", time.time() - self.since)
        self.since, self.delay = None, 1.0


def work(
    backend: Backend, *, runs: Sequence[int] | None = None, device: str = "auto", forever: bool = False,
    batch_size: int | None = None, precision: str | None = None, workers: int = 1, progress: Any = None,
    stop: threading.Event | None = None, contexts: dict[int, RunContext] | None = None, shuffle: random.Random | None = None,
    poll_s: float = 1.0, fail_fast: bool = False, on_shard: Callable[[int], None] | None = None,
    final_stats: dict[int, dict[str, Any]] | None = None,
) -> WorkReport:
    """Claim and embed shards until there is nothing left to do (or, with ``forever``, until ``stop``).

    Parameters
    ----------
    backend
        The open store (its catalog is the queue).
    runs
        Work only on these runs; default: any shared run in the catalog.
    device
        This worker's device (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    forever
        Keep polling for new runs (the ingest service); otherwise return once the runs in scope
        have no shard queued or being embedded and none is waiting for its finaliser (a worker
        waits while others hold shards or finalise a run, so it can take over a dead one's).
    batch_size, precision
        Only to check: a worker whose settings would change a run's numbers refuses it
        (:class:`~.plan.NumericsRefused`) before claiming anything of ``runs``; serving any run
        (``runs=None``) it gives such a run's shard back untouched and skips the run.
    workers
        Tokenizer processes.
    progress
        Object with ``advance(n)`` (cells), or None.
    stop
        Set to drain: the shard in progress is released at its next chunk boundary.
    contexts
        Ready contexts by run id (a plain ingest passes the one it planned).
    shuffle
        Claim shards in random order (tests).
    fail_fast
        Raise the first error instead of releasing the shard for another attempt (plain ingest).
    on_shard
        Called with the cells of each finished shard.
    final_stats
        Extra run stats by run id, recorded if this worker finalises the run.
    """
    stop = stop or threading.Event()
    ctxs: dict[int, RunContext] = dict(contexts or {})
    owned = set(ctxs)
    report = WorkReport(device=device)
    outage = _Outage()
    refused: set[int] = set()
    t0 = time.perf_counter()
    if runs is not None:  # refuse a run this worker would change the numbers of before claiming anything of it
        dev = resolve_device(device)
        for run_id in runs:
            run = backend.get_run(run_id)
            if run_id not in ctxs and run.plan and run.status not in ("complete",):
                check_numerics(run, device=dev, batch_size=batch_size, precision=precision)
    try:
        while not stop.is_set():
            try:
                lease = backend.shards.claim(runs=runs, device=device, shuffle=shuffle, exclude=sorted(refused))
                if lease is None:
                    report.runs_finalised += _finalise_ready(backend, runs, final_stats)
                    # done only when no run in scope has a shard left or a finaliser still at work (another
                    # process consolidating it; if that process died, this one finalises it after its lease)
                    unfinished = set(backend.shards.pending_runs(runs)) | set(backend.shards.finishable_runs(runs))
                    if not forever and not unfinished - refused:
                        break
                    outage.ok()
                    stop.wait(poll_s)
                    continue
                outage.ok()
            except (CatalogConnectionError, sa.exc.DBAPIError) as exc:
                if not forever:
                    raise
                stop.wait(outage.hit(exc))
                continue
            shard = lease.shard
            try:
                ctx = ctxs.get(shard.run_id)
                if ctx is None:
                    t1 = time.perf_counter()
                    ctx = ctxs[shard.run_id] = open_context(backend, backend.get_run(shard.run_id), device=device,
                                                            batch_size=batch_size, precision=precision)
                    report.startup_seconds += time.perf_counter() - t1
                _check_pinned(ctx, shard)
                t1 = time.perf_counter()
                spans: list[float] = []
                with _pinned_threads(ctx) as streams:
                    cells = embed_shard(backend, ctx.run, lease, adapter=ctx.adapter, source=ctx.source, mapping=ctx.mapping,
                                        layers=ctx.layers, pools=ctx.pools, batch_size=ctx.batch_size, chunk_cells=ctx.chunk_cells,
                                        seed=ctx.seed, device=ctx.device, workers=workers, progress=progress, stop=stop, spans=spans,
                                        streams=streams)
                report.embedding_seconds += sum(spans)
            except Interrupted:
                backend.shards.release(lease)
                raise
            except LeaseHeldError as exc:
                lease.stop()
                logger.warning("%s", exc)
                continue
            except NumericsRefused as exc:  # this worker's settings, not the run's fault: give the shard back untouched
                backend.shards.release(lease)
                if runs is not None:
                    raise
                logger.warning("skipping run %d: %s", shard.run_id, exc)
                refused.add(shard.run_id)
                continue
            except BaseException as exc:
                if forever and not fail_fast and isinstance(exc, _OUTAGE):
                    backend.shards.release(lease)  # an outage is no fault of the shard: no attempt counted
                    stop.wait(outage.hit(exc))
                    continue
                fatal = fail_fast or isinstance(exc, _FATAL)
                status = backend.shards.release(lease, error=f"{type(exc).__name__}: {exc}", fail=fatal)
                if fatal or not isinstance(exc, (SclstoreError, Exception)):
                    raise
                logger.warning("shard %d of run %d failed (%s: %s); it is %s", shard.idx, shard.run_id, type(exc).__name__, exc, status)
                continue
            report.cells += cells
            report.peak_rss_bytes = peak_rss_bytes()
            if stop.is_set() and lease.shard.hi > shard.watermark + cells:
                backend.shards.release(lease)
                logger.info("shard %d of run %d released at cell %d (draining)", shard.idx, shard.run_id, shard.watermark + cells)
                break
            if backend.shards.done(lease):
                report.shards += 1
                secs = time.perf_counter() - t1
                logger.info("shard %d of run %d done: cells %d..%d, %d embedded in %.1f s (%.1f cells/s) on %s", shard.idx,
                            shard.run_id, shard.lo, shard.hi, cells, secs, cells / secs if secs > 0 else 0.0, device)
                if on_shard is not None:
                    on_shard(cells)
            report.runs_finalised += _finalise_ready(backend, [shard.run_id], final_stats)
    finally:
        for run_id, ctx in ctxs.items():
            if run_id not in owned:
                with contextlib.suppress(Exception):
                    ctx.close()
        report.seconds = time.perf_counter() - t0
        report.peak_rss_bytes = peak_rss_bytes()
    return report


def _finalise_ready(backend: Backend, runs: Sequence[int] | None, extra: dict[int, dict[str, Any]] | None) -> list[int]:
    done = []
    for run_id in backend.shards.finishable_runs(runs):
        run = backend.get_run(run_id)
        stats = {"gene_mapping": run.plan.get("gene_mapping"), **(extra or {}).get(run_id, {})}
        if backend.finalise_run(run_id, stats) is not None:
            done.append(run_id)
    return done


@contextlib.contextmanager
def _pinned_threads(ctx: RunContext) -> Iterator[int]:
    """Embed a CPU run with its pinned torch threads per batch (the count changes the last bits).

    Yields the number of CPU streams: this process's threads over the run's threads per batch
    (:func:`~sclstore.ingest.embed.stream_count`; 1 on CUDA).
    """
    import torch

    before = torch.get_num_threads()
    if ctx.cpu_threads is None:  # CUDA (a CPU run always pins its threads per batch)
        yield 1
        return
    streams = stream_count(before, ctx.cpu_threads)
    if ctx.cpu_threads == before:
        yield streams
        return
    policy = runtime.active_policy()
    if policy is not None and policy.enabled and ctx.cpu_threads > policy.threads:
        logger.warning("run %d embeds with %d threads on the CPU, as it was planned (this worker's allowance is %d): "
                       "other thread counts would change its numbers", ctx.run.id, ctx.cpu_threads, policy.threads)
    torch.set_num_threads(ctx.cpu_threads)
    try:
        yield streams
    finally:
        torch.set_num_threads(before)


def _check_pinned(ctx: RunContext, shard: Any) -> None:
    """The shard row's pinned numerics must be the ones this worker embeds with."""
    mine = {"batch_size": ctx.batch_size, "chunk_cells": ctx.chunk_cells, "precision": ctx.adapter.precision,
            "cpu_threads": ctx.cpu_threads}
    theirs = {"batch_size": shard.batch_size, "chunk_cells": shard.chunk_cells, "precision": shard.precision,
              "cpu_threads": shard.cpu_threads if ctx.device.type == "cpu" else None}
    bad = {k: (theirs[k], mine[k]) for k in mine if theirs[k] is not None and theirs[k] != mine[k]}
    if bad:
        raise InvalidInputError(f"shard {shard.idx} of run {shard.run_id} is pinned to "
                                + ", ".join(f"{k}={v[0]} (this worker: {v[1]})" for k, v in bad.items())
                                + ": the numbers would change; use a worker with the run's settings")
