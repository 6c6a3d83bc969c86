"""The diffusion map with the lean CSR product equals ``sc.tl.diffmap`` array for array."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

from sclstore.eval.diffmap import csr_matvec, diffusion_map


def _adata(n: int, seed: int, *, split: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, 6))].astype(np.float32)
    if split:  # two far groups: a disconnected graph
        X[: n // 3] += 100.0
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    a.obsm["rep"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=15, use_rep="rep", transformer="sklearn", random_state=0)
    return a


@pytest.mark.parametrize(("n", "seed", "split", "n_comps"), [(40, 0, False, 10), (333, 1, False, 10), (501, 2, True, 15), (250, 3, False, 4)])
def test_diffusion_map_equals_scanpy(n: int, seed: int, split: bool, n_comps: int) -> None:
    ours, theirs = _adata(n, seed, split=split), _adata(n, seed, split=split)
    nb = sc.Neighbors(ours)
    nb.compute_transitions()
    assert nb.transitions_sym.format == "csr" and nb.transitions_sym.dtype == np.float32  # the lean path is the one tested
    diffusion_map(ours, n_comps, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.diffmap(theirs, n_comps=n_comps, random_state=seed)
    assert ours.obsm["X_diffmap"].dtype == theirs.obsm["X_diffmap"].dtype == np.float32
    assert np.array_equal(ours.obsm["X_diffmap"], theirs.obsm["X_diffmap"])
    assert np.array_equal(ours.uns["diffmap_evals"], theirs.uns["diffmap_evals"])


def test_csr_matvec_is_bitwise_scipys_float64_product() -> None:
    rng = np.random.default_rng(4)
    for n, density in [(1, 1.0), (7, 0.5), (103, 0.2), (1000, 0.03)]:
        A = sparse.random(n, n, density=density, random_state=rng, format="csr", dtype=np.float32)
        A.data = (rng.normal(size=A.data.shape[0]) * 10.0 ** rng.integers(-8, 8, size=A.data.shape[0])).astype(np.float32)
        x = rng.normal(size=n)
        y = np.zeros(n)
        csr_matvec(A.indptr.astype(np.uint64), A.indices.astype(np.uint32), A.data, x, y)
        assert np.array_equal(y, A.astype(np.float64) @ x)
