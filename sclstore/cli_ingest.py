"""CLI commands that embed: ingest, submit, work, status, cancel (registered on ``cli.app``).

``ingest`` and ``submit`` take the same options (:class:`IngestOptions`); ``work`` is the worker
every executor runs; ``status`` and ``cancel`` read and write the shard queue only.
"""

import dataclasses
import logging
import signal
import sys
import threading
from typing import Annotated, Any

import typer

from sclstore.api import default_store_path
from sclstore.cli import CatalogOpt, JsonOpt, StoreOpt, ThreadsOpt, VerboseOpt, _open, app, emit_json, err, handled, out, policy_json
from sclstore.store.config import parse_csv

__all__: list[str] = []

DataArg = Annotated[str, typer.Argument(help=".h5ad file with raw counts, or a SOMA Experiment (*.soma; with --obs-filter).")]
ModelOpt = Annotated[str, typer.Option("--model", help="tahoe-x1, scfoundation, scgpt, geneformer or sclstore-tiny.")]
CheckpointOpt = Annotated[str | None, typer.Option(help="Local checkpoint folder (not for sclstore-tiny).")]
NameOpt = Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")]
PoolOpt = Annotated[str | None, typer.Option("--pool", help="Pools, e.g. cls,mean (default: the model's).")]
LayersOpt = Annotated[str, typer.Option(help="all, a list 0,6,12 or a range 0:12.")]
DtypeOpt = Annotated[str, typer.Option(help="float32 or float16.")]
BatchOpt = Annotated[int, typer.Option(help="Cells per forward pass.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
CountsOpt = Annotated[str | None, typer.Option(help="Read counts from layers[KEY] instead of X.")]
GeneColOpt = Annotated[str | None, typer.Option(help="var column with gene ids (default: var index).")]
ClusterOpt = Annotated[str | None, typer.Option(help="obs columns to order cells by, e.g. condition,donor.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of gene subsampling.")]
MaxGenesOpt = Annotated[int | None, typer.Option(help="Cap on tokens per cell (default: the model's).")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (the model's official precision on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
ModelOptionOpt = Annotated[list[str] | None, typer.Option("--model-option", help="KEY=VALUE, repeatable (scfoundation: sub_model, tgthighres).")]
WorkersOpt = Annotated[int, typer.Option(help="Tokenizer worker processes (0 = in process).")]
ChunkOpt = Annotated[int | None, typer.Option(help="Cells per durable write, the resume points (default: what --memory-mb allows, <= 4096).")]
MemoryOpt = Annotated[int, typer.Option("--memory-mb", help="Host memory for embeddings in flight per worker.")]
ShardOpt = Annotated[int | None, typer.Option("--shard-cells", help="Cells per shard (rounded to chunks); workers claim shards.")]
RehashOpt = Annotated[bool, typer.Option("--rehash", help="Re-read the data and checkpoint to hash them (ignore the digest cache).")]


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """The options ``ingest`` and ``submit`` share, as :class:`~sclstore.store.IngestConfig` keywords."""

    name: str | None
    pool: str | None
    layers: str
    dtype: str
    batch_size: int
    device: str
    counts_layer: str | None
    gene_column: str | None
    cluster_by: str | None
    seed: int
    max_genes: int | None
    precision: str
    model_option: list[str] | None
    workers: int
    chunk_cells: int | None
    memory_mb: int
    shard_cells: int | None
    rehash: bool

    def config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pools"] = parse_csv(d.pop("pool")) or None
        d["cluster_by"] = parse_csv(d["cluster_by"])
        d["model_options"] = tuple(d.pop("model_option") or ())
        return d


def _summary(res: Any) -> None:
    what = "cache hit: already stored as run" if res.cache_hit else "stored run"
    err.print(f"{what} {res.run_id} ({res.dataset}/{res.model}): {res.cells} cells x {len(res.layers)} layers x "
              f"pools {','.join(res.pools)}; genes matched {res.gene_mapping['n_matched']}/{res.gene_mapping['n_vars']}; "
              f"{res.seconds:.1f} s", markup=False, highlight=False)


@app.command()
@handled
def ingest(
    data: DataArg, model: ModelOpt, checkpoint: CheckpointOpt = None, name: NameOpt = None, pool: PoolOpt = None,
    layers: LayersOpt = "all", dtype: DtypeOpt = "float32", batch_size: BatchOpt = 32, device: DeviceOpt = "auto",
    counts_layer: CountsOpt = None, gene_column: GeneColOpt = None, cluster_by: ClusterOpt = None, seed: SeedOpt = 0,
    max_genes: MaxGenesOpt = None, precision: PrecisionOpt = "auto", model_option: ModelOptionOpt = None, workers: WorkersOpt = 1,
    chunk_cells: ChunkOpt = None, memory_mb: MemoryOpt = 256, shard_cells: ShardOpt = None, rehash: RehashOpt = False,
    devices: Annotated[str | None, typer.Option("--devices", help="One worker per device, e.g. cuda:0,cuda:1 (or cpu,cpu).")] = None,
    executor: Annotated[str, typer.Option("--executor", help="With --devices: local processes or ray actors (sclstore[ray]).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to join (default: start a local one).")] = None,
    ray_cpus: Annotated[float, typer.Option("--ray-cpus", help="CPUs Ray reserves per worker actor (--executor ray).")] = 1.0,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Fail instead of waiting when another process ingests the same run.")] = False,
    obs_filter: Annotated[str | None, typer.Option("--obs-filter", help="SOMA input: obs filter, e.g. \"cell_type == 'B cell'\".")] = None,
    soma_measurement: Annotated[str, typer.Option("--soma-measurement", help="SOMA input: measurement name.")] = "RNA",
    soma_x: Annotated[str | None, typer.Option("--soma-x", help="SOMA input: X layer of raw counts (default raw, counts, data).")] = None,
    threads: ThreadsOpt = None, store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Embed every cell with every layer of a model, once; prints the run id.

    SIGTERM (e.g. a Slurm time limit) or SIGINT ends it with one line on stderr and exit status
    143 / 130; the run keeps every finished chunk and the same command resumes it.
    """
    from sclstore.ingest.lifecycle import Interrupted, exit_code, signals_as_exceptions

    opts = IngestOptions(name, pool, layers, dtype, batch_size, device, counts_layer, gene_column, cluster_by, seed, max_genes,
                         precision, model_option, workers, chunk_cells, memory_mb, shard_cells, rehash).config()
    soma = {"obs_filter": obs_filter} if obs_filter else {}
    soma |= {"soma_x": soma_x} if soma_x else {}
    sharding: dict[str, Any] = {"devices": parse_csv(devices), "executor": executor, "ray_address": ray_address,
                                "ray_cpus": ray_cpus} if devices else {}
    try:
        with signals_as_exceptions(), _open(store, catalog, create=True) as st:
            # progress goes to stderr: --json stays clean
            res = st.ingest(data, model, checkpoint, progress=True, wait=not no_wait, threads=threads, soma_measurement=soma_measurement,
                            **opts, **soma, **sharding)
    except Interrupted as exc:
        err.print(f"error: {exc}: the run keeps its finished chunks; rerun the same command to resume it",
                  markup=False, highlight=False)
        raise typer.Exit(exit_code(exc.signum)) from None
    if json_out:
        emit_json(res.to_json() | {"thread_policy": policy_json()})
        return
    _summary(res)
    sys.stdout.write(f"{res.run_id}\n")


@app.command()
@handled
def submit(
    data: Annotated[str, typer.Argument(help=".h5ad file with raw counts, at a path every worker can open.")],
    model: ModelOpt, checkpoint: CheckpointOpt = None, name: NameOpt = None, pool: PoolOpt = None,
    layers: LayersOpt = "all", dtype: DtypeOpt = "float32", batch_size: BatchOpt = 32,
    device: Annotated[str, typer.Option(help="The workers' device kind: cuda or cpu (sets the run's precision; need not exist here).")] = "auto",
    counts_layer: CountsOpt = None, gene_column: GeneColOpt = None, cluster_by: ClusterOpt = None, seed: SeedOpt = 0,
    max_genes: MaxGenesOpt = None, precision: PrecisionOpt = "auto", model_option: ModelOptionOpt = None, workers: WorkersOpt = 1,
    chunk_cells: ChunkOpt = None, memory_mb: MemoryOpt = 256, shard_cells: ShardOpt = None, rehash: RehashOpt = False,
    threads: ThreadsOpt = None, store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Plan a run once (hash, register the dataset, create the run, its array and shards); prints the run id.

    Workers anywhere then embed it: `sclstore work RUN` (see the README's Slurm and Kubernetes recipes).
    A CPU run pins one torch thread per batch: each worker runs as many batches at once as its own
    thread policy allows (`--threads`, `$SCLSTORE_THREADS`, else its CPU allowance).
    """
    opts = IngestOptions(name, pool, layers, dtype, batch_size, device, counts_layer, gene_column, cluster_by, seed, max_genes,
                         precision, model_option, workers, chunk_cells, memory_mb, shard_cells, rehash).config()
    with _open(store, catalog, create=True) as st:
        res = st.submit(data, model, checkpoint, threads=threads, **opts)
    if json_out:
        emit_json(res.to_json() | {"thread_policy": policy_json()})
        return
    what = "cache hit: already stored as run" if res.cache_hit else f"run {res.run_id} planned"
    err.print(f"{what} ({res.dataset}/{res.model}): {res.cells} cells in {res.shards} shard(s) of <= {res.shard_cells}; "
              f"embed it with `sclstore work {res.run_id}`", markup=False, highlight=False)
    sys.stdout.write(f"{res.run_id}\n")


@app.command()
@handled
def work(
    runs: Annotated[list[str] | None, typer.Argument(help="Runs to work on (default: any queued run).")] = None,
    device: DeviceOpt = "auto",
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Return when the runs have no shard left (the default).")] = True,
    forever: Annotated[bool, typer.Option("--forever", help="Keep polling for new runs: the long-lived ingest service.")] = False,
    workers: WorkersOpt = 1,
    batch_size: Annotated[int | None, typer.Option(help="Only checked: a run pinned to another batch size is refused.")] = None,
    precision: Annotated[str | None, typer.Option(help="Only checked: a run pinned to another precision is refused.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No per-shard lines on stderr.")] = False,
    threads: ThreadsOpt = None, store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """A worker: claim shards, embed them, finalise each run when its last shard is done.

    SIGTERM or SIGINT drains: the shard in progress is released at its next chunk boundary (exit
    143 / 130); another worker resumes it there.
    """
    from sclstore.ingest.lifecycle import Interrupted, exit_code, signals_as_stop

    if not no_progress and not verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        for name in ("sclstore.ingest.worker", "sclstore.store.shards"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.INFO)
            lg.addHandler(handler)
    stop = threading.Event()
    try:
        with signals_as_stop(stop) as fired, _open(store, catalog) as st:
            report = st.work(runs or None, device=device, forever=forever, workers=workers, batch_size=batch_size,
                             precision=precision, stop=stop, threads=threads)
    except Interrupted as exc:
        err.print(f"error: {exc}: the shard in progress was released at its last written chunk; another worker resumes it",
                  markup=False, highlight=False)
        raise typer.Exit(exit_code(exc.signum)) from None
    if fired:
        err.print(f"error: interrupted by {signal.Signals(fired[0]).name}: drained ({report.shards} shard(s) done, the one in "
                  "progress released at a chunk boundary); another worker resumes it", markup=False, highlight=False)
        raise typer.Exit(exit_code(fired[0]))
    if json_out:
        emit_json(report.to_json() | {"thread_policy": policy_json()})
        return
    rate = report.to_json()["cells_per_s"]
    err.print(f"worker done: {report.shards} shard(s), {report.cells} cells ({rate or 0} cells/s) on {report.device}; "
              f"runs finalised: {report.runs_finalised or 'none'}; peak RSS {report.peak_rss_bytes / 2**20:.0f} MB",
              markup=False, highlight=False)


def _eta(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


@app.command()
@handled
def status(
    run: Annotated[str | None, typer.Argument(help="Run id or dataset/model (default: every unfinished run).")] = None,
    store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Shards queued/claimed/done, per-worker cells/s, ETA and stale leases."""
    with _open(store, catalog) as st:
        reports = st.status(run)
    if json_out:
        emit_json(reports)
        return
    if not reports:
        out.print("no unfinished runs", markup=False)
    for r in reports:
        sh = r["shards"]
        out.print(f"run {r['run']} {r['label']}: {r['status']}, {r['cells_done']}/{r['cells']} cells; shards "
                  f"{sh['done']} done, {sh['claimed']} claimed, {sh['queued']} queued"
                  + (f", {sh['failed']} failed" if sh["failed"] else "") + (f", {sh['cancelled']} cancelled" if sh["cancelled"] else "")
                  + f"; {r['cells_per_s']} cells/s, ETA {_eta(r['eta_s'])}", markup=False, highlight=False)
        for w in r["workers"]:
            out.print(f"  shard {w['shard']}: {w['host']} pid {w['pid']} on {w['device']}, {w['cells_per_s'] or 0} cells/s, "
                      f"at cell {w['cell']} of {w['of'][0]}..{w['of'][1]}", markup=False, highlight=False)
        for w in r["stale_leases"]:
            out.print(f"  shard {w['shard']}: STALE lease of {w['host']} pid {w['pid']} (heartbeat {w['heartbeat_age_s']} s ago): "
                      "the next worker takes it over", markup=False, highlight=False)
        if r["error"]:
            out.print(f"  error: {r['error']}", markup=False, highlight=False)


@app.command()
@handled
def cancel(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Cancel a run: its workers stop at their next chunk; an identical ingest or submit resumes it."""
    with _open(store, catalog) as st:
        n = st.cancel(run)
        info = st.run(run)
    if json_out:
        emit_json({"run": info.id, "status": info.status, "shards_cancelled": n})
        return
    err.print(f"run {info.id} {info.status}: {n} shard(s) cancelled", markup=False, highlight=False)
