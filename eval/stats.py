"""Resampling statistics shared by the per-layer metrics.

Percentile intervals, paired differences on shared resamples, the Mantel permutation test and
the perturbation bootstrap for representational similarity analysis (RSA). Everything here is a
pure function of arrays; randomness comes only from an explicit ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
from scipy import stats as sps

from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "PairedDifference",
    "bootstrap_indices",
    "bootstrap_rsa",
    "calibrated_interval",
    "cosine_similarity_matrix",
    "de_similarity",
    "finite_subset",
    "mantel_test",
    "paired_difference",
    "percentile_ci",
    "rsa_folds",
    "rsa_spearman",
    "subsample_indices",
    "subsample_scale",
    "upper_triangle",
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
        Calibrated interval: ``estimate ± t_{B-1} * scale * sd(resampled differences)``.
    p_value
        Two-sided t p-value of ``estimate / (scale * sd)`` with ``B - 1`` degrees of freedom
        (no ``2 / (B + 1)`` resolution floor; not adjusted for several layers: use
        :func:`sclstore.eval.claims.layer_claims` for that).
    n_resamples
        Number of finite paired resamples used.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_resamples: int


def subsample_scale(fraction: float) -> float:
    """Factor turning the spread of ``fraction``-subsample scores into the full-data sampling error.

    A statistic on ``m = f n`` of ``n`` cells drawn without replacement varies around the
    full-data value with variance ``sigma^2 (1/m - 1/n) = Var(full) (1 - f) / f``; rescaling
    the deviations by ``sqrt(f / (1 - f))`` (2 for ``f = 0.8``) calibrates them.

    Parameters
    ----------
    fraction
        Subsampling fraction ``f`` in (0, 1).

    Returns
    -------
    float
    """
    if not 0.0 < fraction < 1.0:
        msg = f"subsample fraction must be in (0, 1) for calibrated intervals, got {fraction!r}; pass e.g. 0.8"
        raise InvalidInputError(msg)
    return float(np.sqrt(fraction / (1.0 - fraction)))


def calibrated_interval(
    estimate: float,
    resamples: np.ndarray,
    *,
    scale: float = 1.0,
    level: float = 0.95,
    fisher: bool = True,
) -> tuple[float, float]:
    """Interval ``estimate ± t_{B-1} * scale * sd(resamples)``, in Fisher-z space for correlations.

    Parameters
    ----------
    estimate
        Full-data value.
    resamples
        Resampled values (non-finite ignored).
    scale
        Calibration factor (:func:`subsample_scale` for subsamples; 1 for a bootstrap).
    level
        Coverage.
    fisher
        Work on ``atanh`` of the values (correlations; keeps the interval inside (-1, 1)).

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` with fewer than 3 finite resamples or a non-finite estimate.
    """
    if not 0.0 < level < 1.0:
        msg = f"level must be in (0, 1), got {level!r}; pass e.g. level=0.95"
        raise InvalidInputError(msg)
    v = np.asarray(resamples, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size < 3 or not np.isfinite(estimate):
        return (float("nan"), float("nan"))
    if fisher:
        clip = 1 - 1e-9
        v = np.arctanh(np.clip(v, -clip, clip))
        e = float(np.arctanh(np.clip(estimate, -clip, clip)))
    else:
        e = float(estimate)
    half = float(sps.t.ppf(0.5 + level / 2, v.size - 1)) * scale * float(v.std(ddof=1))
    lo, hi = e - half, e + half
    if fisher:
        return (float(np.tanh(lo)), float(np.tanh(hi)))
    return (lo, hi)


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
    scale: float = 1.0,
) -> PairedDifference:
    """Paired difference of two scores over shared resamples (e.g. a layer vs the final layer).

    Parameters
    ----------
    a, b
        Resampled scores of the two representations, index ``i`` computed on the same resample.
    estimate
        Full-data difference to report; defaults to the mean of the resampled differences.
    level
        Coverage of the interval.
    scale
        Calibration factor of the resample spread (:func:`subsample_scale` for subsamples,
        1 for a bootstrap).

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
    n = int(d.size)
    est = float(estimate) if estimate is not None else float(np.mean(d)) if n else float("nan")
    if n < 3 or not np.isfinite(est):
        return PairedDifference(estimate=est, ci_low=float("nan"), ci_high=float("nan"), p_value=float("nan"), n_resamples=n)
    se = scale * float(d.std(ddof=1))
    if se == 0:
        p = 1.0 if est == 0 else 0.0
        return PairedDifference(estimate=est, ci_low=est, ci_high=est, p_value=p, n_resamples=n)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * sps.t.sf(abs(est) / se, n - 1))
    return PairedDifference(estimate=est, ci_low=est - half, ci_high=est + half, p_value=p, n_resamples=n)


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
    m = round(fraction * n)
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
    return _mantel_folds([(a, b)], n_perm=n_perm, seed=seed)


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
    from .rsa_kernels import bootstrap_spearman_pairs

    a, b = _check_pair(a, b)
    k = a.shape[0]
    if n_boot <= 0:
        return np.full(0, np.nan)
    # O(pairs) per resample, no re-ranking: see sclstore.eval.rsa_kernels (equal to ranking the expanded resample)
    ii, jj = np.triu_indices(k, k=1)
    return bootstrap_spearman_pairs(a[ii, jj], b[ii, jj], ii, jj, bootstrap_indices(k, n_boot=n_boot, seed=seed))


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


def de_similarity(lfc: pd.DataFrame | np.ndarray, *, method: str = "pearson") -> np.ndarray:
    """Correlation between DE vectors (rows), pairwise-complete over genes.

    Parameters
    ----------
    lfc
        Perturbations x genes log2 fold changes (``nan`` allowed; never zero-filled).
    method
        ``"pearson"`` (default) or ``"spearman"`` (the paper's code: Spearman between DE profiles).

    Returns
    -------
    numpy.ndarray
        K x K correlation matrix (``nan`` where a vector is constant).
    """
    if method not in ("pearson", "spearman"):
        msg = f"unknown DE similarity {method!r}; pass 'pearson' or 'spearman'"
        raise InvalidInputError(msg)
    A = np.asarray(lfc, dtype=np.float64)
    if np.isfinite(A).all():
        if method == "spearman":
            A = sps.rankdata(A, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return cast("np.ndarray", np.corrcoef(A))  # 2-D input -> K x K matrix
    return pd.DataFrame(A.T).corr(method=method, min_periods=3).to_numpy()


def rsa_folds(
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
) -> tuple[float, np.ndarray, float]:
    """RSA averaged over folds (cross-fitting), with a joint bootstrap and a joint Mantel test.

    Each fold is a pair ``(S_de, S_emb)`` of finite similarity matrices over the same items in
    the same order (e.g. DE from one half of the cells, embedding shifts from the other). The
    score is the mean over folds of the Spearman correlation of the upper triangles; each
    bootstrap replicate resamples the items once and applies that resample to every fold (so
    replicates of different layers with the same seed are paired); each Mantel permutation
    permutes the items of every fold's embedding matrix the same way.

    Parameters
    ----------
    folds
        ``(S_de, S_emb)`` pairs.
    n_boot
        Bootstrap resamples over items (0 disables).
    n_perm
        Mantel permutations (0 disables).
    seed
        Seed of both.

    Returns
    -------
    tuple
        ``(score, boot, p_value)``; ``boot`` has ``n_boot`` values (``nan`` where undefined),
        ``p_value`` is one-sided, ``(1 + #{perm >= obs}) / (n_perm + 1)`` (``nan`` when disabled).
    """
    if not folds:
        msg = "rsa_folds needs at least one (S_de, S_emb) pair"
        raise InvalidInputError(msg)
    pairs = [_check_pair(a, b) for a, b in folds]
    k = pairs[0][0].shape[0]
    if any(a.shape[0] != k for a, _ in pairs):
        msg = "every fold must cover the same items"
        raise InvalidInputError(msg)
    from .rsa_kernels import average_ranks, bootstrap_spearman_pairs, sorted_ties

    # each upper triangle is sorted once: its score, bootstrap and Mantel ranks all come from that order
    # (the same numbers as rsa_spearman, bootstrap_rsa and _rank_matrix, which sort it three times)
    iu = np.triu_indices(k, k=1)
    tris = [(a[iu], b[iu]) for a, b in pairs]
    ties = [(sorted_ties(x), sorted_ties(y)) for x, y in tris]
    finite = [bool(np.isfinite(x).all() and np.isfinite(y).all()) for x, y in tris]
    ranks = [(average_ranks(*tx), average_ranks(*ty)) if f else None for (tx, ty), f in zip(ties, finite, strict=True)]
    score = float(np.mean([_spearman_ranked(x, y, r) if r is not None else rsa_spearman(a, b)
                           for (x, y), r, (a, b) in zip(tris, ranks, pairs, strict=True)]))
    boot = np.full(n_boot, np.nan)
    if n_boot > 0:
        res = bootstrap_indices(k, n_boot=n_boot, seed=seed)  # the resamples of bootstrap_rsa, shared by the folds
        vals = np.array([bootstrap_spearman_pairs(x, y, iu[0], iu[1], res, ties=t) for (x, y), t in zip(tris, ties, strict=True)])
        boot = vals.mean(axis=0)
    p = float("nan")
    if n_perm > 0:
        p = _mantel_folds(pairs, n_perm=n_perm, seed=seed, ranks=ranks)
    return score, boot, p


def _spearman_ranked(x: np.ndarray, y: np.ndarray, ranks: tuple[np.ndarray, np.ndarray]) -> float:
    """:func:`rsa_spearman` of finite upper triangles ``x, y`` given their average ranks: the same number.

    ``scipy.stats.spearmanr(x, y)`` ranks both columns into a ``(2, P)`` buffer, viewed as ``(P, 2)``,
    and returns ``np.corrcoef(view, rowvar=False)[1, 0]``; this makes the same call on the same
    array layout (``tests/eval/test_rsa_blocked.py`` checks equality with ``rsa_spearman``).
    """
    if x.shape[0] < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    buff = np.empty((2, x.shape[0]))
    buff[0], buff[1] = ranks
    return float(np.corrcoef(buff.T, rowvar=False)[1, 0])


def _mantel_folds(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, n_perm: int, seed: int,
                  ranks: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None) -> float:
    """Joint Mantel p-value; ``ranks[f]``: average ranks of fold ``f``'s two upper triangles, if known."""
    k = pairs[0][0].shape[0]
    iu = np.triu_indices(k, k=1)
    xs, rbs, ymeans = [], [], []
    obs = 0.0
    for f, (a, b) in enumerate(pairs):
        if not (np.isfinite(upper_triangle(a)).all() and np.isfinite(upper_triangle(b)).all()):
            msg = "the Mantel test needs finite similarity matrices; drop the items with undefined similarity"
            raise InvalidInputError(msg)
        known = ranks[f] if ranks is not None else None
        if known is None:
            ra, rb = _rank_matrix(a), _rank_matrix(b)
            ra_u, y0 = ra[iu], rb[iu]
        else:  # the values _rank_matrix would give
            ra_u, y0 = known
            rb = np.zeros((k, k))
            rb[iu] = y0
            rb = rb + rb.T
        x = ra_u - ra_u.mean()
        nx, ny = np.sqrt((x**2).sum()), np.sqrt(((y0 - y0.mean()) ** 2).sum())
        if nx == 0 or ny == 0:
            return float("nan")
        obs += float(x @ (y0 - y0.mean()) / (nx * ny))
        xs.append(x / (nx * ny))
        rbs.append(rb)
        ymeans.append(y0.mean())
    from .rsa_kernels import permutation_stats

    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, k)), axis=1)
    stat = np.zeros(n_perm)
    # ranks (integers or halves) are exact in float32 below 2**23 pairs: half the memory traffic, the same sums
    exact32 = len(iu[0]) < 2**23
    perms = perms.astype(np.int32)
    for x, rb, ym in zip(xs, rbs, ymeans, strict=False):  # O(pairs) gathers per permutation, ranks computed once
        stat += permutation_stats(x, rb.astype(np.float32) if exact32 else rb, perms, float(ym))
    count = int((stat >= obs - 1e-12 * len(pairs)).sum())
    return (1 + count) / (n_perm + 1)


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
                       int((~keep).sum()), [p for p, k in zip(perts, keep, strict=False) if not k][:5])
    return S_de[np.ix_(keep, keep)], S_emb[np.ix_(keep, keep)], [p for p, k in zip(perts, keep, strict=False) if k]
