"""Compile obs predicates and ORDER BY keys to bound SQLAlchemy expressions.

User values only ever become bound parameters (:func:`sqlalchemy.literal`); column names are
looked up in the dataset's obs schema and mapped to the generated SQL columns (``c0``, ``c1``,
...). Semantics are the same on SQLite and PostgreSQL:

* comparisons follow SQL three-valued logic (a NULL never satisfies ``=``, ``!=`` or ``NOT``);
* ``LIKE`` is case-sensitive, ``%`` and ``_`` are the only wildcards and there is no escape
  character unless ``ESCAPE`` names one (on SQLite it runs as ``GLOB``, on PostgreSQL as
  ``LIKE ... ESCAPE '\\'``);
* strings compare and sort by code point (PostgreSQL uses ``COLLATE "C"``);
* ``ORDER BY`` places NULLs first for ascending and last for descending keys unless
  ``NULLS FIRST``/``NULLS LAST`` says otherwise, and ties are broken by ``cell_idx``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from sclstore.store.errors import InvalidQueryError

from .spec import And, Between, Compare, InList, IsNull, Like, Not, Or, OrderItem, Predicate, Truth, Value

if TYPE_CHECKING:
    from sclstore.store.obs import ObsColumn

__all__ = [
    "BoundColumn",
    "bind_columns",
    "compile_order",
    "compile_predicate",
    "like_to_regex",
    "like_tokens",
    "resolve_column",
]

_STRING_KINDS = ("string", "category")
_NUMBER_KINDS = ("int", "float")


@dataclass(frozen=True)
class BoundColumn:
    """A user-visible column bound to its SQL column and kind."""

    name: str
    sql: Any  # sqlalchemy Column
    kind: str
    categories: tuple[str, ...] | None = None  # a categorical column's order in the AnnData
    ordered: bool = False


def bind_columns(table: sa.Table, schema: Sequence[ObsColumn]) -> dict[str, BoundColumn]:
    """Map user column names (``cell``, ``cell_idx`` and every obs column) to SQL columns.

    Parameters
    ----------
    table
        The dataset's obs table (``cell_idx``, ``cell``, ``c0``, ``c1``, ...).
    schema
        The dataset's obs schema: ``ObsColumn(name, column, kind)`` for each obs column.
    """
    cols = {
        "cell": BoundColumn("cell", table.c.cell, "string"),
        "cell_idx": BoundColumn("cell_idx", table.c.cell_idx, "int"),
        "src_idx": BoundColumn("src_idx", table.c.src_idx, "int"),
    }
    for col in schema:
        cols[col.name] = BoundColumn(col.name, table.c[col.column], col.kind, col.categories, col.ordered)
    return cols


def resolve_column(name: str, columns: Mapping[str, BoundColumn], where: str) -> BoundColumn:
    """Look a column up; an unknown one raises with close matches and the available names.

    Raises
    ------
    InvalidQueryError
        If ``name`` is not a column of the dataset.
    """
    if name in columns:
        return columns[name]
    names = sorted(columns)
    close = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
    msg = (
        f"unknown column {name!r} in {where}.{hint} Columns of this dataset: {shown}; plus run, dataset, "
        'model, layer, depth, embedding[.pool] (double-quote names that are not plain identifiers, e.g. "cell type")'
    )
    raise InvalidQueryError(msg)


def _kind_word(kind: str) -> str:
    return {"category": "a categorical (text)", "string": "a text", "int": "an integer", "float": "a float", "bool": "a boolean"}[kind]


def _check_value(col: BoundColumn, value: Value, context: str) -> None:
    ok = (
        (col.kind in _STRING_KINDS and isinstance(value, str))
        or (col.kind in _NUMBER_KINDS and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (col.kind == "bool" and isinstance(value, bool))
    )
    if ok:
        return
    example = {"category": "'T cell'", "string": "'T cell'", "int": "3", "float": "0.5", "bool": "TRUE"}[col.kind]
    msg = (
        f"column {col.name!r} is {_kind_word(col.kind)} column and cannot be compared with {value!r} in {context}; "
        f"use a {'string' if col.kind in _STRING_KINDS else 'number' if col.kind in _NUMBER_KINDS else 'boolean'} "
        f"literal such as {example}"
    )
    raise InvalidQueryError(msg)


def _bind(col: BoundColumn, value: Value) -> ColumnElement[Any]:
    if isinstance(value, bool):
        return sa.literal(value, sa.Boolean())
    if isinstance(value, int):
        return sa.literal(value, sa.BigInteger())
    if isinstance(value, float):
        return sa.literal(value, sa.Float())
    return sa.literal(value, sa.String())


def _ordered(col: BoundColumn, dialect: str) -> ColumnElement[Any]:
    """The column as used for ordering comparisons (code-point order for text)."""
    if col.kind in _STRING_KINDS and dialect == "postgresql":
        return col.sql.collate("C")  # type: ignore[no-any-return]
    return col.sql  # type: ignore[no-any-return]


def like_tokens(pattern: str, escape: str | None) -> list[tuple[str, str]]:
    """Split a LIKE pattern into ``("lit", ch)``, ``("any", "%")`` and ``("one", "_")`` tokens.

    Raises
    ------
    InvalidQueryError
        If the pattern ends with the escape character.
    """
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if escape is not None and ch == escape:
            if i + 1 >= len(pattern):
                raise InvalidQueryError(f"LIKE pattern {pattern!r} ends with the escape character {escape!r}")
            out.append(("lit", pattern[i + 1]))
            i += 2
            continue
        out.append(("any", ch) if ch == "%" else ("one", ch) if ch == "_" else ("lit", ch))
        i += 1
    return out


def like_to_regex(pattern: str, escape: str | None = None) -> str:
    """A Python regular expression (for ``re.fullmatch`` with DOTALL) equal to a LIKE pattern."""
    import re

    parts = {"any": ".*", "one": "."}
    return "".join(parts[k] if k in parts else re.escape(ch) for k, ch in like_tokens(pattern, escape))


def _like(col: BoundColumn, pred: Like, dialect: str) -> ColumnElement[bool]:
    if col.kind not in _STRING_KINDS:
        msg = (
            f"LIKE works on text columns only; {col.name!r} is {_kind_word(col.kind)} column: "
            "use =, <, >, BETWEEN or IN instead"
        )
        raise InvalidQueryError(msg)
    tokens = like_tokens(pred.pattern, pred.escape)
    if dialect == "sqlite":
        glob_lit = {"*": "[*]", "?": "[?]", "[": "[[]"}
        glob = "".join("*" if k == "any" else "?" if k == "one" else glob_lit.get(ch, ch) for k, ch in tokens)
        return col.sql.op("GLOB", is_comparison=True)(sa.literal(glob, sa.String()))  # type: ignore[no-any-return]
    esc = {"%": "\\%", "_": "\\_", "\\": "\\\\"}
    like = "".join("%" if k == "any" else "_" if k == "one" else esc.get(ch, ch) for k, ch in tokens)
    return col.sql.like(sa.literal(like, sa.String()), escape="\\")  # type: ignore[no-any-return]


_FLAT_TERMS = 64
"""Longest run of terms joined by one AND/OR in the SQL; longer chains become nested groups."""


class _Paren(ColumnElement[bool]):
    """A boolean expression rendered inside parentheses, always (SQLAlchemy flattens nested
    AND/OR lists of one operator, which would undo the grouping)."""

    inherit_cache = True
    type = sa.Boolean()
    _traverse_internals: ClassVar[list[tuple[str, Any]]] = [("inner", InternalTraversal.dp_clauseelement)]  # type: ignore[misc]  # SQLAlchemy stubs declare it per instance; it is class-level by design

    def __init__(self, inner: ColumnElement[bool]) -> None:
        self.inner = inner


@compiles(_Paren)
def _compile_paren(element: _Paren, compiler: Any, **kw: Any) -> str:
    return "(" + compiler.process(element.inner, **kw) + ")"


def _balanced(join: Any, parts: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    """``a OR b OR ...`` as nested parenthesised groups of at most :data:`_FLAT_TERMS` terms:
    databases parse a flat chain left-deep, and SQLite refuses expressions deeper than 1,000."""
    while len(parts) > _FLAT_TERMS:
        parts = [_Paren(join(*parts[i : i + _FLAT_TERMS])) for i in range(0, len(parts), _FLAT_TERMS)]
    return join(*parts)  # type: ignore[no-any-return]


def compile_predicate(
    pred: Predicate, columns: Mapping[str, BoundColumn], *, dialect: str = "sqlite"
) -> ColumnElement[bool]:
    """Compile an obs predicate to a bound SQLAlchemy boolean expression.

    Parameters
    ----------
    pred
        A predicate over obs columns, ``cell`` and ``cell_idx`` only (run and layer
        conjuncts are removed beforehand by :func:`sclstore.query.plan.split_where`).
    columns
        From :func:`bind_columns`.
    dialect
        The engine's dialect name (``"sqlite"``, ``"postgresql"``); it picks the spelling of
        LIKE and string collation.

    Returns
    -------
    sqlalchemy.sql.elements.ColumnElement
        A WHERE clause whose user values are all bound parameters.

    Raises
    ------
    InvalidQueryError
        For an unknown column, a value of the wrong kind or an operator the column's kind does
        not support.
    """
    if isinstance(pred, (And, Or)):
        parts = [compile_predicate(p, columns, dialect=dialect) for p in pred.items]
        return _balanced(sa.and_ if isinstance(pred, And) else sa.or_, parts)
    if isinstance(pred, Not):
        return sa.not_(compile_predicate(pred.item, columns, dialect=dialect))
    col = resolve_column(pred.column, columns, "WHERE")
    if isinstance(pred, Compare):
        _check_value(col, pred.value, f"`{pred.column} {pred.op} ...`")
        if col.kind == "bool" and pred.op not in ("=", "!="):
            raise InvalidQueryError(f"boolean column {col.name!r} supports = and != only, not {pred.op}")
        left = _ordered(col, dialect) if pred.op not in ("=", "!=") else col.sql
        right = _bind(col, pred.value)
        ops = {
            "=": left.__eq__,
            "!=": left.__ne__,
            "<": left.__lt__,
            "<=": left.__le__,
            ">": left.__gt__,
            ">=": left.__ge__,
        }
        return ops[pred.op](right)  # type: ignore[no-any-return]
    if isinstance(pred, InList):
        for v in pred.values:
            _check_value(col, v, f"`{pred.column} IN (...)`")
        binds = [_bind(col, v) for v in pred.values]
        return col.sql.not_in(binds) if pred.negate else col.sql.in_(binds)  # type: ignore[no-any-return]
    if isinstance(pred, Between):
        for v in (pred.low, pred.high):
            _check_value(col, v, f"`{pred.column} BETWEEN ...`")
        if col.kind == "bool":
            raise InvalidQueryError(f"boolean column {col.name!r} supports = and != only, not BETWEEN")
        expr: ColumnElement[bool] = _ordered(col, dialect).between(_bind(col, pred.low), _bind(col, pred.high))
        return sa.not_(expr) if pred.negate else expr  # type: ignore[no-any-return]
    if isinstance(pred, Like):
        expr = _like(col, pred, dialect)
        return sa.not_(expr) if pred.negate else expr
    if isinstance(pred, IsNull):
        return col.sql.is_not(None) if pred.negate else col.sql.is_(None)  # type: ignore[no-any-return]
    if isinstance(pred, Truth):
        if col.kind != "bool":
            msg = (
                f"column {col.name!r} is {_kind_word(col.kind)} column, not a condition; "
                f"compare it, e.g. `{col.name} = ...`"
            )
            raise InvalidQueryError(msg)
        return col.sql == sa.literal(True, sa.Boolean())  # type: ignore[no-any-return]
    raise InvalidQueryError(f"unsupported predicate {pred!r}")  # pragma: no cover - exhaustive above


def compile_order(
    items: Sequence[OrderItem], columns: Mapping[str, BoundColumn], *, dialect: str = "sqlite"
) -> list[ColumnElement[Any]]:
    """ORDER BY clauses for obs keys, with explicit NULL placement and a ``cell_idx`` tie-break.

    ``layer`` keys must be removed beforehand (they order the layer axis, not the cells).

    Raises
    ------
    InvalidQueryError
        For an unknown column.
    """
    out: list[ColumnElement[Any]] = []
    for item in items:
        col = resolve_column(item.column, columns, "ORDER BY")
        key = _ordered(col, dialect)
        clause = key.desc() if item.desc else key.asc()
        nulls_first = item.nulls_first if item.nulls_first is not None else not item.desc
        if col.name not in ("cell_idx", "cell", "src_idx"):  # never NULL (an obs column named src_idx gets no clause: harmless)
            clause = clause.nulls_first() if nulls_first else clause.nulls_last()
        out.append(clause)
    if not any(item.column == "cell_idx" for item in items):
        out.append(columns["cell_idx"].sql.asc())
    return out
