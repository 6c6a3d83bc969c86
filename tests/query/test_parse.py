"""The slice language: the whitelist refuses everything outside it, naming the part."""

from __future__ import annotations

import pytest

from sclstore.query.parse import parse_query
from sclstore.query.spec import (
    And,
    AvgItem,
    Between,
    ColumnItem,
    Compare,
    CountItem,
    EmbeddingItem,
    InList,
    IsNull,
    Like,
    Not,
    Or,
    OrderItem,
    StarItem,
    Truth,
    to_sql,
)
from sclstore.store.errors import InvalidQueryError, SclstoreError

BASE = "SELECT * FROM embeddings WHERE run = 1"

# (query, regex the message must match: it names the offending part)
HOSTILE = [
    ("SELECT * FROM embeddings WHERE run = 1; DROP TABLE datasets", r"only one statement.*DROP TABLE datasets"),
    ("SELECT * FROM embeddings WHERE run = 1;SELECT * FROM embeddings", r"only one statement"),
    ("SELECT * FROM embeddings WHERE run = 1 -- AND layer = 3", r"comments are not allowed"),
    ("SELECT * FROM embeddings /* hidden */ WHERE run = 1", r"comments are not allowed.*hidden"),
    ("SELECT * FROM embeddings WHERE run = 1 --", r"comments are not allowed"),
    ("-- only a comment", r"comment"),
    ("SELECT * FROM embeddings WHERE run = 1 UNION SELECT * FROM embeddings", r"UNION is not allowed"),
    ("SELECT * FROM embeddings WHERE run = 1 UNION ALL SELECT name, 1 FROM sqlite_master", r"UNION is not allowed"),
    ("SELECT * FROM embeddings WHERE cell IN (SELECT name FROM sqlite_master)", r"subquery.*sqlite_master"),
    ("SELECT * FROM embeddings WHERE run = (SELECT max(id) FROM runs)", r"subquery.*runs"),
    ("SELECT * FROM embeddings WHERE EXISTS (SELECT 1 FROM datasets)", r"(subquery|EXISTS).*datasets"),
    ("SELECT * FROM sqlite_master", r"table `sqlite_master` is not allowed.*only table is `embeddings`"),
    ("SELECT * FROM pg_catalog.pg_tables", r"table `pg_catalog.pg_tables` is not allowed"),
    ("SELECT * FROM datasets WHERE run = 1", r"table `datasets` is not allowed"),
    ("SELECT * FROM main.embeddings WHERE run = 1", r"table `main.embeddings` is not allowed"),
    ("SELECT * FROM embeddings JOIN runs ON 1 = 1", r"JOIN `.*runs"),
    ("SELECT * FROM embeddings, runs", r"JOIN|runs"),
    ("SELECT * FROM embeddings e WHERE run = 1", r"ALIAS|alias"),
    ("WITH x AS (SELECT 1) SELECT * FROM embeddings", r"WITH clause"),
    ("PRAGMA table_info(datasets)", r"PRAGMA|pragma"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", r"cannot parse|ATTACH|not allowed"),
    ("DROP TABLE datasets", r"DROP"),
    ("DELETE FROM runs", r"DELETE"),
    ("INSERT INTO runs VALUES (1)", r"INSERT"),
    ("UPDATE runs SET status = 'x'", r"UPDATE"),
    ("SELECT load_extension('x') FROM embeddings", r"LOAD_EXTENSION"),
    ("SELECT * FROM embeddings WHERE run = 1 AND sqlite_version() = '3'", r"SQLITE_VERSION"),
    ("SELECT * FROM embeddings WHERE run = 1 AND lower(cell) = 'x'", r"LOWER"),
    ("SELECT * FROM embeddings WHERE run = 1 AND n_genes = CAST('3' AS INT)", r"CAST"),
    ("SELECT * FROM embeddings WHERE run = 1 AND n_genes = 1 + 1", r"arithmetic"),
    ("SELECT * FROM embeddings WHERE run = 1 AND n_genes + 1 = 2", r"arithmetic"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = 'a' || 'b'", r"operator|arithmetic"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = ?", r"placeholder"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = :name", r"placeholder"),
    ("SELECT * FROM embeddings WHERE x = 'x'' OR 1=1 --", r"cannot read the query|quote"),
    ("SELECT * FROM embeddings WHERE \"a\"\"b = 1", r"cannot read the query|quote"),
    ("SELECT * FROM embeddings WHERE run = 1 AND n_genes = n_genes", r"compares two columns.*Did you mean the value .n_genes."),
    ("SELECT * FROM embeddings WHERE 1 = 1", r"literal|column"),
    ("SELECT * FROM embeddings WHERE run = 1 OR 1 = 1", r"literal|column"),
    ("SELECT DISTINCT cell FROM embeddings WHERE run = 1", r"DISTINCT"),
    ("SELECT cell FROM embeddings WHERE run = 1 GROUP BY cell HAVING COUNT(*) > 1", r"HAVING"),
    ("SELECT * FROM embeddings WHERE run = 1 LIMIT 5 OFFSET 3", r"OFFSET"),
    ("SELECT * FROM embeddings WHERE run = 1 LIMIT -1", r"LIMIT"),
    ("SELECT * FROM embeddings WHERE run = 1 LIMIT 2.5", r"LIMIT"),
    ("SELECT cell AS x FROM embeddings WHERE run = 1", r"alias"),
    ("SELECT SUM(embedding) FROM embeddings WHERE run = 1", r"SUM"),
    ("SELECT AVG(score) FROM embeddings WHERE run = 1", r"AVG\(embedding\)"),
    ("SELECT COUNT(cell) FROM embeddings WHERE run = 1", r"COUNT\(\*\)"),
    ("SELECT embedding[0] FROM embeddings WHERE run = 1", r"not allowed"),
    ("SELECT 1", r"no FROM"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = NULL", r"IS NULL"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell IS TRUE", r"IS NULL or IS NOT NULL"),
    ("SELECT * FROM embeddings WHERE run = 1 AND n_genes = 99999999999999999999999", r"64-bit"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell LIKE 5", r"string pattern"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell LIKE 'a' ESCAPE 'xy'", r"ESCAPE needs one character"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell ILIKE 'a'", r"ILIKE|not allowed"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell REGEXP 'a'", r"not allowed|cannot parse"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = x'00'", r"cannot parse"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = '\\''", r"cannot read the query"),
    ("SELECT * FROM embeddings WHERE run = 1 FOR UPDATE", r"not allowed|FOR|UPDATE|LOCK"),
    ("", r"empty query"),
    ("   ;  ", r"empty query"),
    ("SELECT * FROM embeddings WHERE run = 1 AND cell = 'a\x00'", r"NUL"),
    ("SELECT * FROM embeddings WHERE " + "(" * 3000 + "run = 1" + ")" * 3000, r"nested too deeply|cannot parse"),
    ("SELECT * FROM embeddings WHERE cell IN (" + ",".join(["'a'"] * 10_001) + ")", r"at most 10000"),
]


@pytest.mark.parametrize(("sql", "match"), HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_inputs_are_refused_with_a_named_reason(sql: str, match: str) -> None:
    with pytest.raises(InvalidQueryError, match=match) as info:
        parse_query(sql)
    assert isinstance(info.value, SclstoreError)
    assert "\x1b[" not in str(info.value)  # no terminal escapes from sqlglot in messages
    assert "\n" not in str(info.value).strip()


def test_messages_say_what_is_allowed() -> None:
    with pytest.raises(InvalidQueryError, match=r"allowed: .*IN, NOT IN, BETWEEN, LIKE"):
        parse_query("SELECT * FROM embeddings WHERE run = 1 AND regexp_like(cell, 'x')")
    with pytest.raises(InvalidQueryError, match=r"SELECT .* FROM embeddings"):
        parse_query("SELECT * FROM embeddings UNION SELECT * FROM embeddings")


def test_quote_breaking_literals_stay_data() -> None:
    q = parse_query("SELECT * FROM embeddings WHERE run = 1 AND cell = 'x'' OR 1=1 --'")
    assert q.where == And((Compare("run", "=", 1), Compare("cell", "=", "x' OR 1=1 --")))
    q = parse_query('SELECT "a""b", "cell type" FROM embeddings WHERE run = 1 AND "a""b" = \'; DROP TABLE runs; --\'')
    assert q.select == (ColumnItem('a"b'), ColumnItem("cell type"))
    assert q.where == And((Compare("run", "=", 1), Compare('a"b', "=", "; DROP TABLE runs; --")))


def test_full_grammar() -> None:
    q = parse_query(
        "SELECT cell_type, layer, AVG(embedding.mean), COUNT(*) FROM embeddings "
        "WHERE dataset = 'pbmc' AND model = 'tahoe-x1' AND depth BETWEEN 0.4 AND 0.7 "
        "AND (cell_type IN ('T', 'B') OR n_genes >= 10) AND NOT is_ctrl AND score IS NOT NULL "
        "AND donor NOT IN ('d1') AND cell LIKE 'c0%' AND cell NOT LIKE '%9' AND -3 < n_genes AND score <> -0.5 "
        "AND flag = TRUE AND n_genes != 2 AND n_genes NOT BETWEEN 40 AND 45 "
        "GROUP BY cell_type, layer ORDER BY cell_type DESC, layer LIMIT 10;"
    )
    assert q.select == (ColumnItem("cell_type"), ColumnItem("layer"), AvgItem("mean"), CountItem())
    assert q.group_by == ("cell_type", "layer")
    assert q.order_by == (OrderItem("cell_type", True, False), OrderItem("layer", False, True))
    assert q.limit == 10
    assert q.is_aggregate
    assert q.where == And(
        (
            Compare("dataset", "=", "pbmc"),
            Compare("model", "=", "tahoe-x1"),
            Between("depth", 0.4, 0.7),
            Or((InList("cell_type", ("T", "B")), Compare("n_genes", ">=", 10))),
            Not(Truth("is_ctrl")),
            Not(IsNull("score")),
            InList("donor", ("d1",), negate=True),
            Like("cell", "c0%"),
            Like("cell", "%9", negate=True),
            Compare("n_genes", ">", -3),
            Compare("score", "!=", -0.5),
            Compare("flag", "=", True),
            Compare("n_genes", "!=", 2),
            Between("n_genes", 40, 45, negate=True),
        )
    )


def test_select_items_and_case() -> None:
    q = parse_query('SELECT embedding, embedding.cls, CELL, "Layer", Cell_Type FROM EMBEDDINGS WHERE RUN = 2')
    assert q.select == (EmbeddingItem(None), EmbeddingItem("cls"), ColumnItem("cell"), ColumnItem("Layer"), ColumnItem("Cell_Type"))
    assert q.where == Compare("run", "=", 2)
    assert parse_query("SELECT * FROM embeddings").select == (StarItem(),)
    assert not parse_query("SELECT * FROM embeddings").is_aggregate
    q = parse_query("SELECT AVG(embedding), COUNT(*) FROM embeddings WHERE run = 'pbmc/tahoe'")
    assert q.select == (AvgItem(None), CountItem()) and q.is_aggregate


def test_like_escape_and_literals() -> None:
    q = parse_query(r"SELECT * FROM embeddings WHERE cell LIKE 'a!%b' ESCAPE '!' AND x = 1e-3 AND y = .5 AND z = FALSE")
    assert q.where == And((Like("cell", "a!%b", escape="!"), Compare("x", "=", 0.001), Compare("y", "=", 0.5), Compare("z", "=", False)))


def test_to_sql_round_trips() -> None:
    sql = (
        "SELECT * FROM embeddings WHERE run = 1 AND (\"cell type\" IN ('it''s', 'B') OR NOT n BETWEEN -1 AND 2.5) "
        "AND c LIKE 'x!_%' ESCAPE '!' AND d IS NOT NULL AND flag"
    )
    q = parse_query(sql)
    again = parse_query(f"SELECT * FROM embeddings WHERE {to_sql(q.where)}")
    assert again.where == q.where
