"""The persistence boundary of the query layer: the store-side obs index, the programmatic slice
API (no SQL text) and catalog errors translated once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.query import cells_query, centroids_query, execute, execute_query
from sclstore.store.errors import CatalogDamagedError, InvalidQueryError

from .helpers import build_store, random_obs

runner = CliRunner()


class NoEngine:
    """A backend proxy without ``engine``: the query layer must not need one."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        if name == "engine":
            raise AssertionError("the query layer reached for the catalog engine")
        return getattr(self._backend, name)


def test_slice_api_equals_sql_and_truth(tmp_path: Path) -> None:
    obs = random_obs(60, seed=5)
    b = build_store(tmp_path / "s", obs=obs, consolidate=False)
    backend = NoEngine(b.backend)
    cell_of_src = b.cell_idx_of_src
    pick = obs["cell_type"].isin(["T", "it's"]).to_numpy() & (obs["n_genes"].to_numpy() > 3)
    src = np.flatnonzero(pick)[np.argsort(cell_of_src[pick])]  # source rows in cell order
    q = cells_query(b.run_id, layers=[3, 8], pool="mean", where={"cell_type": ["T", "it's"]}, columns=["n_genes"])
    res = execute(backend, q)
    want = b.emb["mean"][[2, 4]][:, src]
    sel = res.obs["n_genes"].to_numpy() > 3
    np.testing.assert_array_equal(res.embeddings[:, sel], want)
    assert list(res.obs.index[sel]) == list(obs.index[src])
    sql = execute_query(backend, f"SELECT n_genes, embedding.mean FROM embeddings WHERE run = {b.run_id} AND layer IN (3, 8) "
                                 "AND cell_type IN ('T', 'it''s') ORDER BY cell_idx")
    np.testing.assert_array_equal(sql.embeddings, res.embeddings)
    pd.testing.assert_frame_equal(sql.obs, res.obs)
    assert "cell_type IN ('T', 'it''s')" in res.sql  # rendered for messages only; nothing parses it

    cent = execute(backend, centroids_query(b.run_id, "donor id", pool="cls", layers=[5], where={"is_ctrl": True}))
    ctrl = obs["is_ctrl"].to_numpy()
    for gi, donor in enumerate(cent.obs["donor id"]):
        rows = ctrl & (obs["donor id"].to_numpy() == donor) if isinstance(donor, str) else ctrl & obs["donor id"].isna().to_numpy()
        np.testing.assert_allclose(cent.embeddings[0, gi], b.emb["cls"][3][rows].mean(axis=0), rtol=1e-5, atol=1e-6)
        assert cent.counts[gi] == rows.sum()
    with pytest.raises(InvalidQueryError):
        execute(backend, cells_query(b.run_id, where={"no such column": 1}))
    b.backend.close()


def test_obs_index_selects_and_ranges(tmp_path: Path) -> None:
    obs = random_obs(40, seed=8, with_nulls=False)
    b = build_store(tmp_path / "s", obs=obs, consolidate=False, cluster_by=("cell_type",))
    ds = b.backend.get_run(b.run_id).dataset_id
    index = b.backend.obs_index(ds)
    t = index.table
    col = {c.name: t.c[c.column] for c in b.backend.get_dataset(ds).obs_schema}
    nk = index.cells(col["cell_type"] == sa.literal("NK"))
    want = np.sort(b.cell_idx_of_src[obs["cell_type"].to_numpy() == "NK"])
    np.testing.assert_array_equal(nk, want)
    assert index.contiguous_range(col["cell_type"] == sa.literal("NK")) == (int(want[0]), int(want[-1]))  # clustered
    assert index.contiguous_range(None) == (0, 39)
    frame = index.frame(np.array([want[0]]))
    assert list(frame.index) == [obs.index[b.order[want[0]]]]
    b.backend.close()


@pytest.mark.parametrize("catalog_kind", ["sqlite", "postgresql"])
def test_dropped_obs_table_is_one_line(tmp_path: Path, catalog_kind: str, request: pytest.FixtureRequest) -> None:
    url = None if catalog_kind == "sqlite" else request.getfixturevalue("postgres_server").new_database()
    b = build_store(tmp_path / "s", obs=random_obs(20, seed=1), consolidate=False, catalog=url)
    ds = b.backend.get_dataset(b.dataset)
    with b.backend.engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE "{ds.obs_table}"'))  # test-only, a generated name
    b.backend.close()
    args = ["query", f"SELECT * FROM embeddings WHERE run = {b.run_id} AND cell_type = 'T'", "--store", str(tmp_path / "s")]
    res = runner.invoke(app, args + (["--catalog", url] if url else []))
    assert res.exit_code == 1
    assert res.stderr.startswith("error: the catalog is damaged") and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""
    with pytest.raises(CatalogDamagedError):
        from sclstore.store.backend import Backend

        with Backend.open(tmp_path / "s", url) as again:
            execute_query(again, f"SELECT * FROM embeddings WHERE run = {b.run_id}")


def test_obs_index_keeps_names_only_where_cheap_and_queries_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    obs = random_obs(80, seed=11, with_nulls=False)
    b = build_store(tmp_path / "s", obs=obs, consolidate=False, cluster_by=("cell_type",))
    ds = b.backend.get_run(b.run_id).dataset_id
    index = b.backend.obs_index(ds)
    # truth: cells are the source rows stably sorted by cell_type (pandas as the reference)
    order = obs.reset_index(drop=True).sort_values(["cell_type"], kind="mergesort", na_position="last").index.to_numpy()
    np.testing.assert_array_equal(b.order, order)
    names, src = np.asarray(obs.index, dtype=object)[order], order
    assert index.names(10, 19) is None and index.kept_names() is None  # first, small request: not kept
    got = index.names(3, 12)  # second request: every name is kept from now on
    assert got is not None and list(got[0]) == list(names[3:13]) and list(got[1]) == list(src[3:13])
    kept = index.kept_names()
    assert kept is not None and list(kept[0]) == list(names) and list(kept[1]) == list(src)
    picks = np.array([70, 2, 41])
    by_cells = index.names_of(picks)
    assert by_cells is not None and list(by_cells[0]) == list(names[picks])

    fresh = b.backend.obs_index(ds).__class__(b.backend.engine, b.backend.get_dataset(ds), index.table)
    assert fresh.names(0, 19) is not None  # a quarter of the cells at once: kept at the first request
    import sclstore.store.obs_index as obs_index_mod

    monkeypatch.setattr(obs_index_mod, "NAMES_CACHE_MAX_CELLS", 79)
    big = fresh.__class__(b.backend.engine, b.backend.get_dataset(ds), index.table)
    assert big.names(0, 79) is None and big.names(0, 79) is None and big.kept_names() is None  # too large: never kept

    # queries answer the same with and without the kept names (ranges, predicates, ORDER BY)
    queries = [
        f"SELECT embedding.cls FROM embeddings WHERE run = {b.run_id} AND layer = 3",
        f"SELECT embedding.cls FROM embeddings WHERE run = {b.run_id} AND layer = 3 AND cell_idx BETWEEN 5 AND 30",
        f"SELECT embedding.mean FROM embeddings WHERE run = {b.run_id} AND layer = 5 AND n_genes > 3",
        f"SELECT embedding.mean FROM embeddings WHERE run = {b.run_id} AND layer = 5 AND n_genes > 3 ORDER BY src_idx LIMIT 7",
    ]
    from sclstore.store.backend import Backend

    with Backend.open(tmp_path / "s") as cold:
        for sql in queries:
            with_kept = execute_query(b.backend, sql)
            without = execute_query(cold, sql)
            assert cold.obs_index(ds).kept_names() is None and index.kept_names() is not None
            np.testing.assert_array_equal(with_kept.embeddings, without.embeddings)
            pd.testing.assert_frame_equal(with_kept.obs, without.obs)
            np.testing.assert_array_equal(with_kept.cell_idx, without.cell_idx)
            np.testing.assert_array_equal(with_kept.src_idx, without.src_idx)
            assert list(with_kept.obs.index) == list(names[with_kept.cell_idx])  # against the build's truth
            np.testing.assert_array_equal(with_kept.src_idx, src[with_kept.cell_idx])
    b.backend.close()


def test_obs_index_remembers_selections_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sclstore.store.obs_index as obs_index_mod

    obs = random_obs(60, seed=2, with_nulls=False)
    b = build_store(tmp_path / "s", obs=obs, consolidate=False, cluster_by=())
    ds = b.backend.get_run(b.run_id).dataset_id
    index = b.backend.obs_index(ds)
    col = {c.name: index.table.c[c.column] for c in b.backend.get_dataset(ds).obs_schema}
    truth = {"T": np.sort(b.cell_idx_of_src[obs["cell_type"].to_numpy() == "T"])}
    first = index.cells(col["cell_type"] == sa.literal("T"), key="T")
    np.testing.assert_array_equal(first, truth["T"])
    first[:] = -1  # the caller's copy: the remembered answer is untouched
    with b.backend.engine.begin() as conn:  # an answer under a key is not asked of the catalog again
        conn.execute(sa.text(f'UPDATE "{index.table.name}" SET {col["cell_type"].name} = NULL'))  # test-only
    np.testing.assert_array_equal(index.cells(col["cell_type"] == sa.literal("T"), key="T"), truth["T"])
    assert index.cells(col["cell_type"] == sa.literal("T")).size == 0  # without a key: asked again
    monkeypatch.setattr(obs_index_mod, "SELECTIONS_MAX_CELLS", truth["T"].size + 5)
    np.testing.assert_array_equal(index.cells(index.table.c.cell_idx < 10, key="first ten"), np.arange(10))
    assert "T" not in index._selections  # over the limit in all: the oldest answer went
    b.backend.close()
