"""CLI commands that work over stored runs: query, eval, demo (registered on ``cli.app``)."""

from pathlib import Path
from typing import Annotated, Any

import typer

from sclstore.api import default_store_path
from sclstore.cli import CatalogOpt, JsonOpt, StoreOpt, ThreadsOpt, VerboseOpt, _open, app, emit_json, err, eval_app, handled, out
from sclstore.cli_rows import CsvOpt, NlOpt, TsvOpt, row_format

__all__: list[str] = []


_OUTPUT_HELP = "Write .h5ad, .npy, .npz, .parquet, .csv or .soma; `-o -` writes rows to stdout (--csv, --tsv or --nl)."
_INTO_HELP = "With -o out.h5ad: write a copy of this source .h5ad with the layers added to obsm (rows matched by cell name)."
_COUNTS_HELP = "-o .h5ad: add the cells' raw counts (X) and genes (var) from the ingested file (always for .soma)."


@app.command()
@handled
def query(
    sql: Annotated[str, typer.Argument(help='e.g. "SELECT * FROM embeddings WHERE run = 1 AND layer = 3"')],
    output: Annotated[str | None, typer.Option("-o", "--output", help=_OUTPUT_HELP)] = None,
    into: Annotated[Path | None, typer.Option("--into", help=_INTO_HELP)] = None,
    order: Annotated[str, typer.Option("--order", help="Row order: input (the ingested AnnData's rows) or store.")] = "input",
    with_counts: Annotated[bool, typer.Option("--with-counts", help=_COUNTS_HELP)] = False,
    counts_from: Annotated[Path | None, typer.Option("--counts-from", help="The .h5ad with the counts (source moved).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the -o file if it exists.")] = False,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    tsv_out: TsvOpt = False,
    nl_out: NlOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Slice embeddings by layer and cell metadata with a SQL-style query.

    Without -o: a summary (and, in a terminal, a preview of the first rows); --csv/--tsv/--nl
    print every row (one per layer x cell) on stdout; --json prints the summary as JSON.
    """
    import sys

    from sclstore.query import query_to_file
    from sclstore.store.errors import InvalidInputError

    fmt = row_format(csv_out, tsv_out, nl_out, json_out)
    if into is not None and (output is None or output == "-"):
        raise InvalidInputError("--into needs -o OUT.h5ad: the copy of the source file to write")
    with _open(store, catalog) as st:
        if output == "-" or (output is None and fmt is not None):
            from sclstore.query import open_query
            from sclstore.query.export import write_rows

            res = open_query(st.backend, sql)
            write_rows(res, sys.stdout, fmt or "csv", order=order)
            summary = res.summary()
            _print_hints(summary)
            n = summary.get("n_groups", summary.get("n_cells"))
            what = f"{n} rows x {len(res.layers)} layers x {max(1, len(res.pools))} pool(s)"
            err.print(f"{what} written to stdout", markup=False, highlight=False)
            return
        preview = None
        if output is not None:
            if with_counts or counts_from is not None or output.rstrip("/").endswith(".soma"):
                summary = st.export(sql, output, order=order, with_counts=True, counts_from=counts_from, into=into,
                                   overwrite=force)
            else:
                summary = query_to_file(st.backend, sql, Path(output), order=order, into=into, overwrite=force)
        else:
            res = st.query(sql)
            summary = res.summary()
            if not json_out and sys.stdout.isatty():
                from sclstore.cli_rows import preview_table

                preview = preview_table(res)
    _print_hints(summary)
    if json_out:
        emit_json(summary)
        return
    what = f"{summary.get('n_groups')} groups" if summary.get("grouped") else f"{summary.get('n_cells')} cells"
    out.print(f"run {summary['run']} ({summary['dataset']}/{summary['model']}): {what} x layers {summary['layers']}"
              f" x {summary['dim']} dims, pool {','.join(summary.get('pools') or []) or summary['pool']}", markup=False)
    if preview is not None:
        out.print(preview)
        out.print("(all rows: add --csv, --tsv or --nl, or -o FILE)", markup=False)
    if output is not None:
        out.print(f"wrote {summary['path']}", markup=False)


def _print_hints(summary: dict[str, Any]) -> None:
    for line in summary.get("hints") or ():
        err.print(f"hint: {line}", markup=False, highlight=False)


def _print_eval(result: Any, json_out: bool, plot: Path | None) -> None:
    from sclstore.cli_eval import print_eval

    print_eval(result, json_out, plot)


PoolOpt = Annotated[str | None, typer.Option("--pool", help="Pool to score (default: the run's first).")]
BootOpt = Annotated[int, typer.Option("--bootstrap", help="Resamples for confidence intervals.")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a score-vs-depth PNG.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", help="Worker processes over layers and DE fits (capped by the CPUs this process may use).")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="default, or paper: the authors' exact choices (README, Evaluation).")]


@eval_app.command("trajectory")
@handled
def eval_trajectory(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    pseudotime_key: Annotated[str, typer.Option("--pseudotime-key", help="obs column with the ground-truth time.")],
    root_cell: Annotated[str | None, typer.Option("--root-cell", help="Root cell name (default: diffusion-extreme earliest cell).")] = None,
    n_neighbors: Annotated[int, typer.Option("--n-neighbors", help="kNN graph size for diffusion pseudotime.")] = 30,
    pool: PoolOpt = None,
    bootstrap: BootOpt = 20,
    jobs: JobsOpt = 1,
    plot: PlotOpt = None,
    protocol: ProtocolOpt = "default",
    standardize: Annotated[bool, typer.Option("--standardize", help="Z-score every embedding coordinate first.")] = False,
    roots: Annotated[int, typer.Option("--roots", help="Random earliest-time roots for the root-sensitivity report.")] = 5,
    knn: Annotated[str, typer.Option("--knn", help="auto (exact up to 131,072 cells, pynndescent above), exact or approx.")] = "auto",
    threads: ThreadsOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Score every stored layer on trajectory inference (DPT vs ground-truth time)."""
    with _open(store, catalog) as st:
        res = st.evaluate_trajectory(run, pseudotime_key=pseudotime_key, root_cell=root_cell, pool=pool, n_subsamples=bootstrap,
                                     n_neighbors=n_neighbors, protocol=protocol, standardize=standardize, n_roots=roots,
                                     knn=knn, n_jobs=jobs, progress=not json_out, threads=threads)
    _print_eval(res, json_out, plot)


@eval_app.command("perturbation")
@handled
def eval_perturbation(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    perturbation_key: Annotated[str, typer.Option("--perturbation-key", help="obs column naming the perturbation.")],
    control: Annotated[str, typer.Option("--control", help="Label of control cells, e.g. NTC.")],
    condition_key: Annotated[str | None, typer.Option("--condition-key", help="obs column of cell state; scored separately.")] = None,
    replicate_key: Annotated[str | None, typer.Option("--replicate-key", help="obs column of donors/replicates.")] = None,
    de: Annotated[str | None, typer.Option("--de", help="pydeseq2, fast or wilcoxon (the paper's per-cell DE); "
                                                         "default: wilcoxon with --protocol paper, else pydeseq2.")] = None,
    permutations: Annotated[int, typer.Option("--permutations", help="Permutations of the RSA test.")] = 999,
    pool: PoolOpt = None,
    bootstrap: BootOpt = 200,
    jobs: JobsOpt = 1,
    plot: PlotOpt = None,
    protocol: ProtocolOpt = "default",
    same_cells: Annotated[bool, typer.Option("--same-cells", help="DE and centroids from the same cells (leak-prone; "
                                                                   "default: cross-fitted halves).")] = False,
    splits: Annotated[int, typer.Option("--splits", help="Cross-fitting splits averaged.")] = 1,
    threads: ThreadsOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Score every stored layer on perturbation response (RSA vs DE), per condition."""
    with _open(store, catalog) as st:
        res = st.evaluate_perturbation(run, perturbation_key=perturbation_key, control=control, condition_key=condition_key,
                                       replicate_key=replicate_key, de_mode=de, pool=pool, n_boot=bootstrap, n_perm=permutations,
                                       protocol=protocol, crossfit=False if same_cells else None, n_splits=splits,
                                       n_jobs=jobs, progress=not json_out, threads=threads)
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

    report = run_demo(out_dir, quick=quick, progress=True, say=None if json_out else out.print)
    if json_out:
        emit_json(report)
