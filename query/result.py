"""Query results: an in-memory :class:`QueryResult` and a lazy :class:`QueryStream`.

Both expose the same description of the slice (run, pool, layers, obs, cell ids) and
:meth:`iter_blocks`, which the file writers in :mod:`sclstore.query.export` consume, so a result
too large for memory can still be written to a file one chunk at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata

    from sclstore.store.info import RunInfo

    from .plan import Backend, QueryPlan

__all__ = ["QueryResult", "QueryStream", "format_bytes", "obsm_key"]

logger = logging.getLogger(__name__)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def obsm_key(model: str, layer: int, pool: str, n_model_layers: int) -> str:
    """The AnnData ``obsm`` key of one layer, e.g. ``X_tahoe-x1_L07_cls``.

    The layer number is zero-padded to the width of the model's last layer (at least two
    digits) so keys sort in layer order; characters other than letters, digits, ``.``, ``_``
    and ``-`` in the model name become ``_``.
    """
    width = max(2, len(str(n_model_layers)))
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    return f"X_{safe}_L{layer:0{width}d}_{pool}"


class _Slice:
    """Shared description of a query's output (mixin for result and stream)."""

    run_info: RunInfo
    layers: tuple[int, ...]
    pool: str | None
    obs: pd.DataFrame
    cell_idx: np.ndarray | None
    grouped: bool
    counts: np.ndarray | None
    sql: str
    src_idx: np.ndarray | None
    query_ordered: bool
    extra_pools: tuple[str, ...]

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool in the result (``pool`` first); several with ``SELECT embedding.cls, embedding.mean``."""
        return () if self.pool is None else (self.pool, *self.extra_pools)

    @property
    def run(self) -> int:
        """The run id."""
        return int(self.run_info.id)

    @property
    def depths(self) -> tuple[float, ...]:
        """``layer / L`` of each returned layer."""
        n = self.run_info.n_model_layers
        return tuple(layer / n if n else 0.0 for layer in self.layers)

    @property
    def dim(self) -> int:
        """Embedding width (0 when no embedding is selected)."""
        return int(self.run_info.dim) if self.pool is not None else 0

    @property
    def n_rows(self) -> int:
        """Number of cells (or groups for a GROUP BY query)."""
        return int(self.obs.shape[0])

    @property
    def nbytes(self) -> int:
        """Size of the embedding block, ``n_layers * n_rows * dim * 4`` bytes."""
        return max(1, len(self.pools)) * len(self.layers) * self.n_rows * self.dim * 4

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to release: readers are opened and closed per read."""
        return None

    def obsm_keys(self) -> list[str]:
        """AnnData ``obsm`` key of each (pool, layer) block, pool-major (see :func:`obsm_key`)."""
        info = self.run_info
        return [obsm_key(info.model_name, layer, pool, info.n_model_layers) for pool in self.pools for layer in self.layers]

    def block_label(self, i: int) -> tuple[str, int]:
        """``(pool, layer)`` of block ``i`` of :meth:`iter_blocks`."""
        n = len(self.layers)
        return self.pools[i // n], self.layers[i % n]

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (what ``sclstore query --json`` prints)."""
        out: dict[str, Any] = {
            "run": self.run,
            "dataset": self.run_info.dataset_name,
            "model": self.run_info.model_name,
            "pool": self.pool,
            "pools": list(self.pools),
            "layers": list(self.layers),
            "depths": [round(d, 6) for d in self.depths],
            "grouped": self.grouped,
            "n_groups" if self.grouped else "n_cells": self.n_rows,
            "dim": self.dim,
            "shape": [len(self.layers), self.n_rows, self.dim] if self.pool is not None else None,  # per pool
            "nbytes": self.nbytes,
            "obs_columns": [str(c) for c in self.obs.columns],
        }
        hints = self.hints
        if hints:
            out["hints"] = list(hints)
        return out

    @property
    def provenance(self) -> dict[str, Any]:
        """Checkpoint hash, cache key, dataset hash, source, sclstore version (see ``read.provenance``)."""
        extra = getattr(self, "extra", None)
        return dict(extra.get("provenance", {})) if isinstance(extra, dict) else dict(getattr(self, "_provenance", {}))

    @property
    def hints(self) -> list[str]:
        """Warnings about compared values that match no cell but have near matches (see :mod:`.hints`)."""
        extra = getattr(self, "extra", None)
        return list(extra.get("hints", ())) if isinstance(extra, dict) else list(getattr(self, "_hints", ()))

    def iter_blocks(self, *, chunk_cells: int = 65_536) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(block_position, first_row, block)`` with ``block`` of shape ``(n, dim)``.

        Blocks are (pool, layer) pairs, pool-major (:meth:`block_label`; with one pool the
        position is the layer position); within a block, rows come in output order.
        """
        raise NotImplementedError

    def row_order(self, order: str = "input") -> np.ndarray | None:
        """The permutation that puts rows in ``order``, or ``None`` to keep them as they are.

        ``"input"`` (the default of :meth:`QueryResult.to_anndata` and every export): the rows of
        the ingested AnnData (ascending ``src_idx``), unless the query has its own ``ORDER BY``
        on cells, which is kept. ``"store"``: as the query returned them (the store's cell order,
        which differs from the input order after ``cluster_by``).

        Raises
        ------
        InvalidInputError
            For another ``order``.
        """
        from sclstore.store.errors import InvalidInputError

        if order not in ("input", "store"):
            raise InvalidInputError(f"unknown row order {order!r}: use 'input' (the AnnData's rows) or 'store'")
        if order == "store" or self.grouped or self.src_idx is None or self.query_ordered:
            return None
        src = np.asarray(self.src_idx, dtype=np.int64)
        if src.size < 2 or bool(np.all(src[1:] > src[:-1])):
            return None
        return np.argsort(src, kind="stable")

    def in_order(self, order: str = "input") -> _Slice:
        """This slice with its rows in ``order`` (see :meth:`row_order`); itself when already so."""
        perm = self.row_order(order)
        return self if perm is None else self._take(perm)

    def _take(self, perm: np.ndarray) -> _Slice:
        raise NotImplementedError

    def _index_columns(self) -> dict[str, np.ndarray]:
        """``cell_idx`` and ``src_idx`` columns added to exported obs (when not obs columns)."""
        cols: dict[str, np.ndarray] = {}
        if self.cell_idx is not None and "cell_idx" not in self.obs:
            cols["cell_idx"] = np.asarray(self.cell_idx, dtype=np.int64)
        if self.src_idx is not None and "src_idx" not in self.obs:
            cols["src_idx"] = np.asarray(self.src_idx, dtype=np.int64)
        return cols


@dataclass(frozen=True, eq=False)
class QueryResult(_Slice):
    """The answer to a slice query, held in memory.

    Attributes
    ----------
    embeddings
        float32 ``(n_layers, n_cells, dim)`` (for a GROUP BY query ``(n_layers, n_groups, dim)``
        centroids); ``None`` when the select list has no ``embedding``/``AVG(embedding)``.
    layers
        Stored layer numbers along axis 0 (``depths`` gives ``layer / L``).
    obs
        The selected cells' metadata: index = cell names, original obs column names and
        dtypes (categoricals as pandas categoricals). For a GROUP BY query one row per group
        with the group columns and ``count`` (if ``COUNT(*)`` was selected).
    cell_idx
        int64 positions of the cells in the run's arrays (``None`` for GROUP BY queries).
    src_idx
        int64 rows of the cells in the ingested AnnData (``None`` for GROUP BY queries); rows
        come in store order, ``to_anndata()`` and the exports put them in this input order.
    run_info
        The run the query pinned (``run`` is its id).
    pool
        The pooling that was read (``None`` without an embedding).
    grouped, counts
        Whether this is a GROUP BY result, and the cells per group.

    Notes
    -----
    Memory: ``nbytes`` (``n_layers * n_cells * dim * 4``) for the embeddings, checked against
    the store's memory budget before anything is read, plus the obs frame. The result owns
    plain numpy/pandas objects and is safe to share read-only between threads. It is also a
    (no-op) context manager, like :class:`QueryStream`.
    """

    run_info: RunInfo
    layers: tuple[int, ...]
    pool: str | None
    obs: pd.DataFrame
    embeddings: np.ndarray | None
    cell_idx: np.ndarray | None = None
    grouped: bool = False
    counts: np.ndarray | None = None
    sql: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    src_idx: np.ndarray | None = None
    query_ordered: bool = False
    extra_pools: tuple[str, ...] = ()
    extra_embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def pool_embeddings(self, pool: str) -> np.ndarray:
        """The ``(n_layers, n_rows, dim)`` array of one selected pool."""
        from sclstore.store.errors import NotFoundError

        if pool == self.pool and self.embeddings is not None:
            return self.embeddings
        if pool in self.extra_embeddings:
            return self.extra_embeddings[pool]
        raise NotFoundError(f"pool {pool!r} is not in this result; it has pools {list(self.pools)}")

    def __repr__(self) -> str:
        what = f"{self.n_rows} groups" if self.grouped else f"{self.n_rows} cells"
        return (
            f"<QueryResult run {self.run} ({self.run_info.dataset_name}/{self.run_info.model_name}) "
            f"{what} x layers {list(self.layers)} pool={self.pool} dim={self.dim}>"
        )

    def layer(self, layer: int) -> np.ndarray:
        """The ``(n_cells, dim)`` matrix of one stored layer.

        Raises
        ------
        NotFoundError
            If the layer is not part of this result.
        """
        from sclstore.store.errors import NotFoundError

        if self.embeddings is None:
            raise NotFoundError("this result has no embeddings; select `embedding` in the query")
        if layer not in self.layers:
            raise NotFoundError(f"layer {layer} is not in this result; it has layers {list(self.layers)}")
        return self.embeddings[self.layers.index(layer)]

    def iter_blocks(self, *, chunk_cells: int = 65_536) -> Iterator[tuple[int, int, np.ndarray]]:
        if self.embeddings is None:
            return
        n = len(self.layers)
        for k, pool in enumerate(self.pools):
            arr = self.pool_embeddings(pool)
            for j in range(n):
                for lo in range(0, self.n_rows, chunk_cells):
                    yield k * n + j, lo, arr[j, lo : lo + chunk_cells]
                if self.n_rows == 0:
                    yield k * n + j, 0, arr[j, :0]

    def _take(self, perm: np.ndarray) -> QueryResult:
        return QueryResult(
            run_info=self.run_info, layers=self.layers, pool=self.pool, obs=self.obs.iloc[perm],
            embeddings=None if self.embeddings is None else self.embeddings[:, perm],
            cell_idx=None if self.cell_idx is None else np.asarray(self.cell_idx)[perm], grouped=self.grouped,
            counts=None if self.counts is None else np.asarray(self.counts)[perm], sql=self.sql, extra=dict(self.extra),
            src_idx=None if self.src_idx is None else np.asarray(self.src_idx)[perm], query_ordered=self.query_ordered,
            extra_pools=self.extra_pools, extra_embeddings={p: a[:, perm] for p, a in self.extra_embeddings.items()},
        )

    def to_anndata(self, *, order: str = "input") -> anndata.AnnData:
        """An AnnData with ``obs`` and one ``obsm`` matrix per layer.

        Rows follow the ingested AnnData (``order="input"``, the default; an explicit ``ORDER BY``
        in the query is kept) or the store's cell order (``order="store"``). ``obs`` gets
        ``cell_idx`` (store position) and ``src_idx`` (input row) columns.

        Keys look like ``X_<model>_L07_<pool>`` (see :func:`obsm_key`), so
        ``sc.pp.neighbors(adata, use_rep="X_tahoe-x1_L07_cls")`` works directly. ``X`` is empty
        (zero genes); ``uns["sclstore"]`` records run, dataset, model, pool, layers, depths and
        the query text.

        Examples
        --------
        >>> adata = store.query("SELECT * FROM embeddings WHERE run = 1 AND layer = 7").to_anndata()  # doctest: +SKIP
        >>> adata.obsm["X_tahoe-x1_L07_cls"].shape  # doctest: +SKIP
        (5000, 512)
        """
        import anndata as ad

        res = self.in_order(order)
        if res is not self:
            assert isinstance(res, QueryResult)  # in_order returns self or a same-class copy
            return res.to_anndata(order="store")
        obs = self.obs.copy()
        obs.index = obs.index.astype(str)
        if not obs.index.is_unique:  # group labels can collide; keep AnnData happy
            obs.index = pd.Index([f"{name}-{i}" for i, name in enumerate(obs.index)])
        adata = ad.AnnData(obs=obs)
        if self.embeddings is not None:
            keys = iter(self.obsm_keys())
            for pool in self.pools:
                for block in self.pool_embeddings(pool):
                    adata.obsm[next(keys)] = np.asarray(block)
        for name, values in self._index_columns().items():
            adata.obs[name] = values
        if self.counts is not None and "count" not in obs:
            adata.obs["n_cells"] = np.asarray(self.counts, dtype=np.int64)
        adata.uns["sclstore"] = _uns(self)
        return adata


def _uns(s: _Slice) -> dict[str, Any]:
    """``uns["sclstore"]``: the slice (run, model, layers, pools, query) and its provenance
    (checkpoint hash, cache key, dataset hash, source, sclstore version)."""
    info = s.run_info
    prov = s.provenance
    return {
        **{k: (np.asarray(v, dtype=np.int64) if k in ("stored_layers",) else v) for k, v in prov.items()},
        "run": int(info.id),
        "dataset": info.dataset_name,
        "model": info.model_name,
        "family": info.family,
        "pool": s.pool or "",
        "pools": list(s.pools),
        "layers": np.asarray(s.layers, dtype=np.int64),
        "depths": np.asarray(s.depths, dtype=np.float64),
        "obsm_keys": list(s.obsm_keys()),
        "query": s.sql,
    }


class QueryStream(_Slice):
    """A cell-level query whose cells are resolved but whose embeddings are not read yet.

    Obtained from :func:`sclstore.query.open_query`. ``iter_blocks`` reads one layer × one
    chunk of cells at a time, so memory stays at ``chunk_cells * dim * 4`` bytes however big
    the slice is; :meth:`materialize` loads everything (subject to the memory budget).

    Not thread-safe: the stream opens a reader on the run's array for each iteration.
    """

    def __init__(
        self, backend: Backend, plan: QueryPlan, cell_idx: np.ndarray, obs: pd.DataFrame, budget: int,
        *, src_idx: np.ndarray | None = None,
    ) -> None:
        self.backend = backend
        self.plan = plan
        self.run_info = plan.run
        self.layers = plan.layers
        self.pool = plan.pool
        self.obs = obs
        self.cell_idx = cell_idx
        self.grouped = False
        self.counts = None
        self.sql = plan.query.sql
        self.budget = budget
        self.src_idx = src_idx
        self.query_ordered = bool(plan.order_by)
        self.extra_pools = tuple(plan.extra_pools)
        self._hints: list[str] = []
        self._provenance: dict[str, Any] = {}

    def _take(self, perm: np.ndarray) -> QueryStream:
        out = QueryStream(
            self.backend, self.plan, np.asarray(self.cell_idx)[perm], self.obs.iloc[perm], self.budget,
            src_idx=None if self.src_idx is None else np.asarray(self.src_idx)[perm],
        )
        out._hints = list(self._hints)
        out._provenance = dict(self._provenance)
        return out

    def __repr__(self) -> str:
        return (
            f"<QueryStream run {self.run} {self.n_rows} cells x layers {list(self.layers)} pool={self.pool} "
            f"({format_bytes(self.nbytes)})>"
        )

    def iter_blocks(self, *, chunk_cells: int = 65_536) -> Iterator[tuple[int, int, np.ndarray]]:
        if self.pool is None:
            return
        cells = np.asarray(self.cell_idx, dtype=np.int64)
        n = len(self.plan.slots)
        with self.backend.open_reader(self.run_info) as reader:
            for k, pool in enumerate(self.pools):
                for j, slot in enumerate(self.plan.slots):
                    i = k * n + j
                    if cells.size == 0:
                        yield i, 0, np.empty((0, self.dim), dtype=np.float32)
                    for lo in range(0, cells.size, chunk_cells):
                        part = cells[lo : lo + chunk_cells]
                        order = np.argsort(part, kind="stable")
                        block = reader.read([slot], part[order], pool)[0]
                        out = np.empty_like(block)
                        out[order] = block
                        yield i, lo, out

    def materialize(self) -> QueryResult:
        """Read everything into a :class:`QueryResult`.

        Raises
        ------
        QueryTooLargeError
            If the slice is larger than the memory budget.
        """
        from dataclasses import replace

        from .read import check_budget, read_cells

        check_budget(self.plan, self.n_rows, self.budget)
        assert self.cell_idx is not None  # a stream always has resolved cells (set in __init__)
        emb = read_cells(self.backend, self.plan, self.cell_idx) if self.pool is not None else None
        more = {p: read_cells(self.backend, replace(self.plan, pool=p), self.cell_idx) for p in self.extra_pools}
        return QueryResult(
            run_info=self.run_info, layers=self.layers, pool=self.pool, obs=self.obs, embeddings=emb,
            cell_idx=self.cell_idx, sql=self.sql, src_idx=self.src_idx, query_ordered=self.query_ordered,
            extra_pools=self.extra_pools, extra_embeddings=more,
            extra={"provenance": dict(self._provenance), **({"hints": list(self._hints)} if self._hints else {})},
        )
