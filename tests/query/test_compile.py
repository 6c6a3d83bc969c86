"""Compiled obs predicates select exactly the rows pandas selects, on a real SQLite table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from sclstore.query.compile import bind_columns, compile_order, compile_predicate, like_to_regex
from sclstore.query.parse import parse_query
from sclstore.query.spec import Predicate, to_sql
from sclstore.store.errors import InvalidQueryError

from .helpers import ObsDB, make_obs_db, random_obs
from .oracle import predicates_for, selected


def where_of(text: str) -> Predicate:
    q = parse_query(f"SELECT * FROM embeddings WHERE {text}")
    assert q.where is not None
    return q.where


def run_sql(db: ObsDB, pred: Predicate, *, literal: bool = False) -> np.ndarray:
    cols = bind_columns(db.table, db.schema)
    stmt = sa.select(db.table.c.cell_idx).where(compile_predicate(pred, cols, dialect="sqlite")).order_by(db.table.c.cell_idx)
    with db.engine.connect() as conn:
        if literal:
            text = str(stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
            rows = conn.exec_driver_sql(text).all()
        else:
            rows = conn.execute(stmt).all()
    return np.array([r[0] for r in rows], dtype=np.int64)


def s(df: pd.DataFrame, name: str) -> pd.Series:
    col = df[name]
    return col.astype(object) if isinstance(col.dtype, pd.CategoricalDtype) else col


CASES: list[tuple[str, Callable[[pd.DataFrame], pd.Series]]] = [
    ("cell_type = 'T'", lambda d: s(d, "cell_type") == "T"),
    ("cell_type <> 'T'", lambda d: (s(d, "cell_type") != "T") & d.cell_type.notna()),
    ("cell_type != 'T'", lambda d: (s(d, "cell_type") != "T") & d.cell_type.notna()),
    ("NOT cell_type = 'T'", lambda d: (s(d, "cell_type") != "T") & d.cell_type.notna()),
    ("cell_type IN ('T', 'NK', 'it''s')", lambda d: s(d, "cell_type").isin(["T", "NK", "it's"])),
    ("cell_type NOT IN ('T', 'B')", lambda d: ~s(d, "cell_type").isin(["T", "B"]) & d.cell_type.notna()),
    ("cell_type IS NULL", lambda d: d.cell_type.isna()),
    ("cell_type IS NOT NULL", lambda d: d.cell_type.notna()),
    ("\"donor id\" = 'x*y'", lambda d: d["donor id"] == "x*y"),
    ("\"donor id\" = 'd1'", lambda d: d["donor id"] == "d1"),  # case-sensitive: not 'D1'
    ("\"donor id\" > 'd'", lambda d: d["donor id"].map(lambda v: isinstance(v, str) and v > "d").astype(bool)),
    ("\"donor id\" BETWEEN 'D' AND 'd1'", lambda d: d["donor id"].map(lambda v: isinstance(v, str) and "D" <= v <= "d1").astype(bool)),
    ("cell_type LIKE 'CD4%'", lambda d: s(d, "cell_type").str.startswith("CD4").fillna(False).astype(bool)),
    ("cell_type LIKE 't'", lambda d: s(d, "cell_type") == "t"),  # LIKE is case-sensitive
    ("cell_type LIKE 'mono!_!%' ESCAPE '!'", lambda d: s(d, "cell_type") == "mono_%"),
    ("cell_type LIKE 'mono_%'", lambda d: s(d, "cell_type").str.startswith("mono").fillna(False).astype(bool)),
    ("cell_type LIKE '%''%'", lambda d: s(d, "cell_type").str.contains("'", regex=False).fillna(False).astype(bool)),
    ("\"donor id\" LIKE 'x*%'", lambda d: d["donor id"].str.startswith("x*").fillna(False).astype(bool)),
    ("\"donor id\" LIKE '_'", lambda d: d["donor id"].str.len().eq(1).fillna(False).astype(bool)),  # 'é' is one char
    ("cell_type NOT LIKE '%T%'", lambda d: ~s(d, "cell_type").str.contains("T", regex=False).fillna(True).astype(bool)),
    ("score > 0.5", lambda d: d.score > 0.5),
    ("score <= -0.25 OR score IS NULL", lambda d: (d.score <= -0.25) | d.score.isna()),
    ("NOT (score > 0)", lambda d: d.score <= 0),
    ("score BETWEEN -1 AND 1", lambda d: d.score.between(-1, 1)),
    ("score NOT BETWEEN -1 AND 1", lambda d: ~d.score.between(-1, 1) & d.score.notna()),
    ("n_genes >= 10 AND n_genes < 20", lambda d: (d.n_genes >= 10) & (d.n_genes < 20)),
    ("n_genes = -3", lambda d: d.n_genes == -3),
    ("n_genes > 2.5", lambda d: d.n_genes > 2.5),
    ("3 > n_genes", lambda d: d.n_genes < 3),
    ("n_genes IN (1, 2, 3.0)", lambda d: d.n_genes.isin([1, 2, 3])),
    ("is_ctrl", lambda d: d.is_ctrl),
    ("NOT is_ctrl", lambda d: ~d.is_ctrl),
    ("is_ctrl = FALSE", lambda d: ~d.is_ctrl),
    ("is_ctrl != TRUE AND n_genes > 0", lambda d: ~d.is_ctrl & (d.n_genes > 0)),
    ("cell = 'c0007'", lambda d: pd.Series(d.index == "c0007", index=d.index)),
    ("cell LIKE 'c001_'", lambda d: pd.Series(d.index.str.match(r"^c001.$"), index=d.index)),
    ("cell_idx < 5 OR cell_idx = 199", lambda d: pd.Series((np.arange(len(d)) < 5) | (np.arange(len(d)) == 199), index=d.index)),
    ("(cell_type = 'T' OR cell_type = 'B') AND NOT (score < 0 OR n_genes > 40)",
     lambda d: s(d, "cell_type").isin(["T", "B"]) & (d.score >= 0) & (d.n_genes <= 40)),
    ("cell_type = 'x'' OR 1=1 --'", lambda d: pd.Series(False, index=d.index)),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_compiled_predicate_matches_pandas(obs_db: ObsDB, text: str, expected: Callable[[pd.DataFrame], pd.Series]) -> None:
    pred = where_of(text)
    want = np.flatnonzero(expected(obs_db.obs).to_numpy(dtype=bool))
    assert want.size > 0 or "1=1" in text or "'t'" in text  # the corpus exercises real selections
    np.testing.assert_array_equal(run_sql(obs_db, pred), want)
    np.testing.assert_array_equal(run_sql(obs_db, pred, literal=True), want)


def test_values_are_bound_parameters(obs_db: ObsDB) -> None:
    cols = bind_columns(obs_db.table, obs_db.schema)
    pred = where_of("cell_type = 'x'' OR 1=1 --' AND n_genes IN (1, 2) AND \"donor id\" LIKE 'a%'")
    compiled = compile_predicate(pred, cols).compile(dialect=sqlite.dialect())
    text = str(compiled)
    assert "OR 1=1" not in text and "'" not in text  # user text only in parameters
    assert "x' OR 1=1 --" in compiled.params.values()
    assert text == "obs_test.c0 = ? AND obs_test.c3 IN (?, ?) AND (obs_test.c1 GLOB ?)"


def test_literal_sql_for_both_dialects(obs_db: ObsDB) -> None:
    cols = bind_columns(obs_db.table, obs_db.schema)
    pred = where_of("cell_type LIKE 'a%_[*?' AND \"donor id\" < 'm' AND NOT is_ctrl")
    lit = {"literal_binds": True}
    assert str(compile_predicate(pred, cols, dialect="sqlite").compile(dialect=sqlite.dialect(), compile_kwargs=lit)) == (
        "(obs_test.c0 GLOB 'a*?[[][*][?]') AND obs_test.c1 < 'm' AND obs_test.c4 != 1"
    )
    assert str(compile_predicate(pred, cols, dialect="postgresql").compile(dialect=postgresql.dialect(), compile_kwargs=lit)) == (
        "obs_test.c0 LIKE 'a%%_[*?' ESCAPE '\\' AND (obs_test.c1 COLLATE \"C\") < 'm' AND obs_test.c4 != true"
    )
    order = compile_order(parse_query('SELECT * FROM embeddings ORDER BY "donor id" DESC, score').order_by, cols, dialect="postgresql")
    assert [str(o.compile(dialect=postgresql.dialect())) for o in order] == [
        'obs_test.c1 COLLATE "C" DESC NULLS LAST',
        "obs_test.c2 ASC NULLS FIRST",
        "obs_test.cell_idx ASC",
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cell_type = 3", r"'cell_type' is a categorical \(text\) column and cannot be compared with 3"),
        ("n_genes = '3'", r"'n_genes' is an integer column and cannot be compared with '3'.*number literal"),
        ("score IN (1, 'a')", r"'score' is a float column"),
        ("is_ctrl = 1", r"'is_ctrl' is a boolean column.*TRUE"),
        ("is_ctrl < TRUE", r"boolean column 'is_ctrl' supports = and != only"),
        ("n_genes LIKE '1%'", r"LIKE works on text columns only; 'n_genes' is an integer column"),
        ("score", r"'score' is a float column, not a condition"),
        ("celltype = 'T'", r"unknown column 'celltype' in WHERE\. Did you mean 'cell_type'"),
        ("Cell_Type = 'T'", r"unknown column 'Cell_Type'.*Did you mean 'cell_type'"),
        ("sqlite_master = 'x'", r"unknown column 'sqlite_master'"),
        ("cell LIKE 'a!' ESCAPE '!'", r"ends with the escape character"),
    ],
)
def test_type_and_name_errors(obs_db: ObsDB, text: str, match: str) -> None:
    cols = bind_columns(obs_db.table, obs_db.schema)
    with pytest.raises(InvalidQueryError, match=match):
        compile_predicate(where_of(text), cols)


def test_like_regex_helper() -> None:
    assert like_to_regex("a%b_") == "a.*b."
    assert like_to_regex("a!%", "!") == "a%"


def test_order_matches_pandas(obs_db: ObsDB) -> None:
    cols = bind_columns(obs_db.table, obs_db.schema)
    q = parse_query('SELECT * FROM embeddings ORDER BY "donor id" DESC, score NULLS LAST, cell_idx DESC')
    stmt = sa.select(obs_db.table.c.cell_idx).order_by(*compile_order(q.order_by, cols))
    with obs_db.engine.connect() as conn:
        got = [r[0] for r in conn.execute(stmt)]
    df = obs_db.obs.reset_index(drop=True).assign(idx=np.arange(obs_db.obs.shape[0]))
    df = df.sort_values("idx", ascending=False, kind="mergesort")
    df = df.sort_values("score", na_position="last", kind="mergesort")
    df = df.sort_values("donor id", ascending=False, na_position="last", kind="mergesort")
    assert got == df["idx"].tolist()


@st.composite
def obs_frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    obs = random_obs(n, seed, with_nulls=draw(st.booleans()))
    return obs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_predicates_match_pandas_oracle(data: st.DataObject) -> None:
    obs = data.draw(obs_frames())
    db = make_obs_db(obs)
    try:
        frame = obs.assign(__cell_idx=np.arange(obs.shape[0]))
        pred = data.draw(predicates_for(frame))
        text = to_sql(pred)
        parsed = where_of(text)  # through the text: parser + compiler together
        want = np.flatnonzero(selected(pred, frame))
        np.testing.assert_array_equal(run_sql(db, parsed), want, err_msg=text)
    finally:
        db.engine.dispose()
