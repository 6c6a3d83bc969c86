"""Exports with source counts and provenance, SOMA export and SOMA ingest (issue 15.3).

A real ingest (built-in model, clustered so store order != input order); the oracle is the
source AnnData read directly, matched by obs_names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclstore
from sclstore.ingest.models import TINY_CHECKPOINT
from sclstore.store.errors import InvalidInputError

GENES = [g for g in json.loads((TINY_CHECKPOINT / "vocab.json").read_text()) if not g.startswith("<")][:50]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sclstore.Store, int, ad.AnnData, Path]]:
    root = tmp_path_factory.mktemp("soma")
    rng = np.random.default_rng(2)
    obs = pd.DataFrame({"donor": pd.Categorical(rng.choice(["d2", "d1", "d3"], size=30)), "score": rng.normal(size=30)},
                       index=[f"cell{i:02d}" for i in range(30)])
    var = pd.DataFrame({"gene_name": GENES, "chrom": ["1"] * 50}, index=GENES)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.5, size=(30, 50)).astype(np.float32)), obs=obs, var=var)
    path = root / "src.h5ad"
    adata.write_h5ad(path)
    st = sclstore.open_store(root / "store", create=True)
    run = st.ingest(path, "sclstore-tiny", cluster_by=("donor",), layers="0,3,6", progress=False, workers=0)
    yield st, run.id, adata, root
    st.close()


def _direct(st: sclstore.Store, run_id: int, names: pd.Index, layer: int, pool: str = "cls") -> np.ndarray:
    probe = ad.AnnData(obs=pd.DataFrame(index=names))
    st.attach(probe, run_id, layers=[layer], pools=[pool])
    return next(iter(probe.obsm.values()))


def test_with_counts_and_provenance(lab: tuple[sclstore.Store, int, ad.AnnData, Path], tmp_path: Path) -> None:
    st, run_id, adata, _ = lab
    sql = f"SELECT * FROM embeddings WHERE run = {run_id} AND layer = 3 AND donor IN ('d1', 'd3')"
    st.export(sql, tmp_path / "c.h5ad", with_counts=True)
    got = ad.read_h5ad(tmp_path / "c.h5ad")
    want = adata[adata.obs["donor"].isin(["d1", "d3"]).to_numpy()]
    assert list(got.obs_names) == list(want.obs_names)  # input order
    assert (got.X != want.X).nnz == 0 and got.n_vars == 50
    assert list(got.var_names) == GENES and got.var["gene_name"].tolist() == GENES and list(got.var.columns) == ["gene_name", "chrom"]
    np.testing.assert_array_equal(got.obsm["X_sclstore-tiny_L03_cls"], _direct(st, run_id, got.obs_names, 3))
    uns = got.uns["sclstore"]
    model = st.models()[0]
    run = st.run(run_id)
    assert uns["checkpoint_hash"] == model.checkpoint_hash and uns["cache_key"] == run.cache_key
    assert uns["sclstore_version"] == sclstore.__version__ and list(uns["layers"]) == [3] and list(uns["pools"]) == ["cls"]
    assert uns["dataset_hash"] == st.datasets()[0].content_hash and uns["with_counts"]
    plain = ad.read_h5ad(st.export(sql, tmp_path / "p.h5ad")["path"])
    assert plain.n_vars == 0 and plain.uns["sclstore"]["checkpoint_hash"] == model.checkpoint_hash
    with pytest.raises(InvalidInputError, match=r"--with-counts writes \.h5ad"):
        st.export(sql, tmp_path / "c.npy", with_counts=True)


def test_with_counts_from_a_moved_or_in_memory_source(lab: tuple[sclstore.Store, int, ad.AnnData, Path], tmp_path: Path) -> None:
    st, _, adata, _ = lab
    mem = adata.copy()
    mem.obs_names = [f"m{i}" for i in range(30)]  # another dataset: different names
    run = st.ingest(mem, "sclstore-tiny", layers="0", progress=False, workers=0)
    sql = f"SELECT cell, embedding FROM embeddings WHERE run = {run.id}"
    with pytest.raises(InvalidInputError, match=r"was ingested from memory: pass the AnnData or \.h5ad holding its counts"):
        st.export(sql, tmp_path / "m.h5ad", with_counts=True)
    got = ad.read_h5ad(st.export(sql, tmp_path / "m.h5ad", counts_from=mem)["path"])
    assert (got.X != mem.X).nnz == 0
    with pytest.raises(InvalidInputError, match="does not hold this dataset's cells"):
        st.export(sql, tmp_path / "w.h5ad", counts_from=adata)


def test_soma_round_trip(lab: tuple[sclstore.Store, int, ad.AnnData, Path], tmp_path: Path) -> None:
    pytest.importorskip("tiledbsoma", reason="SOMA needs the optional extra sclstore[soma]")
    import tiledbsoma
    import tiledbsoma.io

    st, run_id, adata, _ = lab
    sql = f"SELECT cell, donor, embedding.cls, embedding.mean FROM embeddings WHERE run = {run_id} AND layer IN (0, 6)"
    summary = st.to_soma(sql, tmp_path / "out.soma")
    assert summary["format"] == "soma"
    with tiledbsoma.Experiment.open(str(tmp_path / "out.soma")) as exp:
        keys = sorted(exp.ms["RNA"].obsm.keys())
        assert keys == sorted(f"X_sclstore-tiny_L{layer:02d}_{pool}" for layer in (0, 6) for pool in ("cls", "mean"))
        query = exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter="donor == 'd1'"))
        back = query.to_anndata(X_name="data", obsm_layers=keys)
    d1 = adata[(adata.obs["donor"] == "d1").to_numpy()]
    assert list(back.obs_names) == list(d1.obs_names)
    assert (sp.csr_matrix(back.X) != d1.X).nnz == 0 and list(back.var_names) == GENES
    for key in keys:
        layer, pool = int(key.split("_L")[1].split("_")[0]), key.rsplit("_", 1)[1]
        np.testing.assert_array_equal(back.obsm[key], _direct(st, run_id, back.obs_names, layer, pool))
    with pytest.raises(InvalidInputError, match=r"already exists: pass --force"):
        st.to_soma(sql, tmp_path / "out.soma")
    # the --with-counts .h5ad is what tiledbsoma.io.from_h5ad accepts
    st.export(sql, tmp_path / "c.h5ad", with_counts=True)
    tiledbsoma.io.from_h5ad(str(tmp_path / "from_h5ad.soma"), str(tmp_path / "c.h5ad"), measurement_name="RNA")


def test_ingest_from_soma_with_obs_filter(lab: tuple[sclstore.Store, int, ad.AnnData, Path], tmp_path: Path) -> None:
    pytest.importorskip("tiledbsoma", reason="SOMA needs the optional extra sclstore[soma]")
    import tiledbsoma
    import tiledbsoma.io

    _, _, adata, _ = lab
    uri = str(tmp_path / "census.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")  # X layer "data"
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(uri, "sclstore-tiny", obs_filter="donor == 'd2' and score > 0", layers="0", progress=False, workers=0)
        keep = ((adata.obs["donor"] == "d2") & (adata.obs["score"] > 0)).to_numpy()
        ds = st.datasets()[0]
        assert res.cells == int(keep.sum()) and ds.name == "census"
        assert ds.source_path == f"soma:{uri} obs[donor == 'd2' and score > 0]"
        # same cells in memory (soma_joinid dropped does not matter: the hash covers counts and names) -> cache hit
        again = st.ingest(adata[keep].copy(), "sclstore-tiny", layers="0", progress=False, workers=0)
        assert again.cache_hit and again.id == res.id
        with pytest.raises(InvalidInputError, match="selects no cell"):
            st.ingest(uri, "sclstore-tiny", obs_filter="donor == 'D2'", progress=False, workers=0)
        with pytest.raises(InvalidInputError, match="obs_filter applies to SOMA Experiments"):
            st.ingest(adata, "sclstore-tiny", obs_filter="donor == 'd2'", progress=False, workers=0)


def test_cli_with_counts_soma_and_obs_filter(lab: tuple[sclstore.Store, int, ad.AnnData, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sclstore.cli import app

    st, run_id, adata, _ = lab
    run = CliRunner().invoke
    sql = f"SELECT cell, embedding FROM embeddings WHERE run = {run_id} AND layer = 6"
    res = run(app, ["query", sql, "-o", str(tmp_path / "deep" / "c.h5ad"), "--with-counts", "--store", str(st.path), "--json"])
    assert res.exit_code == 0, res.stderr
    got = ad.read_h5ad(json.loads(res.stdout)["path"])
    assert list(got.obs_names) == list(adata.obs_names) and (got.X != adata.X).nnz == 0
    if _has_soma():  # the SOMA half needs the optional extra
        res = run(app, ["query", sql, "-o", str(tmp_path / "c.soma"), "--store", str(st.path), "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["format"] == "soma", res.stderr
        import tiledbsoma.io

        tiledbsoma.io.from_anndata(str(tmp_path / "src.soma"), adata, measurement_name="RNA")
        res = run(app, ["ingest", str(tmp_path / "src.soma"), "--model", "sclstore-tiny", "--layers", "0", "--workers", "0",
                        "--obs-filter", "obs_id in ['cell03', 'cell07']", "--store", str(tmp_path / "s2"), "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["cells"] == 2, res.stderr


def _has_soma() -> bool:
    try:
        import tiledbsoma  # noqa: F401
    except ImportError:
        return False
    return True
