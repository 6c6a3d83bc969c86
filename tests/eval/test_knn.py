"""One neighbour search reused by every subsample gives the graphs and DPTs of fresh searches."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.neighbors import NearestNeighbors

from sclstore.eval.knn import NeighbourLists, PrecomputedKnn, list_length, neighbour_lists, restrict
from sclstore.eval.stats import subsample_indices
from sclstore.eval.trajectory import GraphOptions, combine_layer_pseudotimes, layer_pseudotimes


def _data(n: int = 300, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, d - 2))].astype(np.float32)
    return X, t


def _fresh(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d, i = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X).kneighbors(X)
    return i[:, 1:], d[:, 1:]


def test_restrict_equals_a_fresh_search_on_the_subset() -> None:
    X, _ = _data()
    lists = neighbour_lists(X, list_length(X.shape[0], 14, 0.8), method="sklearn")
    for sub in subsample_indices(X.shape[0], n_subsamples=3, fraction=0.8, seed=1):
        got_i, got_d = restrict(lists, X, sub, 14)
        want_i, want_d = _fresh(X[sub], 14)
        assert np.array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


def test_restrict_searches_again_when_the_list_is_too_short() -> None:
    X, _ = _data(n=200)
    short = neighbour_lists(X, 16, method="sklearn")  # 16 full-data neighbours cannot hold 15 members of a half subsample
    lists = NeighbourLists(indices=short.indices, distances=short.distances, method="sklearn")
    sub = np.sort(np.random.default_rng(3).choice(200, size=100, replace=False))
    got_i, got_d = restrict(lists, X, sub, 15)
    want_i, want_d = _fresh(X[sub], 15)
    assert np.array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


def test_precomputed_transformer_gives_scanpys_connectivities() -> None:
    X, _ = _data(n=250)
    graphs = []
    for transformer in ("sklearn", PrecomputedKnn(*_fresh(X, 14))):
        a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(X.shape[0])]))
        a.obsm["rep"] = X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.neighbors(a, n_neighbors=15, use_rep="rep", transformer=transformer, random_state=0)
        graphs.append(a.obsp["connectivities"].toarray())
    np.testing.assert_allclose(graphs[1], graphs[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("root", ["diffusion-extreme", 5])
def test_layer_pseudotimes_reuse_equals_fresh_searches(root: str | int) -> None:
    X, t = _data(n=350)
    idx = subsample_indices(X.shape[0], n_subsamples=4, fraction=0.8, seed=2, always_include=None if isinstance(root, str) else root)
    opt = GraphOptions(n_neighbors=15, transformer="sklearn")
    new = layer_pseudotimes(X, t, subsamples=idx, root=root, options=opt, extra_roots=(1, 7))
    old = layer_pseudotimes(X, t, subsamples=idx, root=root, options=opt, extra_roots=(1, 7), reuse_neighbours=False)
    assert new.root == old.root
    np.testing.assert_allclose(new.full, old.full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.extra_roots, old.extra_roots, rtol=1e-5, atol=1e-6)
    for a, b in zip(new.subsamples, old.subsamples, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    sn = combine_layer_pseudotimes([new], t, subsamples=idx)
    so = combine_layer_pseudotimes([old], t, subsamples=idx)
    np.testing.assert_allclose(sn.resamples_time, so.resamples_time, atol=1e-9)
    assert sn.rho_time[0] == pytest.approx(so.rho_time[0], abs=1e-9)


def test_score_trajectory_subsamples_equal_fresh_dpt_runs() -> None:
    from scipy import stats as sps

    from sclstore.eval.dpt import dpt_pseudotime
    from sclstore.eval.trajectory import score_trajectory

    X, t = _data(n=260)
    s = score_trajectory(X, t, n_neighbors=15, n_subsamples=3, seed=4)
    for b, idx in enumerate(subsample_indices(X.shape[0], n_subsamples=3, fraction=0.8, seed=4)):
        pt = dpt_pseudotime(X[idx], t[idx], n_neighbors=15, seed=4).pseudotime  # a fresh search on the subsample
        ok = np.isfinite(pt)
        assert s.subsample_rho_time[b] == pytest.approx(sps.spearmanr(pt[ok], t[idx][ok]).statistic, abs=1e-9)


def test_no_subsamples_searches_k_neighbours_and_matches() -> None:
    assert list_length(1000, 29, 1.0) == 29 and list_length(1000, 29, 0.8) == 52 and list_length(40, 29, 0.8) == 39
    X, t = _data(n=220)
    opt = GraphOptions(n_neighbors=15, transformer="sklearn")
    new, old = layer_pseudotimes(X, t, options=opt), layer_pseudotimes(X, t, options=opt, reuse_neighbours=False)
    np.testing.assert_allclose(new.full, old.full, rtol=1e-5, atol=1e-6)
