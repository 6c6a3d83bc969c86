"""Label-free geometry of one layer (pure functions: arrays in, numbers out; no store access).

* :func:`anisotropy`: mean cosine similarity of random pairs of distinct cells (≈0 for an
  isotropic cloud around the origin, →1 when every vector points the same way).
* :func:`top_coordinate_share`: the share of the total variance held by the single coordinate
  with the largest variance (a "rogue dimension" detector; 1/d for an isotropic cloud).
* :func:`participation_ratio`: ``(Σλ)² / Σλ²`` of the covariance spectrum — the effective number
  of dimensions the variance is spread over (``d`` for an isotropic cloud, 1 for a line).
* :func:`twonn_dimension`: the TwoNN intrinsic dimension (Facco et al. 2017): with ``μ = r₂/r₁``
  the ratio of each point's second to first neighbour distance, ``-log(1 - F(μ)) = d·log μ``;
  ``d`` is the slope of that line through the origin, fitted after discarding the largest 10%
  of ``μ`` (as in the paper).
* :func:`linear_cka` and :func:`cka_matrix`: linear centred kernel alignment
  ``‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on column-centred matrices (Kornblith et al. 2019); invariant
  to orthogonal transforms and isotropic scaling of either side, 1 for identical representations.

CKA describes redundancy between layers, not quality; compute it on cells (``n ≫ d``), where its
null value is small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sclstore.store.errors import InvalidInputError

__all__ = [
    "anisotropy",
    "cka_matrix",
    "covariance_spectrum",
    "linear_cka",
    "participation_ratio",
    "participation_ratio_from_spectrum",
    "subsample_rows",
    "top_coordinate_share",
    "twonn_dimension",
]


def _matrix(X: np.ndarray, *, min_rows: int = 2) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < min_rows or X.shape[1] < 1:
        raise InvalidInputError(f"expected a cells x dim matrix with at least {min_rows} rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise InvalidInputError("the embedding has NaN or infinite values; drop or repair those cells first")
    return X


def subsample_rows(n: int, max_rows: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded subsample of at most ``max_rows`` of ``n`` rows (all when fewer)."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def anisotropy(X: np.ndarray, *, n_pairs: int = 20_000, seed: int = 0) -> float:
    """Mean cosine similarity of ``n_pairs`` random pairs of distinct cells.

    Parameters
    ----------
    X
        cells x dim.
    n_pairs
        Random pairs (with replacement over pairs; never a cell with itself).
    seed
        Seed of the pairs.

    Returns
    -------
    float
        ``nan`` when every sampled pair involves a zero vector.
    """
    X = _matrix(X)
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    j = (i + rng.integers(1, n, size=n_pairs)) % n  # j != i
    norms = np.linalg.norm(X, axis=1)
    ok = (norms[i] > 0) & (norms[j] > 0)
    if not ok.any():
        return float("nan")
    cos = np.einsum("ij,ij->i", X[i[ok]], X[j[ok]]) / (norms[i[ok]] * norms[j[ok]])
    return float(cos.mean())


def top_coordinate_share(X: np.ndarray) -> float:
    """Largest per-coordinate variance divided by the total variance (``nan`` for a constant matrix)."""
    v = _matrix(X).var(axis=0)
    total = float(v.sum())
    return float(v.max() / total) if total > 0 else float("nan")


def covariance_spectrum(X: np.ndarray) -> np.ndarray:
    """Eigenvalues of the sample covariance, descending (via the d x d covariance or the n x n Gram)."""
    X = _matrix(X)
    Xc = X - X.mean(axis=0)
    n, d = Xc.shape
    G = Xc.T @ Xc if d <= n else Xc @ Xc.T  # same non-zero eigenvalues
    lam = np.linalg.eigvalsh(G)[::-1] / (n - 1)
    return np.clip(lam, 0.0, None)


def participation_ratio_from_spectrum(eigenvalues: Sequence[float] | np.ndarray) -> float:
    """``(Σλ)² / Σλ²`` of non-negative eigenvalues (``nan`` when all are zero)."""
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if lam.size == 0 or (lam < -1e-12 * max(1.0, float(np.abs(lam).max()))).any():
        raise InvalidInputError("eigenvalues must be a non-empty list of non-negative numbers")
    lam = np.clip(lam, 0.0, None)
    s2 = float((lam**2).sum())
    return float(lam.sum() ** 2 / s2) if s2 > 0 else float("nan")


def participation_ratio(X: np.ndarray) -> float:
    """Participation ratio of the covariance spectrum of ``X`` (between 1 and ``min(n - 1, d)``)."""
    return participation_ratio_from_spectrum(covariance_spectrum(X))


def twonn_dimension(X: np.ndarray, *, discard_fraction: float = 0.1, max_cells: int | None = 5_000, seed: int = 0) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), on a seeded subsample of at most ``max_cells``.

    Parameters
    ----------
    X
        cells x dim.
    discard_fraction
        Fraction of the largest ratios ``μ`` left out of the fit (the paper uses 0.1).
    max_cells
        Cells used (exact neighbour search on them; ``None``: all).
    seed
        Seed of the subsample.

    Returns
    -------
    float
        The slope ``d`` of ``-log(1 - F_emp(μ))`` vs ``log μ`` through the origin.

    Raises
    ------
    InvalidInputError
        Fewer than 10 distinct cells.
    """
    from sklearn.neighbors import NearestNeighbors

    if not 0 <= discard_fraction < 1:
        raise InvalidInputError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    X = _matrix(X)
    X = np.unique(X[subsample_rows(X.shape[0], max_cells, seed)], axis=0)  # duplicates give r1 = 0
    if X.shape[0] < 10:
        raise InvalidInputError(f"TwoNN needs at least 10 distinct cells, got {X.shape[0]}")
    dist, _ = NearestNeighbors(n_neighbors=3).fit(X).kneighbors(X)
    r1, r2 = dist[:, 1], dist[:, 2]
    mu = np.sort(r2[r1 > 0] / r1[r1 > 0])
    n = mu.size
    keep = int(np.floor(n * (1 - discard_fraction)))
    F = np.arange(1, n + 1) / n  # empirical CDF
    x = np.log(mu[:keep])
    y = -np.log(1 - F[:keep])
    den = float(x @ x)
    return float(x @ y / den) if den > 0 else float("nan")


def _centre(X: np.ndarray) -> np.ndarray:
    X = _matrix(X)
    return X - X.mean(axis=0)


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA between two representations of the same cells (``nan`` if either is constant)."""
    Xc, Yc = _centre(X), _centre(Y)
    if Xc.shape[0] != Yc.shape[0]:
        raise InvalidInputError(f"CKA needs the same cells on both sides: {Xc.shape[0]} vs {Yc.shape[0]} rows")
    xy = np.linalg.norm(Xc.T @ Yc) ** 2
    xx, yy = np.linalg.norm(Xc.T @ Xc), np.linalg.norm(Yc.T @ Yc)
    return float(xy / (xx * yy)) if xx > 0 and yy > 0 else float("nan")


def cka_matrix(Xs: Sequence[np.ndarray]) -> np.ndarray:
    """Symmetric matrix of linear CKA between every pair of representations (diagonal 1; ``nan`` for a constant one)."""
    cs = [_centre(X) for X in Xs]
    norms = [float(np.linalg.norm(c.T @ c)) for c in cs]
    k = len(cs)
    M = np.diag([1.0 if nm > 0 else float("nan") for nm in norms])  # a constant layer has no CKA, even with itself
    for a in range(k):
        for b in range(a + 1, k):
            den = norms[a] * norms[b]
            M[a, b] = M[b, a] = float(np.linalg.norm(cs[a].T @ cs[b]) ** 2 / den) if den > 0 else float("nan")
    return M
