"""The obs index of one dataset: the only code that runs SQL on a dataset's obs table.

The query layer compiles a user's predicate and ORDER BY to SQLAlchemy expressions over
:attr:`ObsIndex.table` (bound parameters only; see :mod:`sclstore.query.compile`) and hands them
here; it never holds an Engine or a connection. Catalog errors are translated into
``SclstoreError``s once, by the decorator on this class.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ._lazy import lazy_module
from ._translate import translate_errors
from .info import DatasetInfo
from .obs import build_obs_table, frame_from_rows

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:  # loaded on first use: opening a store needs neither
    np = lazy_module("numpy")
    pd = lazy_module("pandas")

__all__ = ["NAMES_CACHE_MAX_CELLS", "SELECTIONS_MAX_CELLS", "ObsIndex"]

NAMES_CACHE_MAX_CELLS = 2_000_000
"""Largest dataset whose cell names an :class:`ObsIndex` keeps in memory (~100 bytes per cell)."""
SELECTIONS_MAX_CELLS = 4_000_000
"""Cells (8 bytes each) of remembered selections an :class:`ObsIndex` keeps (see :meth:`ObsIndex.cells`)."""


@translate_errors
class ObsIndex:
    """Cell selection over one dataset's obs table.

    Parameters
    ----------
    engine
        The catalog engine (kept private to the store layer).
    dataset
        The dataset (immutable once registered).
    table
        Its obs table (``cell_idx``, ``cell``, ``src_idx`` and the generated ``c0``, ``c1``, ...).
    """

    def __init__(self, engine: Engine, dataset: DatasetInfo, table: sa.Table) -> None:
        self._engine = engine
        self.dataset = dataset
        self.table = table
        self.dialect: str = engine.dialect.name
        """``sqlite`` or ``postgresql``: predicates compile per dialect."""
        self._names: tuple[np.ndarray, np.ndarray] | None = None
        self._name_requests = 0
        self._selections: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._selected_cells = 0

    def _rows(self, stmt: sa.Select) -> list[Any]:
        with self._engine.connect() as conn:
            # raw DB-API rows: callers convert per column, much faster than per row
            return cast("list[Any]", conn.execute(stmt).cursor.fetchall())  # DB-API fetchall gives a list

    def select(
        self,
        where: Any = None,
        *,
        columns: Sequence[Any] = (),
        order_by: Sequence[Any] | None = None,
        limit: int | None = None,
        with_cell_idx: bool = True,
    ) -> list[Any]:
        """Rows ``(cell_idx, cell, src_idx, *columns)`` of the cells satisfying ``where``.

        Parameters
        ----------
        where
            A SQLAlchemy boolean expression over :attr:`table`'s columns, or ``None`` for all.
        columns
            Columns of :attr:`table` to return after ``cell``.
        order_by
            Sort keys (default: ``cell_idx``).
        limit
            At most this many rows.
        with_cell_idx
            Whether rows start with ``cell_idx``.
        """
        t = self.table
        lead = (t.c.cell_idx, t.c.cell, t.c.src_idx) if with_cell_idx else (t.c.cell, t.c.src_idx)
        stmt = sa.select(*lead, *columns)
        if where is not None:
            stmt = stmt.where(where)
        stmt = stmt.order_by(*(order_by if order_by is not None else (t.c.cell_idx,)))
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._rows(stmt)

    def cells(self, where: Any = None, *, key: Hashable | None = None) -> np.ndarray:
        """``cell_idx`` of the cells satisfying ``where``, ascending.

        Parameters
        ----------
        key
            A hashable identity of ``where`` (e.g. the query's predicate object): the answer is
            remembered under it (datasets are immutable, so it never goes stale; the least
            recently used answers are dropped beyond :data:`SELECTIONS_MAX_CELLS` cells in all).
        """
        if key is not None and key in self._selections:
            self._selections.move_to_end(key)
            return self._selections[key].copy()
        t = self.table
        stmt = sa.select(t.c.cell_idx).order_by(t.c.cell_idx)
        if where is not None:
            stmt = stmt.where(where)
        rows = self._rows(stmt)
        out = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if key is not None and out.size <= SELECTIONS_MAX_CELLS:
            self._selections[key] = out.copy()
            self._selected_cells += out.size
            while self._selected_cells > SELECTIONS_MAX_CELLS:
                self._selected_cells -= self._selections.popitem(last=False)[1].size
        return out

    def contiguous_range(self, where: Any) -> tuple[int, int] | None:
        """``(first, last)`` when ``where`` selects exactly the cells ``first..last``, else ``None``.

        One aggregate (``COUNT``, ``MIN``, ``MAX`` of ``cell_idx``): an index scan returning one row.
        """
        if where is None:
            n = int(self.dataset.n_obs)
            return (0, n - 1) if n else None
        idx = self.table.c.cell_idx
        n, lo, hi = self._rows(sa.select(sa.func.count(), sa.func.min(idx), sa.func.max(idx)).where(where))[0]
        if not n or int(hi) - int(lo) + 1 != int(n):
            return None
        return int(lo), int(hi)

    def range_rows(self, first: int, last: int, columns: Sequence[Any] = ()) -> list[Any]:
        """Rows ``(cell, src_idx, *columns)`` of cells ``first..last`` in cell order (a primary-key range scan)."""
        t = self.table
        stmt = sa.select(t.c.cell, t.c.src_idx, *columns).where(t.c.cell_idx.between(first, last)).order_by(t.c.cell_idx)
        return self._rows(stmt)

    def names(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(cell names, src_idx)`` of cells ``first..last`` from this index's in-memory copy of
        every cell's name, or ``None`` when it is not kept (then ask :meth:`range_rows`).

        The copy is made (one scan of ``cell`` and ``src_idx``) only where it costs little
        against what is asked: when the request covers at least a quarter of the cells, or from
        the second request on (a process that queries a dataset repeatedly); and never for more
        than :data:`NAMES_CACHE_MAX_CELLS` cells. Datasets are immutable, so the copy never goes stale.
        """
        kept = self._names_for(last - first + 1)
        return None if kept is None else (kept[0][first : last + 1], kept[1][first : last + 1])

    def names_of(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(cell names, src_idx)`` of ``cells`` (any order), as :meth:`names`."""
        kept = self._names_for(len(cells))
        return None if kept is None else (kept[0][cells], kept[1][cells])

    def kept_names(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Every cell's ``(name, src_idx)`` in ``cell_idx`` order if kept in memory (see
        :meth:`names`), else ``None``; nothing is fetched. Treat the arrays as read-only."""
        return self._names

    def keep_names(self, wanted: int) -> bool:
        """Note a request for ``wanted`` cells' names answered elsewhere; keep every cell's name
        if the rule of :meth:`names` says so. Returns whether they are kept now."""
        return self._names_for(wanted) is not None

    def _names_for(self, wanted: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self._names is not None:
            return self._names
        n = int(self.dataset.n_obs)
        self._name_requests += 1
        if n > NAMES_CACHE_MAX_CELLS or (4 * wanted < n and self._name_requests < 2):
            return None
        t = self.table
        rows = self._rows(sa.select(t.c.cell_idx, t.c.cell, t.c.src_idx).order_by(t.c.cell_idx))
        idx = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if len(rows) != n or not np.array_equal(idx, np.arange(n)):
            return None  # cell_idx not 0..n-1 (a damaged catalog): let the SQL path report it
        names = np.empty(n, dtype=object)
        names[:] = [r[1] for r in rows]
        src = np.fromiter((r[2] for r in rows), dtype=np.int64, count=n)
        self._names = (names, src)
        return self._names

    def distinct(self, column: Any, limit: int) -> list[Any]:
        """Up to ``limit`` distinct non-NULL values of one column of :attr:`table`."""
        return [r[0] for r in self._rows(sa.select(column).where(column.is_not(None)).distinct().limit(limit))]

    def frame(self, cells: np.ndarray | None = None) -> pd.DataFrame:
        """Obs in ``cell_idx`` order with original names and dtypes (+ ``src_idx``), of all cells or ``cells``."""
        t = self.table
        stmt = sa.select(t).order_by(t.c.cell_idx)
        if cells is not None:
            stmt = stmt.where(t.c.cell_idx.in_([int(c) for c in cells]))
        with self._engine.connect() as conn:
            # object columns: values stay the driver's Python objects (no int -> float detour for NULLs)
            df = pd.DataFrame(conn.execute(stmt).all(), columns=[c.name for c in t.columns], dtype=object)
        return frame_from_rows(df, self.dataset.obs_schema)

    def cell_order(self) -> np.ndarray:
        """``src_idx`` of every cell in ``cell_idx`` order: where each stored cell sits in the source file."""
        t = self.table
        return np.asarray([r[0] for r in self._rows(sa.select(t.c.src_idx).order_by(t.c.cell_idx))], dtype=np.int64)

    def src_range(self, lo: int, hi: int) -> np.ndarray:
        """``src_idx`` of cells ``lo..hi-1`` in cell order (a primary-key range scan: a shard's rows only)."""
        t = self.table
        stmt = sa.select(t.c.src_idx).where(t.c.cell_idx >= lo, t.c.cell_idx < hi).order_by(t.c.cell_idx)
        return np.asarray([r[0] for r in self._rows(stmt)], dtype=np.int64)

    @staticmethod
    def build_table(dataset: DatasetInfo, metadata: sa.MetaData) -> sa.Table:
        if dataset.obs_table in metadata.tables:
            return metadata.tables[dataset.obs_table]
        return build_obs_table(dataset.obs_table, dataset.obs_schema, metadata)
