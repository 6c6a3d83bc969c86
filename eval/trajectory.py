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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from sclstore.eval.dpt import (
    EIGSH_TOL,
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
    standardize_columns,
)
from sclstore.eval.dpt_direct import components, dpt_pseudotime_from_map
from sclstore.eval.knn import NEIGHBOUR_METHODS, PrecomputedKnn, list_length, neighbour_lists, restrict, subsample_fraction
from sclstore.eval.stats import (
    PairedDifference,
    calibrated_interval,
    paired_difference,
    subsample_indices,
    subsample_scale,
)
from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    # re-exported from .dpt so the whole trajectory API is importable from here
    "ROOT_RULES",
    "GraphOptions",
    "LayerPseudotimes",
    "ReferencePseudotime",
    "RootRule",
    "SubsampleScores",
    "TrajectoryLayers",
    "TrajectoryScore",
    "as_time",
    "combine_layer_pseudotimes",
    "dpt_pseudotime",
    "earliest_roots",
    "layer_pseudotimes",
    "paired_subsample_scores",
    "reference_pseudotime",
    "score_trajectory",
    "score_trajectory_layers",
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
        Calibrated interval of ``rho_time``: the subsample spread rescaled by
        ``sqrt(f / (1 - f))`` (:func:`~sclstore.eval.stats.subsample_scale`), in Fisher-z space
        with a t quantile (:func:`~sclstore.eval.stats.calibrated_interval`).
    ref_ci_low, ref_ci_high
        The same for ``rho_ref``.
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
    subsample_fraction
        Fraction of cells per subsample (sets the calibration of intervals and paired differences).
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
    subsample_fraction: float = 0.8


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
    transformer: Any = "sklearn",
) -> tuple[float, float, int, int, np.ndarray]:
    a = _graph(X, n_neighbors, n_dcs, seed, transformer=transformer)
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
    standardize: bool = False,
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
        Coverage of the calibrated intervals.
    standardize
        Z-score every coordinate first (a coordinate with a huge spread otherwise dominates
        the kNN graph).

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
    if standardize:
        X = standardize_columns(X)
    t0 = _time.perf_counter()
    rho_t, rho_r, dropped, r, pt = _score_once(X, t, ref, root, n_neighbors, n_dcs, seed)
    sub = _subsample_scores([X], t, ref, root, n_neighbors, n_dcs, seed, n_subsamples, subsample_fraction)
    scale = subsample_scale(subsample_fraction) if n_subsamples else 1.0
    lo, hi = calibrated_interval(rho_t, sub.rho_time[0], scale=scale, level=level) if n_subsamples else (np.nan, np.nan)
    rlo, rhi = calibrated_interval(rho_r, sub.rho_ref[0], scale=scale, level=level) if n_subsamples else (np.nan, np.nan)
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
        subsample_fraction=subsample_fraction,
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
    # one exact neighbour search per representation, restricted to every subsample (sclstore.eval.knn)
    lists = [neighbour_lists(X, list_length(n, min(n_neighbors, n - 1) - 1, fraction), method="sklearn") if B and n > 2 else None
             for X in Xs]
    for b, idx in enumerate(idxs):
        sub_root: RootRule | int = root if forced is None else int(np.searchsorted(idx, forced))
        sub_ref = ref[idx] if ref is not None else None
        k = min(n_neighbors, len(idx) - 1)
        for i, X in enumerate(Xs):
            lst = lists[i]
            tr: Any = PrecomputedKnn(*restrict(lst, X, np.asarray(idx), k - 1)) if lst is not None and k >= 2 else "sklearn"
            rt[i, b], rr[i, b], nd[i, b], _, _ = _score_once(X[idx], t[idx], sub_ref, sub_root, n_neighbors, n_dcs, seed, tr)
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
    scale = subsample_scale(score.subsample_fraction)
    if against == "time":
        return paired_difference(score.subsample_rho_time, other.subsample_rho_time,
                                 estimate=score.rho_time - other.rho_time, level=level, scale=scale)
    return paired_difference(score.subsample_rho_ref, other.subsample_rho_ref,
                             estimate=score.rho_ref - other.rho_ref, level=level, scale=scale)


# ------------------------------------------------------------------------ several layers, one cell set
@dataclass(frozen=True, kw_only=True)
class GraphOptions:
    """How each representation's graph and DPT are built (part of every cache key).

    Attributes
    ----------
    n_neighbors
        k of the kNN graph.
    n_dcs
        Diffusion components used by DPT.
    diffmap_comps
        Components computed by the diffusion map (``None``: ``n_dcs``; the paper's code uses
        scanpy's default 15 with DPT on the first 10).
    transformer
        ``"sklearn"`` (exact kNN, default), ``"blocked"`` (exact, by blocked matrix products: faster
        above a few thousand cells), ``"pynndescent"`` (approximate) or ``None`` (scanpy's default
        choice, the paper's).
    standardize
        Z-score every coordinate before the graph (:func:`~sclstore.eval.dpt.standardize_columns`).
    seed
        ``random_state`` of neighbours and eigen solvers.
    fast_eigen
        Diffusion maps with ARPACK tolerance :data:`~sclstore.eval.dpt.EIGSH_TOL`, a larger Lanczos
        basis (:func:`~sclstore.eval.dpt.lanczos_vectors`) and, on the subsamples, a start vector
        from the full-data eigenvectors (~40% fewer Lanczos products);
        with reused neighbour lists, connectivities and transition matrix built straight from the
        lists (:mod:`sclstore.eval.connectivity`); the graph's components found once for the root rule
        and the pseudotime, which is ``sc.tl.dpt``'s formula bit for bit (:mod:`sclstore.eval.dpt_direct`).
        DPT within 5e-6 of ``False``, which is ``sc.pp.neighbors`` + ``sc.tl.diffmap`` bit for bit.
    """

    n_neighbors: int = 30
    n_dcs: int = 10
    diffmap_comps: int | None = None
    transformer: str | None = "sklearn"
    standardize: bool = False
    seed: int = 0
    fast_eigen: bool = True


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays
class LayerPseudotimes:
    """DPT of one representation on all cells and on each subsample (one layer; stream layers).

    Attributes
    ----------
    full
        DPT per cell on all cells (``inf`` off the root's graph component).
    root
        Root cell index used on all cells.
    subsamples
        DPT per cell of each subsample (in the subsample's order).
    extra_roots
        ``(R, n)`` DPT from each of the extra roots, on the full graph (root sensitivity).
    """

    full: np.ndarray = field(repr=False)
    root: int
    subsamples: tuple[np.ndarray, ...] = field(repr=False)
    extra_roots: np.ndarray = field(repr=False)


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays
class TrajectoryLayers:
    """Scores of several representations on one common cell set, with calibrated intervals.

    Attributes
    ----------
    rho_time, rho_ref
        ``(L,)`` full-data Spearman vs time / vs the reference (``nan`` without reference).
    ci_low, ci_high, ref_ci_low, ref_ci_high
        ``(L,)`` calibrated intervals (subsample spread x ``scale``, Fisher z, t quantile).
    resamples_time, resamples_ref
        ``(L, B)`` paired subsample scores (feed them to :func:`~sclstore.eval.claims.layer_claims`
        with ``scale``).
    scale
        ``sqrt(f / (1 - f))`` for subsampling fraction ``f``.
    n_cells
        Cells in the input.
    n_common
        Cells scored for every layer (finite DPT in all layers).
    n_unreached
        ``(L,)`` cells each layer's own graph could not reach from its root (non-finite DPT);
        the union of these is dropped from every layer.
    roots
        ``(L,)`` root per layer (full data).
    root_rho_time
        ``(L, R)`` Spearman vs time from each extra root (on the common cells).
    extra_roots
        The extra root cells (indices into the input).
    """

    rho_time: np.ndarray = field(repr=False)
    rho_ref: np.ndarray = field(repr=False)
    ci_low: np.ndarray = field(repr=False)
    ci_high: np.ndarray = field(repr=False)
    ref_ci_low: np.ndarray = field(repr=False)
    ref_ci_high: np.ndarray = field(repr=False)
    resamples_time: np.ndarray = field(repr=False)
    resamples_ref: np.ndarray = field(repr=False)
    scale: float
    n_cells: int
    n_common: int
    n_unreached: np.ndarray = field(repr=False)
    roots: np.ndarray = field(repr=False)
    root_rho_time: np.ndarray = field(repr=False)
    extra_roots: tuple[int, ...]


def earliest_roots(time: np.ndarray | pd.Series, n_roots: int, *, seed: int = 0) -> tuple[int, ...]:
    """``n_roots`` distinct random earliest-time cells (seeded; the same for every layer).

    Parameters
    ----------
    time
        Time per cell.
    n_roots
        How many (fewer when fewer earliest cells exist).
    seed
        Seed.

    Returns
    -------
    tuple of int
    """
    t = as_time(time)
    finite = np.isfinite(t)
    if n_roots <= 0 or not finite.any():
        return ()
    cand = np.flatnonzero(finite & (t == np.min(t[finite])))
    rng = np.random.default_rng(seed + 7919)
    return tuple(int(c) for c in np.sort(rng.choice(cand, size=min(n_roots, cand.size), replace=False)))


def layer_pseudotimes(
    X: np.ndarray,
    time: np.ndarray | pd.Series,
    *,
    subsamples: Sequence[np.ndarray] = (),
    root: RootRule | int = "diffusion-extreme",
    options: GraphOptions = GraphOptions(),
    extra_roots: Sequence[int] = (),
    reuse_neighbours: bool = True,
    threads: int = 1,
) -> LayerPseudotimes:
    """DPT of one representation on all cells and on the given subsamples.

    Parameters
    ----------
    X
        Representation, cells x dim.
    time
        Time per cell (for the root rule).
    subsamples
        Cell index sets (from :func:`~sclstore.eval.stats.subsample_indices`; pass the same to
        every layer so their scores are paired).
    root
        Root rule or explicit index (an explicit root must be in every subsample).
    options
        Graph options.
    extra_roots
        Additional root cells scored on the full graph (root sensitivity).
    reuse_neighbours
        Search the neighbours once on all cells and restrict them to each subsample
        (:mod:`sclstore.eval.knn`; the same graphs as a fresh exact search per subsample) instead
        of searching every subsample again. Applies to ``options.transformer`` ``"sklearn"``,
        ``"blocked"`` and ``"pynndescent"``; scanpy's own choice (``None``, the paper protocol)
        searches anew.
    threads
        CPU threads: the neighbour search's matrix products use the caller's BLAS threads, and the
        subsample graphs run ``threads`` at a time, each on one BLAS thread (the results do not
        depend on it).

    Returns
    -------
    LayerPseudotimes
    """
    t = as_time(time)
    X = _check_X(X, t.shape[0])
    if options.standardize:
        X = standardize_columns(X)
    o = options
    lists = None
    if reuse_neighbours and o.transformer in NEIGHBOUR_METHODS and X.shape[0] > 2:
        # one search for all cells and every subsample (exact for the exact search: see sclstore.eval.knn)
        K = list_length(X.shape[0], min(o.n_neighbors, X.shape[0] - 1) - 1, subsample_fraction(X.shape[0], subsamples))
        lists = neighbour_lists(X, K, method=str(o.transformer), seed=o.seed)

    def dpt(Xs: np.ndarray, ts: np.ndarray, r: RootRule | int, subset: np.ndarray | None,
            v0: np.ndarray | None = None) -> tuple[np.ndarray, int, Any]:
        transformer: Any = o.transformer
        k = min(o.n_neighbors, Xs.shape[0] - 1)
        if lists is not None and k >= 2:
            sel = np.arange(X.shape[0]) if subset is None else subset
            transformer = PrecomputedKnn(*restrict(lists, X, sel, k - 1))
        a = _graph(Xs, o.n_neighbors, o.n_dcs, o.seed, transformer=transformer, diffmap_comps=o.diffmap_comps, v0=v0,
                   eigen_tol=EIGSH_TOL if o.fast_eigen else 0.0, direct=o.fast_eigen)
        if not o.fast_eigen:
            rr = _choose_root(a, ts, r)
            return _dpt_from_graph(a, rr), rr, a
        a.uns["sclstore_components"] = labels = components(a.obsp["connectivities"])  # symmetric: one search serves both
        rr = _choose_root(a, ts, r, labels)
        return _direct_dpt(a, rr), rr, a

    def _direct_dpt(a: Any, root_: int) -> np.ndarray:
        m = int(a.uns["sclstore_n_dcs"])
        return dpt_pseudotime_from_map(a.uns["diffmap_evals"][:m], a.obsm["X_diffmap"][:, :m], root_, a.uns["sclstore_components"])

    from threadpoolctl import threadpool_limits

    # past the search, one BLAS thread everywhere: the sparse work gains nothing from more, and the
    # numbers then do not depend on ``threads``
    with threadpool_limits(limits=1):
        full, r0, a = dpt(X, t, root, None)
        # warm start: the subsample's leading eigenvectors are close to the full data's, restricted
        basis = np.asarray(a.obsm["X_diffmap"], dtype=np.float64) if o.fast_eigen else None
        dpt_at = _direct_dpt if o.fast_eigen else _dpt_from_graph
        extra = np.vstack([dpt_at(a, int(e)) for e in extra_roots]) if len(extra_roots) else np.empty((0, t.shape[0]))
        forced = None if isinstance(root, str) else int(root)

        def one(idx: np.ndarray) -> np.ndarray:
            sr: RootRule | int = root if forced is None else int(np.searchsorted(idx, forced))
            v0 = basis[idx].sum(axis=1) if basis is not None and len(idx) > basis.shape[1] + 1 else None
            if v0 is not None and not (np.isfinite(v0).all() and np.abs(v0).max() > 0):
                v0 = None  # scanpy's seeded random start
            return dpt(X[idx], t[idx], sr, np.asarray(idx), v0)[0]

        if threads > 1 and len(subsamples) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # threads share the process's warning filters: restore them once all are done
            with warnings.catch_warnings(), ThreadPoolExecutor(min(threads, len(subsamples))) as ex:
                subs = list(ex.map(one, subsamples))
        else:
            subs = [one(idx) for idx in subsamples]
    return LayerPseudotimes(full=full, root=r0, subsamples=tuple(subs), extra_roots=extra)


def combine_layer_pseudotimes(
    pts: Sequence[LayerPseudotimes],
    time: np.ndarray | pd.Series,
    *,
    subsamples: Sequence[np.ndarray] = (),
    reference: np.ndarray | None = None,
    subsample_fraction: float = 0.8,
    common: bool = True,
    level: float = 0.95,
    extra_roots: Sequence[int] = (),
    names: Sequence[str] | None = None,
) -> TrajectoryLayers:
    """Spearman scores of several layers on one common cell set, with calibrated intervals.

    On all cells and on every subsample, a cell is scored only when its DPT is finite in every
    layer (``common=True``), so layers are compared on the same cells; ``common=False`` keeps
    each layer's own finite cells (the paper's code). Each layer that loses cells is warned
    about once, with its name and count.

    Parameters
    ----------
    pts
        One :class:`LayerPseudotimes` per layer, computed with the same ``subsamples``.
    time
        Time per cell.
    subsamples
        The subsamples the pseudotimes were computed on.
    reference
        Reference pseudotime per cell, or ``None``.
    subsample_fraction
        The fraction used to draw ``subsamples`` (sets the calibration ``scale``).
    common
        Score every layer on the cells reached in all layers.
    level
        Coverage of the intervals.
    extra_roots
        The extra roots used in :func:`layer_pseudotimes`.
    names
        Layer names for the warning (default ``layer 0..``).

    Returns
    -------
    TrajectoryLayers
    """
    t = as_time(time)
    n = t.shape[0]
    L = len(pts)
    names = list(names) if names is not None else [f"layer {i}" for i in range(L)]
    ref = None if reference is None else np.asarray(reference, dtype=float).ravel()
    B = len(subsamples)
    if any(len(p.subsamples) != B for p in pts):
        msg = "every layer's pseudotimes must be computed on the same subsamples"
        raise InvalidInputError(msg)
    F = np.vstack([np.isfinite(p.full) for p in pts])
    unreached = (~F).sum(axis=1)
    mask_all = F.all(axis=0)
    if common:
        for nm, u in zip(names, unreached, strict=False):
            if u:
                logger.warning("%s: %d of %d cells are not reachable from the root in its kNN graph; they are dropped "
                               "from every layer so all layers are scored on the same %d cells", nm, int(u), n, int(mask_all.sum()))
    rt, rr = np.full(L, np.nan), np.full(L, np.nan)
    for i, p in enumerate(pts):
        m = mask_all if common else F[i]
        rt[i] = _spearman(p.full[m], t[m])
        rr[i] = _spearman(p.full[m], ref[m]) if ref is not None else np.nan
    St, Sr = np.full((L, B), np.nan), np.full((L, B), np.nan)
    for b, idx in enumerate(subsamples):
        Fb = np.vstack([np.isfinite(p.subsamples[b]) for p in pts])
        mb = Fb.all(axis=0)
        for i, p in enumerate(pts):
            m = mb if common else Fb[i]
            St[i, b] = _spearman(p.subsamples[b][m], t[idx][m])
            Sr[i, b] = _spearman(p.subsamples[b][m], ref[idx][m]) if ref is not None else np.nan
    scale = subsample_scale(subsample_fraction) if B else float("nan")
    ci = np.array([calibrated_interval(rt[i], St[i], scale=scale, level=level) for i in range(L)]).reshape(L, 2)
    rci = np.array([calibrated_interval(rr[i], Sr[i], scale=scale, level=level) for i in range(L)]).reshape(L, 2)
    R = len(extra_roots)
    root_rho = np.full((L, R), np.nan)
    for i, p in enumerate(pts):
        for j in range(min(R, p.extra_roots.shape[0])):
            m = mask_all & np.isfinite(p.extra_roots[j])
            root_rho[i, j] = _spearman(p.extra_roots[j][m], t[m])
    return TrajectoryLayers(rho_time=rt, rho_ref=rr, ci_low=ci[:, 0], ci_high=ci[:, 1], ref_ci_low=rci[:, 0], ref_ci_high=rci[:, 1],
                            resamples_time=St, resamples_ref=Sr, scale=scale, n_cells=n, n_common=int(mask_all.sum()),
                            n_unreached=unreached, roots=np.array([p.root for p in pts]), root_rho_time=root_rho,
                            extra_roots=tuple(int(e) for e in extra_roots))


def score_trajectory_layers(
    Xs: Sequence[np.ndarray],
    time: np.ndarray | pd.Series,
    *,
    reference: np.ndarray | None = None,
    root: RootRule | int = "diffusion-extreme",
    options: GraphOptions = GraphOptions(),
    n_subsamples: int = 20,
    subsample_fraction: float = 0.8,
    common: bool = True,
    n_extra_roots: int = 0,
    level: float = 0.95,
) -> TrajectoryLayers:
    """Score several representations (e.g. every layer) on the same cells and subsamples.

    Convenience wrapper of :func:`layer_pseudotimes` (one call per layer: the runner can stream
    or parallelise those) and :func:`combine_layer_pseudotimes`.

    Parameters
    ----------
    Xs
        Representations over the same cells.
    time, reference, root
        As in :func:`score_trajectory`.
    options
        Graph options (k, diffusion components, kNN transformer, standardisation, seed).
    n_subsamples, subsample_fraction
        Subsamples for the calibrated intervals (drawn with ``options.seed``).
    common
        Score every layer on the cells reached in all layers.
    n_extra_roots
        Random earliest-time roots for the root-sensitivity report.
    level
        Coverage.

    Returns
    -------
    TrajectoryLayers
    """
    if len(Xs) == 0:
        msg = "no representation given; pass a list of cells x dim arrays"
        raise InvalidInputError(msg)
    checked = []
    for X in Xs:
        Xc, t, ref = _validate(X, time, reference, root)
        checked.append(Xc)
    forced = None if isinstance(root, str) else int(root)
    idxs = subsample_indices(t.shape[0], n_subsamples=n_subsamples, fraction=subsample_fraction, seed=options.seed,
                             always_include=forced) if n_subsamples else []
    extra = earliest_roots(t, n_extra_roots, seed=options.seed)
    pts = [layer_pseudotimes(X, t, subsamples=idxs, root=root, options=options, extra_roots=extra) for X in checked]
    return combine_layer_pseudotimes(pts, t, subsamples=idxs, reference=ref, subsample_fraction=subsample_fraction, common=common,
                                     level=level, extra_roots=extra)
