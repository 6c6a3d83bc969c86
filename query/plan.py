"""Bind a parsed query to one run: pin the run, pick layers and pool, check columns.

The planner splits the WHERE clause into its top-level AND conjuncts. Conjuncts on ``run``,
``dataset`` and ``model`` pin the run; conjuncts on ``layer`` and ``depth`` pick stored layers;
everything else is an obs predicate that later runs in the catalog database. ``run``,
``dataset``, ``model``, ``layer`` and ``depth`` may not appear under ``OR`` or ``NOT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sclstore.store.errors import InvalidQueryError, NotFoundError, RunNotFoundError

from .compile import BoundColumn, resolve_column
from .spec import (
    LAYER_COLUMNS,
    RUN_COLUMNS,
    And,
    AvgItem,
    Between,
    ColumnItem,
    Compare,
    CountItem,
    EmbeddingItem,
    InList,
    Not,
    Or,
    OrderItem,
    Predicate,
    SliceQuery,
    StarItem,
    to_sql,
    walk_columns,
)

if TYPE_CHECKING:
    from sclstore.store.info import DatasetInfo, ModelInfo, RunInfo

__all__ = ["Backend", "QueryPlan", "RunReader", "plan_query", "select_layers", "split_where"]

logger = logging.getLogger(__name__)


class RunReader(Protocol):
    """What the planner needs from :meth:`Backend.open_reader` (see ``sclstore.store``)."""

    def read(self, slots: Sequence[int], cells: np.ndarray | None, pool: str) -> np.ndarray: ...

    def iter_chunks(
        self, slots: Sequence[int], cells: np.ndarray | None, pool: str, *, chunk_cells: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class Backend(Protocol):
    """The part of ``sclstore.store.Backend`` the query layer uses."""

    settings: Any

    def get_run(self, run: int | str) -> RunInfo: ...

    def list_runs(
        self, *, dataset: str | None = None, model: str | None = None, status: str | None = "complete"
    ) -> list[RunInfo]: ...

    def list_models(self) -> list[ModelInfo]: ...

    def get_model(self, model_id: int) -> ModelInfo: ...

    def get_dataset(self, dataset: int | str) -> DatasetInfo: ...

    def obs_index(self, dataset: Any) -> Any: ...

    def open_reader(self, run: Any) -> AbstractContextManager[RunReader]: ...


@dataclass(frozen=True)
class QueryPlan:
    """A query bound to one run and dataset; everything :mod:`sclstore.query.read` needs.

    Attributes
    ----------
    run, dataset
        The pinned run and its dataset.
    layers, slots
        Stored layers in output order and their array slots.
    pool
        Pooling attribute read (``None`` if no embedding is selected).
    extra_pools
        Further pools selected in the same query (cell queries only), in select-list order.
    obs_columns
        Obs columns (user names) returned in ``result.obs``, in order.
    where
        The obs part of the WHERE clause (``None``: every cell).
    order_by
        ORDER BY keys over obs columns, ``cell`` and ``cell_idx``.
    limit
        Cells (or groups) kept.
    aggregate
        Whether this is a GROUP BY / aggregate query.
    group_by
        Obs columns grouped on (aggregate queries).
    want_avg, want_count
        Whether ``AVG(embedding)`` / ``COUNT(*)`` are selected.
    """

    query: SliceQuery
    run: RunInfo
    dataset: DatasetInfo
    layers: tuple[int, ...]
    slots: tuple[int, ...]
    pool: str | None
    obs_columns: tuple[str, ...]
    where: Predicate | None
    order_by: tuple[OrderItem, ...]
    limit: int | None
    aggregate: bool = False
    group_by: tuple[str, ...] = ()
    want_avg: bool = False
    want_count: bool = False
    extra_pools: tuple[str, ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool read: ``pool`` then ``extra_pools`` (``SELECT embedding.cls, embedding.mean``)."""
        return () if self.pool is None else (self.pool, *self.extra_pools)

    @property
    def want_embeddings(self) -> bool:
        """Whether array data is read (cell embeddings or centroids)."""
        return self.pool is not None

    def depth(self, layer: int) -> float:
        """``layer / L`` for this run's model."""
        n = self.run.n_model_layers
        return layer / n if n else 0.0


def split_where(where: Predicate | None) -> tuple[list[Compare], list[Predicate], Predicate | None]:
    """Split WHERE into run conjuncts, layer conjuncts and the remaining obs predicate.

    Raises
    ------
    InvalidQueryError
        If ``run``/``dataset``/``model``/``layer``/``depth`` appear under OR or NOT, or are used
        with an operator they do not support, or ``embedding`` is filtered on.
    """
    if where is None:
        return [], [], None
    conjuncts = list(where.items) if isinstance(where, And) else [where]
    run_terms: list[Compare] = []
    layer_terms: list[Predicate] = []
    obs: list[Predicate] = []
    special = set(RUN_COLUMNS) | set(LAYER_COLUMNS)
    for term in conjuncts:
        cols = walk_columns(term)
        if "embedding" in cols:
            raise InvalidQueryError(
                f"`{to_sql(term)}`: embedding cannot be filtered; filter on obs columns, cell, layer or depth"
            )
        hit = sorted(special.intersection(cols))
        if not hit:
            obs.append(term)
            continue
        column = getattr(term, "column", None)
        if column is None or len(cols) != 1:
            msg = (
                f"`{to_sql(term)}`: {', '.join(hit)} may only be constrained in top-level AND conditions, "
                f"not under OR or NOT; write e.g. `run = 3 AND layer IN (6, 12) AND (<obs conditions>)`"
            )
            raise InvalidQueryError(msg)
        if column in RUN_COLUMNS:
            if not (isinstance(term, Compare) and term.op == "="):
                msg = (
                    f"`{to_sql(term)}`: {column} can only be pinned with `=` (one run per query), "
                    f"e.g. `run = 3` or `dataset = 'pbmc' AND model = 'tahoe-x1'`"
                )
                raise InvalidQueryError(msg)
            run_terms.append(term)
        else:
            if not isinstance(term, (Compare, InList, Between)):
                msg = (
                    f"`{to_sql(term)}`: {column} supports = != < <= > >= IN, NOT IN and BETWEEN with numbers, "
                    "e.g. `layer IN (6, 12)` or `depth BETWEEN 0.4 AND 0.7`"
                )
                raise InvalidQueryError(msg)
            layer_terms.append(term)
    obs_pred: Predicate | None = None if not obs else obs[0] if len(obs) == 1 else And(tuple(obs))
    return run_terms, layer_terms, obs_pred


def _describe_runs(runs: Sequence[RunInfo], limit: int = 20) -> str:
    shown = [
        f"run {r.id} ({r.dataset_name}/{r.model_name}, {len(r.layers)} layers, pools {','.join(r.pools)}, {r.status})"
        for r in runs[:limit]
    ]
    more = f"; ... {len(runs) - limit} more (`sclstore ls runs`)" if len(runs) > limit else ""
    return "; ".join(shown) + more


def pin_run(backend: Backend, terms: Sequence[Compare]) -> RunInfo:
    """Resolve ``run = …`` or ``dataset = … AND model = …`` to exactly one run.

    Raises
    ------
    InvalidQueryError
        If the query does not pin one run (the message lists the candidate runs) or the
        conditions contradict each other.
    RunNotFoundError
        If no run matches.
    """
    given: dict[str, Any] = {}
    for term in terms:
        if term.column in given and given[term.column] != term.value:
            raise InvalidQueryError(f"conflicting conditions on {term.column}: {given[term.column]!r} and {term.value!r}")
        given[term.column] = term.value
    for key in ("dataset", "model"):
        if key in given and not isinstance(given[key], str):
            raise InvalidQueryError(f"{key} is a name: write `{key} = '{given[key]}'` with quotes")
    run_value = given.get("run")
    if run_value is not None:
        if isinstance(run_value, (bool, float)):
            raise InvalidQueryError(f"run is an id or a 'dataset/model' name, got {run_value!r}")
        info = backend.get_run(run_value)
        for key, actual in (("dataset", info.dataset_name), ("model", info.model_name)):
            if key in given and given[key] != actual:
                msg = f"run {info.id} has {key} {actual!r}, not {given[key]!r}; drop the {key} condition or fix it"
                raise InvalidQueryError(msg)
        return info
    dataset, model = given.get("dataset"), given.get("model")
    runs = backend.list_runs(dataset=dataset, model=model, status="complete")
    if (dataset is not None or model is not None) and len(runs) == 1:
        return runs[0]  # `dataset = 'pbmc'` with one complete run of pbmc pins it
    if dataset is not None and model is not None and not runs:
        others = backend.list_runs(dataset=dataset, status="complete") or backend.list_runs(status="complete")
        cands = _describe_runs(others) if others else "none (ingest a dataset first)"
        raise RunNotFoundError(f"no complete run of model {model!r} on dataset {dataset!r}; complete runs: {cands}")
    if not runs:
        scope = " matching " + " and ".join(f"{k} = {v!r}" for k, v in given.items()) if given else ""
        raise RunNotFoundError(f"no complete run{scope} in the store; `sclstore ls runs` lists what there is")
    msg = (
        "the query must pin one run: add `run = N` (or `dataset = '...' AND model = '...'`); "
        f"candidates: {_describe_runs(runs)}"
    )
    raise InvalidQueryError(msg)


def _nearest(info: RunInfo, depth: float) -> int:
    n = info.n_model_layers or 1
    target = Fraction(str(depth))
    return min(info.layers, key=lambda layer: (abs(Fraction(layer, n) - target), layer))


def _number(term: Predicate, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        col = getattr(term, "column", "layer")
        raise InvalidQueryError(f"`{to_sql(term)}`: {col} is a number, not {value!r}")
    return value


def select_layers(info: RunInfo, terms: Sequence[Predicate]) -> tuple[int, ...]:
    """Stored layers of ``info`` satisfying every layer/depth conjunct, ascending.

    ``depth = d`` (and each value of ``depth IN (...)``) picks the stored layer nearest to
    ``d * L`` (the lower one on a tie); ranges keep the stored layers whose depth lies inside.

    Raises
    ------
    NotFoundError
        If ``layer = n`` / ``layer IN (...)`` names a layer that is not stored.
    InvalidQueryError
        If no stored layer satisfies the conditions, or a depth is outside 0..1.
    """
    n = info.n_model_layers or 1
    keep = set(info.layers)
    for term in terms:
        assert not isinstance(term, (And, Or, Not))  # split_where keeps only single-column leaf terms here
        column = term.column
        pos = (lambda layer: Fraction(layer)) if column == "layer" else (lambda layer: Fraction(layer, n))
        matched: set[int]
        if (isinstance(term, Compare) and term.op in ("=", "!=")) or isinstance(term, InList):
            values = [term.value] if isinstance(term, Compare) else list(term.values)
            picked: set[int] = set()
            for value in values:
                num = _number(term, value)
                if column == "depth":
                    if not 0 <= num <= 1:
                        raise InvalidQueryError(f"`{to_sql(term)}`: depth is layer / L and lies in 0..1")
                    picked.add(_nearest(info, num))
                elif num in info.layers:
                    picked.add(int(num))
                elif not (isinstance(term, InList) and term.negate) and not (isinstance(term, Compare) and term.op == "!="):
                    msg = (
                        f"layer {value} is not stored in run {info.id}; stored layers: {list(info.layers)} "
                        f"(depth = layer / {info.n_model_layers})"
                    )
                    raise NotFoundError(msg)
            negate = (isinstance(term, Compare) and term.op == "!=") or (isinstance(term, InList) and term.negate)
            matched = set(info.layers) - picked if negate else picked
        elif isinstance(term, Compare):
            bound = Fraction(str(_number(term, term.value)))
            cmp = {"<": bound.__gt__, "<=": bound.__ge__, ">": bound.__lt__, ">=": bound.__le__}[term.op]
            matched = {layer for layer in info.layers if cmp(pos(layer))}
        elif isinstance(term, Between):
            lo, hi = Fraction(str(_number(term, term.low))), Fraction(str(_number(term, term.high)))
            inside = {layer for layer in info.layers if lo <= pos(layer) <= hi}
            matched = set(info.layers) - inside if term.negate else inside
        else:  # pragma: no cover - split_where only lets the kinds above through
            raise InvalidQueryError(f"`{to_sql(term)}` is not a layer condition")
        keep &= matched
    if not keep:
        shown = " AND ".join(to_sql(t) for t in terms)
        msg = (
            f"no stored layer of run {info.id} satisfies `{shown}`; stored layers: {list(info.layers)} "
            f"(L = {info.n_model_layers}, depth = layer / L)"
        )
        raise InvalidQueryError(msg)
    return tuple(sorted(keep))


def plan_query(backend: Backend, query: SliceQuery) -> QueryPlan:
    """Bind a parsed query to a run, its dataset, layers, pool and obs columns.

    Raises
    ------
    InvalidQueryError, NotFoundError, RunNotFoundError
        See :func:`pin_run`, :func:`select_layers` and :func:`split_where`; also unknown
        columns, an unknown pool, and select/GROUP BY/ORDER BY combinations that do not make
        sense (each message says what to write instead).
    """
    run_terms, layer_terms, obs_pred = split_where(query.where)
    info = pin_run(backend, run_terms)
    if info.status != "complete":
        msg = (
            f"run {info.id} ({info.dataset_name}/{info.model_name}) is {info.status}, "
            f"not complete ({info.watermark} of {info.n_cells} cells written); wait for it or re-run the ingest"
        )
        raise InvalidQueryError(msg)
    dataset = backend.get_dataset(info.dataset_id)
    columns = _columns_for(dataset)
    layers = select_layers(info, layer_terms)

    pools = {s.pool for s in query.select if isinstance(s, (EmbeddingItem, AvgItem)) and s.pool is not None}
    want_emb = any(isinstance(s, (StarItem, EmbeddingItem)) for s in query.select) or any(
        isinstance(s, ColumnItem) and s.column == "embedding" for s in query.select
    )
    want_avg = any(isinstance(s, AvgItem) for s in query.select)
    if len(pools) > 1 and query.is_aggregate:
        msg = f"one pool per GROUP BY query, got {sorted(pools)}; run one query per pool (e.g. AVG(embedding.{sorted(pools)[0]}))"
        raise InvalidQueryError(msg)
    # pools in select-list order (embedding.cls, embedding.mean -> cls then mean)
    named = list(dict.fromkeys(s.pool for s in query.select if isinstance(s, (EmbeddingItem, AvgItem)) and s.pool is not None))
    pool: str | None = None
    extra_pools: tuple[str, ...] = ()
    if want_emb or want_avg:
        pool = named[0] if named else info.pools[0]
        extra_pools = tuple(named[1:])
        for p in (pool, *extra_pools):
            if p not in info.pools:
                raise NotFoundError(f"pool {p!r} is not stored in run {info.id}; stored pools: {list(info.pools)}")

    obs_names = {c.name for c in dataset.obs_schema}
    obs_cols: list[str] = []
    for item in query.select:
        if isinstance(item, StarItem):
            obs_cols.extend(c.name for c in dataset.obs_schema)
        elif isinstance(item, ColumnItem) and (
            item.column not in ("run", "dataset", "model", "layer", "depth", "cell", "cell_idx", "src_idx", "embedding")
            or (item.column == "src_idx" and item.column in obs_names)
        ):
            obs_cols.append(resolve_column(item.column, columns, "the select list").name)
    obs_cols = list(dict.fromkeys(obs_cols))

    order_obs: list[OrderItem] = []
    layer_desc = False
    for order in query.order_by:
        if order.column in ("layer", "depth"):
            layer_desc = order.desc
        elif order.column in ("run", "dataset", "model", "embedding"):
            raise InvalidQueryError(f"cannot ORDER BY {order.column}; order by obs columns, cell, cell_idx or layer")
        else:
            resolve_column(order.column, columns, "ORDER BY")
            order_obs.append(order)
    if layer_desc:
        layers = tuple(reversed(layers))
    slots = tuple(info.layers.index(layer) for layer in layers)
    common = dict(query=query, run=info, dataset=dataset, layers=layers, slots=slots, pool=pool, where=obs_pred, limit=query.limit,
                  extra_pools=extra_pools)

    if not query.is_aggregate:
        return QueryPlan(obs_columns=tuple(obs_cols), order_by=tuple(order_obs), **common)  # type: ignore[arg-type]

    group: list[str] = []
    for name in query.group_by:
        if name in ("layer", "depth"):
            continue
        if name in ("run", "dataset", "model", "cell", "cell_idx", "embedding") or (name == "src_idx" and name not in obs_names):
            raise InvalidQueryError(f"cannot GROUP BY {name}; group by obs columns and layer")
        group.append(resolve_column(name, columns, "GROUP BY").name)
    group = list(dict.fromkeys(group))
    by_layer = any(n in ("layer", "depth") for n in query.group_by)
    if len(layers) > 1 and not by_layer:
        msg = (
            f"an aggregate over {len(layers)} layers must be grouped by layer (embeddings of different layers "
            "live in different spaces): add `layer` to GROUP BY, or pin one layer with `layer = n`"
        )
        raise InvalidQueryError(msg)
    for item in query.select:
        if isinstance(item, (StarItem, EmbeddingItem)) or (isinstance(item, ColumnItem) and item.column == "embedding"):
            msg = "a GROUP BY query returns groups, not cells: select group columns, layer, AVG(embedding) and COUNT(*)"
            raise InvalidQueryError(msg)
        if isinstance(item, ColumnItem) and item.column not in ("run", "dataset", "model", "layer", "depth") and item.column not in group:
                msg = f"column {item.column!r} is selected but not in GROUP BY; add it to GROUP BY or drop it"
                raise InvalidQueryError(msg)
    for order in order_obs:
        if order.column not in group:
            raise InvalidQueryError(f"ORDER BY {order.column!r} in a GROUP BY query must be one of the GROUP BY columns")
    return QueryPlan(
        obs_columns=tuple(group),
        order_by=tuple(order_obs),
        aggregate=True,
        group_by=tuple(group),
        want_avg=want_avg,
        want_count=any(isinstance(s, CountItem) for s in query.select),
        **common,  # type: ignore[arg-type]
    )


def _columns_for(dataset: DatasetInfo) -> dict[str, BoundColumn]:
    """Name -> kind map used for validation before the obs table is touched."""
    cols = {
        "cell": BoundColumn("cell", None, "string"),
        "cell_idx": BoundColumn("cell_idx", None, "int"),
        "src_idx": BoundColumn("src_idx", None, "int"),
    }
    for col in dataset.obs_schema:
        cols[col.name] = BoundColumn(col.name, None, col.kind)
    return cols
