"""The runner's direct graph: connectivities (numba union) and transition matrix built from neighbour lists equal scanpy's (the oracle)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scanpy.neighbors import Neighbors
from sklearn.neighbors import NearestNeighbors

from sclstore.eval.connectivity import transitions_sym, umap_connectivities
from sclstore.eval.dpt import _with_self
from sclstore.eval.knn import PrecomputedKnn


def _data(n: int, d: int = 10, seed: int = 0, duplicates: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, d - 2))].astype(np.float32)
    if duplicates:
        X[1:duplicates + 1] = X[0]  # identical cells: zero distances besides the cell itself
    return X


def _lists(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d, i = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X).kneighbors(X)
    out_i, out_d = np.empty((X.shape[0], k), np.int64), np.empty((X.shape[0], k), np.float32)
    for r in range(X.shape[0]):  # drop the cell itself wherever a tie put it
        keep = i[r] != r
        out_i[r], out_d[r] = i[r][keep][:k], d[r][keep][:k]
    return out_i, out_d


def _scanpy(X: np.ndarray, idx: np.ndarray, dist: np.ndarray) -> ad.AnnData:
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(X.shape[0])]))
    a.obsm["rep"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=idx.shape[1] + 1, use_rep="rep", transformer=PrecomputedKnn(idx, dist), random_state=0)
    return a


@pytest.mark.parametrize(("n", "k", "duplicates"), [(300, 14, 0), (800, 29, 0), (400, 14, 5)])
def test_connectivities_equal_scanpys(n: int, k: int, duplicates: int) -> None:
    X = _data(n, duplicates=duplicates)
    idx, dist = _lists(X, k)
    want = _scanpy(X, idx, dist).obsp["connectivities"].tocsr()
    got = umap_connectivities(*_with_self(idx, dist))
    assert got.dtype == np.float32 and got.has_canonical_format
    want.sort_indices()
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
    assert np.array_equal(got.data, want.data)  # bit for bit
    assert abs(got - got.T).max() == 0  # exactly symmetric


def test_transitions_equal_scanpys() -> None:
    X = _data(600, seed=2)
    idx, dist = _lists(X, 20)
    a = _scanpy(X, idx, dist)
    nb = Neighbors(a)
    nb.compute_transitions()
    want = nb.transitions_sym.tocsr().astype(np.float64)
    got = transitions_sym(a.obsp["connectivities"])
    diff = abs(got - want)
    assert diff.max() <= 1e-6 * abs(want).max()
    # a hand check on a 3-cell graph: C = [[0,1,2],[1,0,0],[2,0,0]] -> degrees 3, 1, 2
    from scipy import sparse

    C = sparse.csr_matrix(np.array([[0, 1, 2], [1, 0, 0], [2, 0, 0]], dtype=np.float32))
    K = np.array([[0, 1 / 3, 2 / 6], [1 / 3, 0, 0], [2 / 6, 0, 0]])
    z = np.sqrt(K.sum(axis=1))
    np.testing.assert_allclose(transitions_sym(C).toarray(), K / np.outer(z, z), rtol=1e-12)
