"""The ``sclstore`` command line: parse, call one Store method, render.

Every command takes ``--store`` and ``--catalog``; reporting commands take ``--json`` and then
print exactly one JSON document on stdout. Errors are one line on stderr, exit code 1.
"""

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from sclstore.api import Store, default_store_path, open_store
from sclstore.cli_rows import CsvOpt, NlOpt, TsvOpt, emit_rows, print_table, row_format
from sclstore.store import runtime
from sclstore.store.config import StoreSettings
from sclstore.store.errors import SclstoreError

# Heavy modules (torch, scanpy, anndata, TileDB, pandas, Alembic) load inside the commands that
# use them: `sclstore --help` imports typer and rich only (tests/cli/test_startup.py).

__all__ = ["app", "main"]

app = typer.Typer(
    name="sclstore",
    help="Layer-wise embedding store for single-cell foundation models: every layer, every cell, computed once.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # plain help and usage errors: typer's rich help imports rich.markdown and pygments, ~40% of
    # `sclstore --help` (issue 17: < 0.3 s); tests/cli/test_startup.py guards it
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Catalog schema (Alembic) commands.", no_args_is_help=True, rich_markup_mode=None)
eval_app = typer.Typer(help="Score every stored layer on a task.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")
app.add_typer(eval_app, name="eval")

# piped or redirected stdout has no width: never cut tables at 80 columns (issue 15.4)
out = Console(soft_wrap=True) if sys.stdout.isatty() else Console(soft_wrap=True, width=100_000)
err = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[str, typer.Option("--store", envvar="SCLSTORE_STORE", help="Store folder.", show_default=True)]
CatalogOpt = Annotated[
    str | None, typer.Option("--catalog", envvar="SCLSTORE_CATALOG", help="Catalog URL (default: SQLite inside the store).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log to stderr (-v info, -vv debug).")]
ThreadsOpt = Annotated[
    str | None,
    typer.Option("--threads", envvar=None, help="Threads for models and metrics (default: the CPUs this process may use; "
                 "$SCLSTORE_THREADS; `sclstore info` shows the policy)."),
]

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Turn SclstoreError into one stderr line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _logging(kwargs.get("verbose", 0))
        try:
            if "threads" in kwargs:  # the thread policy, checked and applied before anything starts a pool
                kwargs["threads"] = runtime.parse_threads(kwargs["threads"])
                runtime.configure(kwargs["threads"])
            return fn(*args, **kwargs)
        except SclstoreError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _logging(verbose: int) -> None:
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")


def policy_json() -> dict[str, Any] | None:
    """The thread policy the command ran under, for ``--json`` output."""
    policy = runtime.active_policy()
    return policy.to_json() if policy is not None else None


def emit_json(data: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


_tiledb_options: list[str] = []


@app.callback()
def _global_options(
    tiledb_config: Annotated[
        list[str] | None,
        typer.Option("--tiledb-config", metavar="KEY=VALUE", envvar="SCLSTORE_TILEDB_CONFIG",
                     help="TileDB setting for the store's arrays, repeatable (e.g. vfs.s3.region=eu-west-1); "
                          "also read from a [tiledb] table in sclstore.toml inside or beside the store."),
    ] = None,
) -> None:
    """Layer-wise embedding store for single-cell foundation models: every layer, every cell, computed once."""
    _tiledb_options[:] = list(tiledb_config or ())


def _settings() -> StoreSettings:
    from sclstore.store.location import parse_tiledb_options

    return StoreSettings(tiledb_config=parse_tiledb_options(_tiledb_options))


def _open(store: str, catalog: str | None, *, create: bool = False) -> Store:
    return open_store(store, catalog, create=create, settings=_settings())


# ------------------------------------------------------------------------------ store admin
@app.command()
@handled
def init(store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0) -> None:
    """Create the store, or upgrade its catalog to the newest schema."""
    from sclstore.store import catalog as catalogdb
    from sclstore.store.backend import Backend

    backend = Backend.create(store, catalog, settings=_settings())
    try:
        rev = catalogdb.current_revision(backend.engine)
        info = {"store": backend.location.uri, "catalog": catalogdb.redact(backend.catalog_url), "schema": rev}
    finally:
        backend.close()
    if json_out:
        emit_json(info)
    else:
        out.print(f"store ready at {info['store']} (catalog {info['catalog']}, schema {rev})", markup=False)


@db_app.command("upgrade")
@handled
def db_upgrade(store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0) -> None:
    """Upgrade the catalog schema to the newest revision."""
    init(store=store, catalog=catalog, json_out=json_out, verbose=verbose)


@db_app.command("current")
@handled
def db_current(store: StoreOpt = default_store_path(), catalog: CatalogOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0) -> None:
    """Show the catalog's schema revision and the newest one this sclstore knows."""
    from sclstore.store import catalog as catalogdb
    from sclstore.store.backend import MARKER, Backend
    from sclstore.store.location import StoreLocation

    loc = StoreLocation(store, _settings())
    url = catalog or Backend.default_catalog(loc)
    if catalog is None and not loc.is_file(loc.join(MARKER)):
        Backend.open(store, catalog)  # raises the "not a store" error
    engine = catalogdb.make_engine(url)
    try:
        cur, head = catalogdb.current_revision(engine), catalogdb.head_revision()
    finally:
        engine.dispose()
    if json_out:
        emit_json({"current": cur, "head": head, "up_to_date": cur == head})
    else:
        state = "up to date" if cur == head else "run `sclstore db upgrade`"
        out.print(f"catalog at {cur or '(empty)'}; head {head}: {state}", markup=False)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(x) for x in row])
    return table


def _list(store: str, catalog: str | None, what: str) -> list[Any]:
    """Datasets, models or runs (each a list of *Info); a local SQLite store is read without
    SQLAlchemy (store/listing.py), anything else through the store."""
    if catalog is None:
        from sclstore.store.listing import quick_list

        items = quick_list(store, cast("Any", what))
        if items is not None:
            return items
    with _open(store, catalog) as st:
        return cast("list[Any]", {"datasets": st.datasets, "models": st.models, "runs": st.runs}[what]())


@app.command("ls")
@handled
def ls(
    what: Annotated[str, typer.Argument(help="datasets, models, runs or evals.")] = "runs",
    run: Annotated[str | None, typer.Option("--run", help="With evals: only this run's.")] = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    tsv_out: TsvOpt = False,
    nl_out: NlOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """List what the store holds: datasets, models, runs or evals (cached evaluations)."""
    if what not in ("datasets", "models", "runs", "evals"):
        err.print(f"error: cannot list {what!r}: choose datasets, models, runs or evals", markup=False)
        raise typer.Exit(2)
    fmt = row_format(csv_out, tsv_out, nl_out, json_out)
    if what == "evals":
        with _open(store, catalog) as st:
            from sclstore.cli_eval import print_evals

            print_evals(st, run, json_out)
            return
    items = _list(store, catalog, what)
    if json_out:
        emit_json([i.to_json() for i in items])
        return
    full = fmt is not None  # machine-readable rows carry whole hashes
    if what == "datasets":
        columns = ["id", "name", "cells", "genes", "obs columns", "hash"]
        rows = [[d.id, d.name, d.n_obs, d.n_vars, ",".join(c.name for c in d.obs_schema),
                 d.content_hash if full else d.content_hash[:12]] for d in items]
    elif what == "models":
        columns = ["id", "family", "name", "blocks", "d_model", "checkpoint"]
        rows = [[m.id, m.family, m.name, m.n_layers, m.d_model, m.checkpoint_hash if full else m.checkpoint_hash[:12]] for m in items]
    else:
        columns = ["id", "dataset", "model", "status", "cells", "layers", "pools", "dtype"]
        rows = [[r.id, r.dataset_name, r.model_name, r.status, f"{r.watermark}/{r.n_cells}",
                 f"{r.layers[0]}..{r.layers[-1]} ({len(r.layers)})", ",".join(r.pools), r.dtype] for r in items]
    if fmt is not None:
        emit_rows(fmt, columns, rows, records=[i.to_json() for i in items])
    else:
        print_table(what, columns, rows)


@app.command()
@handled
def verify(
    run: Annotated[str | None, typer.Argument(help="Run id or dataset/model (default: every complete run).")] = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Check that every complete run's array exists with the catalog's shape, encoding and extent."""
    with _open(store, catalog) as st:
        reports = st.verify(run)
    bad = [r for r in reports if not r["ok"]]
    if json_out:
        emit_json({"ok": not bad, "runs": reports})
    else:
        for r in reports:
            mark = ("ok" + (", direct tile reads" if r.get("direct_reads") else "")) if r["ok"] else "PROBLEM"
            out.print(f"run {r['run']} {r['label']}: {mark}" + ("".join(f"\n  - {p}" for p in r["problems"])), markup=False)
        out.print(f"{len(reports)} run(s) checked, {len(bad)} with problems", markup=False)
    if bad:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


from sclstore import (  # noqa: E402,F401  (register info, query, eval, report and demo on `app`)
    cli_checkpoint,
    cli_eval,
    cli_info,
    cli_ingest,
    cli_work,
)

if __name__ == "__main__":  # pragma: no cover
    # `python -m sclstore.cli` (the local --devices workers): this file runs as __main__, but the
    # command modules above registered their commands on the imported sclstore.cli's app
    from sclstore.cli import main as _main

    _main()
