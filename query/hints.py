"""Hints for queries that ran but probably did not mean what they said.

A value compared with a categorical (or text) column that is not one of its values, while a
value differing only in case, or a close spelling, is: ``cell_type = 't cells'`` selects no cell
when the category is ``T cells``. Hints are listed in ``result.hints`` and the summary (the
CLI prints them on stderr as ``hint: ...``) and logged at INFO.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .spec import And, Compare, InList, Not, Or, Predicate

if TYPE_CHECKING:
    from .plan import Backend, QueryPlan

__all__ = ["near_values", "value_hints"]

logger = logging.getLogger(__name__)

MAX_DISTINCT = 5000
"""Text columns with more distinct values than this are not scanned for hints."""


def _equalities(pred: Predicate | None, negated: bool = False) -> Iterator[tuple[str, Any]]:
    """``(column, value)`` of every positive ``=`` / ``IN`` term (not under NOT)."""
    if pred is None:
        return
    if isinstance(pred, (And, Or)):
        for item in pred.items:
            yield from _equalities(item, negated)
    elif isinstance(pred, Not):
        yield from _equalities(pred.item, not negated)
    elif not negated and isinstance(pred, Compare) and pred.op == "=" and isinstance(pred.value, str):
        yield pred.column, pred.value
    elif not negated and isinstance(pred, InList) and not pred.negate:
        for v in pred.values:
            if isinstance(v, str):
                yield pred.column, v


def near_values(value: str, known: list[str], n: int = 3) -> list[str]:
    """Known values equal to ``value`` but for case, else close spellings (difflib)."""
    same_case = [k for k in known if k.lower() == value.lower()]
    if same_case:
        return same_case[:n]
    lowered = {k.lower(): k for k in known}
    return [lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.75)]


def _distinct(backend: Backend, plan: QueryPlan, column: str) -> list[str] | None:
    from .read import _bound

    _, columns, _ = _bound(backend, plan)
    col = columns[column].sql
    stmt = sa.select(col).where(col.is_not(None)).distinct().limit(MAX_DISTINCT + 1)
    with backend.engine.connect() as conn:
        values = [str(v) for v in conn.execute(stmt).scalars().all()]
    return None if len(values) > MAX_DISTINCT else values


def value_hints(backend: Backend, plan: QueryPlan, *, empty: bool) -> list[str]:
    """One line per compared value that is not a value of its column but has near matches.

    Categorical columns are checked from the catalog's category list; text columns only when
    the result is ``empty`` (a bounded DISTINCT scan).
    """
    schema = {c.name: c for c in plan.dataset.obs_schema}
    hints: list[str] = []
    seen: set[tuple[str, str]] = set()
    cache: dict[str, list[str] | None] = {}
    for column, value in _equalities(plan.where):
        col = schema.get(column)
        if col is None or (column, value) in seen:
            continue
        seen.add((column, value))
        if col.kind == "category" and col.categories is not None:
            known: list[str] | None = list(col.categories)
        elif col.kind in ("category", "string") and empty:
            if column not in cache:
                cache[column] = _distinct(backend, plan, column)
            known = cache[column]
        else:
            continue
        if known is None or value in known:
            continue
        near = near_values(value, known)
        if near:
            alts = " or ".join(repr(v) for v in near)
            hints.append(f"{column} has no value {value!r}; did you mean {alts}? (comparisons are case-sensitive)")
    for line in hints:
        logger.info("hint: %s", line)
    return hints
