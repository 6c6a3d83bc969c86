"""Bulk loading of a dataset's obs table (registration of millions of cells).

PostgreSQL gets one ``COPY ... FROM STDIN`` whose text-format payload is built column by column
(vectorised per column, rows joined in C), not row by row through the driver's adapters: that per
row Python call was the largest cost of registering 1M cells. Other dialects get a batched
``executemany`` of positional tuples straight on the driver. Either way the table is created
bare, loaded, and indexed last (one sorted index build instead of per-row index maintenance).

Table and column names are the generated ones (``obs_<hash>``, ``c0``, ...), quoted by the
dialect; values never become SQL text: they are driver parameters or COPY data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table
from sqlalchemy.schema import CreateTable

from ._lazy import lazy_module
from .obs import ObsColumn, columns_in_order

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:
    np = lazy_module("numpy")
    pd = lazy_module("pandas")

__all__ = ["copy_text_chunks", "insert_obs"]

_NULL = "\\N"
# COPY's text format: backslash, tab, newline and carriage return are written as escapes.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ESCAPE_ORDER = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))  # backslash first


def insert_obs(conn: Connection, table: Table, obs: pd.DataFrame, schema: Sequence[ObsColumn], order: np.ndarray,
               *, chunk: int = 100_000) -> None:
    """Create a dataset's obs table and bulk-load its rows inside ``conn``'s transaction.

    ``order[i]`` is the obs row of cell ``i``; ``chunk`` rows are sent per driver call.
    """
    conn.execute(CreateTable(table))
    quote = conn.dialect.identifier_preparer.quote
    names = [c.name for c in table.columns]
    target = f"{quote(table.name)} ({', '.join(quote(n) for n in names)})"
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        raw = conn.connection.driver_connection
        assert raw is not None  # an open connection always has its driver connection
        with raw.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN") as copy:
            for payload in copy_text_chunks(obs, schema, order, chunk=chunk):
                copy.write(payload)
    else:
        cols = columns_in_order(obs, schema, order)
        values = [cols[n] for n in names]
        marks = ", ".join("?" if conn.dialect.paramstyle == "qmark" else "%s" for _ in names)
        sql = f"INSERT INTO {target} VALUES ({marks})"
        for lo in range(0, len(order), chunk):
            conn.exec_driver_sql(sql, list(zip(*(v[lo : lo + chunk] for v in values), strict=True)))
    for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
        index.create(conn)


def copy_text_chunks(obs: pd.DataFrame, schema: Sequence[ObsColumn], order: np.ndarray, *,
                     chunk: int = 100_000) -> Iterator[bytes]:
    """The obs table's rows in ``cell_idx`` order as PostgreSQL ``COPY`` text-format payloads.

    Columns are ``cell_idx, cell, src_idx`` then the schema's columns, as in
    :func:`~sclstore.store.obs.build_obs_table`. Each payload holds up to ``chunk`` whole rows,
    UTF-8 encoded; missing values are ``\\N``; floats are written with ``repr`` (shortest text
    that parses back to the same double).
    """
    order = np.asarray(order, dtype=np.int64)
    cols: list[list[str]] = [
        list(map(str, range(len(order)))),
        _text(obs.index.astype(str).to_numpy(dtype=object)[order]),
        list(map(str, order.tolist())),
    ]
    cols += [_copy_column(obs[obs.columns[i]], c.kind, order) for i, c in enumerate(schema)]
    for lo in range(0, len(order), chunk):
        rows = "\n".join(map("\t".join, zip(*(c[lo : lo + chunk] for c in cols), strict=True)))
        yield (rows + "\n").encode("utf-8")


def _text(values: Any) -> list[str]:
    """Strings (or ``None``) as COPY text fields.

    Escaped in one pass over the joined text (C speed); a value holding the join's NUL
    separator (which PostgreSQL text cannot store anyway) is escaped one by one instead.
    """
    values = list(values)
    present = [v for v in values if v is not None]
    joined = "\0".join(present)
    for char, escape in _ESCAPE_ORDER:
        joined = joined.replace(char, escape)
    escaped = joined.split("\0") if present else []
    if len(escaped) != len(present):
        escaped = [v.translate(_COPY_ESCAPES) for v in present]
    if len(present) == len(values):
        return escaped
    it = iter(escaped)
    return [_NULL if v is None else next(it) for v in values]


def _copy_column(series: pd.Series, kind: str, order: np.ndarray) -> list[str]:
    """One obs column as COPY text fields in ``order``."""
    if kind == "category":
        cat = series.astype("category")
        labels = np.asarray([str(c).translate(_COPY_ESCAPES) for c in cat.cat.categories] + [_NULL], dtype=object)
        codes = cat.cat.codes.to_numpy()[order]
        return labels[np.where(codes < 0, len(labels) - 1, codes)].tolist()
    missing = series.isna().to_numpy()[order]
    out = np.full(len(order), _NULL, dtype=object)
    present = ~missing
    if not present.any():
        return out.tolist()
    kept = series.iloc[order[present]]
    if kind == "float":
        arr = kept.to_numpy(dtype=np.float64)
        finite = np.isfinite(arr)  # infinities are stored as missing, as on every other path
        idx = np.flatnonzero(present)
        out[idx[finite]] = list(map(repr, arr[finite].tolist()))
    elif kind == "int":
        out[present] = list(map(str, kept.astype(np.int64).to_numpy().tolist()))
    elif kind == "bool":
        out[present] = np.where(kept.astype(bool).to_numpy(), "t", "f")
    else:
        out[present] = _text(str(v) for v in kept.to_numpy(dtype=object))
    return out.tolist()
