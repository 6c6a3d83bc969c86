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

Both run several replicates per pass over the pairs (issue 14 item 7, third pass): 8 Mantel
permutations, 16 bootstrap resamples (:data:`LANES`). Each replicate's sums keep their order
term for term, so every number is bit-for-bit the one-replicate-at-a-time kernel's; what changes
is that the sorted index arrays stream once per block, one random read of a pair's y ranks (one
cache line) serves 16 resamples, and independent running sums no longer wait on each other.

``tests/eval/test_rsa_kernels.py`` checks the statistics against the NumPy reference
implementations; ``tests/eval/test_rsa_blocked.py`` checks the blocked kernels against the
one-at-a-time ones for exact equality.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["LANES", "average_ranks", "bootstrap_spearman_blocked", "bootstrap_spearman_pairs", "bootstrap_spearman_weighted", "permutation_stats",
           "sorted_ties"]

#: Bootstrap resamples per pass over the pairs (:func:`bootstrap_spearman_blocked`): 16 float32 ranks of
#: one pair fill one 64-byte cache line, so the one random read per pair serves 16 resamples.
LANES = 16
#: Upper bound on the blocked kernel's rank scratch (``pairs x lanes``, 128 MiB at 2,000 perturbations);
#: fewer lanes above it (same numbers, only slower).
_RANKS_BYTES = 256 * 2**20


@njit(cache=True, nogil=True)
def _permutation_stat(x: np.ndarray, rank_b: np.ndarray, perm: np.ndarray, mean_b: float) -> float:  # pragma: no cover - compiled
    """One permutation's ``sum_{i<j} x_ij (rank_b[perm_i, perm_j] - mean_b)``, summed in pair order."""
    k = perm.shape[0]
    acc = 0.0
    pos = 0
    for i in range(k):
        row = rank_b[perm[i]]
        for j in range(i + 1, k):
            acc += x[pos] * (row[perm[j]] - mean_b)
            pos += 1
    return acc


@njit(cache=True, nogil=True)
def permutation_stats(x: np.ndarray, rank_b: np.ndarray, perms: np.ndarray, mean_b: float) -> np.ndarray:  # pragma: no cover - compiled
    """``stat[p] = sum_{i<j} x_ij (rank_b[perm_i, perm_j] - mean_b)`` for every permutation (row of ``perms``).

    ``x`` is the upper triangle (row by row) of the first matrix's centred, scaled ranks.
    Permutations go in blocks of 8 through one pass over ``x``: eight independent sums
    (a single running sum waits on its previous addition at every pair), each still added
    term by term in pair order, so every statistic is bit-for-bit the one-at-a-time sum
    (:func:`_permutation_stat`, used for the last ``n_perm % 8``).
    """
    n_perm, k = perms.shape
    out = np.zeros(n_perm)
    n_block = n_perm - n_perm % 8
    for p in range(0, n_block, 8):
        q0, q1, q2, q3 = perms[p], perms[p + 1], perms[p + 2], perms[p + 3]
        q4, q5, q6, q7 = perms[p + 4], perms[p + 5], perms[p + 6], perms[p + 7]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        pos = 0
        for i in range(k):
            r0, r1, r2, r3 = rank_b[q0[i]], rank_b[q1[i]], rank_b[q2[i]], rank_b[q3[i]]
            r4, r5, r6, r7 = rank_b[q4[i]], rank_b[q5[i]], rank_b[q6[i]], rank_b[q7[i]]
            for j in range(i + 1, k):
                v = x[pos]
                a0 += v * (r0[q0[j]] - mean_b)
                a1 += v * (r1[q1[j]] - mean_b)
                a2 += v * (r2[q2[j]] - mean_b)
                a3 += v * (r3[q3[j]] - mean_b)
                a4 += v * (r4[q4[j]] - mean_b)
                a5 += v * (r5[q5[j]] - mean_b)
                a6 += v * (r6[q6[j]] - mean_b)
                a7 += v * (r7[q7[j]] - mean_b)
                pos += 1
        out[p], out[p + 1], out[p + 2], out[p + 3] = a0, a1, a2, a3
        out[p + 4], out[p + 5], out[p + 6], out[p + 7] = a4, a5, a6, a7
    for p in range(n_block, n_perm):
        out[p] = _permutation_stat(x, rank_b, perms[p], mean_b)
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


def average_ranks(order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(v)`` (average ranks, float64) from :func:`sorted_ties` of ``v``: the same numbers.

    Every average rank is a half-integer, exact in float64, whatever the arithmetic that forms it.
    """
    counts = np.diff(starts)
    out = np.empty(order.shape[0])
    out[order] = np.repeat(starts[:-1] + (counts + 1) / 2.0, counts)
    return out


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
    """Spearman correlation of two upper triangles on each item resample (row of ``resamples``), one per pass.

    The reference for :func:`bootstrap_spearman_blocked` (which :func:`bootstrap_spearman_pairs` runs).

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


@njit(cache=True, nogil=True)
def _block_counts(resamples: np.ndarray, b0: int, c: np.ndarray, bad_i: np.ndarray, bad_j: np.ndarray,
                  tot: np.ndarray, m: np.ndarray) -> None:  # pragma: no cover - compiled
    """Item counts ``c[:, l]`` of resample ``b0 + l`` and the total pair weight of each (exact integers)."""
    n_boot, k = resamples.shape
    lanes = c.shape[1]
    c[:, :] = 0.0
    for lane in range(min(lanes, n_boot - b0)):
        for s in range(k):
            c[resamples[b0 + lane, s], lane] += 1.0
    for lane in range(lanes):
        s1 = 0.0
        s2 = 0.0
        for i in range(k):
            s1 += c[i, lane]
            s2 += c[i, lane] * c[i, lane]
        t = (s1 * s1 - s2) / 2.0  # sum_{i<j} c_i c_j: integers, exact below 2**53
        for q in range(bad_i.shape[0]):
            t -= c[bad_i[q], lane] * c[bad_j[q], lane]
        tot[lane] = t
        m[lane] = (t + 1.0) / 2.0


@njit(cache=True, nogil=True)
def _tie_group(a: int, e: int, ok: np.ndarray, ii: np.ndarray, jj: np.ndarray, c: np.ndarray, m: np.ndarray, below: np.ndarray,
               grp: np.ndarray, rank: np.ndarray, ss: np.ndarray) -> None:  # pragma: no cover - compiled
    """One group of tied pairs ``a:e`` in every lane: its weight ``grp``, its average rank ``rank``;
    adds ``grp * (rank - m)^2`` to ``ss`` and the weight to ``below`` (pairs ranked so far)."""
    grp[:] = 0.0
    for s in range(a, e):
        if ok[s]:
            i, j = ii[s], jj[s]
            for lane in range(grp.shape[0]):
                grp[lane] += c[i, lane] * c[j, lane]
    for lane in range(grp.shape[0]):
        r = below[lane] + (grp[lane] + 1.0) / 2.0
        rank[lane] = r
        d = r - m[lane]
        ss[lane] += grp[lane] * d * d
        below[lane] += grp[lane]


@njit(cache=True, nogil=True)
def bootstrap_spearman_blocked(ii_x: np.ndarray, jj_x: np.ndarray, ok_x: np.ndarray, starts_x: np.ndarray,
                               ii_y: np.ndarray, jj_y: np.ndarray, ok_y: np.ndarray, starts_y: np.ndarray,
                               y_of_x: np.ndarray, bad_i: np.ndarray, bad_j: np.ndarray, resamples: np.ndarray,
                               ry: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """:func:`bootstrap_spearman_weighted` for ``L`` resamples per pass over the pairs (``ry`` is ``(pairs, L)``).

    The same arithmetic, in the same order, per resample: every output is bit-for-bit the
    one-at-a-time kernel's. What changes is the memory traffic and the waiting: the sorted
    index arrays are read once per block of ``L`` resamples instead of once per resample, the
    ``L`` resamples' weights and ranks of one pair sit side by side (``c`` is ``(items, L)``,
    ``ry`` is ``(pairs, L)``), and the ``L`` running sums are independent. The y side's ranks
    are written first; the x side's are computed on the fly and combined with them at once
    (weights are recomputed from the counts, never stored). The total weight of a resample is
    ``(sum(c)^2 - sum(c^2)) / 2`` minus the weights of the non-finite pairs ``(bad_i, bad_j)``,
    the exact integer the one-at-a-time kernel sums. ``ry`` is float32 when every rank is exact
    in it, else float64.
    """
    n_boot, k = resamples.shape
    lanes = ry.shape[1]
    out = np.full(n_boot, np.nan)
    c = np.zeros((k, lanes))
    tot, m = np.zeros(lanes), np.zeros(lanes)
    below, grp, rank = np.zeros(lanes), np.zeros(lanes), np.zeros(lanes)
    sxx, syy, sxy = np.zeros(lanes), np.zeros(lanes), np.zeros(lanes)
    for b0 in range(0, n_boot, lanes):
        _block_counts(resamples, b0, c, bad_i, bad_j, tot, m)
        # y side: average ranks of every pair, stored for the x pass
        below[:] = 0.0
        syy[:] = 0.0
        for g in range(starts_y.shape[0] - 1):
            a, e = starts_y[g], starts_y[g + 1]
            if e - a == 1:  # a value without ties (the common case)
                i, j = ii_y[a], jj_y[a]
                if ok_y[a]:
                    for lane in range(lanes):
                        w = c[i, lane] * c[j, lane]
                        r = below[lane] + (w + 1.0) / 2.0
                        ry[a, lane] = r
                        d = r - m[lane]
                        syy[lane] += w * d * d
                        below[lane] += w
                else:
                    for lane in range(lanes):
                        ry[a, lane] = below[lane] + 0.5
                continue
            _tie_group(a, e, ok_y, ii_y, jj_y, c, m, below, grp, rank, syy)
            for s in range(a, e):
                for lane in range(lanes):
                    ry[s, lane] = rank[lane]
        # x side: ranks on the fly, joined with the y ranks in x order
        below[:] = 0.0
        sxx[:] = 0.0
        sxy[:] = 0.0
        for g in range(starts_x.shape[0] - 1):
            a, e = starts_x[g], starts_x[g + 1]
            if e - a == 1:
                if ok_x[a]:
                    i, j, t = ii_x[a], jj_x[a], y_of_x[a]
                    for lane in range(lanes):
                        w = c[i, lane] * c[j, lane]
                        r = below[lane] + (w + 1.0) / 2.0
                        d = r - m[lane]
                        sxx[lane] += w * d * d
                        below[lane] += w
                        sxy[lane] += w * d * (ry[t, lane] - m[lane])  # + (+-0) where w = 0: no change
                continue
            _tie_group(a, e, ok_x, ii_x, jj_x, c, m, below, grp, rank, sxx)
            for s in range(a, e):
                if ok_x[s]:
                    i, j, t = ii_x[s], jj_x[s], y_of_x[s]
                    for lane in range(lanes):
                        w = c[i, lane] * c[j, lane]
                        sxy[lane] += w * (rank[lane] - m[lane]) * (ry[t, lane] - m[lane])
        for lane in range(min(lanes, n_boot - b0)):
            if tot[lane] < 3:
                continue
            den = np.sqrt(sxx[lane] * syy[lane])
            if den > 0:
                out[b0 + lane] = sxy[lane] / den
    return out


def bootstrap_spearman_pairs(x: np.ndarray, y: np.ndarray, ii: np.ndarray, jj: np.ndarray, resamples: np.ndarray, *,
                             ties: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Spearman correlation of paired pair-values ``x, y`` (items ``ii, jj``) on each item resample.

    Parameters
    ----------
    x, y
        Values of each pair on the two sides (non-finite pairs are left out).
    ii, jj
        The two items of each pair (``ii != jj``).
    resamples
        ``(n_boot, k)`` item indices drawn with replacement.
    ties
        :func:`sorted_ties` of ``x`` and of ``y`` when the caller has them already.

    Returns
    -------
    numpy.ndarray
        ``n_boot`` correlations (``nan`` where undefined).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    (ox, sx), (oy, sy) = ties if ties is not None else (sorted_ties(x), sorted_ties(y))
    inv_y = np.empty_like(oy)
    inv_y[oy] = np.arange(oy.shape[0])
    ii, jj = ii.astype(np.int32), jj.astype(np.int32)  # 4-byte indices and scratch: the passes are memory-bound
    k = resamples.shape[1]
    # weights c_i c_j (< k^2) and average ranks (halves up to k^2 / 2) are exact in float32 when k^2 < 2**24
    dtype = np.dtype(np.float32 if k * k < 2**24 else np.float64)
    lanes = max(1, min(LANES, resamples.shape[0], _RANKS_BYTES // max(1, x.shape[0] * dtype.itemsize)))
    ry = np.zeros((x.shape[0], lanes), dtype=dtype)
    bad = np.flatnonzero(~ok)
    return np.asarray(bootstrap_spearman_blocked(ii[ox], jj[ox], ok[ox], sx.astype(np.int32), ii[oy], jj[oy], ok[oy], sy.astype(np.int32),
                                                 inv_y[ox].astype(np.int32), ii[bad], jj[bad],
                                                 np.ascontiguousarray(resamples, dtype=np.int64), ry))
