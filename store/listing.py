"""Listings of a local store's SQLite catalog through the standard library, without SQLAlchemy.

``sclstore ls`` on a laptop or a login node should answer at once; importing SQLAlchemy alone
costs more than the whole listing should (``BENCHMARKS.md``, start-up). For the common case -- a
local store with its own SQLite catalog at this code's schema revision -- the rows are read here
with :mod:`sqlite3`, read-only, and turned into the same :class:`~sclstore.store.info.DatasetInfo`,
:class:`~sclstore.store.info.ModelInfo` and :class:`~sclstore.store.info.RunInfo` objects by the
same ``from_row`` constructors the catalog repositories use (the rows are given the ORM rows'
attribute names and Python types).

Anything else -- a remote store, another catalog URL, a missing or locked file, another schema
revision, any SQLite error -- returns ``None``, and the caller opens the store the usual way, which
reports whatever is wrong in its usual words. ``tests/store/test_listing.py`` checks that both
paths list the same objects, field by field, and that the decoded columns match the ORM's types.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from .info import DatasetInfo, ModelInfo, RunInfo
from .location import MARKER, StoreLocation
from .revisions import head_revision

__all__ = ["JSON_COLUMNS", "TIME_COLUMNS", "quick_list"]

Listable = Literal["datasets", "models", "runs"]

# Columns the ORM declares as JSON and as DateTime (stored as text by SQLite); a test checks these
# against the models, so a new column cannot be decoded differently here.
JSON_COLUMNS: dict[str, frozenset[str]] = {
    "datasets": frozenset({"obs_schema", "cluster_by"}),
    "models": frozenset({"config"}),
    "runs": frozenset({"params", "layers", "pools", "stats", "unembeddable", "plan"}),
}
TIME_COLUMNS: dict[str, frozenset[str]] = {
    "datasets": frozenset({"created_at"}),
    "models": frozenset({"created_at"}),
    "runs": frozenset({"created_at", "finished_at"}),
}
_BOOL_COLUMNS = {"runs": frozenset({"shared"})}


def quick_list(store: str | os.PathLike[str], what: Listable) -> list[Any] | None:
    """The store's datasets, models or runs, oldest first; ``None`` if this path does not apply.

    Parameters
    ----------
    store
        The ``--store`` argument; only a local folder holding a store and its
        ``catalog.sqlite`` is read here.
    what
        Which listing.
    """
    path = os.fspath(store)
    if "://" in path:
        return None
    root = Path(path).expanduser()
    db = root / "catalog.sqlite"
    if not (root / MARKER).is_file() or not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        with closing(con):
            version = con.execute("SELECT version_num FROM alembic_version").fetchall()
            if version != [(head_revision(),)]:
                return None
            if what == "datasets":
                return [DatasetInfo.from_row(r) for r in _rows(con, "datasets", "SELECT * FROM datasets ORDER BY id")]
            if what == "models":
                return [ModelInfo.from_row(r) for r in _rows(con, "models", "SELECT * FROM models ORDER BY id")]
            location = StoreLocation(root)
            models = {m.id: m for m in _rows(con, "models", "SELECT * FROM models")}
            datasets = {d.id: d for d in _rows(con, "datasets", "SELECT id, name FROM datasets")}
            out = []
            for run in _rows(con, "runs", "SELECT * FROM runs ORDER BY id"):
                run.dataset, run.model = datasets[run.dataset_id], models[run.model_id]
                out.append(RunInfo.from_row(run, location.resolve(run.array_uri)))
            return out
    except (sqlite3.Error, KeyError, ValueError, TypeError):
        return None


def _rows(con: sqlite3.Connection, table: str, sql: str) -> list[Any]:
    """Rows of a constant query as objects with the ORM's attribute names and value types."""
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    js, times, bools = JSON_COLUMNS[table], TIME_COLUMNS[table], _BOOL_COLUMNS.get(table, frozenset())
    out = []
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        for name in js & row.keys():
            if row[name] is not None:
                row[name] = json.loads(row[name])
        for name in times & row.keys():
            if row[name] is not None:
                row[name] = dt.datetime.fromisoformat(row[name])
        for name in bools & row.keys():
            if row[name] is not None:
                row[name] = bool(row[name])
        out.append(SimpleNamespace(**row))
    return out
