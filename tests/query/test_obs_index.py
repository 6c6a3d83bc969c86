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
