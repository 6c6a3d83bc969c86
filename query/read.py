"""Execute a planned query: resolve cells in the catalog, then read the run's array.

Obs predicates, ORDER BY and LIMIT are compiled to bound SQLAlchemy expressions and run by the
store's obs index (:class:`sclstore.store.obs_index.ObsIndex`) as one SELECT on the dataset's obs
table (so its indexes are used); this layer never holds an Engine. The selected ``cell_idx`` go to the run's reader sorted and unique; the
reader coalesces them into contiguous ranges and picks range reads or a bounding read.
GROUP BY queries never hold the cells' embeddings: chunks are streamed and summed per group.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from sclstore.store._translate import catalog_errors
from sclstore.store.errors import QueryTooLargeError
from sclstore.store.obs import make_categorical

from .compile import BoundColumn, bind_columns, compile_order, compile_predicate
from .hints import value_hints
from .parse import parse_query
from .plan import Backend, QueryPlan, plan_query
from .result import QueryResult, QueryStream, format_bytes
from .spec import And, Between, Compare, OrderItem, Predicate, SliceQuery

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "check_budget",
    "contiguous_range",
    "execute_query",
    "open_query",
    "read_cells",
    "select_cells",
    "select_range",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 128 * 1024**2
"""Target size of one streamed chunk (all selected layers × chunk cells × dim, float32)."""


def _budget(backend: Backend, memory_budget: int | None) -> int:
    if memory_budget is not None:
        return int(memory_budget)
    settings = getattr(backend, "settings", None)
    return int(getattr(settings, "memory_budget_bytes", 4 * 1024**3))


def check_budget(plan: QueryPlan, n_rows: int, budget: int) -> None:
    """Refuse a result whose embedding block would exceed ``budget`` bytes.

    Raises
    ------
    QueryTooLargeError
        Stating the size, the budget and how to narrow the query.
    """
    if plan.pool is None:
        return
    itemsize = 8 if plan.aggregate else 4  # centroids accumulate in float64
    size = len(plan.pools) * len(plan.layers) * n_rows * plan.run.dim * itemsize
    if size <= budget:
        return
    what = "groups" if plan.aggregate else "cells"
    msg = (
        f"query result is {format_bytes(size)} ({len(plan.layers)} layers x {n_rows:,} {what} x {plan.run.dim} dims), "
        f"above the memory budget of {format_bytes(budget)}: pin fewer layers (e.g. `layer = {plan.layers[-1]}`), "
        "filter cells on obs columns, add LIMIT, raise memory_budget, or write it to a file "
        "(`sclstore query \"...\" -o out.npy`, which streams)"
    )
    raise QueryTooLargeError(msg)


def _frame(
    rows: list[Any], names: list[str], columns: dict[str, BoundColumn], cell_idx: np.ndarray | None = None
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """``cell_idx``, the obs DataFrame and ``src_idx`` from raw ``(cell_idx, cell, src_idx, *cols)``
    rows, or from ``(cell, src_idx, *cols)`` rows when ``cell_idx`` is already known.

    Columns get their original names and dtypes; categories are the values present in the
    selection, in the AnnData's category order (as ``Backend.read_obs`` builds them).
    """
    n = len(rows)
    lead = 2 if cell_idx is not None else 3
    if cell_idx is not None and not names:  # names and input rows only: no 2-D object array needed
        src = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        return cell_idx, pd.DataFrame(index=pd.Index([r[0] for r in rows], dtype=object)), src
    arr = np.array(rows, dtype=object) if n else np.empty((0, lead + len(names)), dtype=object)
    arr = arr.reshape(n, lead + len(names))
    if cell_idx is None:
        cell_idx = arr[:, 0].astype(np.int64)
    src_idx = arr[:, lead - 1].astype(np.int64)
    index = pd.Index(arr[:, lead - 2], dtype=object)
    data: dict[str, Any] = {}
    for j, name in enumerate(names):
        values = arr[:, lead + j]
        kind = columns[name].kind
        null = pd.isna(values)
        if kind == "category":
            data[name] = make_categorical(values, columns[name].categories, columns[name].ordered)
        elif kind == "int":
            data[name] = pd.array(values, dtype="Int64") if null.any() else values.astype(np.int64)
        elif kind == "float":
            data[name] = np.where(null, np.nan, values).astype(np.float64)
        elif kind == "bool":
            if null.any():
                data[name] = pd.array([None if v is None else bool(v) for v in values], dtype="boolean")
            else:
                data[name] = values.astype(bool)
        else:
            data[name] = values
    return cell_idx, pd.DataFrame(data, index=index, columns=names), src_idx


def _bound(backend: Backend, plan: QueryPlan) -> tuple[Any, dict[str, Any], str]:
    """The dataset's obs index, its columns bound for compiling, and its SQL dialect."""
    index = backend.obs_index(plan.dataset)
    return index, bind_columns(index.table, plan.dataset.obs_schema), index.dialect


def select_cells(
    backend: Backend, plan: QueryPlan, *, sort_by_cell: bool = False
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Run the obs part of a plan in the catalog: ``(cell_idx, obs, src_idx)`` in output order.

    Parameters
    ----------
    sort_by_cell
        Ignore ORDER BY/LIMIT and return cells ordered by ``cell_idx`` (for GROUP BY).
    """
    t0 = time.perf_counter()
    index, columns, dialect = _bound(backend, plan)
    names = list(plan.obs_columns)
    where = compile_predicate(plan.where, columns, dialect=dialect) if plan.where is not None else None
    by_cell = not names and (sort_by_cell or (not plan.order_by and plan.limit is None))
    kept = index.kept_names() if by_cell else None
    if kept is not None:  # only cell_idx from the catalog (remembered per predicate); names from the index's copy
        cell_idx = index.cells(where, key=_hashable(plan.where))
        obs = pd.DataFrame({}, index=pd.Index(kept[0][cell_idx], dtype=object), columns=[])  # as _frame builds it
        logger.debug("resolved %d cells of dataset %s in %.3f s", len(cell_idx), plan.dataset.name, time.perf_counter() - t0)
        return cell_idx, obs, kept[1][cell_idx]
    order = None if sort_by_cell else compile_order(plan.order_by, columns, dialect=dialect)
    rows = index.select(where, columns=[columns[n].sql for n in names], order_by=order,
                        limit=None if sort_by_cell else plan.limit)
    cell_idx, obs, src_idx = _frame(rows, names, {n: columns[n] for n in names})
    if by_cell:
        index.keep_names(len(rows))  # a dataset queried again keeps its names in memory
    logger.debug("resolved %d cells of dataset %s in %.3f s", len(rows), plan.dataset.name, time.perf_counter() - t0)
    return cell_idx, obs, src_idx


def _hashable(pred: Predicate | None) -> Predicate | None:
    """``pred`` itself when it can key a cache (frozen dataclasses of plain values), else ``None``."""
    try:
        hash(pred)
    except TypeError:
        return None
    return pred


def contiguous_range(backend: Backend, plan: QueryPlan, *, scan: bool = True) -> tuple[int, int] | None:
    """``(first, last)`` when the plan selects exactly the cells ``first..last``, in that order.

    One aggregate over the predicate (``COUNT``, ``MIN``, ``MAX`` of ``cell_idx``: an index
    scan that returns one row). Datasets registered with ``cluster_by`` store each metadata
    group as one run of ``cell_idx``, so filters on those columns usually qualify; the cells
    are then known before any row is fetched and the array read can start at once.

    Returns ``None`` (use :func:`select_cells`) for ORDER BY other than ``cell_idx``, LIMIT,
    an empty selection, or cells with gaps; with ``scan=False`` also for any predicate that is
    not integer bounds on ``cell_idx`` (nothing is asked of the catalog).
    """
    if plan.limit is not None or any(item.column != "cell_idx" or item.desc for item in plan.order_by):
        return None
    if plan.where is None:  # every cell: known from the catalog row, no scan
        n = int(plan.dataset.n_obs)
        return (0, n - 1) if n else None
    bounds = _cell_idx_bounds(plan.where)
    if bounds is not None:  # only integer bounds on cell_idx, which numbers the cells 0..n-1: no scan
        lo, hi = max(bounds[0], 0), min(bounds[1], int(plan.dataset.n_obs) - 1)
        return (lo, hi) if lo <= hi else None
    if not scan:
        return None
    index, columns, dialect = _bound(backend, plan)
    return index.contiguous_range(compile_predicate(plan.where, columns, dialect=dialect))


def _cell_idx_bounds(pred: Predicate) -> tuple[int, int] | None:
    """``(low, high)`` (inclusive, unclipped) when ``pred`` is only integer bounds on ``cell_idx``
    (``BETWEEN``, ``=``, ``<``, ``<=``, ``>``, ``>=`` and ``AND`` of them), else ``None``."""
    items = pred.items if isinstance(pred, And) else (pred,)
    lo, hi = -(2**62), 2**62
    for item in items:
        values: tuple[Any, ...]
        if isinstance(item, Between) and item.column == "cell_idx" and not item.negate:
            values = (item.low, item.high)
        elif isinstance(item, Compare) and item.column == "cell_idx" and item.op != "!=":
            values = (item.value,)
        else:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        if isinstance(item, Between):
            lo, hi = max(lo, int(item.low)), min(hi, int(item.high))
        else:
            v = int(item.value)
            if item.op in ("=", ">="):
                lo = max(lo, v)
            if item.op in ("=", "<="):
                hi = min(hi, v)
            if item.op == ">":
                lo = max(lo, v + 1)
            if item.op == "<":
                hi = min(hi, v - 1)
    return lo, hi


def select_range(backend: Backend, plan: QueryPlan, first: int, last: int) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """``(cell_idx, obs, src_idx)`` of the cells ``first..last`` (a :func:`contiguous_range`), in cell order.

    A primary-key range scan: the predicate is not evaluated again.
    """
    index, columns, _ = _bound(backend, plan)
    names = list(plan.obs_columns)
    kept = index.names(first, last) if not names else None
    if kept is not None:  # the index keeps every cell's name: no catalog round trip
        obs = pd.DataFrame(index=pd.Index(kept[0], dtype=object, copy=True))
        return np.arange(first, last + 1, dtype=np.int64), obs, kept[1].copy()
    rows = index.range_rows(first, last, [columns[n].sql for n in names])
    if len(rows) != last - first + 1:  # datasets are immutable: this means a damaged catalog
        from sclstore.store.errors import SclstoreError

        msg = f"obs table of dataset {plan.dataset.name!r} lacks cells in {first}..{last}: run `sclstore verify`"
        raise SclstoreError(msg)
    return _frame(rows, names, {n: columns[n] for n in names}, cell_idx=np.arange(first, last + 1, dtype=np.int64))


def _chunk_cells(plan: QueryPlan, budget: int) -> int:
    per_cell = max(1, len(plan.layers) * plan.run.dim * 4)
    return int(max(1, min(1 << 20, min(DEFAULT_CHUNK_BYTES, budget // 4) // per_cell)))


def read_cells(backend: Backend, plan: QueryPlan, cell_idx: np.ndarray) -> np.ndarray:
    """Read ``(n_layers, len(cell_idx), dim)`` float32 for cells in any order."""
    assert plan.pool is not None
    cells = np.asarray(cell_idx, dtype=np.int64)
    t0 = time.perf_counter()
    is_sorted = cells.size < 2 or bool(np.all(cells[1:] > cells[:-1]))
    order = None if is_sorted else np.argsort(cells, kind="stable")
    wanted = cells if order is None else cells[order]
    with backend.open_reader(plan.run) as reader:
        everything = wanted.size == plan.run.n_cells and (wanted.size == 0 or (wanted[0] == 0 and wanted[-1] == wanted.size - 1))
        data = reader.read(list(plan.slots), None if everything and wanted.size else wanted, plan.pool)
    if order is not None:
        for i in range(data.shape[0]):  # undo the sort one layer at a time (bounded extra memory)
            layer = np.empty_like(data[i])
            layer[order] = data[i]
            data[i] = layer
    logger.debug("read %s from run %s in %.3f s", data.shape, plan.run.id, time.perf_counter() - t0)
    return data


def _sort_groups(groups: pd.DataFrame, keys: list[OrderItem]) -> np.ndarray:
    """Stable multi-key sort of the group table with SQL NULL placement."""
    perm = np.arange(len(groups))
    for key in reversed(keys):
        col = groups[key.column].iloc[perm]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(object)
        nulls_first = key.nulls_first if key.nulls_first is not None else not key.desc
        ordered = col.reset_index(drop=True).sort_values(
            ascending=not key.desc, kind="mergesort", na_position="first" if nulls_first else "last"
        )
        perm = perm[ordered.index.to_numpy()]
    return perm


def _aggregate(backend: Backend, plan: QueryPlan, budget: int) -> QueryResult:
    cell_idx, keys, _ = select_cells(backend, plan, sort_by_cell=True)
    cols = list(plan.group_by)
    if cols:
        codes = keys.groupby(cols, sort=False, dropna=False, observed=True).ngroup().to_numpy()
        _, first = np.unique(codes, return_index=True)  # row of each group's first cell, by code
        groups = keys[cols].iloc[first].reset_index(drop=True)
    else:
        codes = np.zeros(len(cell_idx), dtype=np.int64)
        groups = pd.DataFrame(index=range(1 if len(cell_idx) else 0))
    counts_all = np.bincount(codes, minlength=len(groups)).astype(np.int64)
    default = [OrderItem(c) for c in cols]
    perm = _sort_groups(groups, [*plan.order_by, *default]) if cols else np.arange(len(groups))
    if plan.limit is not None:
        perm = perm[: plan.limit]
    rank = np.full(len(groups), -1, dtype=np.int64)
    rank[perm] = np.arange(len(perm))
    groups = groups.iloc[perm].reset_index(drop=True)
    counts = counts_all[perm]
    check_budget(plan, len(groups), budget)
    cell_rank = rank[codes] if len(codes) else codes
    keep = cell_rank >= 0
    cells, cell_rank = cell_idx[keep], cell_rank[keep]

    centroids: np.ndarray | None = None
    if plan.pool is not None:
        from scipy import sparse

        n_groups = len(groups)
        sums = np.zeros((len(plan.layers), n_groups, plan.run.dim), dtype=np.float64)
        if cells.size:
            with backend.open_reader(plan.run) as reader:
                chunks = reader.iter_chunks(list(plan.slots), cells, plan.pool, chunk_cells=_chunk_cells(plan, budget))
                pos = 0
                for part, block in chunks:
                    r = cell_rank[pos : pos + part.size]
                    pos += part.size
                    onehot = sparse.csr_matrix((np.ones(part.size), (r, np.arange(part.size))), shape=(n_groups, part.size))
                    for i in range(block.shape[0]):
                        sums[i] += onehot @ block[i].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            centroids = (sums / np.maximum(counts, 1)[None, :, None]).astype(np.float32)
    obs = groups.copy()
    if plan.want_count:
        obs["count"] = counts
    labels = ["|".join("NA" if pd.isna(v) else str(v) for v in row) for row in groups.itertuples(index=False)] if cols else ["all"] * len(groups)
    obs.index = pd.Index(labels, dtype=object)
    return QueryResult(
        run_info=plan.run, layers=plan.layers, pool=plan.pool, obs=obs, embeddings=centroids,
        grouped=True, counts=counts, sql=plan.query.sql,
    )


@functools.cache
def _sclstore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sclstore")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def provenance(backend: Backend, plan: QueryPlan) -> dict[str, Any]:
    """What exports record in ``uns["sclstore"]`` besides the slice: where the numbers came from."""
    run = plan.run
    model = backend.get_model(run.model_id)
    params = run.params or {}
    return {
        "checkpoint_hash": model.checkpoint_hash,
        "cache_key": run.cache_key,
        "dataset_hash": plan.dataset.content_hash,
        "source_path": plan.dataset.source_path or "",
        "counts": str(params.get("counts", "X")),
        "seed": int(params.get("seed", 0) or 0),
        "dtype": run.dtype,
        "precision": str(params.get("precision", "")),
        "stored_pools": list(run.pools),
        "stored_layers": list(run.layers),
        "n_model_layers": int(run.n_model_layers),
        "sclstore_version": _sclstore_version(),
    }


def _prepare(backend: Backend, sql: str | SliceQuery) -> QueryPlan:
    query = sql if isinstance(sql, SliceQuery) else parse_query(sql)
    plan = plan_query(backend, query)
    logger.info(
        "query on run %s: layers %s, pool %s, %s", plan.run.id, list(plan.layers), plan.pool,
        "grouped" if plan.aggregate else "cells",
    )
    return plan


@catalog_errors
def execute_query(backend: Backend, sql: str | SliceQuery, *, memory_budget: int | None = None) -> QueryResult:
    """Run a slice query and return its result in memory.

    Parameters
    ----------
    backend
        An open :class:`sclstore.store.Backend`.
    sql
        ``SELECT ... FROM embeddings WHERE run = N ...`` (see ``DESIGN.md``), or a
        :class:`SliceQuery` built in Python (:mod:`sclstore.query.slices`): nothing is parsed.
    memory_budget
        Largest embedding block materialised, in bytes (default: the store's
        ``settings.memory_budget_bytes``).

    Returns
    -------
    QueryResult
        Embeddings ``(n_layers, n_cells, dim)`` in output order, layers, obs and cell ids; for
        a GROUP BY query, per-group centroids and counts.

    Raises
    ------
    InvalidQueryError
        If the query is not valid (message names the offending part).
    QueryTooLargeError
        If the result exceeds the memory budget (use :func:`open_query` + ``write_result``).
    RunNotFoundError, NotFoundError
        If the run, a layer or a pool does not exist.

    Examples
    --------
    >>> res = execute_query(backend, "SELECT * FROM embeddings WHERE run = 1 AND layer = 7")  # doctest: +SKIP
    >>> res.embeddings.shape  # doctest: +SKIP
    (1, 5000, 512)
    """
    budget = _budget(backend, memory_budget)
    plan = _prepare(backend, sql)
    if plan.aggregate:
        res = _aggregate(backend, plan, budget)
        res.extra.update({"hints": value_hints(backend, plan, empty=res.n_rows == 0)} if plan.where is not None else {})
        res.extra["provenance"] = provenance(backend, plan)
        return res
    # with every cell's name in memory, select_cells costs one cell_idx lookup: a range scan first would only add one
    in_memory = not plan.obs_columns and backend.obs_index(plan.dataset).kept_names() is not None
    span = contiguous_range(backend, plan, scan=not in_memory) if plan.pool is not None else None
    if span is not None:
        # the cells are known: read the array in a thread (libtiledb releases the GIL) while
        # this thread fetches their names and metadata from the catalog
        first, last = span
        check_budget(plan, last - first + 1, budget)
        cells = np.arange(first, last + 1, dtype=np.int64)
        if in_memory:
            cell_idx, obs, src_idx = select_range(backend, plan, first, last)  # in memory: nothing to overlap
            emb: np.ndarray | None = read_cells(backend, plan, cells)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sclstore-read") as pool:
                reading = pool.submit(read_cells, backend, plan, cells)
                cell_idx, obs, src_idx = select_range(backend, plan, first, last)
                emb = reading.result()
    else:
        cell_idx, obs, src_idx = select_cells(backend, plan)
        check_budget(plan, len(cell_idx), budget)
        emb = read_cells(backend, plan, cell_idx) if plan.pool is not None else None
    more = {p: read_cells(backend, replace(plan, pool=p), cell_idx) for p in plan.extra_pools}
    hints = value_hints(backend, plan, empty=len(cell_idx) == 0)
    return QueryResult(
        run_info=plan.run, layers=plan.layers, pool=plan.pool, obs=obs, embeddings=emb, cell_idx=cell_idx, sql=plan.query.sql or str(sql),
        src_idx=src_idx, query_ordered=bool(plan.order_by), extra_pools=plan.extra_pools, extra_embeddings=more,
        extra={"provenance": provenance(backend, plan), **({"hints": hints} if hints else {})},
    )


@catalog_errors
def open_query(backend: Backend, sql: str | SliceQuery, *, memory_budget: int | None = None) -> QueryResult | QueryStream:
    """Resolve a query's cells without reading embeddings, for streaming to a file.

    Cell-level queries give a :class:`QueryStream` (read chunk by chunk by
    :func:`sclstore.query.export.write_result`); GROUP BY queries are computed at once
    (streaming over cells) and give a :class:`QueryResult`.

    Raises
    ------
    InvalidQueryError, QueryTooLargeError, RunNotFoundError, NotFoundError
        As :func:`execute_query` (only centroid tables are checked against the budget).
    """
    budget = _budget(backend, memory_budget)
    plan = _prepare(backend, sql)
    if plan.aggregate:
        res = _aggregate(backend, plan, budget)
        res.extra["provenance"] = provenance(backend, plan)
        return res
    cell_idx, obs, src_idx = select_cells(backend, plan)
    stream = QueryStream(backend, plan, cell_idx, obs, budget, src_idx=src_idx)
    stream._hints = value_hints(backend, plan, empty=len(cell_idx) == 0)
    stream._provenance = provenance(backend, plan)
    return stream
