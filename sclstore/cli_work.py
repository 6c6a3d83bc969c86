"""CLI commands that work over stored runs: query, eval, demo (registered on ``cli.app``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sclstore.cli import (
    CatalogOpt,
    JsonOpt,
    StoreOpt,
    ThreadsOpt,
    VerboseOpt,
    _open,
    app,
    emit_json,
    err,
    eval_app,
    handled,
    out,
    policy_json,
)
from sclstore.api import default_store_path

__all__: list[str] = []


@app.command()
@handled
def query(
    sql: Annotated[str, typer.Argument(help='e.g. "SELECT * FROM embeddings WHERE run = 1 AND layer = 3"')],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write .h5ad, .npy, .npz, .parquet or .csv.")] = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Slice embeddings by layer and cell metadata with a SQL-style query."""
    from sclstore.query import query_to_file

    with _open(store, catalog) as st:
        if output is not None:
            summary = query_to_file(st.backend, sql, output)
        else:
            summary = st.query(sql).summary()
    if json_out:
        emit_json(summary)
        return
    what = f"{summary.get('n_groups')} groups" if summary.get("grouped") else f"{summary.get('n_cells')} cells"
    out.print(f"run {summary['run']} ({summary['dataset']}/{summary['model']}): {what} x layers {summary['layers']}"
              f" x {summary['dim']} dims, pool {summary['pool']}", markup=False)
    if output is not None:
        out.print(f"wrote {summary['path']}", markup=False)


def _print_eval(result: Any, json_out: bool, plot: Path | None) -> None:
    if plot is not None:
        result.plot(plot)
    if json_out:
        emit_json(result.to_json() | {"thread_policy": policy_json()})
        return
    out.print(result.rich_table())
    for line in result.headline():
        out.print(line, markup=False)
    if plot is not None:
        err.print(f"plot written to {plot}", markup=False)


PoolOpt = Annotated[str | None, typer.Option("--pool", help="Pool to score (default: the run's first).")]
BootOpt = Annotated[int, typer.Option("--bootstrap", help="Resamples for confidence intervals.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a score-vs-depth PNG.")]


@eval_app.command("trajectory")
@handled
def eval_trajectory(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    pseudotime_key: Annotated[str, typer.Option("--pseudotime-key", help="obs column with the ground-truth time.")],
    root_cell: Annotated[str | None, typer.Option("--root-cell", help="Root cell name (default: diffusion-extreme earliest cell).")] = None,
    pool: PoolOpt = None,
    bootstrap: BootOpt = 20,
    plot: PlotOpt = None,
    threads: ThreadsOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Score every stored layer on trajectory inference (DPT vs ground-truth time)."""
    with _open(store, catalog) as st:
        res = st.evaluate_trajectory(run, pseudotime_key=pseudotime_key, root_cell=root_cell, pool=pool, n_subsamples=bootstrap,
                                     threads=threads)
    _print_eval(res, json_out, plot)


@eval_app.command("perturbation")
@handled
def eval_perturbation(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    perturbation_key: Annotated[str, typer.Option("--perturbation-key", help="obs column naming the perturbation.")],
    control: Annotated[str, typer.Option("--control", help="Label of control cells, e.g. NTC.")],
    condition_key: Annotated[str | None, typer.Option("--condition-key", help="obs column of cell state; scored separately.")] = None,
    replicate_key: Annotated[str | None, typer.Option("--replicate-key", help="obs column of donors/replicates.")] = None,
    de: Annotated[str, typer.Option("--de", help="pydeseq2 (paper-faithful) or fast.")] = "pydeseq2",
    pool: PoolOpt = None,
    bootstrap: BootOpt = 200,
    plot: PlotOpt = None,
    threads: ThreadsOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Score every stored layer on perturbation response (RSA vs DE), per condition."""
    with _open(store, catalog) as st:
        res = st.evaluate_perturbation(run, perturbation_key=perturbation_key, control=control, condition_key=condition_key,
                                       replicate_key=replicate_key, de_mode=de, pool=pool, n_boot=bootstrap, threads=threads)
    _print_eval(res, json_out, plot)


@app.command()
@handled
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo store, data and plots.")] = Path("sclstore-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller simulations (for tests).")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """The whole pipeline on bundled data with the built-in model: ingest, query, evaluate, plot."""
    from sclstore.demo import run_demo

    report = run_demo(out_dir, quick=quick, progress=not json_out, say=None if json_out else out.print)
    if json_out:
        emit_json(report)
