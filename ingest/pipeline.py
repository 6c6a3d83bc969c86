"""``sclstore ingest`` and ``sclstore submit``: plan a run once, then embed its shards.

A plain ingest plans the run (:func:`.plan.plan_run`) and works on it in this process
(:func:`.worker.work`) with the model it already loaded; with ``devices`` it starts one worker
per device (:mod:`.executors`) and waits for them. A submit only plans: workers anywhere do the
rest (``sclstore work``).

Everything that can be wrong with the input is checked before the store is touched. A completed
identical run is a cache hit that loads no weights; an interrupted one resumes where its shards'
watermarks stand, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sclstore.store import Backend, IngestConfig, RunInfo
from sclstore.store.errors import InvalidInputError, LeaseHeldError

from .adapter import GeneMapping, ModelAdapter
from .lifecycle import Interrupted
from .plan import SUBMIT_SHARD_CHUNKS, plan_run, resolve_device
from .progress import make_progress
from .run_key import pin_resumed
from .worker import work

__all__ = ["IngestResult", "SubmitResult", "ingest", "resolve_device", "submit"]

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SubmitResult:
    """What ``submit`` planned."""

    run_id: int
    dataset: str
    model: str
    cache_hit: bool
    status: str
    cells: int
    shards: int
    shard_cells: int
    chunk_cells: int

    @property
    def id(self) -> int:
        return self.run_id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def submit(backend: Backend, path: str | os.PathLike[str], config: IngestConfig) -> SubmitResult:
    """Plan a run for workers anywhere (``sclstore work``): hash, register, create the run and its shards.

    ``config.device`` names the workers' device (its precision enters the run's key); it need not
    exist on this machine. Default shard size: 16 chunks.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError("submit needs a .h5ad path that workers can open; for an in-memory AnnData use ingest")
    with contextlib.ExitStack() as stack:
        plan = plan_run(backend, path, config, stack=stack, device=config.device, shared=True, shard_chunks=SUBMIT_SHARD_CHUNKS)
    run = plan.run
    shards = backend.shards.shards(run.id)
    chunk = int(run.params.get("chunk_cells") or 0)
    return SubmitResult(run_id=run.id, dataset=run.dataset_name, model=run.model_name, cache_hit=plan.cache_hit, status=run.status,
                        cells=run.n_cells, shards=len(shards), shard_cells=max((s.hi - s.lo for s in shards), default=0),
                        chunk_cells=chunk)


def ingest(
    backend: Backend, path: str | os.PathLike[str] | Any, config: IngestConfig, *, adapter: ModelAdapter | None = None,
    source_label: str | None = None, devices: Sequence[str] | None = None, executor: str = "local",
    ray_address: str | None = None, ray_cpus: float = 1.0,
) -> IngestResult:
    """Embed every cell of an .h5ad file (or an AnnData) with every kept layer, into ``backend``.

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
    devices
        One worker per device (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]``): local processes,
        or Ray actors with ``executor="ray"``. Default: this process embeds on ``config.device``.
    executor, ray_address, ray_cpus
        ``local`` or ``ray`` (``sclstore[ray]``), the Ray cluster to join (default: a local Ray
        instance), and the CPUs Ray reserves per worker actor.

    Returns
    -------
    IngestResult

    Raises
    ------
    InvalidInputError, DatasetError, CheckpointError
        On bad input, before anything is written.
    LeaseHeldError
        If another process is embedding the run and ``config.wait`` is false.
    """
    t0 = time.perf_counter()
    if executor not in ("local", "ray"):
        raise InvalidInputError(f"--executor {executor!r} is not one of local, ray")
    if devices:
        from .executors import ingest_on_devices

        return ingest_on_devices(backend, path, config, devices=list(devices), executor=executor, ray_address=ray_address,
                                 source_label=source_label, t0=t0, ray_cpus=ray_cpus)
    with contextlib.ExitStack() as stack:
        plan = plan_run(backend, path, config, stack=stack, adapter=adapter, source_label=source_label)
        if plan.cache_hit or plan.context is None:
            return _result(plan.run, cache_hit=True, embedded=0, t0=t0, device=str(plan.device), mapping=plan.mapping)
        run = plan.run
        start = run.watermark
        pin_resumed(run, dataclasses.replace(config, chunk_cells=plan.context.chunk_cells), start)  # says what resumes as it started
        if not config.wait:
            _refuse_if_held(backend, run.id)
        logger.info("run %s: embedding %d of %d cells on %s", run.id, run.n_cells - start, run.n_cells, plan.device)
        with make_progress(f"ingest {run.dataset_name}", total=run.n_cells, done=start, enabled=config.progress) as progress:
            try:
                report = work(backend, runs=[run.id], device=str(plan.device), workers=config.workers, progress=progress,
                              contexts={run.id: plan.context}, fail_fast=True,
                              final_stats={run.id: {"gene_mapping": plan.mapping.stats(), "device": str(plan.device),
                                                    "resumed_from": start}})
            except (Interrupted, Exception) as exc:
                backend.mark_failed(run.id, f"{type(exc).__name__}: {exc}")
                raise
        run = backend.get_run(run.id)
        if run.status != "complete":
            raise LeaseHeldError(f"run {run.id} is not complete ({run.status}): see `sclstore status {run.id}`")
        if run.unembeddable:
            logger.warning("%d cells have no gene the model knows; stored as NaN and recorded in run %s", len(run.unembeddable), run.id)
        return _result(run, cache_hit=False, embedded=report.cells, t0=t0, device=str(plan.device), mapping=plan.mapping)


def _refuse_if_held(backend: Backend, run_id: int) -> None:
    """``wait=False``: a run whose every unfinished shard is held by a live process is refused."""
    shards = backend.shards.shards(run_id)
    open_ = [s for s in shards if s.status in ("queued", "claimed")]
    held = [s for s in open_ if s.status == "claimed" and s.heartbeat_at and s.heartbeat_at > time.time() - backend.settings.lease_ttl_s]
    if open_ and len(held) == len(open_):
        s = held[0]
        age = time.time() - (s.heartbeat_at or 0)
        raise LeaseHeldError(f"run {run_id} is being written by {s.lease_host} pid {s.lease_pid} (heartbeat {age:.0f} s ago): "
                             f"wait for it, or rerun once its lease expires ({backend.settings.lease_ttl_s:.0f} s)")


def _result(run: RunInfo, *, cache_hit: bool, embedded: int, t0: float, device: str, mapping: GeneMapping | None) -> IngestResult:
    secs = time.perf_counter() - t0
    return IngestResult(
        run_id=run.id, dataset=run.dataset_name, model=run.model_name, cache_hit=cache_hit, cells=run.n_cells,
        cells_embedded=embedded, layers=run.layers, pools=run.pools, seconds=round(secs, 3),
        cells_per_s=round(embedded / secs, 2) if secs > 0 and embedded else 0.0,
        gene_mapping=mapping.stats() if mapping is not None else dict(run.stats.get("gene_mapping") or {}), device=device,
    )
