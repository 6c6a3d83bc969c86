"""What a per-layer evaluation may claim: best-layer set, win frequencies, a multiplicity-aware gain.

One pure function, :func:`layer_claims`, shared by every task. It takes the layers' point
estimates and their *paired* resampled scores (row ``l`` = layer ``l``, column ``b`` = resample
``b``; every layer scored on the same resamples) and returns a :class:`Claim`:

* simultaneous intervals for ``score_l - score_final`` over all layers (a max-statistic over the
  layers, so choosing the best of ``L`` layers after the fact keeps the family-wise level);
* a headline gain only when the best layer's simultaneous interval vs the final layer excludes 0,
  otherwise "no layer distinguishable from the final one";
* the set of layers statistically indistinguishable from the best (simultaneous intervals of
  ``score_best - score_l`` that include 0);
* how often each layer wins (is the highest) across calibrated resamples.

Calibration: resampled scores are turned into draws of the full-data estimate's sampling error
by ``scale * (r_b - mean_b r)``. Use ``scale = sqrt(f / (1 - f))`` for subsamples of a fraction
``f`` drawn without replacement (their spread is ``sqrt((1 - f) / f)`` times the full-data
error; :func:`~sclstore.eval.stats.subsample_scale`) and ``scale = 1`` for a bootstrap.
Standard errors come from those draws; the critical value is the ``level`` quantile of
``max_l |T_l|`` for a multivariate t with ``B - 1`` degrees of freedom and the resamples'
correlation between layers (simulated with ``n_draws`` seeded draws), so it reduces to the
t quantile for a single layer and the p-values have no ``2 / (B + 1)`` floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from sclstore.store.errors import InvalidInputError

__all__ = ["Claim", "layer_claims", "simultaneous_critical_value"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Claim:
    """What the evidence supports about the layers of one (pool, condition, metric) group.

    Attributes
    ----------
    layers
        Layers considered (finite estimates), in input order.
    best_layer, best_score
        The layer with the highest point estimate.
    final_layer, final_score
        The reference layer (the deepest one).
    gain, gain_ci_low, gain_ci_high
        ``best - final`` and its simultaneous (max-statistic) interval over all layers.
    claimed
        ``True`` only when the best layer is not the final one and ``gain_ci_low > 0``.
    indistinguishable
        Layers whose difference from the best is not significant (the best included).
    win_frequency
        ``{layer: fraction of calibrated resamples in which it scores highest}``.
    diff, diff_ci_low, diff_ci_high, diff_p, diff_p_adj
        Per layer: difference vs final, simultaneous interval, unadjusted two-sided t p-value
        and max-statistic adjusted p-value (``nan`` for the final layer).
    flagged
        Layers whose simultaneous interval vs the final layer excludes 0.
    critical_value
        The simultaneous critical value used for the differences vs final.
    level
        Family-wise coverage.
    n_resamples
        Paired resamples used.
    headline
        One sentence stating the claim (or that nothing can be claimed).
    """

    layers: tuple[int, ...]
    best_layer: int
    best_score: float
    final_layer: int
    final_score: float
    gain: float
    gain_ci_low: float
    gain_ci_high: float
    claimed: bool
    indistinguishable: tuple[int, ...]
    win_frequency: dict[int, float] = field(repr=False)
    diff: dict[int, float] = field(repr=False)
    diff_ci_low: dict[int, float] = field(repr=False)
    diff_ci_high: dict[int, float] = field(repr=False)
    diff_p: dict[int, float] = field(repr=False)
    diff_p_adj: dict[int, float] = field(repr=False)
    flagged: tuple[int, ...]
    critical_value: float
    level: float
    n_resamples: int
    headline: str


def simultaneous_critical_value(
    deviations: np.ndarray,
    *,
    level: float = 0.95,
    n_draws: int = 20000,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Critical value of ``max_l |T_l|`` for the correlation structure of resampled deviations.

    Parameters
    ----------
    deviations
        ``(m, B)`` centred resampled deviations of ``m`` statistics (rows with zero spread are
        not allowed; drop them first).
    level
        Family-wise coverage.
    n_draws
        Simulation draws of the multivariate t.
    seed
        Seed of the draws.

    Returns
    -------
    tuple
        The critical value and the simulated maxima (to turn statistics into adjusted p-values).
    """
    B = deviations.shape[1]
    if B < 3:
        msg = f"simultaneous intervals need at least 3 paired resamples, got {B}; increase --bootstrap"
        raise InvalidInputError(msg)
    sd = deviations.std(axis=1, ddof=1)
    Z = deviations / sd[:, None]
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_draws, B))
    W = g @ Z.T / math.sqrt(B - 1)  # multivariate normal with the sample correlation of the rows
    W /= np.sqrt(rng.chisquare(B - 1, size=n_draws) / (B - 1))[:, None]  # -> multivariate t, df B-1
    maxima = np.abs(W).max(axis=1)
    return float(np.quantile(maxima, level)), np.sort(maxima)


def _adjusted_p(t_abs: float, maxima: np.ndarray) -> float:
    above = maxima.size - np.searchsorted(maxima, t_abs, side="left")
    return float((above + 1) / (maxima.size + 1))


def layer_claims(
    estimates: Sequence[float] | np.ndarray,
    resamples: np.ndarray,
    layers: Sequence[int],
    *,
    final_layer: int | None = None,
    scale: float = 1.0,
    level: float = 0.95,
    seed: int = 0,
    n_draws: int = 20000,
    metric: str = "score",
    depths: Sequence[float] | None = None,
) -> Claim:
    """Best layer, indistinguishable set, win frequencies and a multiplicity-aware gain vs final.

    Parameters
    ----------
    estimates
        Full-data score per layer.
    resamples
        ``(L, B)`` paired resampled scores (same resamples for every layer). Resamples where a
        considered layer is not finite are dropped for all layers.
    layers
        Layer ids, in the order of ``estimates``.
    final_layer
        The reference layer (default: the largest id with a finite estimate).
    scale
        Calibration factor from resample spread to sampling error (see the module docstring).
    level
        Family-wise coverage of the simultaneous intervals.
    seed, n_draws
        Seed and size of the simulation of the max-statistic.
    metric
        Name used in the headline.
    depths
        Relative depths (for the headline), in the order of ``layers``.

    Returns
    -------
    Claim

    Raises
    ------
    InvalidInputError
        Shapes disagree, no finite estimate, or fewer than 3 usable resamples.
    """
    est = np.asarray(estimates, dtype=float).ravel()
    R = np.asarray(resamples, dtype=float)
    lay = [int(x) for x in layers]
    if R.ndim != 2 or R.shape[0] != est.size or len(lay) != est.size:
        msg = f"resamples must be (layers x resamples) = ({est.size}, B), got {R.shape} for {len(lay)} layers"
        raise InvalidInputError(msg)
    ok = np.isfinite(est)
    if not ok.any():
        msg = "no finite layer score; nothing to claim"
        raise InvalidInputError(msg)
    dep = dict(zip(lay, depths, strict=False)) if depths is not None else {}
    idx = np.flatnonzero(ok)
    est, R, lay = est[idx], R[idx], [lay[i] for i in idx]
    R = R[:, np.isfinite(R).all(axis=0)]
    B = R.shape[1]
    f_layer = max(lay) if final_layer is None else int(final_layer)
    if f_layer not in lay:
        msg = f"final layer {f_layer} has no finite score; pass final_layer= one of {lay}"
        raise InvalidInputError(msg)
    fi = lay.index(f_layer)
    bi = int(np.argmax(est))
    dev = scale * (R - R.mean(axis=1, keepdims=True))
    cal = est[:, None] + dev  # calibrated pseudo-replicates of the full-data estimates

    def family(ref: int, sign: float) -> tuple[dict[int, float], dict[int, float], dict[int, float], dict[int, float],
                                                dict[int, float], float]:
        # sign=+1: layer - ref (differences vs final); sign=-1: ref - layer (shortfalls vs best)
        d = {lay[i]: float(sign * (est[i] - est[ref])) for i in range(len(lay))}
        others = [i for i in range(len(lay)) if i != ref]
        D = np.array([sign * (dev[i] - dev[ref]) for i in others]).reshape(len(others), B)
        sd = D.std(axis=1, ddof=1) if B > 1 else np.zeros(len(others))
        live = sd > 1e-12 * max(1.0, float(np.abs(est).max()))
        lo: dict[int, float] = {lay[ref]: float("nan")}
        hi: dict[int, float] = {lay[ref]: float("nan")}
        p: dict[int, float] = {lay[ref]: float("nan")}
        padj: dict[int, float] = {lay[ref]: float("nan")}
        q = float("nan")
        if live.any():
            q, maxima = simultaneous_critical_value(D[live], level=level, n_draws=n_draws, seed=seed)
        for j, i in enumerate(others):
            li = lay[i]
            if not live[j]:  # identical resamples: the difference is exactly the estimate
                lo[li] = hi[li] = d[li]
                p[li] = padj[li] = 0.0 if d[li] != 0 else 1.0
                continue
            lo[li], hi[li] = d[li] - q * sd[j], d[li] + q * sd[j]
            t = abs(d[li]) / sd[j]
            p[li] = float(2 * sps.t.sf(t, B - 1))
            padj[li] = _adjusted_p(t, maxima)
        return d, lo, hi, p, padj, q

    if B < 3:
        msg = f"claims need at least 3 finite paired resamples, got {B}; increase --bootstrap"
        raise InvalidInputError(msg)
    d, lo, hi, p, padj, q = family(fi, 1.0)
    flagged = tuple(li for li in lay if li != f_layer and (lo[li] > 0 or hi[li] < 0))
    _db, blo, _bhi, _bp, _bpadj, _bq = family(bi, -1.0)
    indist = tuple(li for li in lay if li == lay[bi] or not blo[li] > 0)
    wins = np.bincount(np.argmax(cal, axis=0), minlength=len(lay)) / B
    win = {li: float(w) for li, w in zip(lay, wins, strict=False)}
    best = lay[bi]
    gain = float(est[bi] - est[fi])
    g_lo, g_hi = (lo[best], hi[best]) if best != f_layer else (0.0, 0.0)
    claimed = best != f_layer and g_lo > 0
    pct = round(level * 100)

    def name(li: int) -> str:
        return f"layer {li}" + (f" (depth {dep[li]:.2f})" if li in dep and np.isfinite(dep[li]) else "")

    same = ", ".join(str(x) for x in indist)
    if claimed:
        text = (f"{name(best)} beats the final layer {f_layer} on {metric}: {est[bi]:.3f} vs {est[fi]:.3f}, gain {gain:+.3f} "
                f"({pct}% simultaneous CI {g_lo:+.3f} to {g_hi:+.3f} over {len(lay)} layers); "
                f"indistinguishable from the best: {same}; wins {win[best]:.0%} of resamples")
    elif best == f_layer:
        text = (f"the final layer {f_layer} scores highest on {metric} ({est[fi]:.3f}); "
                f"indistinguishable from it: {same}")
    else:
        text = (f"no layer distinguishable from the final one on {metric}: highest point estimate {name(best)} "
                f"{est[bi]:.3f} vs final {est[fi]:.3f} (gain {gain:+.3f}, {pct}% simultaneous CI {g_lo:+.3f} to {g_hi:+.3f} "
                f"includes 0); indistinguishable from the best: {same}")
    return Claim(layers=tuple(lay), best_layer=best, best_score=float(est[bi]), final_layer=f_layer, final_score=float(est[fi]),
                 gain=gain, gain_ci_low=float(g_lo), gain_ci_high=float(g_hi), claimed=bool(claimed), indistinguishable=indist,
                 win_frequency=win, diff=d, diff_ci_low=lo, diff_ci_high=hi, diff_p=p, diff_p_adj=padj, flagged=flagged,
                 critical_value=q, level=level, n_resamples=int(B), headline=text)
