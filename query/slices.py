"""The programmatic slice API: build a :class:`~sclstore.query.spec.SliceQuery` from Python values
(no SQL text is generated or parsed) and run it with :func:`sclstore.query.execute`.

Values only ever reach the catalog as bound parameters, exactly as parsed queries' do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sclstore.store.errors import InvalidQueryError

from .spec import (
    And,
    AvgItem,
    ColumnItem,
    Compare,
    CountItem,
    EmbeddingItem,
    InList,
    OrderItem,
    Predicate,
    SelectItem,
    SliceQuery,
    Value,
    to_sql,
)

__all__ = ["cells_query", "centroids_query"]


def _where(run: int, layers: Sequence[int] | None, where: Mapping[str, Value | Sequence[Value]] | None) -> Predicate:
    terms: list[Predicate] = [Compare("run", "=", int(run))]
    if layers is not None:
        layers = [int(x) for x in layers]
        if not layers:
            raise InvalidQueryError("layers=[] selects nothing: pass None for every stored layer")
        terms.append(Compare("layer", "=", layers[0]) if len(layers) == 1 else InList("layer", tuple(layers)))
    for column, value in (where or {}).items():
        if isinstance(value, (list, tuple)):
            terms.append(InList(str(column), tuple(value)))
        else:
            terms.append(Compare(str(column), "=", value))  # type: ignore[arg-type]
    return And(tuple(terms))


def _text(select: str, pred: Predicate, tail: str = "") -> str:
    return f"SELECT {select} FROM embeddings WHERE {to_sql(pred)}{tail}"


def cells_query(
    run: int,
    *,
    layers: Sequence[int] | None = None,
    pool: str | None = None,
    where: Mapping[str, Value | Sequence[Value]] | None = None,
    columns: Sequence[str] = (),
) -> SliceQuery:
    """Embeddings of every cell matching ``where`` (column = value, or column IN values), in cell order.

    Parameters
    ----------
    run
        Run id.
    layers
        Stored layer numbers (default: every stored layer).
    pool
        Pooling attribute (default: the run's first).
    where
        Obs column equalities, ANDed; a list or tuple value means ``IN``.
    columns
        Obs columns returned next to the embeddings.
    """
    pred = _where(run, layers, where)
    select: tuple[SelectItem, ...] = (*(ColumnItem(c) for c in columns), EmbeddingItem(pool))
    text = _text(", ".join([*columns, f"embedding{'.' + pool if pool else ''}"]), pred, " ORDER BY cell_idx")
    return SliceQuery(select=select, where=pred, order_by=(OrderItem("cell_idx"),), sql=text)


def centroids_query(
    run: int, key: str, *, pool: str | None = None, layers: Sequence[int] | None = None,
    where: Mapping[str, Value | Sequence[Value]] | None = None,
) -> SliceQuery:
    """Per-``key`` group and layer: the mean embedding and the cell count (``GROUP BY key, layer``)."""
    pred = _where(run, layers, where)
    select = (ColumnItem(key), ColumnItem("layer"), AvgItem(pool), CountItem())
    text = _text(f"{key}, layer, AVG(embedding{'.' + pool if pool else ''}), COUNT(*)", pred, f" GROUP BY {key}, layer")
    return SliceQuery(select=select, where=pred, group_by=(key, "layer"), sql=text)
