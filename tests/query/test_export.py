"""-o writers: every format holds exactly the result's values, streamed or not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from sclstore.query import QueryResult, QueryStream, execute_query, open_query, query_to_file, write_result
from sclstore.store.errors import InvalidInputError

from .helpers import BuiltStore, build_store, random_obs


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    b = build_store(tmp_path_factory.mktemp("x") / "store", obs=random_obs(30, seed=3), consolidate=False)
    yield b
    b.backend.close()


SQL = "SELECT * FROM embeddings WHERE run = 1 AND layer IN (2, 5) AND n_genes > 5 ORDER BY score DESC"


def _both(b: BuiltStore) -> tuple[QueryResult, QueryStream]:
    res = execute_query(b.backend, SQL)
    stream = open_query(b.backend, SQL)
    assert isinstance(stream, QueryStream)
    assert stream.n_rows == res.n_rows > 5
    return res, stream


@pytest.mark.parametrize("streamed", [False, True])
def test_npy_npz(small: BuiltStore, tmp_path: Path, streamed: bool) -> None:
    res, stream = _both(small)
    src = stream if streamed else res
    np.testing.assert_array_equal(np.load(write_result(src, tmp_path / "a.npy", chunk_cells=4)), res.embeddings)
    z = np.load(write_result(src, tmp_path / "a.npz", chunk_cells=4), allow_pickle=False)
    np.testing.assert_array_equal(z["embeddings"], res.embeddings)
    np.testing.assert_array_equal(z["cell_idx"], res.cell_idx)
    assert z["cells"].tolist() == list(res.obs.index)
    assert z["layers"].tolist() == [2, 5]
    np.testing.assert_array_equal(z["obs_score"], res.obs["score"].to_numpy())
    assert z["obs_cell_type"].tolist() == ["" if pd.isna(v) else v for v in res.obs["cell_type"]]
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("streamed", [False, True])
def test_h5ad(small: BuiltStore, tmp_path: Path, streamed: bool) -> None:
    res, stream = _both(small)
    adata = ad.read_h5ad(write_result(stream if streamed else res, tmp_path / "a.h5ad", chunk_cells=4))
    want = res.to_anndata()
    assert list(adata.obsm) == list(want.obsm) == ["X_tiny-m_L02_cls", "X_tiny-m_L05_cls"]
    for key in want.obsm:
        np.testing.assert_array_equal(adata.obsm[key], want.obsm[key])
    assert list(adata.obs_names) == list(res.obs.index)
    # anndata stores text columns as categoricals; compare the values
    got = adata.obs[list(res.obs.columns)]
    for name in res.obs.columns:
        assert [None if pd.isna(v) else v for v in got[name]] == [None if pd.isna(v) else v for v in res.obs[name]], name
    assert adata.uns["sclstore"]["run"] == 1
    assert list(adata.uns["sclstore"]["layers"]) == [2, 5]


@pytest.mark.parametrize("ext", [".parquet", ".csv"])
@pytest.mark.parametrize("streamed", [False, True])
def test_long_format(small: BuiltStore, tmp_path: Path, ext: str, streamed: bool) -> None:
    res, stream = _both(small)
    path = write_result(stream if streamed else res, tmp_path / f"a{ext}", chunk_cells=4)
    df = pd.read_parquet(path) if ext == ".parquet" else pd.read_csv(path)
    n = res.n_rows
    assert len(df) == 2 * n
    assert df["layer"].tolist() == [2] * n + [5] * n
    np.testing.assert_allclose(df["depth"].to_numpy(), [2 / 8] * n + [5 / 8] * n)
    assert df["cell"].tolist() == list(res.obs.index) * 2
    assert df["cell_idx"].tolist() == list(res.cell_idx) * 2
    emb = df[[f"e{j}" for j in range(6)]].to_numpy()
    assert emb.dtype == (np.float32 if ext == ".parquet" else np.float64)
    np.testing.assert_array_equal(emb.astype(np.float32), res.embeddings.reshape(2 * n, 6))  # %.9g is exact for float32
    np.testing.assert_allclose(df["score"].to_numpy()[:n], res.obs["score"].to_numpy())


def test_grouped_and_obs_only(small: BuiltStore, tmp_path: Path) -> None:
    b = small
    g = execute_query(b.backend, "SELECT cell_type, layer, AVG(embedding), COUNT(*) FROM embeddings WHERE run = 1 GROUP BY cell_type, layer")
    df = pd.read_parquet(write_result(g, tmp_path / "g.parquet"))
    assert len(df) == len(b.layers) * g.n_rows
    np.testing.assert_array_equal(df[[f"e{j}" for j in range(6)]].to_numpy(), g.embeddings.reshape(-1, 6))
    assert df["count"].tolist() == list(g.counts) * len(b.layers)
    a = ad.read_h5ad(write_result(g, tmp_path / "g.h5ad"))
    np.testing.assert_array_equal(a.obsm["X_tiny-m_L08_cls"], g.embeddings[-1])
    cells = execute_query(b.backend, "SELECT cell, score FROM embeddings WHERE run = 1 AND layer = 2")
    assert cells.embeddings is None
    df = pd.read_csv(write_result(cells, tmp_path / "c.csv"))
    assert df.columns.tolist() == ["cell", "cell_idx", "src_idx", "score"] and len(df) == 30
    with pytest.raises(InvalidInputError, match=r"\.npy holds embeddings, but the query selects none"):
        write_result(cells, tmp_path / "c.npy")


def test_bad_paths(small: BuiltStore, tmp_path: Path) -> None:
    res = execute_query(small.backend, SQL)
    with pytest.raises(InvalidInputError, match=r"unknown extension '\.txt'; use one of \.h5ad, \.npy"):
        write_result(res, tmp_path / "a.txt")
    made = write_result(res, tmp_path / "nope" / "a.npy")  # like --plot, -o creates its folder
    assert made.is_file() and np.load(made).shape == res.embeddings.shape
    with pytest.raises(InvalidInputError, match="unknown output extension"):
        query_to_file(small.backend, SQL, tmp_path / "a.xlsx")
    summary = query_to_file(small.backend, SQL, tmp_path / "q.npy")
    assert summary["path"].endswith("q.npy") and summary["shape"] == [2, res.n_rows, 6] and summary["run"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "q.npy"), res.embeddings)


def test_parquet_schema_from_all_rows(tmp_path: Path) -> None:
    obs = random_obs(12, seed=0, with_nulls=False)
    obs["donor id"] = [None] * 6 + ["late"] * 6  # NULL in the first blocks, text later
    b = build_store(tmp_path / "s", obs=obs, consolidate=False, cluster_by=())
    try:
        stream = open_query(b.backend, "SELECT * FROM embeddings WHERE run = 1 AND layer = 0")
        df = pd.read_parquet(write_result(stream, tmp_path / "a.parquet", chunk_cells=3))
        assert df["donor id"].tolist() == [None] * 6 + ["late"] * 6
        np.testing.assert_array_equal(df[[f"e{j}" for j in range(6)]].to_numpy(), b.emb["cls"][0])
    finally:
        b.backend.close()
