"""The compiled RSA resampling kernels give the numbers of the former NumPy implementations.

The references below are the former (``O(P log P)`` per replicate) implementations of
``bootstrap_rsa`` and the Mantel test, kept here as the oracle: the fast path must equal them
replicate by replicate, ties, missing values, tiny and multi-fold cases included.
The matrices are made exactly symmetric first: the reference read a pair as ``a[i, j]`` or
``a[j, i]`` depending on the resample, so on matrices symmetric only to rounding it untied copies
of one pair by last-bit noise; the kernel reads each pair once (the upper triangle).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from sclstore.eval.stats import _mantel_folds, _rank_matrix, bootstrap_indices, bootstrap_rsa, rsa_folds


def reference_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    k = a.shape[0]
    ii, jj = np.triu_indices(k, k=1)
    idx = bootstrap_indices(k, n_boot=n_boot, seed=seed)
    pi, pj = idx[:, ii], idx[:, jj]
    x, y = a[pi, pj], b[pi, pj]
    bad = (pi == pj) | ~np.isfinite(x) | ~np.isfinite(y)
    x[bad] = np.nan
    y[bad] = np.nan
    rx = sps.rankdata(x, axis=1, nan_policy="omit")
    ry = sps.rankdata(y, axis=1, nan_policy="omit")
    cnt = (~bad).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rx = rx - np.nanmean(rx, axis=1, keepdims=True)
        ry = ry - np.nanmean(ry, axis=1, keepdims=True)
        rx[bad] = 0.0
        ry[bad] = 0.0
        den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
        r = (rx * ry).sum(axis=1) / den
    r[(cnt < 3) | (den == 0)] = np.nan
    return r


def reference_mantel(pairs: list[tuple[np.ndarray, np.ndarray]], n_perm: int, seed: int) -> float:
    k = pairs[0][0].shape[0]
    iu = np.triu_indices(k, k=1)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, k)), axis=1)
    stat = np.zeros(n_perm)
    obs = 0.0
    for a, b in pairs:
        ra, rb = _rank_matrix(a), _rank_matrix(b)
        x = ra[iu] - ra[iu].mean()
        y0 = rb[iu]
        nx, ny = np.sqrt((x**2).sum()), np.sqrt(((y0 - y0.mean()) ** 2).sum())
        obs += float(x @ (y0 - y0.mean()) / (nx * ny))
        Y = rb[perms[:, iu[0]], perms[:, iu[1]]]
        stat += (Y - y0.mean()) @ (x / (nx * ny))
    return (1 + int((stat >= obs - 1e-12 * len(pairs)).sum())) / (n_perm + 1)


def _sim(k: int, seed: int, *, ties: bool = False, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k, 6))
    a = np.corrcoef(z + rng.normal(size=(k, 6)))
    b = np.corrcoef(signal * z + rng.normal(size=(k, 6)))
    if ties:  # coarse values: many ties between different pairs
        a, b = np.round(a, 1), np.round(b, 1)
    # np.corrcoef is symmetric only to the last bit; the reference reads a[i, j] or a[j, i] depending on the
    # resample, which unties copies of one pair by rounding noise, while the kernel reads each pair once
    return (a + a.T) / 2, (b + b.T) / 2


@pytest.mark.parametrize(("k", "ties", "seed"), [(3, False, 0), (4, True, 1), (12, False, 2), (30, True, 3), (60, False, 4)])
def test_bootstrap_equals_reference(k: int, ties: bool, seed: int) -> None:
    a, b = _sim(k, seed, ties=ties)
    got = bootstrap_rsa(a, b, n_boot=150, seed=seed)
    want = reference_bootstrap(a, b, 150, seed)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-10)


def test_bootstrap_with_missing_pairs_equals_reference() -> None:
    a, b = _sim(25, 7)
    a[2, 5] = a[5, 2] = np.nan
    b[1, 9] = b[9, 1] = np.inf
    got = bootstrap_rsa(a, b, n_boot=100, seed=3)
    want = reference_bootstrap(a, b, 100, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("k", "ties", "n_folds"), [(3, False, 1), (5, True, 1), (20, False, 2), (40, True, 2), (15, False, 3)])
def test_mantel_equals_reference(k: int, ties: bool, n_folds: int) -> None:
    pairs = [_sim(k, 10 * n_folds + f, ties=ties, signal=0.3) for f in range(n_folds)]
    for seed in range(3):
        assert _mantel_folds(pairs, n_perm=199, seed=seed) == reference_mantel(pairs, 199, seed)


def test_rsa_folds_null_p_values_uniform_ish() -> None:
    # independent matrices: the p-value is a valid permutation p-value (roughly uniform)
    ps = [rsa_folds([_sim(15, s, signal=0.0)], n_boot=0, n_perm=99, seed=s)[2] for s in range(40)]
    assert 0.3 < float(np.mean(ps)) < 0.7
    assert np.mean(np.asarray(ps) <= 0.05) <= 0.15


def test_float64_scratch_gives_the_float32_numbers() -> None:
    # above k = 4096 the kernel works in float64 (ranks no longer exact in float32): same code, same numbers
    from sclstore.eval.rsa_kernels import bootstrap_spearman_weighted, sorted_ties

    a, b = _sim(40, 9)
    ii, jj = np.triu_indices(40, k=1)
    x, y = a[ii, jj], b[ii, jj]
    ok = np.ones(x.shape[0], dtype=bool)
    ox, sx = sorted_ties(x)
    oy, sy = sorted_ties(y)
    inv = np.empty_like(oy)
    inv[oy] = np.arange(oy.shape[0])
    i32, j32 = ii.astype(np.int32), jj.astype(np.int32)
    args = (i32[ox], j32[ox], ok, sx.astype(np.int32), i32[oy], j32[oy], ok, sy.astype(np.int32), inv[ox].astype(np.int32),
            bootstrap_indices(40, n_boot=30, seed=1))
    r32 = bootstrap_spearman_weighted(*args, np.zeros((4, x.shape[0]), dtype=np.float32))
    r64 = bootstrap_spearman_weighted(*args, np.zeros((4, x.shape[0]), dtype=np.float64))
    np.testing.assert_allclose(r64, r32, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r64, reference_bootstrap(a, b, 30, 1), rtol=0, atol=1e-10)
