"""The numpy UMAP connectivities against umap itself (through scanpy), and the pseudotimes built on them."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from sclstore.eval.connectivity import _exp32, bandwidths, umap_connectivities
from sclstore.eval.dpt import _dpt_from_graph, _graph
from sclstore.eval.knn import PrecomputedKnn, neighbour_lists


def _data(n: int, seed: int, duplicates: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 1, n))
    X = np.c_[np.cos(3 * t), np.sin(3 * t), t, rng.normal(0, 0.05, (n, 5))] * rng.uniform(0.5, 20)
    if duplicates:  # repeated cells: zero distances to neighbours other than the cell itself
        X[n - duplicates:] = X[:duplicates]
    return X.astype(np.float32)


def _scanpy(X: np.ndarray, transformer: object, k: int) -> ad.AnnData:
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(X.shape[0])]))
    a.obsm["rep"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=k, use_rep="rep", transformer=transformer, random_state=0)
    return a


@pytest.mark.parametrize(("n", "k", "seed", "dups"), [(300, 15, 0, 0), (400, 30, 1, 0), (250, 15, 2, 20), (120, 5, 3, 0)])
def test_connectivities_equal_umaps(n: int, k: int, seed: int, dups: int) -> None:
    X = _data(n, seed, dups)
    lists = neighbour_lists(X, k - 1, method="sklearn")
    want = _scanpy(X, PrecomputedKnn(lists.indices, lists.distances), k).obsp["connectivities"]
    idx = np.hstack([np.arange(n)[:, None], lists.indices])
    dist = np.hstack([np.zeros((n, 1), np.float32), lists.distances])
    got = umap_connectivities(idx, dist)
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert (got != want).nnz == 0  # bit for bit


def test_bandwidths_equal_umaps_smooth_knn_dist() -> None:
    from umap.umap_ import smooth_knn_dist

    X = _data(500, 4, 10)
    lists = neighbour_lists(X, 14, method="sklearn")
    dist = np.hstack([np.zeros((500, 1), np.float32), lists.distances])
    want_sigma, want_rho = smooth_knn_dist(dist, 15.0)
    sigma, rho = bandwidths(dist, 15.0)
    np.testing.assert_array_equal(rho, want_rho)
    np.testing.assert_array_equal(sigma, want_sigma)


def test_float32_exp_is_the_c_librarys() -> None:
    import ctypes
    import ctypes.util

    expf = ctypes.CDLL(ctypes.util.find_library("m")).expf
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    x = -np.random.default_rng(0).uniform(0, 30, 400_000).astype(np.float32)
    want = np.array([expf(float(v)) for v in x], dtype=np.float32)
    assert np.array_equal(_exp32(x), want)
    # the check is not vacuous: correct rounding alone differs from expf on some of these values
    assert not np.array_equal(np.exp(x.astype(np.float64)).astype(np.float32), want)


def test_hand_computed_bandwidth() -> None:
    # one cell, neighbours at 1, 2, 3 (self 0), k = 4: rho = 1, and sigma solves
    # 1 + exp(-1/s) + exp(-2/s) = log2(4) = 2, i.e. exp(-1/s) = (sqrt(5) - 1) / 2
    sigma, rho = bandwidths(np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32), 4.0)
    assert rho[0] == 1.0
    assert sigma[0] == pytest.approx(-1 / np.log((np.sqrt(5) - 1) / 2), rel=1e-4)


@pytest.mark.parametrize("transformer", ["sklearn", "precomputed"])
def test_graph_and_pseudotime_equal_scanpys(transformer: str) -> None:
    X = _data(350, 5)
    lists = neighbour_lists(X, 14, method="sklearn")
    tr = "sklearn" if transformer == "sklearn" else PrecomputedKnn(lists.indices, lists.distances)
    ours = _graph(X, 15, 10, 0, transformer=tr)
    ref = _scanpy(X, tr, 15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.diffmap(ref, n_comps=10, random_state=0)
    ref.uns["sclstore_n_dcs"] = 10
    assert (ours.obsp["connectivities"] != ref.obsp["connectivities"]).nnz == 0
    np.testing.assert_allclose(np.abs(ours.obsm["X_diffmap"]), np.abs(ref.obsm["X_diffmap"]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(_dpt_from_graph(ours, 0), _dpt_from_graph(ref, 0), rtol=1e-6, atol=1e-9)


def test_trajectory_graph_imports_no_umap() -> None:
    code = (
        "import sys, numpy as np\n"
        "from sclstore.eval.dpt import _graph\n"
        "X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)\n"
        "a = _graph(X, 15, 10, 0)\n"
        "assert a.obsp['connectivities'].nnz > 0\n"
        "print(sorted(m for m in ('umap', 'pynndescent') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    assert out.stdout.strip() == "[]"


def test_memberships_of_tied_and_far_neighbours_equal_umaps_without_warnings() -> None:
    from umap.umap_ import compute_membership_strengths, smooth_knn_dist

    from sclstore.eval.connectivity import memberships

    d = np.array([[0, 0, 0, 1e-30, 50.0], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]], np.float32)  # ties, a far cell, all duplicates
    i = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [2, 0, 1, 3, 4]])
    sigma, rho = smooth_knn_dist(d, 5.0)
    want = compute_membership_strengths(i, d, sigma, rho, False)[2].reshape(3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or division warnings from discarded values
        got = memberships(i, d)
    assert np.array_equal(got, want)
