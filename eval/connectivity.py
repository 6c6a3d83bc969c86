"""UMAP connectivities and the diffusion operator of a kNN graph, without importing umap.

``sc.pp.neighbors`` turns neighbour lists into connectivities with umap's
``fuzzy_simplicial_set``. Importing umap imports pynndescent, which compiles its distance
functions with numba at import time, uncached: 13-16 s of CPU in every new process, more than a
whole trajectory evaluation of a few thousand cells, and the part that is most erratic on a
loaded machine. The computation itself is small and is done here with umap's arithmetic, step
for step:

- :func:`bandwidths`: the per-cell bisection in float64 over float32 distance differences (what
  umap's compiled code does; a small numba kernel, cached on disk);
- :func:`memberships`: ``exp(-(d - rho) / sigma)`` in float32 with the C library's ``expf``
  values;
- :func:`umap_connectivities`: the fuzzy union ``A + A^T - A * A^T`` (a numba merge of each row
  with its transposed row, in float32 as scipy's sparse arithmetic);
- :func:`transitions_sym`: scanpy's Coifman-Lafon diffusion operator, accumulated in float64 in
  one pass (the trajectory runner's direct path; scanpy sums in float32).

The connectivities are umap's bit for bit wherever the C library can be loaded; elsewhere the
float32 ``exp`` is correctly rounded, which differs from ``expf`` in ~0.1% of values by one unit
in the last place. ``tests/eval/test_connectivity.py`` checks both against umap and scanpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import cast

import numba
import numpy as np
from scipy import sparse

__all__ = ["bandwidths", "memberships", "transitions_sym", "umap_connectivities"]

_TOLERANCE = 1e-5  # umap's SMOOTH_K_TOLERANCE
_MIN_SCALE = 1e-3  # umap's MIN_K_DIST_SCALE
_FLOATMAX = float(np.finfo(np.float32).max)
#: Distance from the float32 rounding midpoint, in units in the last place, within which ``expf``
#: itself is asked (glibc's ``expf`` errs by <= 0.502 ulp, so only values within 0.002 can differ).
_NEAR_MIDPOINT = 0.01


@functools.cache
def _libm_expf() -> Callable[[float], float] | None:
    """The C library's ``expf`` (what umap's numba code calls), or ``None`` where it cannot be loaded."""
    name = ctypes.util.find_library("m")
    try:
        fn = ctypes.CDLL(name).expf if name else None
    except (OSError, AttributeError):
        return None
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return cast("Callable[[float], float]", fn)


def _exp32(x: np.ndarray) -> np.ndarray:
    """``exp`` of float32 values, as the C library's ``expf`` returns them.

    Computed in float64 and rounded to float32: the correctly rounded result. ``expf`` (glibc's
    errs by at most 0.502 units in the last place) can round the other way only when the exact
    value lies within 0.002 units of the midpoint between two float32 numbers; the values within
    :data:`_NEAR_MIDPOINT` units (5x that margin, ~2% of values) are passed to ``expf`` itself,
    so the result is ``expf``'s bit for bit and the bandwidth search takes exactly umap's steps.
    """
    exact = np.exp(x.astype(np.float64))
    out = exact.astype(np.float32)
    expf = _libm_expf()
    if expf is None or out.size == 0:
        return out
    ulp = np.spacing(out).astype(np.float64)
    near = np.abs(np.abs(exact - out.astype(np.float64)) / ulp - 0.5) < _NEAR_MIDPOINT
    near &= np.isfinite(exact) & (out > 0)
    if near.any():
        flat, where = out.reshape(-1), np.flatnonzero(near.reshape(-1))
        src = x.reshape(-1)
        flat[where] = np.fromiter((expf(float(v)) for v in src[where]), dtype=np.float32, count=where.size)
    return out


def _mean32(d: np.ndarray, axis: int | None) -> np.ndarray | float:
    """Mean as numba's ``np.mean`` of a float32 array: a float32 running sum, divided in float64."""
    if axis is None:
        return float(np.cumsum(d.reshape(-1), dtype=np.float32)[-1]) / d.size
    acc = np.zeros(d.shape[0], dtype=np.float32)
    for j in range(d.shape[1]):
        acc += d[:, j]
    return acc.astype(np.float64) / d.shape[1]


@numba.njit(cache=True, nogil=True)
def _bisect(shifted: np.ndarray, target: float, tol: float, n_iter: int) -> np.ndarray:  # pragma: no cover - numba
    """The per-cell bisection (~0.05 s for 100,000 cells).

    Per row: ``mid`` starts at 1; each step sums ``exp(-d / mid)`` over the positive shifted
    distances (1 for the others) left to right in float64; within ``tol`` of ``target`` the row
    stops; above it ``mid`` halves towards ``lo``, below it doubles while no upper bound is known.
    """
    n, k = shifted.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        lo, hi, mid = 0.0, np.inf, 1.0
        for _ in range(n_iter):
            psum = 0.0
            for j in range(k):
                x = shifted[i, j]
                psum += np.exp(-(x / mid)) if x > 0 else 1.0
            if np.fabs(psum - target) < tol:
                break
            if psum > target:
                hi = mid
                mid = (lo + hi) / 2.0
            else:
                lo = mid
                mid = mid * 2.0 if np.isinf(hi) else (lo + hi) / 2.0
        out[i] = mid
    return out


def bandwidths(distances: np.ndarray, k: float, *, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's kernel bandwidth ``sigma`` and nearest non-zero distance ``rho`` (local connectivity 1).

    ``sigma`` solves ``sum_j exp(-max(d_j - rho, 0) / sigma) = log2(k)`` over the neighbours
    (column 0, the cell itself, excluded) by bisection, all cells at once, stopping a cell when
    the sum is within 1e-5 of the target; a bandwidth below 1e-3 of the mean distance is raised
    to it.

    Parameters
    ----------
    distances
        ``(n, k)`` distances, ascending per row, column 0 the cell itself (0).
    k
        Neighbours per cell, the cell itself included.
    n_iter
        Bisection steps.

    Returns
    -------
    tuple of numpy.ndarray
        ``(sigma, rho)``, float32, one per cell.
    """
    d = np.asarray(distances, dtype=np.float32)
    n = d.shape[0]
    target = float(np.log2(k))
    positive = d > 0
    first = positive.argmax(axis=1)
    rho = np.where(positive.any(axis=1), d[np.arange(n), first], np.float32(0)).astype(np.float32)
    shifted = (d[:, 1:] - rho[:, None]).astype(np.float32)  # the difference in float32, as umap's
    sigma = _bisect(shifted, target, _TOLERANCE, n_iter)
    floor = np.where(rho > 0, _mean32(d, 1), _mean32(d, None)) * _MIN_SCALE
    sigma = np.where(sigma < floor, floor, sigma).astype(np.float32)
    return sigma, rho


def memberships(indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """umap's membership strengths ``exp(-max(d_ij - rho_i, 0) / sigma_i)``, float32, per list entry.

    Parameters
    ----------
    indices
        ``(n, k)`` neighbour indices, column 0 the cell itself (its entry is 0: no self loops;
        negative indices, missing neighbours, are 0 too).
    distances
        ``(n, k)`` matching distances, ascending per row.

    Returns
    -------
    numpy.ndarray
        ``(n, k)`` float32 (1 where the distance is within ``rho_i`` or ``sigma_i = 0``).
    """
    idx = np.asarray(indices, dtype=np.int64)
    d = np.asarray(distances, dtype=np.float32)
    n, k = idx.shape
    sigma, rho = bandwidths(d, float(k))
    shifted = (d - rho[:, None]).astype(np.float32)
    one = (shifted <= 0) | (sigma[:, None] == 0)
    safe_sigma = np.where(sigma > 0, sigma, np.float32(1.0)).astype(np.float32)
    w = _exp32(-(np.where(one, np.float32(0.0), shifted) / safe_sigma[:, None]))  # computed where used: no overflow
    w[one] = 1.0
    w[idx == np.arange(n)[:, None]] = 0.0
    w[idx < 0] = 0.0
    return w


@numba.njit(cache=True, nogil=True)  # the last layer builds its subsample graphs in threads
def _fuzzy_union(idx: np.ndarray, val: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - numba
    """CSR (sorted columns) of ``P + P^T - P * P^T`` in float32; ``P[i, idx[i, j]] = val[i, j]`` (zeros dropped)."""
    k = idx.shape[1]
    # forward rows, sorted by column; duplicates summed (as a COO -> CSR conversion does)
    fcol = np.empty((n, k), dtype=np.int64)
    fval = np.empty((n, k), dtype=np.float32)
    flen = np.zeros(n, dtype=np.int64)
    bcount = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        order = np.argsort(idx[i], kind="mergesort")
        m = 0
        for jj in range(k):
            j = order[jj]
            v = val[i, j]
            if v == 0.0:
                continue
            c = idx[i, j]
            if m > 0 and fcol[i, m - 1] == c:
                fval[i, m - 1] = np.float32(fval[i, m - 1] + v)
            else:
                fcol[i, m] = c
                fval[i, m] = v
                m += 1
        flen[i] = m
        for jj in range(m):
            bcount[fcol[i, jj] + 1] += 1
    # backward rows (the transpose) by counting sort: row c holds (i, P[i, c]) in increasing i
    bptr = np.cumsum(bcount)
    bcol = np.empty(bptr[n], dtype=np.int64)
    bval = np.empty(bptr[n], dtype=np.float32)
    fill = bptr[:n].copy()
    for i in range(n):
        for jj in range(flen[i]):
            c = fcol[i, jj]
            bcol[fill[c]] = i
            bval[fill[c]] = fval[i, jj]
            fill[c] += 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    cols = np.empty(bptr[n] + flen.sum(), dtype=np.int32)
    data = np.empty(bptr[n] + flen.sum(), dtype=np.float32)
    pos = 0
    for i in range(n):
        a, b = 0, bptr[i]
        ae, be = flen[i], bptr[i + 1]
        while a < ae or b < be:
            if b >= be or (a < ae and fcol[i, a] < bcol[b]):
                c, p, q = fcol[i, a], fval[i, a], np.float32(0.0)
                a += 1
            elif a >= ae or bcol[b] < fcol[i, a]:
                c, p, q = bcol[b], np.float32(0.0), bval[b]
                b += 1
            else:
                c, p, q = fcol[i, a], fval[i, a], bval[b]
                a += 1
                b += 1
            u = np.float32(np.float32(p + q) - np.float32(p * q))
            if u != 0.0:
                cols[pos] = c
                data[pos] = u
                pos += 1
        indptr[i + 1] = pos
    return indptr, cols[:pos], data[:pos]


def umap_connectivities(indices: np.ndarray, distances: np.ndarray) -> sparse.csr_matrix:
    """Symmetric fuzzy-union connectivities of a kNN graph (umap's, with scanpy's arguments).

    Parameters
    ----------
    indices
        ``(n, k)`` neighbour indices, column 0 the cell itself.
    distances
        ``(n, k)`` matching distances, ascending per row.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``n x n`` float32, sorted indices, no explicit zeros: ``w_ij + w_ji - w_ij * w_ji`` of
        :func:`memberships` ``w``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    n = idx.shape[0]
    indptr, cols, data = _fuzzy_union(idx, memberships(idx, distances), n)
    out = sparse.csr_matrix((data, cols, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def transitions_sym(conn: sparse.csr_matrix) -> sparse.csr_matrix:
    """Symmetric transition matrix with Coifman-Lafon density normalisation (scanpy's), float64.

    ``K = D^-1 C D^-1`` with ``D`` the degrees of ``C``, then ``T = Z^-1 K Z^-1`` with ``Z`` the
    square roots of the degrees of ``K``.

    Parameters
    ----------
    conn
        Symmetric connectivities (CSR).

    Returns
    -------
    scipy.sparse.csr_matrix
        float64, same sparsity pattern.
    """
    conn = sparse.csr_matrix(conn)
    n = conn.shape[0]
    rows = np.repeat(np.arange(n), np.diff(conn.indptr))
    cols = conn.indices
    c = conn.data.astype(np.float64)
    q = np.bincount(rows, weights=c, minlength=n)  # = column sums: C is symmetric
    kd = c / (q[rows] * q[cols])
    z = np.sqrt(np.bincount(rows, weights=kd, minlength=n))
    return sparse.csr_matrix((kd / (z[rows] * z[cols]), cols.copy(), conn.indptr.copy()), shape=(n, n))
