"""A symmetric sparse matrix stored as its upper triangle, as the diffusion map's eigensolver operator.

ARPACK spends most of a diffusion map's time in products with the transition matrix, and a CSR
product is bound by reading the matrix: 12 bytes per stored value (a float64 and an int32
column). The matrix is exactly symmetric (:func:`~sclstore.eval.connectivity.transitions_sym`
computes ``T_ij`` and ``T_ji`` by the same commutative products), so its upper triangle holds it
all: one pass over each stored value adds ``T_ij x_j`` to ``y_i`` and ``T_ij x_i`` to ``y_j``.
Half the bytes are read; the vectors (0.8 MB at 100,000 cells) stay in the core's cache. The sums
run in another order than scipy's CSR product, so products agree to rounding, not bit for bit
(``tests/eval/test_symmetric.py``).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import sparse
from scipy.sparse.linalg import LinearOperator

__all__ = ["UpperSymmetric"]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _symv(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover - numba
    """``y = (U + U^T - diag U) x`` for ``U`` the upper triangle (with the diagonal) in CSR.

    Unsigned ``indptr``/``indices``: numba checks every signed index for a negative value.
    """
    n = x.shape[0]
    for r in range(n):
        y[r] = 0.0
    for r in range(n):
        xr = x[r]
        acc = 0.0
        for p in range(indptr[r], indptr[r + 1]):
            c = indices[p]
            a = data[p]
            acc += a * x[c]
            if c != r:
                y[c] += a * xr
        y[r] += acc


class UpperSymmetric(LinearOperator):  # type: ignore[misc]
    """``T @ x`` for a symmetric CSR ``T``, reading only its upper triangle.

    Parameters
    ----------
    matrix
        Square, symmetric (not checked: the caller's construction guarantees it), float64 CSR.
    """

    def __init__(self, matrix: sparse.csr_matrix) -> None:
        m = sparse.csr_matrix(matrix)
        n = m.shape[0]
        if m.shape != (n, n) or n >= 2**32:
            raise ValueError(f"UpperSymmetric needs a square matrix with fewer than 2^32 rows, not {m.shape}")
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(m.indptr))
        keep = m.indices >= rows
        self._indptr = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(np.bincount(rows[keep], minlength=n), out=self._indptr[1:])
        self._indices = m.indices[keep].astype(np.uint32)
        self._data = np.ascontiguousarray(m.data[keep], dtype=np.float64)
        super().__init__(dtype=np.dtype(np.float64), shape=(n, n))

    @property
    def stored(self) -> int:
        """Values stored (the upper triangle with the diagonal)."""
        return int(self._data.shape[0])

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1))
        y = np.empty_like(v)
        _symv(self._indptr, self._indices, self._data, v, y)
        return y

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)
