"""Messages for refused query parts: what the part is, and what is allowed instead."""

from __future__ import annotations

from sqlglot import exp

from sclstore.store.errors import InvalidQueryError

__all__ = ["ALLOWED_PREDICATES", "ALLOWED_SHAPE", "check_args", "describe", "refuse", "snippet"]

ALLOWED_SHAPE = (
    "SELECT <columns | * | embedding[.pool] | AVG(embedding[.pool]) | COUNT(*)> FROM embeddings "
    "[WHERE <predicate>] [GROUP BY <obs columns>, layer] [ORDER BY <obs columns | cell | cell_idx | layer>] "
    "[LIMIT n]"
)
ALLOWED_PREDICATES = (
    "= != <> < <= > >= IN, NOT IN, BETWEEN, LIKE, IS [NOT] NULL, AND, OR, NOT and parentheses, "
    "comparing a column with a string, number or boolean literal"
)

# Node kinds that get a specific name in messages.
_NAMED: dict[type[exp.Expression], str] = {
    exp.Union: "UNION",
    exp.Intersect: "INTERSECT",
    exp.Except: "EXCEPT",
    exp.Subquery: "a subquery",
    exp.Join: "a JOIN",
    exp.With: "a WITH clause (CTE)",
    exp.CTE: "a WITH clause (CTE)",
    exp.Cast: "a CAST",
    exp.TryCast: "a CAST",
    exp.Placeholder: "a parameter placeholder",
    exp.Parameter: "a parameter placeholder",
    exp.Pragma: "PRAGMA",
    exp.Insert: "INSERT",
    exp.Update: "UPDATE",
    exp.Delete: "DELETE",
    exp.Drop: "DROP",
    exp.Create: "CREATE",
    exp.Alias: "an alias (AS)",
    exp.Window: "a window function",
    exp.Distinct: "DISTINCT",
    exp.Star: "*",
}


def snippet(node: exp.Expr | None, limit: int = 80) -> str:
    if node is None:
        return ""
    try:
        text = node.sql()
    except Exception:  # sqlglot cannot render every node it parses; fall back to its name
        text = type(node).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(node: exp.Expression) -> str:
    for kind, name in _NAMED.items():
        if isinstance(node, kind):
            return name
    if isinstance(node, exp.Binary) and not isinstance(node, exp.Connector):
        arithmetic = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.DPipe)
        return "arithmetic or an operator" if isinstance(node, arithmetic) else f"the operator {type(node).__name__.upper()}"
    if isinstance(node, exp.Func):
        name = node.sql_name() if not isinstance(node, exp.Anonymous) else str(node.this)
        return f"the function {name.upper()}()"
    if isinstance(node, exp.Query):
        return "a subquery"
    return f"{type(node).__name__.lower()} expression"


def refuse(node: exp.Expression, where: str, allowed: str) -> InvalidQueryError:
    msg = f"{describe(node)} `{snippet(node)}` is not allowed in {where}; allowed: {allowed}"
    return InvalidQueryError(msg)


def check_args(node: exp.Expression, allowed: set[str], where: str, what: str) -> None:
    """Refuse any populated sqlglot argument of ``node`` not in ``allowed``."""
    for key, value in node.args.items():
        if key in allowed or value is None or value is False or value == [] or value == "":
            continue
        part = value.sql() if isinstance(value, exp.Expression) else key.replace("_", " ").strip().upper()
        if isinstance(value, list) and value and isinstance(value[0], exp.Expression):
            part = ", ".join(v.sql() for v in value)
        msg = f"{key.strip('_').replace('_', ' ').upper()} `{part}` is not allowed in {where}; allowed: {what}"
        raise InvalidQueryError(msg)
