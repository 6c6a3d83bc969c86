"""The runner's diffusion map: scanpy's bit for bit at tol 0; the fast solver (tol, warm start, basis) within 5e-6 (DPT)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from sclstore.eval.dpt import EIGSH_TOL, diffusion_map, lanczos_vectors
from sclstore.eval.stats import subsample_indices
from sclstore.eval.trajectory import GraphOptions, combine_layer_pseudotimes, layer_pseudotimes


def _data(n: int, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, d - 2))].astype(np.float32)
    return X, t


def _graph(X: np.ndarray, k: int = 15) -> ad.AnnData:
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(X.shape[0])]))
    a.obsm["rep"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=k, use_rep="rep", transformer="sklearn", random_state=0)
    return a


@pytest.mark.parametrize("seed", [0, 3])
def test_tol_zero_is_scanpys_diffmap_bit_for_bit(seed: int) -> None:
    X, _ = _data(400, seed=seed)
    ours, theirs = _graph(X), _graph(X)
    diffusion_map(ours, 10, seed, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.diffmap(theirs, n_comps=10, random_state=seed)
    assert np.array_equal(ours.obsm["X_diffmap"], theirs.obsm["X_diffmap"])
    assert np.array_equal(ours.uns["diffmap_evals"], theirs.uns["diffmap_evals"])
    assert ours.obsm["X_diffmap"].dtype == np.float32


@pytest.mark.parametrize("larger_basis", [False, True])
def test_tolerance_and_warm_start_reach_the_same_eigenpairs(larger_basis: bool) -> None:
    X, _ = _data(1200)
    full = _graph(X)
    diffusion_map(full, 10, 0, tol=0.0)
    sub = np.sort(np.random.default_rng(1).choice(1200, size=960, replace=False))
    cold, warm = _graph(X[sub]), _graph(X[sub])
    diffusion_map(cold, 10, 0, tol=0.0)
    diffusion_map(warm, 10, 0, tol=EIGSH_TOL, v0=np.asarray(full.obsm["X_diffmap"], dtype=np.float64)[sub].sum(axis=1),
                  ncv=lanczos_vectors(960, 10) if larger_basis else None)
    np.testing.assert_allclose(warm.uns["diffmap_evals"], cold.uns["diffmap_evals"], rtol=0, atol=1e-6)
    # eigenvectors up to sign (DPT uses differences of squares, invariant to the sign)
    c, w = np.asarray(cold.obsm["X_diffmap"], float), np.asarray(warm.obsm["X_diffmap"], float)
    cos = np.abs(np.sum(c * w, axis=0)) / np.linalg.norm(c, axis=0) / np.linalg.norm(w, axis=0)
    assert cos.min() > 1 - 1e-8


@pytest.mark.parametrize("root", ["diffusion-extreme", 4])
def test_fast_eigen_dpt_equal_scanpys_within_5e6(root: str | int) -> None:
    X, t = _data(1500)
    idx = subsample_indices(X.shape[0], n_subsamples=5, fraction=0.8, seed=2, always_include=None if isinstance(root, str) else root)
    fast = layer_pseudotimes(X, t, subsamples=idx, root=root, options=GraphOptions(n_neighbors=15), extra_roots=(1, 9))
    exact = layer_pseudotimes(X, t, subsamples=idx, root=root, options=GraphOptions(n_neighbors=15, fast_eigen=False), extra_roots=(1, 9))
    assert fast.root == exact.root
    np.testing.assert_allclose(fast.full, exact.full, rtol=0, atol=5e-6)
    np.testing.assert_allclose(fast.extra_roots, exact.extra_roots, rtol=0, atol=5e-6)
    for a, b in zip(fast.subsamples, exact.subsamples, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-6)
    sf = combine_layer_pseudotimes([fast], t, subsamples=idx)
    se = combine_layer_pseudotimes([exact], t, subsamples=idx)
    # Spearman on 1,200 cells: two cells whose DPTs differ by < 5e-6 may swap ranks, which moves rho by
    # 12 |rank difference in time| / (n^3 - n), ~1e-6 here; the scores agree to that
    np.testing.assert_allclose(sf.resamples_time, se.resamples_time, rtol=0, atol=1e-5)
    assert sf.rho_time[0] == pytest.approx(se.rho_time[0], abs=1e-5)
