"""Planning a run once, and rebuilding what a worker needs from that plan.

:func:`plan_run` does everything that reads the whole input or touches the catalog for the first
time: checks the data and the checkpoint, hashes both (through the persistent digest cache),
derives the run's cache key, registers the dataset (bulk obs load) and the model, creates the run's
array, its catalog row with its *plan*, and its shards. It runs once per run (``sclstore submit``, or
the first step of ``sclstore ingest``).

:func:`open_context` is the worker side: from a run's plan it opens the data file and the
checkpoint without hashing either (it checks the file is the one planned by size and mtime, the
gene mapping and the adapter by digest), refuses settings that would change the run's numbers
(batch size, precision), and loads the model on the worker's device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from sclstore.store import ArraySpec, Backend, IngestConfig, RunInfo, parse_layers, validate_name
from sclstore.store.arrays import cell_tile
from sclstore.store.errors import DatasetError, IngestError, InvalidInputError
from sclstore.store.hashcache import rehashing
from sclstore.store.shards import split_cells

from .adapter import GeneMapping, ModelAdapter, resolve_precision
from .anndata_source import is_anndata, open_source, source_provenance
from .gene_check import check_unique_tokens
from .hints import amend_counts_error, amend_gene_error
from .models import load_adapter
from .run_key import adapter_digest, mapping_digest, run_key
from .source import CountsSource

__all__ = ["PLAN_VERSION", "NumericsRefused", "Plan", "RunContext", "auto_chunk_cells", "check_numerics", "open_context", "plan_run",
           "resolve_device"]

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
MAX_CHUNK_CELLS = 4096
SUBMIT_SHARD_CHUNKS = 16
"""Default shard size of ``sclstore submit``, in chunks."""
CPU_THREADS_PER_BATCH = 1
"""Torch threads per batch of a new CPU run. One thread per batch, with several batches at once,
is faster than one batch split over the threads and keeps its speed on a CPU shared with other
busy processes (:mod:`sclstore.ingest.embed`); and a run's numbers then do not depend on the
machine's or the worker's thread count."""


def resolve_device(device: str, *, check: bool = True) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error (unless not ``check``:
    planning for workers elsewhere)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if check and device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device} asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def auto_chunk_cells(*, n_slots: int, n_pools: int, dim: int, memory_mb: int) -> int:
    """Cells per chunk so that about three chunks of float32 results fit in ``memory_mb``.

    A power of two in ``[1, 4096]``: one chunk is being embedded, one waits for the writer and
    one is being written (tokenized chunks are small beside them). Powers of two keep chunks
    and the array's cell tiles aligned.
    """
    per_cell = max(1, n_slots * n_pools * dim * 4)
    cells = max(1, memory_mb * 2**20 // (3 * per_cell))
    return int(min(MAX_CHUNK_CELLS, 1 << (cells.bit_length() - 1)))


def _default_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-_") or "dataset"
    return stem[:128]


def _storage_params(adapter: ModelAdapter, source: CountsSource) -> dict[str, Any]:
    """Cache-key parameters for how the counts are stored, for tokenizers whose output depends on it."""
    out: dict[str, Any] = {}
    if source.stored_entries and source.stored_layout != "canonical":
        out["stored_layout"] = source.stored_layout
    storage = getattr(adapter.tokenizer, "storage_key", None)
    if callable(storage) and storage() is not None:
        out["counts_storage"] = storage()
    return out


def _file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


@dataclass
class RunContext:
    """Everything a worker holds to embed shards of one run (model loaded, data file open)."""

    run: RunInfo
    adapter: ModelAdapter
    source: CountsSource
    mapping: GeneMapping
    layers: tuple[int, ...]
    pools: tuple[str, ...]
    batch_size: int
    chunk_cells: int
    seed: int
    device: torch.device
    closer: contextlib.ExitStack
    cpu_threads: int | None = None
    """The run's pinned torch threads per batch on the CPU (None on CUDA or for runs without one)."""

    def close(self) -> None:
        self.closer.close()


@dataclass
class Plan:
    """The outcome of :func:`plan_run`: the run, and (unless a cache hit) a ready context."""

    run: RunInfo
    cache_hit: bool
    mapping: GeneMapping
    device: torch.device
    context: RunContext | None


def _prepare(
    path: Any, config: IngestConfig, adapter: ModelAdapter | None, stack: contextlib.ExitStack,
) -> tuple[Any, CountsSource, ModelAdapter, GeneMapping]:
    in_memory = is_anndata(path)
    if not in_memory and not isinstance(path, (str, os.PathLike)):
        open_source(path)  # raises: names what was passed
    if not in_memory:
        path = Path(path).expanduser().resolve()
    if adapter is None:
        adapter = load_adapter(config.model, config.checkpoint, max_genes=config.max_genes, options=dict(config.model_options))
    source = stack.enter_context(open_source(path, counts_layer=config.counts_layer, gene_column=config.gene_column))
    try:
        mapping = adapter.map_genes(source.gene_ids)
    except InvalidInputError as exc:
        if config.gene_column is not None:
            raise
        raise InvalidInputError(amend_gene_error(str(exc), getattr(source, "var", None))) from None
    check_unique_tokens(source.gene_ids, mapping)
    adapter.observe_source(dense=source.dense, dtype=source.dtype)
    source.stored_entries = bool(getattr(adapter.tokenizer, "reads_stored_entries", False))
    return path, source, adapter, mapping


def plan_run(
    backend: Backend, path: Any, config: IngestConfig, *, stack: contextlib.ExitStack, adapter: ModelAdapter | None = None,
    source_label: str | None = None, device: str | None = None, shard_cells: int | None = None, shared: bool = True,
    min_shards: int = 1, shard_chunks: int | None = None, cpu_threads: int | None = None,
) -> Plan:
    """Check, hash, register and create a run with its shards (or find the identical one).

    Parameters
    ----------
    backend
        The open store.
    path
        The .h5ad file, or an AnnData (then the run is not ``shared``: only this process has the data).
    config
        The ingest configuration.
    stack
        Holds the opened data file (and the loaded model) for as long as the caller needs them.
    adapter
        A ready adapter (tests, custom models); default: built from ``config``.
    source_label
        What the catalog records as the source instead of the path.
    device
        The device the run is planned for (its precision follows); default ``config.device``,
        which must then be present here. ``submit`` plans for workers elsewhere: ``cuda`` is
        accepted on a machine without a GPU.
    shard_cells
        Cells per shard (rounded up to chunk and tile boundaries); default ``config.shard_cells``
        or one shard.
    shared
        Whether ``sclstore work`` processes anywhere may claim the run's shards.
    min_shards
        Without ``shard_cells``, split into at least this many shards (several workers).
    shard_chunks
        Without ``shard_cells``, shards of this many of the run's (pinned) chunks (``submit``: 16).
    cpu_threads
        For a CPU run, the torch threads each batch runs on (the count changes the last bits of a
        CPU forward pass, so a CPU run pins it); default :data:`CPU_THREADS_PER_BATCH`. Workers
        run as many batches at once as their thread allowance holds
        (:func:`~sclstore.ingest.embed.stream_count`), so a run's numbers do not depend on it.

    Returns
    -------
    Plan
        With a ready :class:`RunContext` (model loaded on the device) unless the run is complete.
    """
    dev = resolve_device(device or config.device, check=device is None)
    path, source, adapter, mapping = _prepare(path, config, adapter, stack)
    in_memory = is_anndata(path)
    name = config.name or (None if in_memory else validate_name(_default_name(cast("Path", path)), what="dataset"))
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
    precision = resolve_precision(config.precision, adapter.official_precision, dev)
    adapter.precision = precision
    chunk = config.chunk_cells or auto_chunk_cells(n_slots=len(layers), n_pools=len(pools), dim=adapter.d_model,
                                                   memory_mb=config.memory_mb)
    config = dataclasses.replace(config, chunk_cells=chunk)
    derived = run_key(config, content_hash=content_hash, checkpoint_hash=checkpoint_hash, mapping=mapping,
                      adapter_description=adapter.describe(), precision=precision,
                      resolved={"model": adapter.family, "checkpoint": checkpoint_hash, "layers": list(layers),
                                "pools": list(pools), "counts_layer": source.counts_key, "precision": precision,
                                "model_options": sorted(adapter.effective_options().items())},
                      storage=_storage_params(adapter, source))
    hit = backend.find_run(derived.key)
    if hit is not None and hit.status == "complete":
        logger.info("cache hit: run %s already holds this extraction", hit.id)
        return Plan(hit, True, mapping, dev, None)
    # the whole checkpoint (headers, tensor names and shapes against the config) is checked by
    # loading it strictly, before the first catalog write
    adapter.load(dev if dev.type == "cpu" or torch.cuda.is_available() else torch.device("cpu"))
    dataset = backend.register_dataset(name=name, content_hash=content_hash, obs=source.obs, n_vars=source.n_vars,
                                       source_path=source_label or source_provenance(source), cluster_by=config.cluster_by)
    model = backend.register_model(family=adapter.family, name=adapter.name, checkpoint_hash=adapter.checkpoint_hash,
                                   n_layers=adapter.n_layers, d_model=adapter.d_model, config=adapter.describe())
    spec = ArraySpec(n_layers=len(layers), n_cells=dataset.n_obs, dim=adapter.d_model, pools=pools, dtype=config.dtype)
    checkpoint = None if config.checkpoint is None else str(Path(config.checkpoint).expanduser().resolve())
    plan = {
        "version": PLAN_VERSION, "source": None if in_memory else str(path),
        "source_stat": None if in_memory else _file_stat(cast("Path", path)),
        "counts_layer": config.counts_layer, "gene_column": config.gene_column, "model": config.model,
        "checkpoint": checkpoint, "max_genes": config.max_genes, "model_options": dict(config.model_options),
        "precision": config.precision, "seed": config.seed, "layers": list(layers), "pools": list(pools),
        "batch_size": config.batch_size, "chunk_cells": chunk, "memory_mb": config.memory_mb,
        "gene_mapping": mapping.stats(), "planned_device": str(dev),
    }
    threads = (cpu_threads or CPU_THREADS_PER_BATCH) if dev.type == "cpu" else None
    run = backend.create_run(dataset=dataset, model=model, key=derived.key, params={**derived.params, "cpu_threads": threads},
                             layers=layers, spec=spec, plan=plan, shared=shared and not in_memory)
    pinned_chunk = int(run.params.get("chunk_cells") or chunk)
    align = max(pinned_chunk, cell_tile(spec.dim, spec.dtype))
    size = (shard_cells or config.shard_cells or (shard_chunks * pinned_chunk if shard_chunks else 0)
            or -(-run.n_cells // max(1, min_shards)))
    backend.shards.create(run.id, split_cells(run.n_cells, max(1, size), align), pinned=run.params)
    if run.status in ("failed", "cancelled"):
        backend.shards.requeue(run.id)
        run = backend.get_run(run.id)
    context = _context(run, adapter, source, mapping, dev, stack)
    return Plan(run, False, mapping, dev, context)


def _context(
    run: RunInfo, adapter: ModelAdapter, source: CountsSource, mapping: GeneMapping, device: torch.device, stack: contextlib.ExitStack,
) -> RunContext:
    p = run.params
    chunk = int(p.get("chunk_cells") or run.plan.get("chunk_cells") or MAX_CHUNK_CELLS)
    return RunContext(run=run, adapter=adapter, source=source, mapping=mapping, layers=run.layers, pools=run.pools,
                      batch_size=int(p.get("batch_size") or run.plan.get("batch_size") or 32), chunk_cells=chunk,
                      seed=int(p.get("seed", 0)), device=device, closer=stack,
                      cpu_threads=int(p["cpu_threads"]) if device.type == "cpu" and p.get("cpu_threads") else None)


class NumericsRefused(InvalidInputError):
    """This worker's settings would change a run's numbers (batch size, precision): it refuses the run.

    Not the run's fault: a worker with the run's settings can still embed it.
    """


def check_numerics(
    run: RunInfo, *, device: torch.device, batch_size: int | None, precision: str | None, official: str | None = None,
) -> str | None:
    """The precision this worker would embed ``run`` at, or raise if its settings would change the run's numbers.

    ``official`` is the model's official precision; without it, a CUDA worker asked for ``auto``
    cannot tell yet and None is returned (checked again once the model is known).

    Raises
    ------
    NumericsRefused
        Another batch size, or a precision other than the one the run is pinned to.
    """
    if batch_size is not None and batch_size != run.params.get("batch_size"):
        raise NumericsRefused(f"run {run.id} is pinned to --batch-size {run.params.get('batch_size')} (batch composition changes "
                              f"the numbers); this worker asked for {batch_size}: drop --batch-size")
    requested = precision or run.plan.get("precision") or "auto"
    if requested == "auto" and device.type == "cuda" and official is None:
        return None
    got = resolve_precision(requested, official or "fp32", device)
    want = run.params.get("precision")
    if got != want:
        raise NumericsRefused(f"run {run.id} is pinned to {want} precision; on {device} this worker would run {got}: "
                              f"use a {'CUDA' if device.type == 'cpu' else 'CPU'} worker or submit the run for this device")
    planned = torch.device(run.plan.get("planned_device") or "cpu").type
    if device.type != planned:
        raise NumericsRefused(f"run {run.id} was planned for {planned} workers and this worker embeds on {device.type}: the numbers "
                              f"differ between the two; run it with --device {planned}, or submit the data again for {device.type}")
    return got


def open_context(
    backend: Backend, run: RunInfo, *, device: str, batch_size: int | None = None, precision: str | None = None,
) -> RunContext:
    """A worker's context for ``run``, rebuilt from its plan (no hashing of data or checkpoint).

    Raises
    ------
    InvalidInputError
        If the run was ingested from memory, or this worker's settings would change its numbers.
    DatasetError, CheckpointError
        If the data file or the checkpoint is not the one the run was planned with.
    """
    plan = run.plan
    if not plan.get("source"):
        raise InvalidInputError(f"run {run.id} was ingested from memory (no data file): only the process that started it can embed it")
    dev = resolve_device(device)
    check_numerics(run, device=dev, batch_size=batch_size, precision=precision)  # before anything is opened
    path = Path(plan["source"])
    try:
        stat = _file_stat(path)
    except OSError as exc:
        raise DatasetError(f"run {run.id}'s data file {path} is not readable here ({exc.strerror}): mount it at that path") from None
    if stat != plan.get("source_stat"):
        raise DatasetError(f"the data file {path} changed since run {run.id} was planned (size or mtime differ): "
                           "submit it again (a new run) or restore the file")
    config = IngestConfig(model=plan["model"], checkpoint=plan["checkpoint"], counts_layer=plan["counts_layer"],
                          gene_column=plan["gene_column"], max_genes=plan["max_genes"],
                          model_options=tuple(sorted(plan["model_options"].items())),
                          precision=cast("Any", precision or plan["precision"]))
    stack = contextlib.ExitStack()
    try:
        _, source, adapter, mapping = _prepare(path, config, None, stack)
        if mapping_digest(mapping) != run.params.get("gene_mapping"):
            raise DatasetError(f"the gene mapping of {path} differs from run {run.id}'s plan: submit it again")
        if adapter_digest(adapter.describe()) != run.params.get("adapter"):
            raise IngestError(f"the checkpoint at {plan['checkpoint']} is not the one run {run.id} was planned with: "
                              "point the worker at the same checkpoint")
        got = check_numerics(run, device=dev, batch_size=batch_size, precision=precision, official=adapter.official_precision)
        adapter.precision = cast("str", got)
        adapter.load(dev)
        return _context(run, adapter, source, mapping, dev, stack)
    except BaseException:
        stack.close()
        raise
