"""Exact nearest neighbours of every cell by blocked matrix products (a flat search, as FAISS's).

Squared Euclidean distances ``|x|^2 + |y|^2 - 2 x.y`` of a block of cells against another come
from one float32 matrix product of augmented rows ``[x, |x|^2, 1] . [-2y, 1, |y|^2]`` (centred
data, to keep the norms small). The distance matrix is symmetric, so only block pairs ``I <= J``
are formed: half the products of a plain search, each pair updating the candidate lists of the
rows of ``I`` and of ``J``. Every cell keeps its ``K + margin`` best candidates in a max-heap;
a block's row and column minima select the few rows and columns that can improve a heap.

The candidates are then re-measured in float64 (direct differences of the float32 input, as an
exact search measures them) and sorted. A cell's list is provably its exact ``K`` nearest when
its ``K``-th re-measured distance lies below its last float32 candidate's distance minus the
rounding bound of the float32 computation (see :func:`_rounding_bound`); any other cell is
searched again in float64 against all cells. So the result is the exact search's, ties aside,
at the cost of ~half a brute-force matrix product, whatever the data's structure: at 100,000
cells x 512 dims, 60-72 s of one CPU against ~270 s for scikit-learn's brute force (extrapolated
from 20,000 cells). pynndescent's approximate graph took 75-90 s on the benchmark's noisiest layer
(recall 0.52) but is faster on structured layers, where it also finds more true neighbours
(``bench/eval_scale.py`` E8; BENCHMARKS.md).
"""

from __future__ import annotations

import logging

import numba
import numpy as np

from sclstore.store.errors import InvalidInputError

__all__ = ["BLOCK", "MARGIN", "exact_neighbours"]

logger = logging.getLogger(__name__)

#: Cells per block: a 512 x 512 float32 block of distances (1 MiB) stays in a core's L2 cache.
BLOCK = 512
#: Extra float32 candidates per cell, so that rounding cannot hide one of the ``K`` nearest.
MARGIN = 16

_U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


@numba.njit(nogil=True, inline="always", cache=True)
def _sift(hd: np.ndarray, hi: np.ndarray, d: float, j: int) -> None:  # pragma: no cover - numba
    """Replace a max-heap's root by ``(d, j)`` and restore the heap."""
    size = hd.shape[0]
    p = 0
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        if c + 1 < size and hd[c + 1] > hd[c]:
            c += 1
        if hd[c] <= d:
            break
        hd[p] = hd[c]
        hi[p] = hi[c]
        p = c
    hd[p] = d
    hi[p] = j


@numba.njit(nogil=True, inline="always", cache=True)
def _offer_line(values: np.ndarray, first: int, hd: np.ndarray, hi: np.ndarray, t: float) -> float:  # pragma: no cover - numba
    """Offer ``values[b]`` (cell ``first + b``) to one heap of current root ``t``; returns the new root."""
    for b in range(values.shape[0]):
        if values[b] < t:
            _sift(hd, hi, values[b], first + b)
            t = hd[0]
    return t


@numba.njit(nogil=True, cache=True)
def _offer(D: np.ndarray, i0: int, j0: int, rows: np.ndarray, cols: np.ndarray, hd: np.ndarray, hi: np.ndarray,
           thr: np.ndarray) -> None:  # pragma: no cover - numba
    """Offer block ``D`` (rows ``i0 + a``, columns ``j0 + b``) to the heaps of the given rows and columns."""
    for a in rows:
        thr[i0 + a] = _offer_line(D[a], j0, hd[i0 + a], hi[i0 + a], thr[i0 + a])
    for b in cols:
        thr[j0 + b] = _offer_line(D[:, b], i0, hd[j0 + b], hi[j0 + b], thr[j0 + b])


@numba.njit(nogil=True, cache=True)
def _remeasure(X: np.ndarray, rows: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - numba
    """Float64 squared distances of ``X[rows[r]]`` to ``X[idx[r, k]]`` (direct differences, summed in order)."""
    d = X.shape[1]
    for r in range(rows.shape[0]):
        xi = X[rows[r]]
        for k in range(idx.shape[1]):
            xj = X[idx[r, k]]
            s = 0.0
            for c in range(d):
                t = np.float64(xi[c]) - np.float64(xj[c])
                s += t * t
            out[r, k] = s


def _rounding_bound(sq: np.ndarray, dim: int) -> np.ndarray:
    """Per cell ``i``, a bound on ``|float32 distance - exact distance|`` to any other cell.

    The product of two augmented rows of length ``m = dim + 2`` errs by at most
    ``gamma_m * sum|a_k b_k| <= gamma_m * 2 (|x|^2 + |y|^2)`` whatever the summation order
    (Higham, *Accuracy and Stability*, eq. 3.5); rounding the centred data and the squared norms to
    float32 adds at most ``5u (|x|^2 + |y|^2)``. ``|y|^2`` is bounded by the largest norm.
    """
    m = dim + 2
    gamma = m * _U32 / (1 - m * _U32)
    return (2 * gamma + 6 * _U32) * (sq + sq.max()) * (1 + 1e-6)


def exact_neighbours(X: np.ndarray, K: int, *, block: int = BLOCK, margin: int = MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """The ``K`` nearest other cells of every cell, exactly (Euclidean), by blocked products.

    Parameters
    ----------
    X
        Representation, cells x dim (float32 is used; distances are measured from it).
    K
        Neighbours per cell, the cell itself excluded (``1 <= K < n``).
    block
        Cells per block of the products.
    margin
        Extra candidates per cell kept from the float32 products.

    Returns
    -------
    tuple of numpy.ndarray
        ``(indices, distances)``, ``(n, K)`` int64 and float32, nearest first (ties by index).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, dim = X.shape
    if not 1 <= K < n:
        raise InvalidInputError(f"neighbour list length must be between 1 and n_cells - 1 = {n - 1}, got {K}")
    if not np.isfinite(X).all():
        raise InvalidInputError("representation has non-finite values; drop or impute those cells before the kNN graph")
    Kc = min(n - 1, K + margin)
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = np.empty_like(X)
    sq = np.empty(n)
    for c0 in range(0, n, 65536):  # centred in float64, rounded once to float32 (bounded memory)
        centred = X[c0:c0 + 65536] - mean
        sq[c0:c0 + 65536] = np.einsum("ij,ij->i", centred, centred)
        Xc[c0:c0 + 65536] = centred
    del centred
    left = np.hstack([Xc, sq.astype(np.float32)[:, None], np.ones((n, 1), np.float32)])
    right = np.hstack([-2 * Xc, np.ones((n, 1), np.float32), sq.astype(np.float32)[:, None]])
    del Xc
    hd = np.full((n, Kc), np.inf, dtype=np.float32)
    hi = np.full((n, Kc), -1, dtype=np.int64)
    thr = np.full(n, np.inf, dtype=np.float32)
    for i0 in range(0, n, block):
        rows_i = left[i0:i0 + block]
        for j0 in range(i0, n, block):
            D = rows_i @ right[j0:j0 + block].T
            if i0 == j0:  # the diagonal block: each pair once, no cell with itself
                D[np.tril_indices(D.shape[0])] = np.inf
            rows = np.flatnonzero(D.min(axis=1) < thr[i0:i0 + D.shape[0]])
            cols = np.flatnonzero(D.min(axis=0) < thr[j0:j0 + D.shape[1]])
            if rows.size or cols.size:
                _offer(D, i0, j0, rows, cols, hd, hi, thr)
    del left, right
    cand_d = np.empty((n, Kc))
    _remeasure(X, np.arange(n), hi, cand_d)
    order = np.lexsort((hi, cand_d), axis=1)  # by distance, ties by index
    cand_i = np.take_along_axis(hi, order, axis=1)
    cand_d = np.take_along_axis(cand_d, order, axis=1)
    # proven: every cell outside the candidates is at least (last float32 candidate - bound) away
    last = hd.max(axis=1).astype(np.float64)
    unproven = np.flatnonzero((Kc < n - 1) & ~(cand_d[:, K - 1] < last - _rounding_bound(sq, dim)))
    if unproven.size:
        logger.debug("exact kNN: %d of %d cells searched again in float64 (rounding bound above their margin)", unproven.size, n)
        _search_again(X, unproven, K, cand_i, cand_d)
    return cand_i[:, :K].copy(), np.sqrt(cand_d[:, :K]).astype(np.float32)


def _search_again(X: np.ndarray, rows: np.ndarray, K: int, cand_i: np.ndarray, cand_d: np.ndarray) -> None:
    """Float64 distances of ``rows`` to every cell; their first ``K`` candidates replaced in place."""
    n = X.shape[0]
    everyone = np.arange(n, dtype=np.int64)[None, :]
    d = np.empty((1, n))
    for r in rows:
        _remeasure(X, np.array([r]), everyone, d)
        d[0, r] = np.inf
        top = np.argpartition(d[0], K)[:K + 1] if n > K + 1 else np.arange(n)
        top = top[np.lexsort((top, d[0, top]))][:K]
        cand_i[r, :K] = top
        cand_d[r, :K] = d[0, top]
