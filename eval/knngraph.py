"""scanpy's kNN connectivities and diffusion operator built straight from neighbour lists.

The trajectory runner builds one graph per subsample replicate (21 per layer). Through
``sc.pp.neighbors(transformer=...)`` + ``sc.tl.diffmap`` each graph passes through a distance
matrix, COO/CSC/CSR conversions and diagonal-matrix products; this module computes the same
quantities directly:

- :func:`umap_connectivities`: umap's fuzzy simplicial set (umap's own ``smooth_knn_dist`` and
  ``compute_membership_strengths``, then the fuzzy union ``P + P^T - P * P^T`` in float32, as
  ``umap.umap_.fuzzy_simplicial_set`` with scanpy's arguments). ``tests/eval/test_knngraph.py``
  checks it against scanpy's connectivities.
- :func:`transitions_sym`: the Coifman-Lafon density-normalised symmetric transition matrix of
  ``scanpy.neighbors.Neighbors.compute_transitions``, accumulated in float64 (scanpy sums the
  float32 connectivities in float32; entries agree to float32 rounding).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import sparse

__all__ = ["transitions_sym", "umap_connectivities"]


@numba.njit(cache=True)
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
    """umap's fuzzy-union connectivities of a kNN graph, as ``sc.pp.neighbors`` computes them.

    Parameters
    ----------
    indices, distances
        ``(m, k - 1)`` neighbours of each cell, the cell itself excluded, nearest first (as
        :class:`~sclstore.eval.knn.PrecomputedKnn` takes them); the graph uses ``k`` per row with the cell itself.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(m, m)`` float32, symmetric, sorted indices, no explicit zeros.
    """
    from umap.umap_ import compute_membership_strengths, smooth_knn_dist

    m, kk = indices.shape
    knn_i = np.hstack([np.arange(m, dtype=np.int64)[:, None], np.asarray(indices, dtype=np.int64)])
    knn_d = np.hstack([np.zeros((m, 1), dtype=np.float32), np.asarray(distances, dtype=np.float32)])
    sigmas, rhos = smooth_knn_dist(knn_d, float(kk + 1), local_connectivity=1.0)
    _rows, _cols, vals, _ = compute_membership_strengths(knn_i, knn_d, sigmas, rhos, False)
    indptr, cols, data = _fuzzy_union(knn_i, vals.reshape(m, kk + 1), m)
    out = sparse.csr_matrix((data, cols, indptr), shape=(m, m))
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
