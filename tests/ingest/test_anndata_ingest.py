"""``store.ingest(adata)`` (issue 15.2): an in-memory or backed AnnData is one more source, with
the same checks and the same content hash as its file (so the second ingest is a cache hit)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclstore
from sclstore.ingest.anndata_source import AnnDataSource
from sclstore.ingest.models import TINY_CHECKPOINT
from sclstore.ingest.source import CountsSource
from sclstore.store.errors import DatasetError, InvalidInputError


@pytest.fixture
def adata(random_counts: Callable[..., sp.csr_matrix]) -> ad.AnnData:
    genes = [g for g in json.loads((TINY_CHECKPOINT / "vocab.json").read_text()) if not g.startswith("<")][:30]
    counts = random_counts(40, 30, seed=5)
    obs = pd.DataFrame({"donor": np.where(np.arange(40) % 2, "d1", "d2")}, index=[f"c{i}" for i in range(40)])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))


def _all(st: sclstore.Store, run_id: int) -> np.ndarray:
    run = st.run(run_id)
    with st.backend.open_reader(run_id) as rd:
        return rd.read(list(range(len(run.layers))), None, run.pools[0])


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
def test_same_hash_as_the_file(adata: ad.AnnData, tmp_path: Path, encoding: str) -> None:
    adata.write_h5ad(tmp_path / "a.h5ad")
    if encoding == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif encoding == "dense":
        adata.X = adata.X.toarray()
    with CountsSource(tmp_path / "a.h5ad") as f:
        want = f.scan(block_rows=7)
        rows = f.take(np.array([5, 1, 30]))
    src = AnnDataSource(adata)
    assert src.scan(block_rows=7) == want
    assert (src.take(np.array([5, 1, 30])) != rows).nnz == 0
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    assert AnnDataSource(backed).scan(block_rows=7) == want


def test_ingest_in_memory_then_file_is_a_cache_hit(adata: ad.AnnData, tmp_path: Path) -> None:
    adata.write_h5ad(tmp_path / "a.h5ad")
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        mem = st.ingest(adata, "sclstore-tiny", progress=False, workers=0, cluster_by=("donor",))
        ds = st.datasets()[0]
        assert ds.source_path == "in-memory" and ds.name.startswith("anndata-")
        again = st.ingest(tmp_path / "a.h5ad", "sclstore-tiny", progress=False, workers=0)
        assert again.cache_hit and again.id == mem.id
        stored = _all(st, mem.id)
    # oracle: a separate store fed the file gives the same numbers
    with sclstore.open_store(tmp_path / "f", create=True) as st2:
        ref = st2.ingest(tmp_path / "a.h5ad", "sclstore-tiny", progress=False, workers=0, cluster_by=("donor",))
        np.testing.assert_array_equal(_all(st2, ref.id), stored)
        assert st2.datasets()[0].source_path == str((tmp_path / "a.h5ad").resolve())


def test_backed_anndata_records_its_file(adata: ad.AnnData, tmp_path: Path) -> None:
    adata.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        st.ingest(backed, "sclstore-tiny", progress=False, workers=0, name="pbmc")
        ds = st.datasets()[0]
        assert (ds.name, ds.source_path, ds.n_obs) == ("pbmc", str((tmp_path / "b.h5ad").resolve()), 40)


def test_same_checks_as_files(adata: ad.AnnData, tmp_path: Path) -> None:
    bad = adata.copy()
    bad.X = bad.X.astype(np.float32) * 0.5
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        with pytest.raises(DatasetError, match="non-integer"):
            st.ingest(bad, "sclstore-tiny", progress=False, workers=0)
        with pytest.raises(InvalidInputError, match="counts_layer 'raw' not in the AnnData"):
            st.ingest(adata, "sclstore-tiny", progress=False, workers=0, counts_layer="raw")
        with pytest.raises(InvalidInputError, match=r"cannot ingest a dict: pass the path of an \.h5ad file or an anndata\.AnnData"):
            st.ingest({"X": 1}, "sclstore-tiny", progress=False, workers=0)  # type: ignore[arg-type]
        assert st.datasets() == [] and st.runs() == []
