"""Parse slice-query text with sqlglot and check the tree against a whitelist.

The grammar accepted is deliberately small (see ``DESIGN.md``, "The SQL-style slice language")::

    SELECT <items> FROM embeddings [WHERE <predicate>] [GROUP BY <cols>] [ORDER BY <keys>] [LIMIT n]

Every sqlglot node is converted by a function that knows exactly which node types and which
node arguments it accepts; anything else is refused with an :class:`InvalidQueryError` that
names the offending part and says what is allowed. The result is a tree of frozen value objects
(:mod:`sclstore.query.spec`); the user's text is never executed.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from sclstore.store.errors import InvalidQueryError

from ._messages import ALLOWED_PREDICATES, ALLOWED_SHAPE, check_args, describe, refuse, snippet
from .spec import (
    VIRTUAL_COLUMNS,
    And,
    AvgItem,
    Between,
    ColumnItem,
    Compare,
    CompareOp,
    CountItem,
    EmbeddingItem,
    InList,
    IsNull,
    Like,
    Not,
    Or,
    OrderItem,
    Predicate,
    SelectItem,
    SliceQuery,
    StarItem,
    Truth,
    Value,
)

__all__ = ["ALLOWED_PREDICATES", "ALLOWED_SHAPE", "MAX_IN_VALUES", "MAX_QUERY_CHARS", "parse_query"]

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 100_000
"""Longest query text accepted."""
MAX_IN_VALUES = 10_000
"""Most values in one ``IN (...)`` list (each becomes a bound parameter)."""
_INT64_MAX = 2**63 - 1

_COMPARE: dict[type[exp.Expression], CompareOp] = {
    exp.EQ: "=",
    exp.NEQ: "!=",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}
_FLIP: dict[CompareOp, CompareOp] = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}

# ---------------------------------------------------------------------------------------------
# tokens


def _check_tokens(sql: str) -> None:
    """Refuse comments, placeholders and stacked statements before parsing."""
    try:
        tokens = sqlglot.tokenize(sql)
    except TokenError as err:
        msg = f"cannot read the query: {err}; check that every quote is closed ('text', \"column name\")"
        raise InvalidQueryError(msg) from None
    for i, tok in enumerate(tokens):
        if tok.comments:
            msg = (
                f"comments are not allowed in a query (found {tok.comments[0].strip()!r} near "
                f"{tok.text!r}); remove the comment"
            )
            raise InvalidQueryError(msg)
        if tok.token_type == TokenType.SEMICOLON and any(t.token_type != TokenType.SEMICOLON for t in tokens[i + 1 :]):
            rest = sql[tok.end + 1 :].strip()
            msg = (
                f"only one statement is allowed; found more after ';': {rest[:60]!r}; "
                f"send a single {ALLOWED_SHAPE}"
            )
            raise InvalidQueryError(msg)
        if tok.token_type in (TokenType.PLACEHOLDER, TokenType.PARAMETER):
            msg = f"parameter placeholder {tok.text!r} is not allowed; write the literal value instead"
            raise InvalidQueryError(msg)
    if not tokens:  # only whitespace and comments: sqlglot keeps no token to attach them to
        raise InvalidQueryError(f"comments are not allowed in a query and there is nothing else; write {ALLOWED_SHAPE}")


# ---------------------------------------------------------------------------------------------
# identifiers and literals


def _column_name(node: exp.Expression, where: str) -> str:
    """The name of a plain (unqualified) column reference."""
    if isinstance(node, exp.Paren):
        return _column_name(node.this, where)
    if not isinstance(node, exp.Column):
        raise refuse(node, where, "a column name (double-quote names that are not plain identifiers)")
    if node.args.get("table") is not None:
        msg = (
            f"qualified column `{snippet(node)}` is not allowed in {where}; write the plain column name "
            '(double-quoted if it is not a plain identifier, e.g. "cell type")'
        )
        raise InvalidQueryError(msg)
    check_args(node, {"this"}, where, "a plain column name")
    ident = node.this
    if isinstance(ident, exp.Star):
        raise refuse(node, where, "a column name")
    if not isinstance(ident, exp.Identifier):
        raise refuse(node, where, "a column name")
    name = str(ident.this)
    if not ident.quoted and name.lower() in VIRTUAL_COLUMNS:
        return name.lower()
    if ident.quoted and name in VIRTUAL_COLUMNS:
        return name
    if not name:
        raise InvalidQueryError(f'empty column name `{snippet(node)}` in {where}; give the obs column\'s name')
    return name


def _literal(node: exp.Expression, where: str) -> Value:
    """A string, number or boolean literal (``-`` allowed in front of a number)."""
    if isinstance(node, exp.Paren):
        return _literal(node.this, where)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Null):
        msg = (
            f"NULL cannot be compared with = or IN in {where} (the result is never true); "
            "use `column IS NULL` or `column IS NOT NULL`"
        )
        raise InvalidQueryError(msg)
    if isinstance(node, exp.Neg):
        inner = _literal(node.this, where)
        if isinstance(inner, bool) or not isinstance(inner, (int, float)):
            raise refuse(node, where, "a minus sign only in front of a number")
        return -inner
    if isinstance(node, exp.Literal):
        check_args(node, {"this", "is_string"}, where, "a plain literal")
        text = str(node.this)
        if node.is_string:
            return text
        return _number(text, node, where)
    raise refuse(node, where, "string, number or boolean literals")


def _number(text: str, node: exp.Expression, where: str) -> int | float:
    if text.isdigit():
        value = int(text)
        if value > _INT64_MAX:
            raise InvalidQueryError(f"number {text} in {where} is larger than a 64-bit integer")
        return value
    try:
        fvalue = float(text)
    except ValueError:
        raise refuse(node, where, "decimal numbers such as 3, -2.5 or 1e-3") from None
    if not math.isfinite(fvalue):
        raise InvalidQueryError(f"number {text} in {where} is not finite; use a number within float64 range")
    return fvalue


def _pool_of(node: exp.Expression, where: str) -> str | None:
    """``embedding`` -> None, ``embedding.cls`` -> ``"cls"``; anything else is refused."""
    if isinstance(node, exp.Column):
        check_args(node, {"this", "table"}, where, "embedding or embedding.<pool>")
        table = node.args.get("table")
        name = str(node.this.this) if isinstance(node.this, exp.Identifier) else None
        if table is None and name is not None and name.lower() == "embedding":
            return None
        if isinstance(table, exp.Identifier) and str(table.this).lower() == "embedding" and name:
            return name
    allowed = "AVG(embedding) or AVG(embedding.<pool>)" if where == "AVG()" else "embedding or embedding.<pool>"
    raise refuse(node, where, allowed)


# ---------------------------------------------------------------------------------------------
# predicates


def _sql_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _predicate(node: exp.Expression) -> Predicate:
    where = "WHERE"
    if isinstance(node, exp.Paren):
        check_args(node, {"this"}, where, ALLOWED_PREDICATES)
        return _predicate(node.this)
    if isinstance(node, (exp.And, exp.Or)):
        cls: Callable[[tuple[Predicate, ...]], Predicate] = And if isinstance(node, exp.And) else Or
        items: list[Predicate] = []
        for side in _chain(node, where):
            sub = _predicate(side)
            if type(sub) is cls:
                items.extend(sub.items)  # type: ignore[union-attr]
            else:
                items.append(sub)
        return cls(tuple(items))
    if isinstance(node, exp.Not):
        check_args(node, {"this"}, where, ALLOWED_PREDICATES)
        inner = _predicate(node.this)
        # `x NOT IN (...)` / `x NOT BETWEEN ...` arrive as NOT(x IN ...): keep them as one operator
        if isinstance(inner, (InList, Between, Like)) and not isinstance(node.this, exp.Paren) and not inner.negate:
            return type(inner)(**{**inner.__dict__, "negate": True})
        return Not(inner)
    if type(node) in _COMPARE:
        check_args(node, {"this", "expression"}, where, ALLOWED_PREDICATES)
        op = _COMPARE[type(node)]
        left, right = node.this, node.expression
        if _is_column(left) and not _is_column(right):
            return Compare(_column_name(left, where), op, _literal(right, where))
        if _is_column(right) and not _is_column(left):
            return Compare(_column_name(right, where), _FLIP[op], _literal(left, where))
        if _is_column(left) and _is_column(right):
            rname = _column_name(right, where)
            op_sql = snippet(node)[len(snippet(left)):].strip().split(" ")[0] if snippet(node).startswith(snippet(left)) else op
            msg = (
                f"`{snippet(node)}` compares two columns, which WHERE does not allow. Did you mean the value {rname!r}? "
                f"Quote values with single quotes: `{snippet(left)} {op_sql} {_sql_quote(rname)}` "
                '(double quotes name columns, e.g. "cell type")'
            )
            raise InvalidQueryError(msg)
        bad = right if _is_column(right) or isinstance(left, (exp.Literal, exp.Boolean, exp.Neg)) else left
        raise refuse(bad, where, "a column compared with a string, number or boolean literal")
    if isinstance(node, exp.In):
        check_args(node, {"this", "expressions"}, where, "column IN (literal, ...)")
        values = tuple(_literal(v, where) for v in node.expressions)
        if not values:
            raise InvalidQueryError("IN () needs at least one value")
        if len(values) > MAX_IN_VALUES:
            msg = f"IN list has {len(values)} values; at most {MAX_IN_VALUES} are allowed: split the query"
            raise InvalidQueryError(msg)
        return InList(_column_name(node.this, where), values)
    if isinstance(node, exp.Between):
        check_args(node, {"this", "low", "high"}, where, "column BETWEEN literal AND literal")
        return Between(_column_name(node.this, where), _literal(node.args["low"], where), _literal(node.args["high"], where))
    if isinstance(node, exp.Escape):
        like = node.this
        if not isinstance(like, exp.Like):
            raise refuse(node, where, "ESCAPE only after LIKE")
        esc = _literal(node.expression, where)
        if not isinstance(esc, str) or len(esc) != 1:
            raise InvalidQueryError(f"ESCAPE needs one character, got {esc!r}")
        return _like(like, esc)
    if isinstance(node, exp.Like):
        return _like(node, None)
    if isinstance(node, exp.Is):
        check_args(node, {"this", "expression", "negate"}, where, "IS NULL or IS NOT NULL")
        if not isinstance(node.expression, exp.Null):
            raise refuse(node, where, "IS NULL or IS NOT NULL (compare booleans with = TRUE / = FALSE)")
        return IsNull(_column_name(node.this, where), negate=bool(node.args.get("negate")))
    if isinstance(node, exp.Column):
        return Truth(_column_name(node, where))
    raise refuse(node, where, ALLOWED_PREDICATES)


def _chain(node: exp.Expression, where: str) -> list[exp.Expression]:
    """The operands of a flat ``a OR b OR c ...`` (or AND) chain, left to right, without recursion:
    sqlglot builds such chains as left-deep trees, one level per term."""
    kind = type(node)
    operands: list[exp.Expression] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if type(cur) is kind:
            check_args(cur, {"this", "expression"}, where, ALLOWED_PREDICATES)
            stack.append(cur.expression)
            stack.append(cur.this)
        else:
            operands.append(cur)
    return operands


def _like(node: exp.Like, escape: str | None) -> Predicate:
    check_args(node, {"this", "expression", "negate"}, "WHERE", "column LIKE 'pattern'")
    pattern = _literal(node.expression, "LIKE")
    if not isinstance(pattern, str):
        raise InvalidQueryError(f"LIKE needs a string pattern such as 'CD4%', got {pattern!r}")
    return Like(_column_name(node.this, "LIKE"), pattern, negate=bool(node.args.get("negate")), escape=escape)


def _is_column(node: exp.Expression) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    return isinstance(node, exp.Column)


# ---------------------------------------------------------------------------------------------
# clauses


def _select_item(node: exp.Expression) -> SelectItem:
    where = "the select list"
    what = "*, column names, embedding[.pool], AVG(embedding[.pool]), COUNT(*)"
    if isinstance(node, exp.Star):
        return StarItem()
    if isinstance(node, exp.Avg):
        check_args(node, {"this"}, where, what)
        return AvgItem(_pool_of(node.this, "AVG()"))
    if isinstance(node, exp.Count):
        check_args(node, {"this", "big_int"}, where, what)
        if not isinstance(node.this, exp.Star):
            raise refuse(node, where, "COUNT(*) (count rows, not values)")
        return CountItem()
    if isinstance(node, exp.Column):
        table = node.args.get("table")
        name = node.this
        if isinstance(name, exp.Star):
            raise refuse(node, where, what)
        if table is not None or (isinstance(name, exp.Identifier) and not name.quoted and str(name.this).lower() == "embedding"):
            return EmbeddingItem(_pool_of(node, where))
        return ColumnItem(_column_name(node, where))
    raise refuse(node, where, what)


def _from(select: exp.Select) -> None:
    src = select.args.get("from_")
    if src is None:
        raise InvalidQueryError(f"the query has no FROM; write {ALLOWED_SHAPE}")
    check_args(src, {"this"}, "FROM", "FROM embeddings")
    table = src.this
    if not isinstance(table, exp.Table):
        raise refuse(table, "FROM", "only the table `embeddings`")
    name = table.this
    label = snippet(table)
    if isinstance(name, exp.Identifier) and str(name.this).lower() == "embeddings" and not any(
        table.args.get(k) for k in ("db", "catalog")
    ):
        check_args(table, {"this"}, "FROM", "FROM embeddings, without an alias or other clauses")
        return
    msg = f"table `{label}` is not allowed in FROM: the only table is `embeddings` (one row per layer and cell)"
    raise InvalidQueryError(msg)


def _limit(select: exp.Select) -> int | None:
    node = select.args.get("limit")
    if node is None:
        return None
    check_args(node, {"expression"}, "LIMIT", "LIMIT n")
    value = _literal(node.expression, "LIMIT")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidQueryError(f"LIMIT needs a non-negative whole number, got {snippet(node.expression)}")
    return value


def _order(select: exp.Select) -> tuple[OrderItem, ...]:
    node = select.args.get("order")
    if node is None:
        return ()
    check_args(node, {"expressions"}, "ORDER BY", "ORDER BY column [ASC|DESC], ...")
    items = []
    for ordered in node.expressions:
        if not isinstance(ordered, exp.Ordered):
            raise refuse(ordered, "ORDER BY", "column [ASC|DESC] [NULLS FIRST|LAST]")
        check_args(ordered, {"this", "desc", "nulls_first"}, "ORDER BY", "column [ASC|DESC] [NULLS FIRST|LAST]")
        col = _column_name(ordered.this, "ORDER BY")
        nf = ordered.args.get("nulls_first")
        items.append(OrderItem(col, desc=bool(ordered.args.get("desc")), nulls_first=None if nf is None else bool(nf)))
    return tuple(items)


def _group(select: exp.Select) -> tuple[str, ...]:
    node = select.args.get("group")
    if node is None:
        return ()
    check_args(node, {"expressions"}, "GROUP BY", "GROUP BY obs columns and layer")
    return tuple(_column_name(e, "GROUP BY") for e in node.expressions)


_SELECT_ARGS = {"expressions", "from_", "where", "group", "order", "limit", "kind"}


def parse_query(sql: str) -> SliceQuery:
    """Parse and validate slice-query text.

    Parameters
    ----------
    sql
        ``SELECT ... FROM embeddings [WHERE ...] [GROUP BY ...] [ORDER BY ...] [LIMIT n]``.

    Returns
    -------
    SliceQuery
        The validated query (column names not yet checked against a dataset).

    Raises
    ------
    InvalidQueryError
        If the text does not parse or uses anything outside the whitelist; the message names
        the offending part and what is allowed.

    Examples
    --------
    >>> q = parse_query("SELECT * FROM embeddings WHERE run = 3 AND layer = 7")
    >>> q.where
    And(items=(Compare(column='run', op='=', value=3), Compare(column='layer', op='=', value=7)))
    """
    if not isinstance(sql, str):
        raise InvalidQueryError(f"a query must be text, got {type(sql).__name__}")
    return _parse_cached(sql)


@functools.lru_cache(maxsize=256)
def _parse_cached(sql: str) -> SliceQuery:
    """:func:`parse_query` of one text, remembered (a :class:`SliceQuery` is immutable; errors
    are not cached): repeated queries skip sqlglot."""
    if len(sql) > MAX_QUERY_CHARS:
        raise InvalidQueryError(f"query is {len(sql)} characters; at most {MAX_QUERY_CHARS} are allowed")
    if "\x00" in sql:
        raise InvalidQueryError("query contains a NUL character; remove it")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes from argv/files arrive as lone surrogates
        msg = (
            f"query contains bytes that are not valid UTF-8 (at character {exc.start + 1}): "
            "write the query in UTF-8 (check the terminal's or the script's encoding)"
        )
        raise InvalidQueryError(msg) from None
    if not sql.strip().strip(";").strip():
        raise InvalidQueryError(f"empty query; write {ALLOWED_SHAPE}")
    _check_tokens(sql)
    try:
        statements = [s for s in sqlglot.parse(sql, error_level=sqlglot.ErrorLevel.RAISE) if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        near = (first.get("highlight") or "").strip()
        desc = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", str(first.get("description", err)))
        msg = f"cannot parse the query: {desc}"
        if near:
            msg += f" near {near!r} (line {first.get('line')}, column {first.get('col')})"
        hint = 'double-quote column names that are SQL keywords or not plain identifiers (e.g. "case", "cell type")'
        raise InvalidQueryError(f"{msg}; {hint}; write {ALLOWED_SHAPE}") from None
    except TokenError as err:
        raise InvalidQueryError(f"cannot read the query: {err}") from None
    except RecursionError:
        raise InvalidQueryError("query is nested too deeply; simplify the parentheses") from None
    if len(statements) != 1:
        raise InvalidQueryError(f"only one statement is allowed, got {len(statements)}; send a single SELECT")
    try:
        return _convert(cast("exp.Expression", statements[0]), sql)  # parsed statements are concrete Expression nodes
    except RecursionError:
        raise InvalidQueryError("query is nested too deeply; simplify the parentheses") from None


def _convert(tree: exp.Expression, sql: str) -> SliceQuery:
    if not isinstance(tree, exp.Select):
        if isinstance(tree, (exp.Union, exp.Intersect, exp.Except)):
            msg = f"{describe(tree)} is not allowed: send one SELECT over `embeddings` ({ALLOWED_SHAPE})"
        else:
            msg = f"{describe(tree)} statement `{snippet(tree)}` is not allowed; only {ALLOWED_SHAPE}"
        raise InvalidQueryError(msg)
    if tree.args.get("with_"):
        raise InvalidQueryError(f"a WITH clause (CTE) `{snippet(tree.args['with_'])}` is not allowed; only {ALLOWED_SHAPE}")
    if tree.args.get("joins"):
        raise InvalidQueryError(f"JOIN `{snippet(tree.args['joins'][0])}` is not allowed: the only table is `embeddings`")
    if tree.args.get("distinct"):
        raise InvalidQueryError("DISTINCT is not allowed; use GROUP BY with COUNT(*) to list distinct values")
    if tree.args.get("having"):
        raise InvalidQueryError("HAVING is not allowed; filter groups with WHERE on obs columns")
    if tree.args.get("offset") or (tree.args.get("limit") and tree.args["limit"].args.get("offset")):
        raise InvalidQueryError("OFFSET is not allowed; narrow the query with WHERE (e.g. cell_idx >= n) and LIMIT")
    if tree.args.get("locks"):
        raise InvalidQueryError("FOR UPDATE / FOR SHARE is not allowed: queries are read-only")
    if tree.args.get("kind"):
        raise InvalidQueryError(f"SELECT {tree.args['kind']} is not allowed; only {ALLOWED_SHAPE}")
    check_args(tree, _SELECT_ARGS, "the query", ALLOWED_SHAPE)
    for node in tree.find_all(exp.Query):
        if node is not tree:
            raise InvalidQueryError(f"a subquery `{snippet(node)}` is not allowed; only {ALLOWED_SHAPE}")
    _from(tree)
    select = tuple(_select_item(e) for e in tree.expressions)
    if not select:
        raise InvalidQueryError(f"empty select list; write {ALLOWED_SHAPE}")
    where_node = tree.args.get("where")
    where: Predicate | None = None
    if where_node is not None:
        check_args(where_node, {"this"}, "WHERE", ALLOWED_PREDICATES)
        where = _predicate(where_node.this)
    query = SliceQuery(
        select=select, where=where, group_by=_group(tree), order_by=_order(tree), limit=_limit(tree), sql=sql
    )
    logger.debug("parsed query %r -> %r", sql, query)
    return query
