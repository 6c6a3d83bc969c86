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


def _sorted_inputs(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The kernels' common arguments (pairs in x order, then in y order, then y's position of each x pair) and the missing mask."""
    ok = np.isfinite(x) & np.isfinite(y)
    ox, sx = sorted_ties(x)
    oy, sy = sorted_ties(y)
    inv = np.empty_like(oy)
    inv[oy] = np.arange(oy.shape[0])
    i32, j32 = ii.astype(np.int32), jj.astype(np.int32)
    return (i32[ox], j32[ox], ok[ox], sx.astype(np.int32), i32[oy], j32[oy], ok[oy], sy.astype(np.int32), inv[ox].astype(np.int32)), ~ok


def _one_at_a_time(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray, dtype: type) -> np.ndarray:
    args, _ = _sorted_inputs(x, y, ii, jj)
    return bootstrap_spearman_weighted(*args, resamples, np.zeros((4, x.shape[0]), dtype=dtype))


def _blocked(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray, dtype: type, lanes: int) -> np.ndarray:
    args, bad = _sorted_inputs(x, y, ii, jj)
    return bootstrap_spearman_blocked(*args, ii[bad].astype(np.int32), jj[bad].astype(np.int32), resamples,
                                      np.zeros((x.shape[0], lanes), dtype=dtype))


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


def test_average_ranks_are_scipys_rankdata() -> None:
    from scipy import stats as sps

    from sclstore.eval.rsa_kernels import average_ranks

    rng = np.random.default_rng(8)
    for v in (rng.normal(size=1000), np.round(rng.normal(size=5000), 1), np.array([2.0]), np.zeros(7)):
        assert np.array_equal(average_ranks(*sorted_ties(v)), sps.rankdata(v))


def _old_rsa_folds(folds: list[tuple[np.ndarray, np.ndarray]], n_boot: int, n_perm: int, seed: int) -> tuple[float, np.ndarray, float]:
    from sclstore.eval.stats import _mantel_folds, bootstrap_rsa, rsa_spearman

    score = float(np.mean([rsa_spearman(a, b) for a, b in folds]))
    boot = np.array([bootstrap_rsa(a, b, n_boot=n_boot, seed=seed) for a, b in folds]).mean(axis=0)
    p = _mantel_folds(folds, n_perm=n_perm, seed=seed) if n_perm else float("nan")
    return score, boot, p


@pytest.mark.parametrize(("k", "ties", "n_folds"), [(5, False, 1), (40, True, 2), (300, False, 2), (120, True, 3)])
def test_rsa_folds_shared_sorts_give_the_former_numbers(k: int, ties: bool, n_folds: int) -> None:
    from sclstore.eval.stats import rsa_folds

    rng = np.random.default_rng(k)
    z = rng.normal(size=(k, 4))
    folds = []
    for _ in range(n_folds):
        a, b = np.corrcoef(z + rng.normal(size=(k, 4))), np.corrcoef(0.5 * z + rng.normal(size=(k, 4)))
        if ties:
            a, b = np.round(a, 1), np.round(b, 1)
        folds.append(((a + a.T) / 2, (b + b.T) / 2))
    got = rsa_folds(folds, n_boot=37, n_perm=45, seed=3)
    want = _old_rsa_folds(folds, 37, 45, 3)
    assert got[0] == want[0] and np.isfinite(got[0])
    assert np.array_equal(got[1], want[1], equal_nan=True)
    assert got[2] == want[2]


def test_rsa_folds_with_missing_pairs_gives_the_former_score_and_bootstrap() -> None:
    from sclstore.eval.stats import rsa_folds

    x, y, ii, jj = _pairs(30, 2, missing=6)
    a, b = np.zeros((30, 30)), np.zeros((30, 30))
    a[ii, jj], b[ii, jj] = x, y
    a, b = a + a.T, b + b.T
    got = rsa_folds([(a, b)], n_boot=20, n_perm=0, seed=1)
    want = _old_rsa_folds([(a, b)], 20, 0, 1)
    assert got[0] == want[0] and np.array_equal(got[1], want[1], equal_nan=True) and np.isnan(got[2])
