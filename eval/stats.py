"""Resampling statistics shared by the per-layer metrics.

Percentile intervals, paired differences on shared resamples, the Mantel permutation test and
the perturbation bootstrap for representational similarity analysis (RSA). Everything here is a
pure function of arrays; randomness comes only from an explicit ``seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "PairedDifference",
    "cosine_similarity_matrix",
    "de_similarity",
    "finite_subset",
    "percentile_ci",
    "paired_difference",
    "subsample_indices",
    "bootstrap_indices",
    "upper_triangle",
    "rsa_spearman",
    "mantel_test",
    "bootstrap_rsa",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """Difference ``a - b`` between two scores computed on the same resamples.

    Attributes
    ----------
    estimate
        Difference of the full-data scores (or the mean resampled difference when none given).
    ci_low, ci_high
        Percentile interval of the resampled differences.
    p_value
        Two-sided sign p-value: twice the smaller fraction of resampled differences on one side
        of zero (with the usual +1 correction), capped at 1. Its resolution is ``2 / (B + 1)``
        for ``B`` resamples, so use B >= 40 when a p-value below 0.05 must be reachable.
    n_resamples
        Number of finite paired resamples used.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_resamples: int


def percentile_ci(values: np.ndarray, *, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of resampled values, ignoring non-finite entries.

    Parameters
    ----------
    values
        1-d array of resampled statistics.
    level
        Coverage of the interval, in (0, 1).

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` when no value is finite.

    Raises
    ------
    InvalidInputError
        If ``level`` is not in (0, 1).
    """
    if not 0.0 < level < 1.0:
        msg = f"level must be in (0, 1), got {level!r}; pass e.g. level=0.95"
        raise InvalidInputError(msg)
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    *,
    estimate: float | None = None,
    level: float = 0.95,
) -> PairedDifference:
    """Paired difference of two scores over shared resamples (e.g. a layer vs the final layer).

    Parameters
    ----------
    a, b
        Resampled scores of the two representations, index ``i`` computed on the same resample.
    estimate
        Full-data difference to report; defaults to the mean of the resampled differences.
    level
        Coverage of the percentile interval.

    Returns
    -------
    PairedDifference

    Raises
    ------
    InvalidInputError
        If the arrays differ in length.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        msg = f"paired scores must come from the same resamples; got {a.size} and {b.size} values"
        raise InvalidInputError(msg)
    d = a - b
    d = d[np.isfinite(d)]
    lo, hi = percentile_ci(d, level=level)
    n = int(d.size)
    if n == 0:
        p = float("nan")
    else:
        p = min(1.0, 2.0 * (1 + min(int((d <= 0).sum()), int((d >= 0).sum()))) / (n + 1))
    if estimate is not None:
        est = float(estimate)
    else:
        est = float(np.mean(d)) if n else float("nan")
    return PairedDifference(estimate=est, ci_low=lo, ci_high=hi, p_value=p, n_resamples=n)


def subsample_indices(
    n: int,
    *,
    n_subsamples: int,
    fraction: float = 0.8,
    seed: int = 0,
    always_include: int | None = None,
) -> list[np.ndarray]:
    """Sorted index sets of ``fraction * n`` items drawn without replacement.

    The draws depend only on ``(n, n_subsamples, fraction, seed, always_include)``, so two
    calls with the same arguments give the same subsamples (this is what makes layer scores
    paired).

    Parameters
    ----------
    n
        Number of items (cells).
    n_subsamples
        Number of subsamples.
    fraction
        Fraction kept in each subsample, in (0, 1].
    seed
        Seed of the generator.
    always_include
        An index forced into every subsample (an explicit root cell).

    Returns
    -------
    list of numpy.ndarray
        ``n_subsamples`` sorted int64 arrays.

    Raises
    ------
    InvalidInputError
        If ``fraction`` is out of range or a subsample would hold fewer than 3 items.
    """
    if not 0.0 < fraction <= 1.0:
        msg = f"subsample fraction must be in (0, 1], got {fraction!r}; pass e.g. 0.8"
        raise InvalidInputError(msg)
    m = int(round(fraction * n))
    if m < 3:
        msg = f"a subsample of {fraction:.0%} of {n} cells has fewer than 3 cells; use more cells"
        raise InvalidInputError(msg)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for _ in range(n_subsamples):
        if always_include is None:
            idx = rng.choice(n, size=m, replace=False)
        else:
            rest = np.delete(np.arange(n), always_include)
            idx = np.append(rng.choice(rest, size=m - 1, replace=False), always_include)
        out.append(np.sort(idx).astype(np.int64))
    return out


def bootstrap_indices(n: int, *, n_boot: int, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples (with replacement) of ``n`` items, shape ``(n_boot, n)``.

    Parameters
    ----------
    n
        Number of items (perturbations).
    n_boot
        Number of resamples.
    seed
        Seed of the generator; equal arguments give equal resamples.

    Returns
    -------
    numpy.ndarray
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def upper_triangle(m: np.ndarray) -> np.ndarray:
    """Entries above the diagonal of a square matrix, row by row.

    Parameters
    ----------
    m
        Square matrix.

    Returns
    -------
    numpy.ndarray
        1-d array of length ``k * (k - 1) / 2``.
    """
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        msg = f"expected a square matrix, got shape {m.shape}"
        raise InvalidInputError(msg)
    iu = np.triu_indices(m.shape[0], k=1)
    return m[iu]


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        msg = f"similarity matrices must be square and of equal shape, got {a.shape} and {b.shape}"
        raise InvalidInputError(msg)
    if a.shape[0] < 3:
        msg = f"RSA needs at least 3 items (3 pairs), got {a.shape[0]}"
        raise EvaluationError(msg)
    return a, b


def rsa_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation between the upper triangles of two similarity matrices.

    Pairs where either matrix is not finite are dropped.

    Parameters
    ----------
    a, b
        Square similarity matrices over the same items in the same order.

    Returns
    -------
    float
        Spearman's rho; ``nan`` when fewer than 3 finite pairs remain or one side is constant.
    """
    a, b = _check_pair(a, b)
    x, y = upper_triangle(a), upper_triangle(b)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(sps.spearmanr(x[ok], y[ok]).statistic)


def _rank_matrix(m: np.ndarray) -> np.ndarray:
    """Symmetric matrix whose upper triangle holds the average ranks of ``m``'s upper triangle."""
    k = m.shape[0]
    iu = np.triu_indices(k, k=1)
    r = np.zeros((k, k))
    r[iu] = sps.rankdata(m[iu])
    return r + r.T


def mantel_test(a: np.ndarray, b: np.ndarray, *, n_perm: int = 999, seed: int = 0) -> float:
    """One-sided Mantel permutation p-value for the Spearman RSA of two similarity matrices.

    The item labels of ``b`` are permuted jointly on rows and columns; the p-value is
    ``(1 + #{perm: rho_perm >= rho_obs}) / (n_perm + 1)``, so its minimum is ``1/(n_perm+1)``.

    Parameters
    ----------
    a, b
        Square similarity matrices over the same items (finite).
    n_perm
        Number of permutations.
    seed
        Seed of the permutation generator.

    Returns
    -------
    float
        The p-value; ``nan`` when the observed correlation is undefined.

    Raises
    ------
    InvalidInputError
        If a matrix holds non-finite entries or ``n_perm < 1``.
    """
    a, b = _check_pair(a, b)
    if n_perm < 1:
        msg = f"n_perm must be at least 1, got {n_perm}"
        raise InvalidInputError(msg)
    if not (np.isfinite(upper_triangle(a)).all() and np.isfinite(upper_triangle(b)).all()):
        msg = "the Mantel test needs finite similarity matrices; drop the items with undefined similarity"
        raise InvalidInputError(msg)
    k = a.shape[0]
    iu = np.triu_indices(k, k=1)
    ra, rb = _rank_matrix(a), _rank_matrix(b)
    x = ra[iu] - ra[iu].mean()
    y0 = rb[iu]
    nx = np.sqrt((x**2).sum())
    ny = np.sqrt(((y0 - y0.mean()) ** 2).sum())
    if nx == 0 or ny == 0:
        return float("nan")
    # Ranks are invariant to a joint permutation (same multiset of values), so the permuted
    # Spearman is the Pearson correlation of x with the permuted rank matrix.
    obs = float(x @ (y0 - y0.mean()) / (nx * ny))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, k)), axis=1)
    ymean = y0.mean()
    count = 0
    for p in perms:
        yp = rb[p[:, None], p[None, :]][iu]
        if float(x @ (yp - ymean)) / (nx * ny) >= obs - 1e-12:
            count += 1
    return (1 + count) / (n_perm + 1)


def bootstrap_rsa(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """RSA on bootstrap resamples of the items (perturbations), not of the pairs.

    Each resample draws ``k`` items with replacement; pairs of two copies of the same item are
    dropped. The resamples depend only on ``(k, n_boot, seed)``, so two layers scored with the
    same seed share them and their difference is paired.

    Parameters
    ----------
    a, b
        Square similarity matrices over the same items.
    n_boot
        Number of resamples.
    seed
        Seed of the resampling generator.

    Returns
    -------
    numpy.ndarray
        ``n_boot`` resampled Spearman correlations (``nan`` where undefined).
    """
    a, b = _check_pair(a, b)
    k = a.shape[0]
    out = np.full(n_boot, np.nan)
    ii, jj = np.triu_indices(k, k=1)
    for i, idx in enumerate(bootstrap_indices(k, n_boot=n_boot, seed=seed)):
        pi, pj = idx[ii], idx[jj]
        keep = pi != pj
        x, y = a[pi[keep], pj[keep]], b[pi[keep], pj[keep]]
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = _spearman_fast(x, y)
    return out


def _spearman_fast(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))


def cosine_similarity_matrix(V: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows; rows of zero norm give ``nan``.

    Parameters
    ----------
    V
        K x dim.

    Returns
    -------
    numpy.ndarray
        K x K.
    """
    V = np.asarray(V, dtype=np.float64)
    nrm = np.linalg.norm(V, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        U = V / nrm[:, None]
    U[nrm == 0] = np.nan
    return U @ U.T


def de_similarity(lfc: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Pearson correlation between DE vectors (rows), pairwise-complete over genes.

    Parameters
    ----------
    lfc
        Perturbations x genes log2 fold changes (``nan`` allowed; never zero-filled).

    Returns
    -------
    numpy.ndarray
        K x K correlation matrix (``nan`` where a vector is constant).
    """
    A = np.asarray(lfc, dtype=np.float64)
    if np.isfinite(A).all():
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.corrcoef(A)
    return pd.DataFrame(A.T).corr(method="pearson", min_periods=3).to_numpy()


def finite_subset(S_de: np.ndarray, S_emb: np.ndarray, perts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Drop items (greedily, worst first) until both similarity matrices are finite off the diagonal.

    Parameters
    ----------
    S_de, S_emb
        Square similarity matrices over ``perts``.
    perts
        Item names, in matrix order.

    Returns
    -------
    tuple
        The reduced matrices and the kept names.
    """
    keep = np.ones(len(perts), dtype=bool)
    while True:
        bad = ~(np.isfinite(S_de) & np.isfinite(S_emb))
        np.fill_diagonal(bad, False)
        bad[~keep, :] = False
        bad[:, ~keep] = False
        if not bad.any():
            break
        keep[int(np.argmax(bad.sum(axis=1)))] = False
    if not keep.all():
        logger.warning("dropped %d perturbations with undefined similarity (zero shift or constant DE): %s",
                       int((~keep).sum()), [p for p, k in zip(perts, keep) if not k][:5])
    return S_de[np.ix_(keep, keep)], S_emb[np.ix_(keep, keep)], [p for p, k in zip(perts, keep) if k]
