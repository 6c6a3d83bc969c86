"""Bulk obs registration (COPY on PostgreSQL, driver executemany on SQLite) round-trips exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import sqlalchemy as sa

import sclstore

AWKWARD = ["plain", "tab\there", "new\nline", "back\\slash", "quote\"s", "comma,s", "", "\\N", "ünïcode ρ", "NULL",
           "cr\r\nlf", "\\t not a tab", "trailing\\"]
# doubles whose text form is easy to get wrong: subnormal, extremes, negative zero, 17 significant digits
EDGE_FLOATS = [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1 + 0.2, 1 / 3, -1e-300, 123456789.12345679]


def _obs(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    text = np.array([AWKWARD[i % len(AWKWARD)] for i in range(n)], dtype=object)
    text[rng.random(n) < 0.1] = None
    raw = rng.integers(-5, 5, n)
    raw[:2] = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]
    ints = pd.array(raw, dtype="Int64")
    ints[rng.random(n) < 0.1] = pd.NA
    floats = rng.normal(size=n)
    floats[rng.random(n) < 0.1] = np.nan
    floats[: len(EDGE_FLOATS)] = EDGE_FLOATS
    flags = pd.array(rng.random(n) < 0.5, dtype="boolean")
    flags[rng.random(n) < 0.1] = pd.NA
    cats = pd.Categorical(rng.choice(["b", "a", "c\td"], n), categories=["c\td", "b", "a"])
    return pd.DataFrame(
        {"label": cats, "note": text, "count": ints, "score": floats, "flag": flags, "donor": rng.choice(["d2", "d1"], n)},
        index=[f"cell-{i}\t{AWKWARD[i % 3]}" for i in range(n)],
    )


def test_registered_obs_round_trips_awkward_values(store: sclstore.Store) -> None:
    obs = _obs(2_000)
    info = store.backend.register_dataset(name="bulk", content_hash="b" * 64, obs=obs, n_vars=5, source_path=None,
                                          cluster_by=("donor",))
    back = store.backend.read_obs(info.id)
    order = np.argsort(obs["donor"].to_numpy(), kind="stable")  # the cluster_by order, computed independently
    assert back["src_idx"].to_numpy().tolist() == order.tolist()
    assert back["cell_idx"].to_numpy().tolist() == list(range(len(obs)))
    expected = obs.iloc[order]
    assert back.index.tolist() == expected.index.tolist()
    assert back["label"].astype(object).tolist() == expected["label"].astype(object).tolist()
    assert list(back["label"].cat.categories) == ["c\td", "b", "a"]
    for col in ("note", "donor"):
        got = [None if pd.isna(v) else v for v in back[col].tolist()]
        want = [None if pd.isna(v) else v for v in expected[col].tolist()]
        assert got == want, col
    np.testing.assert_array_equal(back["score"].to_numpy(), expected["score"].to_numpy())  # bit-exact doubles
    if store.backend.engine.dialect.name == "postgresql":  # SQLite stores an integral REAL as an integer: -0.0 -> 0
        assert np.signbit(back["score"].to_numpy()).tolist() == np.signbit(expected["score"].to_numpy()).tolist()
    assert back["count"].isna().tolist() == expected["count"].isna().tolist()
    assert back["count"].dropna().astype(int).tolist() == expected["count"].dropna().astype(int).tolist()
    assert back["flag"].isna().tolist() == expected["flag"].isna().tolist()
    assert back["flag"].dropna().astype(bool).tolist() == expected["flag"].dropna().astype(bool).tolist()


def test_obs_table_indexes_exist_after_bulk_load(store: sclstore.Store) -> None:
    obs = _obs(50)
    info = store.backend.register_dataset(name="idx", content_hash="c" * 64, obs=obs, n_vars=5, source_path=None)
    table = store.backend.obs_table(info.id)
    names = {ix["name"] for ix in sa.inspect(store.backend.engine).get_indexes(table.name)}
    assert {ix.name for ix in table.indexes} <= names
    with store.backend.engine.connect() as conn:  # the unique index on cell names holds
        n = conn.execute(sa.select(sa.func.count(sa.distinct(table.c.cell)))).scalar_one()
    assert n == len(obs)


def test_copy_text_fields_escape_like_postgresql_documents() -> None:
    from sclstore.store.obs_load import _text

    # COPY text format: backslash, tab, newline, CR escaped; NULL is \N; a literal "\N" must not read as NULL
    assert _text(["a\tb", None, "c\\N", "x\r\ny", ""]) == ["a\\tb", "\\N", "c\\\\N", "x\\r\\ny", ""]
    # a value with the joiner's NUL falls back to escaping value by value (same fields, same count)
    assert _text(["n\0ul\t", None, "ok"]) == ["n\0ul\\t", "\\N", "ok"]
