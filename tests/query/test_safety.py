"""Hostile queries against real stores leave the catalog unchanged, on SQLite and PostgreSQL;
results on PostgreSQL equal the same oracle as on SQLite (LIKE, string order, NULLs)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sclstore.query import execute_query
from sclstore.query.spec import OrderItem, to_sql
from sclstore.store.errors import InvalidQueryError, SclstoreError

from .helpers import BuiltStore, build_store, check_cells, expected_rows, frame_of, random_obs
from .oracle import predicates_for
from .test_parse import HOSTILE

# Values that look like SQL stay values: valid queries that must select nothing and change nothing.
INJECTED_VALUES = [
    "SELECT * FROM embeddings WHERE run = 1 AND cell = 'x''; DROP TABLE runs; --'",
    "SELECT * FROM embeddings WHERE run = 1 AND cell_type = 'T'' OR ''1''=''1'",
    "SELECT * FROM embeddings WHERE run = 1 AND \"donor id\" IN ('a''); DELETE FROM datasets; --', 'b')",
    "SELECT * FROM embeddings WHERE run = 1 AND cell LIKE '%''; ATTACH DATABASE ''x'' AS y; --'",
    "SELECT * FROM embeddings WHERE run = 1 AND cell = '\\' ",  # a backslash is just a character
]
# Hostile identifiers: valid syntax, unknown columns.
HOSTILE_NAMES = [
    'SELECT * FROM embeddings WHERE run = 1 AND "a""b" = 1',
    'SELECT * FROM embeddings WHERE run = 1 AND "x"" = 1; DROP TABLE runs; --" = 1',
    'SELECT "c0" FROM embeddings WHERE run = 1',
    'SELECT * FROM embeddings WHERE run = 1 AND c1 = 1',  # physical column names stay hidden (src_idx is public)
    "SELECT * FROM embeddings WHERE run = 1 AND sqlite_master = 'x'",
    "SELECT * FROM embeddings WHERE run = 1 AND pg_catalog = 'x'",
]


def _catalog_fingerprint(b: BuiltStore) -> Any:
    """SQLite: the bytes of every catalog file. PostgreSQL: every row of every table."""
    engine = b.backend.engine
    if engine.dialect.name == "sqlite":
        files = sorted(p for p in b.root.iterdir() if p.name.startswith("catalog"))
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    insp = sa.inspect(engine)
    out = {}
    with engine.connect() as conn:
        for name in sorted(insp.get_table_names()):
            rows = conn.execute(sa.text(f'SELECT * FROM "{name}"')).all()  # test-only, fixed names
            out[name] = sorted(map(repr, rows))
    return out


def _hammer(b: BuiltStore) -> None:
    for sql, _ in HOSTILE:
        with pytest.raises(InvalidQueryError):
            execute_query(b.backend, sql)
    for sql in HOSTILE_NAMES:
        with pytest.raises(InvalidQueryError, match="unknown column"):
            execute_query(b.backend, sql)
    for sql in INJECTED_VALUES:
        res = execute_query(b.backend, sql)
        assert res.obs.shape[0] == 0 and res.embeddings.shape[1] == 0


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    b = build_store(tmp_path_factory.mktemp("s") / "store", obs=random_obs(40, seed=11), consolidate=False)
    yield b
    b.backend.close()


@pytest.fixture(scope="module")
def pg_store(tmp_path_factory: pytest.TempPathFactory, postgres_server: Any) -> Iterator[BuiltStore]:
    url = postgres_server.new_database()
    b = build_store(tmp_path_factory.mktemp("p") / "store", obs=random_obs(40, seed=11), catalog=url, consolidate=False)
    yield b
    b.backend.close()


def test_hostile_queries_leave_sqlite_catalog_byte_identical(sqlite_store: BuiltStore) -> None:
    before = _catalog_fingerprint(sqlite_store)
    assert "catalog.sqlite" in before
    _hammer(sqlite_store)
    assert _catalog_fingerprint(sqlite_store) == before
    ok = execute_query(sqlite_store.backend, "SELECT * FROM embeddings WHERE run = 1 AND layer = 0")
    assert ok.obs.shape[0] == 40  # the store still works


def test_hostile_queries_leave_postgres_catalog_unchanged(pg_store: BuiltStore) -> None:
    before = _catalog_fingerprint(pg_store)
    assert any(name.startswith("obs_") for name in before) and "runs" in before
    _hammer(pg_store)
    assert _catalog_fingerprint(pg_store) == before


def test_postgres_results_equal_sqlite_results(sqlite_store: BuiltStore, pg_store: BuiltStore) -> None:
    queries = [
        "SELECT * FROM embeddings WHERE run = 1 AND layer = 3 AND \"donor id\" > 'd' ORDER BY \"donor id\" DESC, cell",
        "SELECT * FROM embeddings WHERE run = 1 AND layer = 3 AND cell_type LIKE 't%'",  # case-sensitive: none
        "SELECT * FROM embeddings WHERE run = 1 AND layer = 3 AND cell_type LIKE 'T%' ORDER BY cell_type, score DESC",
        "SELECT * FROM embeddings WHERE run = 1 AND layer = 3 AND cell_type LIKE 'mono!_!%' ESCAPE '!'",
        "SELECT * FROM embeddings WHERE run = 1 AND layer = 3 AND \"donor id\" LIKE '%\\%'",
        "SELECT * FROM embeddings WHERE run = 1 AND depth = 0.6 AND NOT is_ctrl ORDER BY score NULLS FIRST LIMIT 9",
        # one run of cell_idx (clustered by cell_type): the overlapped range path
        "SELECT * FROM embeddings WHERE run = 1 AND layer IN (0, 3) AND cell_type = 'T'",
        "SELECT embedding.mean FROM embeddings WHERE run = 1 AND layer = 8 AND cell_idx BETWEEN 5 AND 20",
    ]
    for sql in queries:
        a = execute_query(sqlite_store.backend, sql)
        b = execute_query(pg_store.backend, sql)
        assert list(a.obs.index) == list(b.obs.index), sql
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
        np.testing.assert_array_equal(a.cell_idx, b.cell_idx)
        pd.testing.assert_frame_equal(a.obs, b.obs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_queries_on_postgres_match_oracle(pg_store: BuiltStore, data: st.DataObject) -> None:
    b = pg_store
    pred = data.draw(predicates_for(frame_of(b), max_leaves=6))
    order = data.draw(st.lists(st.sampled_from(["cell_type", "donor id", "score", "cell"]), max_size=2, unique=True))
    items = [OrderItem(c, data.draw(st.booleans()), None) for c in order]
    order_sql = " ORDER BY " + ", ".join(f'"{o.column}" {"DESC" if o.desc else ""}' for o in items) if items else ""
    res = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 5 AND ({to_sql(pred)}){order_sql}")
    fixed = [OrderItem(o.column, o.desc, not o.desc) for o in items]
    check_cells(b, res, expected_rows(b, pred, fixed), (5,), "cls")


def test_errors_are_sclstore_errors(sqlite_store: BuiltStore, tmp_path: Path) -> None:
    for sql, _ in HOSTILE[:5]:
        with pytest.raises(SclstoreError):
            execute_query(sqlite_store.backend, sql)
