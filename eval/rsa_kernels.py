"""Compiled inner loops of the RSA resampling statistics (numba; pure functions of arrays).

At ``K`` perturbations an RSA compares ``P = K (K - 1) / 2`` pairs (2 million at ``K = 2,000``).
The NumPy versions of the bootstrap and the Mantel test materialised and re-ranked ``P`` values
per replicate (``O(P log P)``, ~3.5 s per bootstrap replicate at ``K = 2,000``). These kernels give
the same numbers in ``O(P)`` per replicate without any per-replicate sort:

* **Mantel permutations**: ranks are permutation-invariant, so the ranks of both upper triangles
  are computed once and each permutation only gathers ``rank_b[pi_i, pi_j]`` and accumulates
  its product with the centred ranks of ``a`` (the statistic of the NumPy version, term for term).
* **Bootstrap over items**: a resample with item counts ``c`` holds each original pair
  ``{i, j}`` exactly ``c_i c_j`` times (pairs of two copies of one item are dropped), and copies
  of one pair are ties. The average ranks of that multiset follow from one global sort of each
  upper triangle (done once): walking the sorted pairs and summing the weights ``c_i c_j``
  gives every element's average rank, ties between different pairs included. The weighted
  Pearson correlation of those ranks is the Spearman correlation of the expanded resample.

``tests/eval/test_rsa_kernels.py`` checks both against the NumPy reference implementations.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bootstrap_spearman_pairs", "bootstrap_spearman_weighted", "permutation_stats", "sorted_ties"]


@njit(cache=True, nogil=True)
def permutation_stats(x: np.ndarray, rank_b: np.ndarray, perms: np.ndarray, mean_b: float) -> np.ndarray:  # pragma: no cover - compiled
    """``stat[p] = sum_{i<j} x_ij (rank_b[perm_i, perm_j] - mean_b)`` for every permutation (row of ``perms``).

    ``x`` is the upper triangle (row by row) of the first matrix's centred, scaled ranks.
    """
    n_perm, k = perms.shape
    out = np.zeros(n_perm)
    for p in range(n_perm):
        perm = perms[p]
        acc = 0.0
        pos = 0
        for i in range(k):
            row = rank_b[perm[i]]
            for j in range(i + 1, k):
                acc += x[pos] * (row[perm[j]] - mean_b)
                pos += 1
        out[p] = acc
    return out


def sorted_ties(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort order of ``v`` and the start of each run of equal values in that order (plus the end).

    Parameters
    ----------
    v
        Finite values (non-finite entries are given weight 0 by the caller and may sit anywhere).

    Returns
    -------
    tuple of numpy.ndarray
        ``(order, starts)``; ``starts[-1] == len(v)``.
    """
    order = np.argsort(v, kind="stable")
    s = v[order]
    new = np.ones(s.shape[0], dtype=bool)
    if s.shape[0] > 1:
        new[1:] = s[1:] != s[:-1]
    starts = np.append(np.flatnonzero(new), s.shape[0]).astype(np.int64)
    return order.astype(np.int64), starts


@njit(cache=True, nogil=True)
def _sorted_ranks(starts: np.ndarray, w: np.ndarray, r: np.ndarray, m: float) -> float:  # pragma: no cover - compiled
    """Average ranks, in sorted order, of a multiset whose ``s``-th sorted value is repeated ``w[s]`` times.

    Writes the ranks to ``r`` and returns ``sum w (r - m)**2`` for the known mean rank ``m``.
    """
    below = 0.0
    ss = 0.0
    for g in range(starts.shape[0] - 1):
        a, b = starts[g], starts[g + 1]
        tot = 0.0
        for s in range(a, b):
            tot += w[s]
        rank = below + (tot + 1.0) / 2.0
        for s in range(a, b):
            r[s] = rank
        ss += tot * (rank - m) * (rank - m)
        below += tot
    return ss


@njit(cache=True, nogil=True)
def bootstrap_spearman_weighted(ii_x: np.ndarray, jj_x: np.ndarray, ok_x: np.ndarray, starts_x: np.ndarray,
                                ii_y: np.ndarray, jj_y: np.ndarray, ok_y: np.ndarray, starts_y: np.ndarray,
                                y_of_x: np.ndarray, resamples: np.ndarray, work: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Spearman correlation of two upper triangles on each item resample (row of ``resamples``).

    Each side is given in its own sorted order (:func:`sorted_ties`): the items ``ii, jj`` of
    each sorted pair, ``ok`` (pair finite on both sides) and the tie starts; ``y_of_x[s]`` is
    the position in the y order of the pair at position ``s`` of the x order. The mean rank of
    a multiset of ``W`` elements is ``(W + 1) / 2``. ``work`` is a ``(4, pairs)`` scratch array
    (float32 when every weight and average rank is exact in it, else float64). ``nan`` where
    fewer than 3 pairs remain or one side is constant.
    """
    n_boot, k = resamples.shape
    n_pairs = ii_x.shape[0]
    out = np.full(n_boot, np.nan)
    c = np.zeros(k)
    wx, wy, rx, ry = work[0], work[1], work[2], work[3]
    for b in range(n_boot):
        c[:] = 0.0
        for s in range(k):
            c[resamples[b, s]] += 1.0
        tot = 0.0
        for s in range(n_pairs):  # sequential: c is small and stays in cache
            v = c[ii_x[s]] * c[jj_x[s]] if ok_x[s] else 0.0
            wx[s] = v
            tot += v
            wy[s] = c[ii_y[s]] * c[jj_y[s]] if ok_y[s] else 0.0
        if tot < 3:
            continue
        m = (tot + 1.0) / 2.0
        sxx = _sorted_ranks(starts_x, wx, rx, m)
        syy = _sorted_ranks(starts_y, wy, ry, m)
        sxy = 0.0
        for s in range(n_pairs):
            w = wx[s]
            if w > 0:
                sxy += w * (rx[s] - m) * (ry[y_of_x[s]] - m)  # the only random access
        den = np.sqrt(sxx * syy)
        if den > 0:
            out[b] = sxy / den
    return out


def bootstrap_spearman_pairs(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Spearman correlation of paired pair-values ``x, y`` (items ``ii, jj``) on each item resample.

    Parameters
    ----------
    x, y
        Values of each pair on the two sides (non-finite pairs are left out).
    ii, jj
        The two items of each pair (``ii != jj``).
    resamples
        ``(n_boot, k)`` item indices drawn with replacement.

    Returns
    -------
    numpy.ndarray
        ``n_boot`` correlations (``nan`` where undefined).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    ox, sx = sorted_ties(x)
    oy, sy = sorted_ties(y)
    inv_y = np.empty_like(oy)
    inv_y[oy] = np.arange(oy.shape[0])
    ii, jj = ii.astype(np.int32), jj.astype(np.int32)  # 4-byte indices and scratch: the passes are memory-bound
    k = resamples.shape[1]
    # weights c_i c_j (< k^2) and average ranks (halves up to k^2 / 2) are exact in float32 when k^2 < 2**24
    work = np.zeros((4, x.shape[0]), dtype=np.float32 if k * k < 2**24 else np.float64)
    return np.asarray(bootstrap_spearman_weighted(ii[ox], jj[ox], ok[ox], sx.astype(np.int32), ii[oy], jj[oy], ok[oy], sy.astype(np.int32),
                                                  inv_y[ox].astype(np.int32), np.ascontiguousarray(resamples, dtype=np.int64), work))
