"""Trajectory inference per layer: kNN graph -> diffusion map -> DPT -> Spearman.

The protocol follows the paper's code (Civale et al. 2026; ``research/data_eval.md`` §2.1, §5.2)
with a deterministic root and subsampling uncertainty added:

1. ``sc.pp.neighbors`` on the embedding (exact sklearn kNN, ``k=30``, ``random_state=seed``),
2. ``sc.tl.diffmap`` with 10 components, ``sc.tl.dpt`` from a root cell (:mod:`.dpt`),
3. Spearman's rho of the pseudotime against the ground-truth time and against a reference
   pseudotime (DPT on 50 PCs of 2,500 HVGs of log-normalised counts:
   :func:`~sclstore.eval.dpt.reference_pseudotime`).

Cells whose DPT is not finite (in a graph component without the root) are dropped from the
correlation and counted. Uncertainty comes from ``B`` subsamples of 80% of the cells drawn
without replacement, rerunning the whole pipeline on each; the subsamples depend only on the
number of cells and the seed, so scores of different layers with the same seed are paired.
"""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from sclstore.eval.dpt import (
    ROOT_RULES,
    ReferencePseudotime,
    RootRule,
    _check_X,
    _choose_root,
    _dpt_from_graph,
    _graph,
    _spearman,
    as_time,
    dpt_pseudotime,
    reference_pseudotime,
)
from sclstore.eval.stats import PairedDifference, paired_difference, percentile_ci, subsample_indices
from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    # re-exported from .dpt so the whole trajectory API is importable from here
    "ROOT_RULES",
    "RootRule",
    "ReferencePseudotime",
    "as_time",
    "dpt_pseudotime",
    "reference_pseudotime",
    "TrajectoryScore",
    "SubsampleScores",
    "score_trajectory",
    "paired_subsample_scores",
    "trajectory_paired_difference",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class TrajectoryScore:
    """Trajectory score of one representation, with subsampling uncertainty.

    Attributes
    ----------
    rho_time
        Spearman's rho of the DPT against the ground-truth time on all cells.
    rho_ref
        Spearman's rho against the reference pseudotime (``nan`` without a reference).
    ci_low, ci_high
        Percentile interval of ``rho_time`` over the subsamples.
    ref_ci_low, ref_ci_high
        Percentile interval of ``rho_ref`` over the subsamples.
    n_cells
        Cells scored.
    n_dropped
        Cells dropped from the correlation because their DPT is not finite.
    root
        Root cell index (into the full input).
    root_rule
        ``"diffusion-extreme"``, ``"first"`` or ``"explicit"``.
    n_neighbors
        k of the kNN graph.
    subsample_rho_time, subsample_rho_ref
        Per-subsample scores (paired across layers scored with the same seed).
    pseudotime
        Full-data DPT per cell.
    """

    rho_time: float
    rho_ref: float
    ci_low: float
    ci_high: float
    ref_ci_low: float
    ref_ci_high: float
    n_cells: int
    n_dropped: int
    root: int
    root_rule: str
    n_neighbors: int
    subsample_rho_time: np.ndarray = field(repr=False)
    subsample_rho_ref: np.ndarray = field(repr=False)
    pseudotime: np.ndarray = field(repr=False)


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class SubsampleScores:
    """Scores of several representations on the same subsamples.

    Attributes
    ----------
    rho_time, rho_ref
        Arrays of shape ``(n_representations, n_subsamples)``.
    n_dropped
        Non-finite DPT counts, same shape.
    indices
        The subsamples (cell indices).
    """

    rho_time: np.ndarray = field(repr=False)
    rho_ref: np.ndarray = field(repr=False)
    n_dropped: np.ndarray = field(repr=False)
    indices: tuple[np.ndarray, ...] = field(repr=False)


def _score_once(
    X: np.ndarray,
    t: np.ndarray,
    ref: np.ndarray | None,
    root: RootRule | int,
    n_neighbors: int,
    n_dcs: int,
    seed: int,
) -> tuple[float, float, int, int, np.ndarray]:
    a = _graph(X, n_neighbors, n_dcs, seed)
    r = _choose_root(a, t, root)
    pt = _dpt_from_graph(a, r)
    dropped = int((~np.isfinite(pt)).sum())
    rho_t = _spearman(pt, t)
    rho_r = _spearman(pt, ref) if ref is not None else float("nan")
    return rho_t, rho_r, dropped, r, pt


def _validate(
    X: np.ndarray,
    time: np.ndarray | pd.Series,
    reference: np.ndarray | None,
    root: RootRule | int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t = as_time(time)
    X = _check_X(X, t.shape[0])
    if X.shape[0] < 10:
        msg = f"trajectory scoring needs at least 10 cells, got {X.shape[0]}"
        raise EvaluationError(msg)
    if isinstance(root, str) and root not in ROOT_RULES:
        msg = f"unknown root rule {root!r}; pass one of {list(ROOT_RULES)} or a cell index"
        raise InvalidInputError(msg)
    if not isinstance(root, str) and not 0 <= int(root) < X.shape[0]:
        msg = f"root cell index {root} out of range for {X.shape[0]} cells; pass 0..{X.shape[0] - 1}"
        raise InvalidInputError(msg)
    ref = None
    if reference is not None:
        ref = np.asarray(reference, dtype=float).ravel()
        if ref.shape[0] != X.shape[0]:
            msg = f"reference has {ref.shape[0]} values for {X.shape[0]} cells; pass one per cell"
            raise InvalidInputError(msg)
    return X, t, ref


def score_trajectory(
    X: np.ndarray,
    time: np.ndarray | pd.Series,
    *,
    reference: np.ndarray | None = None,
    n_neighbors: int = 30,
    root: RootRule | int = "diffusion-extreme",
    n_subsamples: int = 20,
    subsample_fraction: float = 0.8,
    n_dcs: int = 10,
    seed: int = 0,
    level: float = 0.95,
) -> TrajectoryScore:
    """Score one representation for trajectory inference, with a subsampling interval.

    Parameters
    ----------
    X
        Representation (one layer's embedding, or the PCA baseline), cells x dim.
    time
        Ground-truth time (numeric or ordered categorical), one per cell.
    reference
        Reference pseudotime per cell (e.g. from :func:`reference_pseudotime`), or ``None``.
    n_neighbors
        k of the kNN graph (the paper uses 30).
    root
        Root rule (``"diffusion-extreme"``, ``"first"``) or a cell index; in subsamples the
        rule is applied to the subsample's earliest cells, and an explicit root is kept in
        every subsample.
    n_subsamples
        Number of subsamples for the interval (0 disables it).
    subsample_fraction
        Fraction of cells per subsample, drawn without replacement.
    n_dcs
        Diffusion components.
    seed
        Seed of the subsamples and of the solvers; layers scored with the same seed share
        their subsamples, so :func:`trajectory_paired_difference` is a paired comparison.
    level
        Coverage of the percentile intervals.

    Returns
    -------
    TrajectoryScore

    Raises
    ------
    InvalidInputError
        Malformed embedding, time column, reference or root.
    EvaluationError
        Too few cells.

    Examples
    --------
    >>> s = score_trajectory(emb, adata.obs["day"], n_subsamples=20)  # doctest: +SKIP
    >>> s.rho_time, (s.ci_low, s.ci_high)  # doctest: +SKIP
    """
    X, t, ref = _validate(X, time, reference, root)
    t0 = _time.perf_counter()
    rho_t, rho_r, dropped, r, pt = _score_once(X, t, ref, root, n_neighbors, n_dcs, seed)
    sub = _subsample_scores([X], t, ref, root, n_neighbors, n_dcs, seed, n_subsamples, subsample_fraction)
    lo, hi = percentile_ci(sub.rho_time[0], level=level) if n_subsamples else (np.nan, np.nan)
    rlo, rhi = percentile_ci(sub.rho_ref[0], level=level) if n_subsamples else (np.nan, np.nan)
    logger.debug("trajectory score rho=%.3f (%d subsamples) in %.2fs", rho_t, n_subsamples, _time.perf_counter() - t0)
    return TrajectoryScore(
        rho_time=rho_t,
        rho_ref=rho_r,
        ci_low=lo,
        ci_high=hi,
        ref_ci_low=rlo,
        ref_ci_high=rhi,
        n_cells=int(X.shape[0]),
        n_dropped=dropped,
        root=r,
        root_rule=root if isinstance(root, str) else "explicit",
        n_neighbors=int(min(n_neighbors, X.shape[0] - 1)),
        subsample_rho_time=sub.rho_time[0],
        subsample_rho_ref=sub.rho_ref[0],
        pseudotime=pt,
    )


def _subsample_scores(
    Xs: Sequence[np.ndarray],
    t: np.ndarray,
    ref: np.ndarray | None,
    root: RootRule | int,
    n_neighbors: int,
    n_dcs: int,
    seed: int,
    n_subsamples: int,
    fraction: float,
) -> SubsampleScores:
    n = t.shape[0]
    forced = None if isinstance(root, str) else int(root)
    idxs = subsample_indices(n, n_subsamples=n_subsamples, fraction=fraction, seed=seed, always_include=forced) if n_subsamples else []
    L, B = len(Xs), len(idxs)
    rt, rr, nd = np.full((L, B), np.nan), np.full((L, B), np.nan), np.zeros((L, B), dtype=np.int64)
    for b, idx in enumerate(idxs):
        sub_root: RootRule | int = root if forced is None else int(np.searchsorted(idx, forced))
        sub_ref = ref[idx] if ref is not None else None
        for i, X in enumerate(Xs):
            rt[i, b], rr[i, b], nd[i, b], _, _ = _score_once(X[idx], t[idx], sub_ref, sub_root, n_neighbors, n_dcs, seed)
    return SubsampleScores(rho_time=rt, rho_ref=rr, n_dropped=nd, indices=tuple(idxs))


def paired_subsample_scores(
    Xs: Sequence[np.ndarray],
    time: np.ndarray | pd.Series,
    *,
    reference: np.ndarray | None = None,
    n_neighbors: int = 30,
    root: RootRule | int = "diffusion-extreme",
    n_subsamples: int = 20,
    subsample_fraction: float = 0.8,
    n_dcs: int = 10,
    seed: int = 0,
) -> SubsampleScores:
    """Scores of several representations on the same cell subsamples.

    Parameters
    ----------
    Xs
        Representations over the same cells (e.g. every layer), each cells x dim.
    time, reference, n_neighbors, root, n_subsamples, subsample_fraction, n_dcs, seed
        As in :func:`score_trajectory`.

    Returns
    -------
    SubsampleScores
        Arrays ``(len(Xs), n_subsamples)``; row ``i`` minus row ``j`` is a paired difference.

    Raises
    ------
    InvalidInputError
        If the representations do not have one row per cell.
    """
    if len(Xs) == 0:
        msg = "no representation given; pass a list of cells x dim arrays"
        raise InvalidInputError(msg)
    checked = []
    t = as_time(time)
    ref = None
    for X in Xs:
        Xc, t, ref = _validate(X, time, reference, root)
        checked.append(Xc)
    return _subsample_scores(checked, t, ref, root, n_neighbors, n_dcs, seed, n_subsamples, subsample_fraction)


def trajectory_paired_difference(
    score: TrajectoryScore,
    other: TrajectoryScore,
    *,
    against: Literal["time", "reference"] = "time",
    level: float = 0.95,
) -> PairedDifference:
    """Paired difference ``score - other`` (e.g. a layer vs the final layer) on shared subsamples.

    Both scores must come from :func:`score_trajectory` on the same cells with the same seed,
    number of subsamples and fraction (so their subsamples are identical).

    Parameters
    ----------
    score, other
        The two trajectory scores.
    against
        Compare the correlations with the time column or with the reference pseudotime.
    level
        Coverage of the interval.

    Returns
    -------
    PairedDifference

    Raises
    ------
    InvalidInputError
        If the two scores were not computed on the same cells or subsamples.
    """
    if score.n_cells != other.n_cells or score.subsample_rho_time.shape != other.subsample_rho_time.shape:
        msg = "scores were computed on different cells or subsample counts; rescore both with the same seed"
        raise InvalidInputError(msg)
    if against == "time":
        return paired_difference(score.subsample_rho_time, other.subsample_rho_time,
                                 estimate=score.rho_time - other.rho_time, level=level)
    return paired_difference(score.subsample_rho_ref, other.subsample_rho_ref,
                             estimate=score.rho_ref - other.rho_ref, level=level)
