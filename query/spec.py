"""Frozen value objects for a parsed slice query.

:func:`sclstore.query.parse.parse_query` turns the user's SQL text into a :class:`SliceQuery`.
Nothing here knows about a store: column names are still the user's names, checked against a
dataset's obs schema only when the query is bound (:mod:`sclstore.query.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "COMPARE_OPS",
    "LAYER_COLUMNS",
    "RUN_COLUMNS",
    "VIRTUAL_COLUMNS",
    "And",
    "AvgItem",
    "Between",
    "ColumnItem",
    "Compare",
    "CompareOp",
    "CountItem",
    "EmbeddingItem",
    "InList",
    "IsNull",
    "Like",
    "Not",
    "Or",
    "OrderItem",
    "Predicate",
    "SelectItem",
    "SliceQuery",
    "StarItem",
    "Truth",
    "Value",
    "to_sql",
    "walk_columns",
]

RUN_COLUMNS: tuple[str, ...] = ("run", "dataset", "model")
"""Columns that pick the run; only ``=`` in a top-level AND conjunct."""
LAYER_COLUMNS: tuple[str, ...] = ("layer", "depth")
"""Columns that pick stored layers; only in top-level AND conjuncts."""
VIRTUAL_COLUMNS: tuple[str, ...] = (*RUN_COLUMNS, *LAYER_COLUMNS, "cell", "cell_idx", "src_idx", "embedding")
"""Columns of the ``embeddings`` table that are not obs columns (``src_idx``: the cell's row in the
ingested AnnData, its input order; an obs column of the same name takes precedence)."""

CompareOp = Literal["=", "!=", "<", "<=", ">", ">="]
COMPARE_OPS: tuple[str, ...] = get_args(CompareOp)

Value = str | int | float | bool
"""A literal in a predicate (``NULL`` only appears as :class:`IsNull`)."""


@dataclass(frozen=True)
class Compare:
    """``column <op> value``."""

    column: str
    op: CompareOp
    value: Value


@dataclass(frozen=True)
class InList:
    """``column [NOT] IN (v1, v2, ...)``."""

    column: str
    values: tuple[Value, ...]
    negate: bool = False


@dataclass(frozen=True)
class Between:
    """``column [NOT] BETWEEN low AND high`` (inclusive)."""

    column: str
    low: Value
    high: Value
    negate: bool = False


@dataclass(frozen=True)
class Like:
    """``column [NOT] LIKE pattern [ESCAPE c]``; case-sensitive on every backend."""

    column: str
    pattern: str
    negate: bool = False
    escape: str | None = None


@dataclass(frozen=True)
class IsNull:
    """``column IS [NOT] NULL``."""

    column: str
    negate: bool = False


@dataclass(frozen=True)
class Truth:
    """A bare boolean column used as a predicate (``WHERE is_doublet``)."""

    column: str


@dataclass(frozen=True)
class And:
    """Conjunction of two or more predicates."""

    items: tuple[Predicate, ...]


@dataclass(frozen=True)
class Or:
    """Disjunction of two or more predicates."""

    items: tuple[Predicate, ...]


@dataclass(frozen=True)
class Not:
    """Negation (SQL three-valued logic: ``NOT NULL`` is ``NULL``)."""

    item: Predicate


Predicate = Compare | InList | Between | Like | IsNull | Truth | And | Or | Not


@dataclass(frozen=True)
class StarItem:
    """``*``: every obs column and the embedding (default pool)."""


@dataclass(frozen=True)
class ColumnItem:
    """A plain column in the select list (an obs column or a virtual column)."""

    column: str


@dataclass(frozen=True)
class EmbeddingItem:
    """``embedding`` or ``embedding.<pool>``."""

    pool: str | None = None


@dataclass(frozen=True)
class AvgItem:
    """``AVG(embedding[.pool])``: per-group centroid."""

    pool: str | None = None


@dataclass(frozen=True)
class CountItem:
    """``COUNT(*)``: cells per group."""


SelectItem = StarItem | ColumnItem | EmbeddingItem | AvgItem | CountItem


@dataclass(frozen=True)
class OrderItem:
    """One ``ORDER BY`` key; ``nulls_first`` as written or as sqlglot's default implies."""

    column: str
    desc: bool = False
    nulls_first: bool | None = None


@dataclass(frozen=True)
class SliceQuery:
    """A validated query over the virtual ``embeddings`` table.

    Attributes
    ----------
    select
        The select list, in order.
    where
        The WHERE predicate, or ``None``.
    group_by
        ``GROUP BY`` columns (obs columns and ``layer``), in order.
    order_by
        ``ORDER BY`` keys.
    limit
        ``LIMIT n`` or ``None``.
    sql
        The original text (for messages).
    """

    select: tuple[SelectItem, ...]
    where: Predicate | None = None
    group_by: tuple[str, ...] = ()
    order_by: tuple[OrderItem, ...] = ()
    limit: int | None = None
    sql: str = ""

    @property
    def is_aggregate(self) -> bool:
        """Whether the query returns groups (GROUP BY or an aggregate in the select list)."""
        return bool(self.group_by) or any(isinstance(s, (AvgItem, CountItem)) for s in self.select)


def walk_columns(pred: Predicate) -> list[str]:
    """Every column name a predicate references, in order of appearance."""
    if isinstance(pred, (And, Or)):
        return [c for item in pred.items for c in walk_columns(item)]
    if isinstance(pred, Not):
        return walk_columns(pred.item)
    return [pred.column]


def _quote_ident(name: str) -> str:
    if name.isidentifier() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def _quote_value(value: Value) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def to_sql(pred: Predicate) -> str:
    """Render a predicate back to query text (for messages and tests; never executed)."""
    if isinstance(pred, (And, Or)):
        word = " AND " if isinstance(pred, And) else " OR "
        return "(" + word.join(to_sql(p) for p in pred.items) + ")"
    if isinstance(pred, Not):
        return f"NOT {to_sql(pred.item)}"
    col = _quote_ident(pred.column)
    if isinstance(pred, Compare):
        return f"{col} {pred.op} {_quote_value(pred.value)}"
    if isinstance(pred, InList):
        return f"{col} {'NOT IN' if pred.negate else 'IN'} ({', '.join(_quote_value(v) for v in pred.values)})"
    if isinstance(pred, Between):
        word = "NOT BETWEEN" if pred.negate else "BETWEEN"
        return f"{col} {word} {_quote_value(pred.low)} AND {_quote_value(pred.high)}"
    if isinstance(pred, Like):
        esc = f" ESCAPE {_quote_value(pred.escape)}" if pred.escape is not None else ""
        return f"{col} {'NOT LIKE' if pred.negate else 'LIKE'} {_quote_value(pred.pattern)}{esc}"
    if isinstance(pred, IsNull):
        return f"{col} IS {'NOT ' if pred.negate else ''}NULL"
    return col
