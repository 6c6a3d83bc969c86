"""Input order (issue 15.1): src_idx is queryable, exports and to_anndata follow the AnnData's
rows, Store.attach and ``--into`` align by obs_names. The store is clustered by cell_type, so
its cell order differs from the input order; the oracle is the truth in source row order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from sclstore.query import execute_query, query_to_file
from sclstore.query.attach import attach
from sclstore.store.errors import InvalidInputError

from .helpers import BuiltStore, build_store, random_obs


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    built = build_store(tmp_path_factory.mktemp("order") / "store", obs=random_obs(50, seed=3), consolidate=False)
    assert not np.array_equal(built.order, np.arange(50))  # clustered: store order != input order
    yield built
    built.backend.close()


def _truth(b: BuiltStore, names: pd.Index, layer: int, pool: str = "cls") -> np.ndarray:
    rows = b.obs.index.get_indexer(names)
    assert (rows >= 0).all()
    return b.emb[pool][b.layers.index(layer)][rows]


def test_src_idx_is_a_queryable_column(b: BuiltStore) -> None:
    res = execute_query(b.backend, f"SELECT cell, src_idx FROM embeddings WHERE run = {b.run_id} AND src_idx < 10 ORDER BY src_idx DESC")
    assert list(res.src_idx) == list(range(9, -1, -1))
    assert list(res.obs.index) == list(b.obs.index[9::-1])
    np.testing.assert_array_equal(res.cell_idx, b.cell_idx_of_src[9::-1])
    # an explicit ORDER BY is kept by to_anndata
    assert list(res.to_anndata().obs_names) == list(b.obs.index[9::-1])


def test_to_anndata_defaults_to_input_order(b: BuiltStore) -> None:
    res = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 3")
    assert list(res.obs.index) != list(b.obs.index)  # the result itself is in store order
    adata = res.to_anndata()
    assert list(adata.obs_names) == list(b.obs.index)
    assert list(adata.obs["src_idx"]) == list(range(50))
    np.testing.assert_array_equal(adata.obsm["X_tiny-m_L03_cls"], _truth(b, adata.obs_names, 3))
    pd.testing.assert_series_equal(adata.obs["cell_type"].astype(str), b.obs["cell_type"].astype(str), check_names=False)
    store = res.to_anndata(order="store")
    assert list(store.obs_names) == list(res.obs.index)
    np.testing.assert_array_equal(store.obsm["X_tiny-m_L03_cls"], _truth(b, store.obs_names, 3))
    with pytest.raises(InvalidInputError, match="unknown row order"):
        res.to_anndata(order="random")


@pytest.mark.parametrize("suffix", [".h5ad", ".npz", ".csv"])
def test_exports_default_to_input_order(b: BuiltStore, tmp_path: Path, suffix: str) -> None:
    sql = f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 5 AND cell_type != 'B'"
    keep = b.obs.index[(b.obs["cell_type"].notna() & (b.obs["cell_type"] != "B")).to_numpy()]  # SQL: NULL != x is not true
    out = tmp_path / "sub" / f"x{suffix}"  # parent folder created
    query_to_file(b.backend, sql, out)
    if suffix == ".h5ad":
        got = ad.read_h5ad(out)
        names, emb = got.obs_names, got.obsm["X_tiny-m_L05_cls"]
    elif suffix == ".npz":
        z = np.load(out)
        names, emb = pd.Index(z["cells"]), z["embeddings"][0]
        assert list(z["src_idx"]) == list(b.obs.index.get_indexer(names))
    else:
        df = pd.read_csv(out)
        names, emb = pd.Index(df["cell"].astype(str)), df[[f"e{j}" for j in range(6)]].to_numpy(np.float32)
    assert list(names) == list(keep)
    np.testing.assert_array_equal(emb, _truth(b, names, 5))
    query_to_file(b.backend, sql, tmp_path / f"s{suffix}", order="store")
    if suffix == ".h5ad":
        store_names = ad.read_h5ad(tmp_path / "s.h5ad").obs_names
        assert list(store_names) == sorted(keep, key=lambda n: b.cell_idx_of_src[b.obs.index.get_loc(n)])


def test_attach_aligns_by_obs_names(b: BuiltStore) -> None:
    rng = np.random.default_rng(0)
    pick = rng.permutation(50)[:30]
    adata = ad.AnnData(obs=pd.DataFrame(index=b.obs.index[pick].astype(str)))
    keys = attach(b.backend, adata, b.run_id, layers=[0, 8], pools=["cls", "mean"])
    assert keys == ["X_tiny-m_L00_cls", "X_tiny-m_L08_cls", "X_tiny-m_L00_mean", "X_tiny-m_L08_mean"]
    for layer in (0, 8):
        for pool in ("cls", "mean"):
            np.testing.assert_array_equal(adata.obsm[f"X_tiny-m_L{layer:02d}_{pool}"], _truth(b, adata.obs_names, layer, pool))
    unknown = ad.AnnData(obs=pd.DataFrame(index=[*b.obs.index[:3].astype(str), "not-a-cell"]))
    with pytest.raises(InvalidInputError, match=r"1 of 4 cells .* not in .*'not-a-cell'"):
        attach(b.backend, unknown, b.run_id, layers=[0])
    assert "X_tiny-m_L00_cls" not in unknown.obsm


def test_query_into_a_copy_of_the_source(b: BuiltStore, tmp_path: Path) -> None:
    src = tmp_path / "source.h5ad"
    X = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    ad.AnnData(X=X, obs=pd.DataFrame({"keep": np.arange(50)}, index=b.obs.index.astype(str))).write_h5ad(src)
    before = src.read_bytes()
    sql = f"SELECT cell, embedding FROM embeddings WHERE run = {b.run_id} AND layer = 2 AND cell_type = 'T'"
    summary = query_to_file(b.backend, sql, tmp_path / "out" / "with.h5ad", into=src)
    assert src.read_bytes() == before
    got = ad.read_h5ad(tmp_path / "out" / "with.h5ad")
    np.testing.assert_array_equal(got.X, X)
    assert list(got.obs_names) == list(b.obs.index)
    is_t = (b.obs["cell_type"] == "T").to_numpy()
    emb = got.obsm["X_tiny-m_L02_cls"]
    np.testing.assert_array_equal(emb[is_t], _truth(b, b.obs.index[is_t], 2))
    assert np.isnan(emb[~is_t]).all()
    assert summary["unfilled"] == int((~is_t).sum())
    assert got.uns["sclstore"]["run"] == b.run_id
    with pytest.raises(InvalidInputError, match="overwrite its source"):
        query_to_file(b.backend, sql, src, into=src)


def test_several_pools_in_one_query(b: BuiltStore, tmp_path: Path) -> None:
    from sclstore.query import open_query, write_result

    sql = f"SELECT cell, embedding.mean, embedding.cls FROM embeddings WHERE run = {b.run_id} AND layer IN (0, 3)"
    res = execute_query(b.backend, sql)
    assert res.pools == ("mean", "cls") and res.layers == (0, 3)
    store_names = res.obs.index
    for pool in ("mean", "cls"):
        for j, layer in enumerate((0, 3)):
            np.testing.assert_array_equal(res.pool_embeddings(pool)[j], _truth(b, store_names, layer, pool))
    adata = res.to_anndata()
    assert list(adata.obsm) == ["X_tiny-m_L00_mean", "X_tiny-m_L03_mean", "X_tiny-m_L00_cls", "X_tiny-m_L03_cls"]
    np.testing.assert_array_equal(adata.obsm["X_tiny-m_L03_mean"], _truth(b, adata.obs_names, 3, "mean"))
    stream = open_query(b.backend, sql)
    got = ad.read_h5ad(write_result(stream, tmp_path / "p.h5ad"))
    for key in adata.obsm:
        np.testing.assert_array_equal(got.obsm[key], adata.obsm[key])
    df = pd.read_csv(write_result(stream, tmp_path / "p.csv"))
    assert len(df) == 4 * 50 and list(df.columns[:3]) == ["pool", "layer", "depth"]
    part = df[(df["pool"] == "cls") & (df["layer"] == 3)]
    np.testing.assert_array_equal(part[[f"e{j}" for j in range(6)]].to_numpy(np.float32), _truth(b, pd.Index(part["cell"]), 3, "cls"))
    with pytest.raises(InvalidInputError, match=r"\.npy holds one pool, but the query selects \['mean', 'cls'\]"):
        write_result(stream, tmp_path / "p.npy")
