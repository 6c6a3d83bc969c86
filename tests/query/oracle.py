"""An independent pandas evaluator of predicate value objects (SQL three-valued logic),
and hypothesis strategies that generate valid predicates for a given obs frame.

Nothing here uses the compiler: it is the oracle the compiled SQL is checked against.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from sclstore.query.spec import And, Between, Compare, InList, IsNull, Like, Not, Or, Predicate, Truth

TRICKY_STRINGS = ["T", "B", "NK", "CD4 T", "mono_%", "it's", "d1", "D1", "x*y", "é", "'; DROP TABLE datasets; --", "%", "", "c0001"]


def _like_regex(pattern: str, escape: str | None) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if escape is not None and ch == escape:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return "".join(out)


def _values(obs: pd.DataFrame, column: str) -> pd.Series:
    if column == "cell":
        return pd.Series(obs.index.astype(str), index=obs.index, dtype=object)
    if column == "cell_idx":
        return pd.Series(obs["__cell_idx"].to_numpy(), index=obs.index, dtype=object)
    s = obs[column]
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    return s.astype(object).where(s.notna(), None)


def evaluate(pred: Predicate, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(is_true, is_unknown)`` masks of a predicate over ``obs`` (SQL semantics)."""
    n = obs.shape[0]
    if isinstance(pred, And):
        parts = [evaluate(p, obs) for p in pred.items]
        t = np.logical_and.reduce([p[0] for p in parts])
        f = np.logical_or.reduce([~p[0] & ~p[1] for p in parts])
        return t, ~t & ~f
    if isinstance(pred, Or):
        parts = [evaluate(p, obs) for p in pred.items]
        t = np.logical_or.reduce([p[0] for p in parts])
        f = np.logical_and.reduce([~p[0] & ~p[1] for p in parts])
        return t, ~t & ~f
    if isinstance(pred, Not):
        t, u = evaluate(pred.item, obs)
        return ~t & ~u, u
    vals = list(_values(obs, pred.column))
    null = np.array([v is None for v in vals], dtype=bool)
    if isinstance(pred, IsNull):
        return (~null if pred.negate else null), np.zeros(n, dtype=bool)

    def each(fn: Any) -> np.ndarray:
        return np.array([False if v is None else bool(fn(v)) for v in vals], dtype=bool)

    if isinstance(pred, Compare):
        x = pred.value
        ops = {
            "=": lambda v: v == x,
            "!=": lambda v: v != x,
            "<": lambda v: v < x,
            "<=": lambda v: v <= x,
            ">": lambda v: v > x,
            ">=": lambda v: v >= x,
        }
        t = each(ops[pred.op])
    elif isinstance(pred, InList):
        t = each(lambda v: any(v == x for x in pred.values))
        if pred.negate:
            t = ~t & ~null
    elif isinstance(pred, Between):
        t = each(lambda v: pred.low <= v <= pred.high)
        if pred.negate:
            t = ~t & ~null
    elif isinstance(pred, Like):
        rx = re.compile(_like_regex(pred.pattern, pred.escape), re.DOTALL)
        t = each(lambda v: rx.fullmatch(v) is not None)
        if pred.negate:
            t = ~t & ~null
    elif isinstance(pred, Truth):
        t = each(lambda v: v is True or v == 1)
    else:  # pragma: no cover
        raise AssertionError(pred)
    return t, null


def selected(pred: Predicate | None, obs: pd.DataFrame) -> np.ndarray:
    """Boolean mask of rows a WHERE clause keeps."""
    if pred is None:
        return np.ones(obs.shape[0], dtype=bool)
    return evaluate(pred, obs)[0]


# ------------------------------------------------------------------------------- strategies


def kinds_of(obs: pd.DataFrame) -> dict[str, str]:
    out = {"cell": "string", "cell_idx": "int"}
    for name in obs.columns:
        if str(name).startswith("__"):
            continue
        s = obs[name]
        if isinstance(s.dtype, pd.CategoricalDtype):
            out[name] = "category"
        elif pd.api.types.is_bool_dtype(s.dtype):
            out[name] = "bool"
        elif pd.api.types.is_integer_dtype(s.dtype):
            out[name] = "int"
        elif pd.api.types.is_float_dtype(s.dtype):
            out[name] = "float"
        else:
            out[name] = "string"
    return out


def _value_for(kind: str, obs: pd.DataFrame, column: str) -> st.SearchStrategy[Any]:
    present = [v for v in _values(obs, column) if v is not None][:30]
    if kind in ("string", "category"):
        return st.sampled_from(sorted(set(map(str, present)) | set(TRICKY_STRINGS)))
    if kind == "int":
        nums = [int(v) for v in present]
        return st.one_of(st.sampled_from(nums or [0]), st.integers(-10, 70), st.sampled_from([0.5, -2.5, 10.0]))
    if kind == "float":
        nums = [float(v) for v in present]
        return st.one_of(st.sampled_from(nums or [0.0]), st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 2)), st.integers(-2, 2))
    return st.booleans()


def _pattern() -> st.SearchStrategy[tuple[str, str | None]]:
    """LIKE patterns; ``!`` only occurs as ``!%``/``!_`` so it never dangles as an escape."""
    piece = st.sampled_from(["%", "_", "T", "d", "D", "1", "*", "'", "é", " ", "c0", "mono", "!%", "!_", "x", "["])
    return st.tuples(st.lists(piece, min_size=0, max_size=4).map("".join), st.sampled_from([None, "!"]))


def leaf_for(obs: pd.DataFrame) -> st.SearchStrategy[Predicate]:
    kinds = kinds_of(obs)

    @st.composite
    def leaf(draw: Any) -> Predicate:
        column = draw(st.sampled_from(sorted(kinds)))
        kind = kinds[column]
        value = _value_for(kind, obs, column)
        choices = ["cmp", "in", "null"]
        if kind != "bool":
            choices += ["between"]
        else:
            choices += ["truth"]
        if kind in ("string", "category"):
            choices += ["like", "like"]
        what = draw(st.sampled_from(choices))
        if what == "cmp":
            ops = ["=", "!="] if kind == "bool" else ["=", "!=", "<", "<=", ">", ">="]
            return Compare(column, draw(st.sampled_from(ops)), draw(value))  # type: ignore[arg-type]
        if what == "in":
            return InList(column, tuple(draw(st.lists(value, min_size=1, max_size=4))), negate=draw(st.booleans()))
        if what == "null":
            return IsNull(column, negate=draw(st.booleans()))
        if what == "between":
            return Between(column, draw(value), draw(value), negate=draw(st.booleans()))
        if what == "truth":
            return Truth(column)
        pattern, esc = draw(_pattern())
        return Like(column, pattern, negate=draw(st.booleans()), escape=esc)

    return leaf()


def predicates_for(obs: pd.DataFrame, max_leaves: int = 8) -> st.SearchStrategy[Predicate]:
    """Random predicate trees (AND/OR/NOT over leaves) valid for ``obs``'s column kinds."""
    return st.recursive(
        leaf_for(obs),
        lambda children: st.one_of(
            st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
            children.map(Not),
        ),
        max_leaves=max_leaves,
    )
