"""The blocked RSA kernels give bit-for-bit the numbers of the one-at-a-time kernels.

``bootstrap_spearman_blocked`` (several resamples per pass over the pairs) against
``bootstrap_spearman_weighted`` (one resample per pass; itself checked against the former NumPy
implementation in ``test_rsa_kernels.py``), and the 8-permutation blocks of ``permutation_stats``
against a plain Python sum in pair order: equal arrays, not merely close ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from sclstore.eval.rsa_kernels import (
    bootstrap_spearman_blocked,
    bootstrap_spearman_pairs,
    bootstrap_spearman_weighted,
    permutation_stats,
    sorted_ties,
)
from sclstore.eval.stats import bootstrap_indices


def _pairs(k: int, seed: int, *, ties: bool = False, missing: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k, 5))
    a = np.corrcoef(z + rng.normal(size=(k, 5)))
    b = np.corrcoef(z + rng.normal(size=(k, 5)))
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    ii, jj = np.triu_indices(k, k=1)
    x, y = a[ii, jj].copy(), b[ii, jj].copy()
    for q in rng.choice(x.shape[0], size=min(missing, x.shape[0]), replace=False):
        (x if q % 2 else y)[q] = np.nan if q % 3 else np.inf
    return x, y, ii, jj


def _one_at_a_time(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray, dtype: type) -> np.ndarray:
    ok = np.isfinite(x) & np.isfinite(y)
    ox, sx = sorted_ties(x)
    oy, sy = sorted_ties(y)
    inv = np.empty_like(oy)
    inv[oy] = np.arange(oy.shape[0])
    i32, j32 = ii.astype(np.int32), jj.astype(np.int32)
    return bootstrap_spearman_weighted(i32[ox], j32[ox], ok[ox], sx.astype(np.int32), i32[oy], j32[oy], ok[oy], sy.astype(np.int32),
                                       inv[ox].astype(np.int32), resamples, np.zeros((4, x.shape[0]), dtype=dtype))


def _blocked(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray, dtype: type, lanes: int) -> np.ndarray:
    ok = np.isfinite(x) & np.isfinite(y)
    ox, sx = sorted_ties(x)
    oy, sy = sorted_ties(y)
    inv = np.empty_like(oy)
    inv[oy] = np.arange(oy.shape[0])
    i32, j32 = ii.astype(np.int32), jj.astype(np.int32)
    bad = np.flatnonzero(~ok)
    return bootstrap_spearman_blocked(i32[ox], j32[ox], ok[ox], sx.astype(np.int32), i32[oy], j32[oy], ok[oy], sy.astype(np.int32),
                                      inv[ox].astype(np.int32), i32[bad], j32[bad], resamples, np.zeros((x.shape[0], lanes), dtype=dtype))


@pytest.mark.parametrize(("k", "ties", "missing", "n_boot"),
                         [(3, False, 0, 40), (4, True, 0, 33), (12, False, 2, 17), (30, True, 5, 64), (60, False, 0, 45), (45, True, 9, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_bootstrap_is_bitwise_the_one_at_a_time_kernel(k: int, ties: bool, missing: int, n_boot: int, dtype: type) -> None:
    x, y, ii, jj = _pairs(k, k + n_boot, ties=ties, missing=missing)
    res = bootstrap_indices(k, n_boot=n_boot, seed=k)
    want = _one_at_a_time(x, y, ii, jj, res, dtype)
    assert np.isfinite(want).sum() >= 5  # the comparison is about real values (k = 3: most resamples hold < 3 pairs)
    for lanes in (1, 5, 16):
        got = _blocked(x, y, ii, jj, res, dtype, lanes)
        assert np.array_equal(got, want, equal_nan=True), (lanes, np.nanmax(np.abs(got - want)))


def test_bootstrap_spearman_pairs_uses_the_blocked_kernel_with_the_same_numbers() -> None:
    x, y, ii, jj = _pairs(70, 5, ties=True, missing=4)
    res = bootstrap_indices(70, n_boot=27, seed=2)
    assert np.array_equal(bootstrap_spearman_pairs(x, y, ii, jj, res), _one_at_a_time(x, y, ii, jj, res, np.float32), equal_nan=True)


def _python_stats(x: np.ndarray, rank_b: np.ndarray, perms: np.ndarray, mean_b: float) -> np.ndarray:
    k = perms.shape[1]
    out = []
    for perm in perms:
        acc, pos = 0.0, 0
        for i in range(k):
            for j in range(i + 1, k):
                acc += float(x[pos]) * (float(rank_b[perm[i], perm[j]]) - mean_b)
                pos += 1
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("n_perm", [1, 7, 8, 19])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_permutation_blocks_are_bitwise_the_pair_order_sums(n_perm: int, dtype: type) -> None:
    k = 23
    rng = np.random.default_rng(n_perm)
    x = rng.normal(size=k * (k - 1) // 2)
    r = np.zeros((k, k))
    iu = np.triu_indices(k, k=1)
    r[iu] = np.argsort(np.argsort(rng.normal(size=iu[0].shape[0]))) + 1.0
    r[iu] = np.round(r[iu] / 2) + 0.5 * (r[iu] % 2)  # ties: halves as average ranks give
    r = (r + r.T).astype(dtype)
    perms = np.argsort(rng.random((n_perm, k)), axis=1).astype(np.int32)
    mean_b = float(r[iu].mean())
    got = permutation_stats(x, r, perms, mean_b)
    assert np.array_equal(got, _python_stats(x, r, perms, mean_b))
