"""Row output for the CLI (``--csv``, ``--tsv``, ``--nl``), untruncated tables when piped, and
the interactive preview of a query's first rows."""

import csv
import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["CsvOpt", "NlOpt", "TsvOpt", "cell", "emit_rows", "preview_table", "print_table", "row_format"]

CsvOpt = Annotated[bool, typer.Option("--csv", help="Print rows as CSV on stdout.")]
TsvOpt = Annotated[bool, typer.Option("--tsv", help="Print rows as tab-separated values on stdout.")]
NlOpt = Annotated[bool, typer.Option("--nl", help="Print rows as newline-delimited JSON on stdout.")]


def row_format(csv_out: bool, tsv_out: bool, nl_out: bool, json_out: bool = False) -> str | None:
    """The one row format asked for (``csv``, ``tsv``, ``nl``) or None; two at once is an error."""
    chosen = [name for name, on in (("csv", csv_out), ("tsv", tsv_out), ("nl", nl_out), ("json", json_out)) if on]
    if len(chosen) > 1:
        from sclstore.store.errors import InvalidInputError

        raise InvalidInputError(f"choose one output format, got {', '.join('--' + c for c in chosen)}")
    return chosen[0] if chosen and chosen[0] != "json" else None


def emit_rows(fmt: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], records: Sequence[dict[str, Any]] | None = None) -> None:
    """Write rows to stdout as ``csv``/``tsv`` (``columns`` header), or ``nl`` (one JSON object per
    line: ``records`` when given, else the rows keyed by ``columns``)."""
    if fmt == "nl":
        for rec in records if records is not None else [dict(zip(columns, row, strict=True)) for row in rows]:
            sys.stdout.write(json.dumps(rec, default=str) + "\n")
        return
    writer = csv.writer(sys.stdout, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])


def _stdout_console() -> Console:
    # piped or redirected: no terminal width, so never cut or wrap table cells
    return Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def cell(value: Any) -> Text:
    """A table cell shown exactly as written: rich markup (``[bold]``) and emoji codes (``:x:``) in
    users' names and obs values are not interpreted."""
    return Text(str(value))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on stdout; full width (no truncation) when stdout is not a terminal."""
    table = Table(title=title)
    for col in columns:
        table.add_column(cell(col), overflow="fold")
    for row in rows:
        table.add_row(*[cell(x) for x in row])
    _stdout_console().print(table)


def preview_table(res: Any, n: int = 10, dims: int = 4) -> Table:
    """The first ``n`` rows of a query result (input order): cell, src_idx, obs, first dims."""
    part = res.in_order("input")
    table = Table(title=f"first {min(n, part.n_rows)} of {part.n_rows} rows")
    obs_cols = [str(c) for c in part.obs.columns][:6]
    cols = ["cell", *(["src_idx"] if part.src_idx is not None else []), *obs_cols]
    emb = None
    if getattr(part, "pool", None) is not None and part.n_rows:
        first = next(iter(part.iter_blocks(chunk_cells=n)))[2]
        emb = first[:n]
        pool, layer = part.block_label(0)
        cols += [f"L{layer} {pool}[{j}]" for j in range(min(dims, part.dim))]
    for c in cols:
        table.add_column(cell(c))
    for i in range(min(n, part.n_rows)):
        row = [part.obs.index[i]]
        if part.src_idx is not None:
            row.append(part.src_idx[i])
        row += [part.obs[c].iloc[i] for c in part.obs.columns[:6]]
        if emb is not None:
            row += [f"{v:.4g}" for v in emb[i, :dims]]
        table.add_row(*[cell(x) for x in row])
    return table
