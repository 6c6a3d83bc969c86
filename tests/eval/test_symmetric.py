"""The upper-triangle operator equals the full CSR product (to rounding) and gives the same eigenpairs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.sparse.linalg import eigsh

from sclstore.eval.connectivity import transitions_sym, umap_connectivities
from sclstore.eval.dpt import _with_self
from sclstore.eval.knn import neighbour_lists
from sclstore.eval.symmetric import UpperSymmetric


def _transitions(n: int, seed: int) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(size=(n // 2, 6)), rng.normal(loc=4.0, size=(n - n // 2, 6))]).astype(np.float32)
    lists = neighbour_lists(X, 14, method="sklearn")
    return transitions_sym(umap_connectivities(*_with_self(lists.indices, lists.distances)))


@pytest.mark.parametrize("seed", [0, 1])
def test_products_equal_the_full_matrix_to_rounding(seed: int) -> None:
    T = _transitions(1500, seed)
    assert (T != T.T).nnz == 0  # exactly symmetric, as the operator assumes
    op = UpperSymmetric(T)
    assert op.stored == (T.nnz + T.diagonal().astype(bool).sum()) // 2
    x = np.random.default_rng(seed).standard_normal(1500)
    dense = T.toarray()
    want = dense @ x  # an independent product (BLAS, another order)
    np.testing.assert_allclose(op @ x, want, rtol=0, atol=1e-14 * np.abs(want).max())
    np.testing.assert_allclose(op.rmatvec(x), want, rtol=0, atol=1e-14 * np.abs(want).max())
    np.testing.assert_allclose(op.matmat(np.c_[x, 2 * x]), np.c_[want, 2 * want], rtol=0, atol=1e-13)


def test_diagonal_values_count_once() -> None:
    rng = np.random.default_rng(3)
    A = sparse.random(300, 300, density=0.05, random_state=4, format="csr")
    S = (A + A.T + sparse.diags(rng.uniform(1, 2, 300))).tocsr()  # a stored diagonal
    x = rng.standard_normal(300)
    np.testing.assert_allclose(UpperSymmetric(S) @ x, S.toarray() @ x, rtol=0, atol=1e-12)


def test_eigenpairs_equal_the_csr_solvers() -> None:
    T = _transitions(2000, 5)
    v0 = np.random.default_rng(0).standard_normal(2000)
    w_csr, V_csr = eigsh(T, k=10, which="LM", ncv=36, v0=v0, tol=1e-8)
    w_sym, V_sym = eigsh(UpperSymmetric(T), k=10, which="LM", ncv=36, v0=v0, tol=1e-8)
    np.testing.assert_allclose(w_sym, w_csr, rtol=0, atol=1e-10)
    # two clusters: some eigenvalues come in equal pairs, whose vectors are defined up to a rotation;
    # the spanned space is not (all principal angles ~0)
    assert np.linalg.svd(V_sym.T @ V_csr, compute_uv=False).min() > 1 - 1e-8


def test_a_non_square_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        UpperSymmetric(sparse.csr_matrix((3, 4)))
