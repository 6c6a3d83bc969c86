"""CLI commands over evaluation tasks and their cached results (registered on ``cli.app``).

``eval diagnostics``, ``eval celltype``, ``eval run TASK`` (any registered task, options as
KEY=VALUE), ``eval show ID``, ``ls evals`` (through :func:`print_evals`) and ``report``.
"""

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sclstore.api import Store, default_store_path
from sclstore.cli import (
    CatalogOpt,
    JsonOpt,
    StoreOpt,
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
from sclstore.cli_rows import cell
from sclstore.store.errors import InvalidInputError

__all__ = ["print_eval", "print_evals"]

PoolOpt = Annotated[str | None, typer.Option("--pool", help="Pool to score (default: the run's first).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write the task's figure as a PNG.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", help="Worker processes over layers (capped by the CPUs this process may use).")]


def _wide(result: Any) -> Table:
    df = result.table.pivot_table(index="layer", columns="metric", values="score", sort=False)
    table = Table(title=f"{result.task}: run {result.run_id} {result.run_label} (pool {result.params.get('pool')})"
                  + (" [cached]" if result.cached else ""))
    table.add_column("layer", justify="right")
    for c in df.columns:
        table.add_column(str(c), justify="right")
    for layer, row in zip(df.index, df.to_numpy(), strict=False):
        table.add_row(str(int(layer)), *("" if not math.isfinite(v) else f"{v:.3f}" for v in row))
    return table


def print_eval(result: Any, json_out: bool, plot: Path | None, cka_map: Path | None = None) -> None:
    """Render one evaluation: the JSON document, or a table plus headline; write the figures asked for."""
    from sclstore.eval.tasks import get_task

    if plot is not None:
        get_task(result.task).plot(result, plot)
    if cka_map is not None:
        from sclstore.eval.figures import plot_cka_map

        cmap = result.notes.get("cka_map")
        if not cmap:
            raise InvalidInputError("this evaluation has no CKA map: rerun it with --cka-map PNG")
        plot_cka_map(cmap["matrix"], cmap["layers"], cka_map, title=f"linear CKA - {result.run_label}")
    if json_out:
        emit_json(result.to_json() | {"thread_policy": policy_json()})
        return
    out.print(_wide(result) if result.task == "diagnostics" else result.rich_table())
    for line in result.headline():
        out.print(line, markup=False)
    for path in (plot, cka_map):
        if path is not None:
            err.print(f"figure written to {path}", markup=False)


@eval_app.command("diagnostics")
@handled
def eval_diagnostics(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    pool: PoolOpt = None,
    cka_map: Annotated[Path | None, typer.Option("--cka-map", help="Also compute the layer x layer CKA map and write it as a PNG heatmap.")] = None,
    cka_cells: Annotated[int, typer.Option("--cka-cells", help="Cells (seeded subsample) for CKA.")] = 10_000,
    twonn_cells: Annotated[int, typer.Option("--twonn-cells", help="Cells (seeded subsample) for TwoNN.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Seed of the subsamples and random pairs.")] = 0,
    jobs: JobsOpt = 1,
    plot: PlotOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Label-free diagnostics per layer: anisotropy, top-coordinate share, participation ratio, TwoNN, CKA."""
    with _open(store, catalog) as st:
        res = st.evaluate("diagnostics", run, pool=pool, cka_map=cka_map is not None, cka_cells=cka_cells, twonn_cells=twonn_cells,
                          seed=seed, n_jobs=jobs, progress=not json_out)
    print_eval(res, json_out, plot, cka_map)


@eval_app.command("celltype")
@handled
def eval_celltype(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    label_key: Annotated[str, typer.Option("--label-key", help="obs column with the cell labels to probe.")],
    k: Annotated[int, typer.Option("--k", help="Neighbours of the kNN probe.")] = 15,
    folds: Annotated[int, typer.Option("--folds", help="Stratified folds of the logistic-regression probe.")] = 5,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples of cells for the intervals.")] = 200,
    knn: Annotated[str, typer.Option("--knn", help="auto (approximate above 8,192 cells), exact or approx.")] = "auto",
    pool: PoolOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of folds, neighbours and bootstrap.")] = 0,
    jobs: JobsOpt = 1,
    plot: PlotOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Per-layer label probing: kNN and logistic-regression macro-F1 with intervals."""
    with _open(store, catalog) as st:
        res = st.evaluate("celltype", run, label_key=label_key, k=k, folds=folds, n_boot=bootstrap, knn_method=knn, pool=pool,
                          seed=seed, n_jobs=jobs, progress=not json_out)
    print_eval(res, json_out, plot)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise InvalidInputError(f"option {text!r} is not KEY=VALUE (e.g. -o label_key=cell_type)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


@eval_app.command("run")
@handled
def eval_run(
    task: Annotated[str, typer.Argument(help="A registered task (sclstore.tasks entry points included).")],
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE of the task's config, repeatable.")] = None,
    jobs: JobsOpt = 1,
    plot: PlotOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Run any registered task with its config fields given as KEY=VALUE."""
    opts = dict(_parse_option(o) for o in option or ())
    with _open(store, catalog) as st:
        res = st.evaluate(task, run, **opts, n_jobs=jobs, progress=not json_out)
    print_eval(res, json_out, plot)


@eval_app.command("show")
@handled
def eval_show(
    evaluation: Annotated[int, typer.Argument(help="Evaluation id (see `sclstore ls evals`).")],
    plot: PlotOpt = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Reload a cached evaluation: its table and headline (or --json), without recomputing anything."""
    with _open(store, catalog) as st:
        res = st.evaluation(evaluation)
    print_eval(res, json_out, plot)


def print_evals(st: Store, run: str | None, json_out: bool) -> None:
    """``sclstore ls evals``: every cached evaluation (of one run with --run)."""
    items = st.evaluations(run)
    if json_out:
        emit_json(items)
        return
    table = Table(title="evaluations")
    for col in ("id", "run", "task", "parameters", "created"):
        table.add_column(col)
    for e in items:
        params = ", ".join(f"{k}={v}" for k, v in e["params"].items() if k not in ("task", "version", "primary_metric") and v is not None)
        table.add_row(*(cell(x) for x in (e["id"], e["run"], e["task"], params, str(e["created_at"] or "")[:19])))
    out.print(table)


@app.command("report")
@handled
def report(
    run: Annotated[str, typer.Argument(help="Run id or dataset/model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")] = Path("report.html"),
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """A self-contained HTML report of every cached evaluation of a run (figures embedded; no JS, no Python to read)."""
    with _open(store, catalog) as st:
        path = st.report(run, output)
        n = len(st.evaluations(run))
    if json_out:
        emit_json({"path": str(path), "evaluations": n})
    else:
        out.print(f"wrote {path} ({n} evaluation(s))", markup=False)
