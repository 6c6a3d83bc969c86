"""Label-free diagnostics: hand-computed cases, known spectra, invariances and simulated truth."""

from __future__ import annotations

import numpy as np
import pytest
from sclstore.eval.diagnostics import (
    anisotropy,
    cka_matrix,
    covariance_spectrum,
    linear_cka,
    participation_ratio,
    participation_ratio_from_spectrum,
    top_coordinate_share,
    twonn_dimension,
)
from sclstore.store.errors import InvalidInputError


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_anisotropy_hand_cases(rng: np.random.Generator) -> None:
    # two cells: every pair is (0, 1) or (1, 0): cos = 1/sqrt(2)
    assert anisotropy(np.array([[1.0, 0.0], [1.0, 1.0]]), n_pairs=50) == pytest.approx(1 / np.sqrt(2))
    # positive multiples of one direction: 1
    assert anisotropy(np.outer(rng.uniform(0.5, 3, 40), [1.0, -2.0, 0.5])) == pytest.approx(1.0)
    # an isotropic cloud around the origin: ~0; shifted far along one axis: ~1
    Z = rng.normal(size=(4000, 32))
    assert abs(anisotropy(Z, seed=1)) < 0.02
    assert anisotropy(Z + 50 * np.eye(32)[0]) > 0.95


def test_top_coordinate_share_and_participation_ratio(rng: np.random.Generator) -> None:
    X = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])  # variances 1, 4, 9
    assert top_coordinate_share(X) == pytest.approx(9 / 14)
    assert participation_ratio_from_spectrum([1, 1, 1, 1]) == pytest.approx(4.0)
    assert participation_ratio_from_spectrum([5, 0, 0]) == pytest.approx(1.0)
    assert participation_ratio_from_spectrum([3, 1]) == pytest.approx(16 / 10)
    # a matrix with an exactly known covariance spectrum, rotated: PR = (sum l)^2 / sum l^2
    n, lam = 500, np.array([8.0, 4.0, 2.0, 1.0, 1.0, 0.5])
    Z = rng.normal(size=(n, lam.size))
    Z -= Z.mean(axis=0)
    q, _ = np.linalg.qr(Z)  # orthonormal columns, zero mean
    X = q * np.sqrt((n - 1) * lam) @ _orthogonal(lam.size, rng)
    np.testing.assert_allclose(covariance_spectrum(X), lam, rtol=1e-9)
    assert participation_ratio(X) == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    with pytest.raises(InvalidInputError, match="non-negative"):
        participation_ratio_from_spectrum([1, -3])


@pytest.mark.parametrize("d", [2, 3, 5])
def test_twonn_recovers_dimension_of_a_cube(d: int, rng: np.random.Generator) -> None:
    U = rng.uniform(size=(3000, d))
    assert twonn_dimension(U) == pytest.approx(d, rel=0.1)
    # embedded in 40 ambient dimensions and rotated: the intrinsic dimension is unchanged
    E = np.hstack([U, np.zeros((3000, 40 - d))]) @ _orthogonal(40, rng)
    assert twonn_dimension(E) == pytest.approx(d, rel=0.1)


def test_linear_cka_invariances_and_hand_case(rng: np.random.Generator) -> None:
    X = rng.normal(size=(300, 12))
    Y = X[:, :6] @ rng.normal(size=(6, 9)) + rng.normal(size=(300, 9))
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, X @ _orthogonal(12, rng)) == pytest.approx(1.0)  # orthogonal transform
    assert linear_cka(X, 7.5 * X) == pytest.approx(1.0)  # isotropic scaling
    base = linear_cka(X, Y)
    assert linear_cka(3 * X @ _orthogonal(12, rng), 0.2 * Y @ _orthogonal(9, rng) + 4.0) == pytest.approx(base)
    assert 0 < base < 1
    # one column each: CKA = squared Pearson correlation
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + y
    assert linear_cka(x[:, None], y[:, None]) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    # not invariant to a non-isotropic scaling (sanity: the metric is not trivially 1)
    assert linear_cka(X, X * np.r_[10.0, np.ones(11)]) < 0.9
    M = cka_matrix([X, Y, X @ _orthogonal(12, rng)])
    np.testing.assert_allclose(M, M.T)
    np.testing.assert_allclose(np.diag(M), 1.0)
    assert M[0, 1] == pytest.approx(base) and M[0, 2] == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="same cells"):
        linear_cka(X, Y[:10])
