"""Perturbation response per layer: RSA between DE similarity and embedding-shift similarity.

For one condition (the runner loops conditions; they are never pooled):

* ``S_DE[p, q]`` = Pearson correlation of the DE vectors (log2 fold changes over a fixed gene
  universe) of perturbations ``p`` and ``q``;
* ``S_emb[p, q]`` = cosine of the embedding shifts ``Δ_p = mean(emb[p]) - mean(emb[control])``
  (``variant="shift"``), or of the raw perturbed centroids (``variant="centroid"``, the
  paper's code, kept for comparability; it is not invariant to a common offset);
* RSA = Spearman's rho between the upper triangles; Mantel one-sided permutation p-value;
  percentile CI from a bootstrap over perturbations (same-perturbation pairs dropped).

A split-half DE ceiling (:func:`split_half_ceiling`) tells how much of the DE similarity
structure is reproducible at all, so a layer's score can be read against noise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pandas as pd
from scipy import sparse

from sclstore.eval.de import (
    DEMode,
    _missing_control,
    expressed_genes,
    pseudobulk,
    run_de,
)
from sclstore.eval.stats import (
    PairedDifference,
    cosine_similarity_matrix,
    de_similarity,
    paired_difference,
    percentile_ci,
    rsa_folds,
)
from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "VARIANTS",
    "PerturbationScore",
    "Similarity",
    "SplitHalfCeiling",
    "Variant",
    "ceiling_from_folds",
    "crossfit_de",
    "crossfit_halves",
    "embedding_vectors",
    "group_centroids",
    "perturbation_paired_difference",
    "rsa_crossfit",
    "rsa_from_centroids",
    "score_perturbation",
    "score_perturbation_crossfit",
    "select_perturbations",
    "split_half_ceiling",
]

logger = logging.getLogger(__name__)

Variant = Literal["shift", "centroid"]
VARIANTS: tuple[str, ...] = get_args(Variant)
Similarity = Literal["pearson", "spearman"]


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class PerturbationScore:
    """RSA score of one layer in one condition.

    Attributes
    ----------
    score
        Spearman's rho between the upper triangles of the DE and embedding similarity matrices.
    ci_low, ci_high
        Percentile bootstrap interval over perturbations.
    p_value
        One-sided Mantel permutation p-value (``nan`` when ``n_perm=0``).
    n_perturbations
        Perturbations scored.
    n_pairs
        Pairs compared (``K (K-1) / 2``).
    variant
        ``"shift"`` or ``"centroid"``.
    perturbations
        The perturbations, in matrix order.
    boot
        Bootstrap replicates (paired across layers scored with the same seed and perturbations).
    n_folds
        Cross-fitting folds averaged (1: DE and embedding from the same cells, leak-prone).
    """

    score: float
    ci_low: float
    ci_high: float
    p_value: float
    n_perturbations: int
    n_pairs: int
    variant: str
    perturbations: tuple[str, ...] = field(repr=False)
    boot: np.ndarray = field(repr=False)
    n_folds: int = 1


@dataclass(frozen=True, kw_only=True)
class SplitHalfCeiling:
    """Reproducibility of the DE similarity structure between two halves of the cells.

    Read a layer's RSA against the noise ceiling (classical test theory: a measure correlates with
    anything at most ``sqrt(reliability)``): ``ceiling_half`` for cross-fitted scores (their
    DE comes from half of the cells, whose reliability is the split-half ``rsa``) and
    ``ceiling_full`` = ``sqrt(spearman_brown)`` for the leak-prone full-data scores.

    Attributes
    ----------
    rsa
        Mean over splits of the RSA between the halves' DE similarity matrices.
    spearman_brown
        ``2 r / (1 + r)``: the reliability projected to the full number of cells.
    values
        RSA of each split.
    n_perturbations
        Perturbations in the (last) split.
    mode
        DE mode used on the halves.
    ceiling_full
        ``sqrt(spearman_brown)``: the most a layer can reach against DE from all the cells
        (the leak-prone, non-cross-fitted scores).
    ceiling_half
        ``sqrt(rsa)``: the most a layer can reach against DE from half of the cells (the
        cross-fitted scores, whose DE side is one half).
    similarity
        DE similarity used (``"pearson"`` or ``"spearman"``).
    """

    rsa: float
    spearman_brown: float
    values: tuple[float, ...]
    n_perturbations: int
    mode: str
    ceiling_full: float = float("nan")
    ceiling_half: float = float("nan")
    similarity: str = "pearson"


def _labels(x: Sequence[str] | np.ndarray | pd.Series, n: int | None, what: str) -> np.ndarray:
    a = np.asarray(x).astype(str)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        msg = f"{what} must have one label per cell ({n}), got shape {a.shape}"
        raise InvalidInputError(msg)
    return a


def select_perturbations(
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    replicate_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    *,
    min_cells: int = 10,
    min_replicates: int = 2,
    min_perturbations: int = 3,
) -> list[str]:
    """Perturbations of one condition with enough cells and replicates to be scored.

    Parameters
    ----------
    perturbation_labels, replicate_labels
        Per-cell labels (one condition).
    control
        Control label (e.g. ``"NTC"``); it must itself pass the thresholds.
    min_cells
        Minimum cells per perturbation (the paper uses 10).
    min_replicates
        Minimum distinct replicates (donors) per perturbation; pydeseq2 needs 2.
    min_perturbations
        Fewer kept perturbations than this is an error (RSA needs 3).

    Returns
    -------
    list of str
        Kept perturbation labels (control excluded), sorted.

    Raises
    ------
    EvaluationError
        Missing control, a control with too few cells or replicates, or too few perturbations.
    """
    pert = _labels(perturbation_labels, None, "perturbation labels")
    rep = _labels(replicate_labels, pert.shape[0], "replicate labels")
    df = pd.DataFrame({"p": pert, "r": rep})
    if control not in set(pert.tolist()):
        raise _missing_control(control, pert)
    n_cells = df.groupby("p").size()
    n_reps = df.groupby("p")["r"].nunique()
    if n_cells[control] < min_cells or n_reps[control] < min_replicates:
        msg = (
            f"control {control!r} has {n_cells[control]} cells in {n_reps[control]} replicates; "
            f"need >={min_cells} cells and >={min_replicates} replicates: pass a replicate key with more donors or lower min_cells"
        )
        raise EvaluationError(msg)
    ok = (n_cells >= min_cells) & (n_reps >= min_replicates)
    kept = sorted(p for p in n_cells.index[ok] if p != control)
    if len(kept) < min_perturbations:
        n_all = len(n_cells) - 1
        msg = (
            f"only {len(kept)} of {n_all} perturbations have >={min_cells} cells in >={min_replicates} replicates; "
            f"RSA needs >={min_perturbations}: lower min_cells, pass a replicate key, or use a condition with more cells"
        )
        raise EvaluationError(msg)
    logger.info("kept %d of %d perturbations (>=%d cells, >=%d replicates)", len(kept), len(n_cells) - 1, min_cells, min_replicates)
    return kept


def group_centroids(
    emb: np.ndarray,
    labels: Sequence[str] | np.ndarray | pd.Series,
    *,
    groups: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Mean embedding per label.

    Parameters
    ----------
    emb
        Embedding, cells x dim.
    labels
        Label per cell.
    groups
        Labels to compute (default: all present).

    Returns
    -------
    dict
        ``{label: centroid}`` (float64 vectors).
    """
    X = np.asarray(emb)
    if X.ndim != 2:
        msg = f"embedding must be 2-d (cells x dim), got shape {X.shape}"
        raise InvalidInputError(msg)
    lab = _labels(labels, X.shape[0], "labels")
    codes, uniq = pd.factorize(lab)
    counts = np.bincount(codes, minlength=len(uniq))
    ind = sparse.csr_matrix((np.ones(lab.shape[0]), (codes, np.arange(lab.shape[0]))), shape=(len(uniq), lab.shape[0]))
    sums = np.asarray(ind @ X.astype(np.float64))
    want = set(uniq) if groups is None else {str(g) for g in groups}
    return {u: sums[i] / counts[i] for i, u in enumerate(uniq) if u in want}


def embedding_vectors(
    centroids: Mapping[str, np.ndarray],
    control: str,
    perturbations: Sequence[str],
    *,
    variant: Variant = "shift",
) -> np.ndarray:
    """Per-perturbation vectors compared by cosine: shifts from control, or raw centroids.

    Parameters
    ----------
    centroids
        ``{label: centroid}``, including the control for ``variant="shift"``.
    control
        Control label.
    perturbations
        Order of the rows.
    variant
        ``"shift"`` (Δ_p = centroid_p - centroid_control) or ``"centroid"`` (centroid_p).

    Returns
    -------
    numpy.ndarray
        K x dim.
    """
    if variant not in VARIANTS:
        msg = f"unknown variant {variant!r}; pass one of {list(VARIANTS)}"
        raise InvalidInputError(msg)
    V = np.vstack([np.asarray(centroids[p], dtype=np.float64) for p in perturbations])
    if variant == "shift":
        if control not in centroids:
            raise _missing_control(control, np.asarray(list(centroids)))
        V = V - np.asarray(centroids[control], dtype=np.float64)[None, :]
    return V


def rsa_from_centroids(
    centroids: Mapping[str, np.ndarray],
    control: str,
    de_lfc: pd.DataFrame,
    *,
    variant: Variant = "shift",
    similarity: Similarity = "pearson",
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
    level: float = 0.95,
) -> PerturbationScore:
    """RSA score of one layer from per-group centroids (e.g. returned by a GROUP BY query).

    DE and centroids from the same cells are leak-prone (shared sampling noise inflates the
    score); :func:`rsa_crossfit` with folds from :func:`crossfit_halves` avoids that.

    Parameters
    ----------
    centroids
        ``{label: mean embedding}`` for the control and the perturbations.
    control
        Control label.
    de_lfc
        Perturbations x genes log2 fold changes; its index fixes which perturbations are scored
        (those that also have a centroid) and their order.
    variant
        ``"shift"`` (default) or the paper's ``"centroid"``.
    similarity
        DE similarity: ``"pearson"`` (default) or the paper's ``"spearman"``.
    n_boot
        Bootstrap resamples over perturbations for the interval (0 disables it).
    n_perm
        Mantel permutations (0 disables the p-value).
    seed
        Seed of bootstrap and permutations; equal seeds give paired bootstraps across layers.
    level
        Coverage of the interval.

    Returns
    -------
    PerturbationScore

    Raises
    ------
    EvaluationError
        Missing control centroid (shift variant) or fewer than 3 scorable perturbations.
    """
    return rsa_crossfit([centroids], [de_lfc], control, variant=variant, similarity=similarity, n_boot=n_boot, n_perm=n_perm,
                        seed=seed, level=level)


def _finite_folds(mats: list[tuple[np.ndarray, np.ndarray]], perts: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Drop items (worst first) until every fold's matrices are finite off the diagonal."""
    keep = np.ones(len(perts), dtype=bool)
    while True:
        bad = np.zeros((len(perts), len(perts)), dtype=bool)
        for a, b in mats:
            bad |= ~(np.isfinite(a) & np.isfinite(b))
        np.fill_diagonal(bad, False)
        bad[~keep, :] = False
        bad[:, ~keep] = False
        if not bad.any():
            break
        keep[int(np.argmax(bad.sum(axis=1)))] = False
    if not keep.all():
        logger.warning("dropped %d perturbations with undefined similarity (zero shift or constant DE): %s",
                       int((~keep).sum()), [p for p, k in zip(perts, keep, strict=False) if not k][:5])
    ix = np.ix_(keep, keep)
    return [(a[ix], b[ix]) for a, b in mats], [p for p, k in zip(perts, keep, strict=False) if k]


def rsa_crossfit(
    centroid_folds: Sequence[Mapping[str, np.ndarray]],
    de_folds: Sequence[pd.DataFrame],
    control: str,
    *,
    variant: Variant = "shift",
    similarity: Similarity = "pearson",
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
    level: float = 0.95,
) -> PerturbationScore:
    """RSA averaged over cross-fitting folds: fold ``i`` pairs ``de_folds[i]`` with ``centroid_folds[i]``.

    In a fold the DE comes from one half of the cells and the centroids from the other, so the
    sampling noise of the two sides is independent (no leakage). The score, each bootstrap
    replicate and each Mantel permutation statistic are means over the folds
    (:func:`~sclstore.eval.stats.rsa_folds`); one fold reproduces :func:`rsa_from_centroids`.

    Parameters
    ----------
    centroid_folds
        Per fold, ``{label: mean embedding}`` of the cells *not* used for that fold's DE.
    de_folds
        Per fold, perturbations x genes log2 fold changes.
    control, variant, similarity, n_boot, n_perm, seed, level
        As in :func:`rsa_from_centroids`.

    Returns
    -------
    PerturbationScore
        ``n_folds`` = number of folds; perturbations = those scorable in every fold.

    Raises
    ------
    EvaluationError
        Missing control centroid, or fewer than 3 perturbations scorable in every fold.
    """
    if variant not in VARIANTS:
        msg = f"unknown variant {variant!r}; pass one of {list(VARIANTS)}"
        raise InvalidInputError(msg)
    if len(centroid_folds) != len(de_folds) or not de_folds:
        msg = f"need one DE per centroid fold, got {len(de_folds)} DE and {len(centroid_folds)} centroid folds"
        raise InvalidInputError(msg)
    cfs = [{str(k): v for k, v in c.items()} for c in centroid_folds]
    if variant == "shift":
        for c in cfs:
            if control not in c:
                raise _missing_control(control, np.asarray(list(c)))
    idx = [str(p) for p in de_folds[0].index]
    perts = [p for p in idx if p != control and all(p in c for c in cfs)
             and all(p in set(map(str, d.index)) for d in de_folds)]
    if len(perts) < len(idx):
        logger.info("%d DE perturbations lack a centroid or DE in some fold and are skipped", len(idx) - len(perts))
    if len(perts) < 3:
        msg = f"RSA needs >=3 perturbations with both DE and embedding, got {len(perts)}; pass more perturbations (labels in DE: {idx[:5]})"
        raise EvaluationError(msg)
    mats = []
    for c, d in zip(cfs, de_folds, strict=False):
        S_de = de_similarity(d.set_axis([str(x) for x in d.index], axis=0).loc[perts], method=similarity)
        S_emb = cosine_similarity_matrix(embedding_vectors(c, control, perts, variant=variant))
        mats.append((S_de, S_emb))
    mats, perts = _finite_folds(mats, perts)
    if len(perts) < 3:
        msg = f"only {len(perts)} perturbations have a defined similarity; RSA needs >=3"
        raise EvaluationError(msg)
    score, boot, p = rsa_folds(mats, n_boot=n_boot, n_perm=n_perm, seed=seed)
    lo, hi = percentile_ci(boot, level=level) if n_boot > 0 else (float("nan"), float("nan"))
    k = len(perts)
    return PerturbationScore(score=score, ci_low=lo, ci_high=hi, p_value=p, n_perturbations=k, n_pairs=k * (k - 1) // 2,
                             variant=variant, perturbations=tuple(perts), boot=boot if n_boot > 0 else np.empty(0),
                             n_folds=len(mats))


def crossfit_halves(
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    replicate_labels: Sequence[str] | np.ndarray | pd.Series,
    *,
    n_splits: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Random halves of the cells, balanced within every (perturbation, replicate) group.

    Parameters
    ----------
    perturbation_labels, replicate_labels
        Per-cell labels (one condition).
    n_splits
        Number of independent splits.
    seed
        Seed; equal arguments give equal splits (so every layer uses the same halves).

    Returns
    -------
    list of numpy.ndarray
        One boolean mask per split (``True`` = half A); each split gives two folds (DE from A
        with centroids from B, and the reverse).
    """
    pert = _labels(perturbation_labels, None, "perturbation labels")
    rep = _labels(replicate_labels, pert.shape[0], "replicate labels")
    if n_splits < 1:
        msg = f"n_splits must be >= 1, got {n_splits}"
        raise InvalidInputError(msg)
    rng = np.random.default_rng(seed + 104729)
    groups = pd.Series(np.arange(pert.shape[0])).groupby([pert, rep]).indices
    out = []
    for _ in range(n_splits):
        half = np.zeros(pert.shape[0], dtype=bool)
        for _key, ix in groups.items():
            ix = rng.permutation(ix)
            half[ix[: (len(ix) + int(rng.integers(0, 2))) // 2]] = True
        out.append(half)
    return out


def crossfit_de(
    counts: np.ndarray | sparse.spmatrix,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    replicate_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    halves: Sequence[np.ndarray],
    *,
    perturbations: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
    mode: DEMode = "fast",
    n_jobs: int = 1,
    only: int | None = None,
) -> list[pd.DataFrame]:
    """DE of each half of each split: ``[DE(A_1), DE(B_1), DE(A_2), ...]`` (log2 fold changes).

    Pair fold ``2 s`` with centroids of ``~halves[s]`` and fold ``2 s + 1`` with centroids of
    ``halves[s]`` (:func:`score_perturbation_crossfit` does this).

    Parameters
    ----------
    counts
        Raw counts of one condition, cells x genes.
    perturbation_labels, replicate_labels
        Per-cell labels.
    control
        Control label.
    halves
        Masks from :func:`crossfit_halves`.
    perturbations
        Perturbations to test (default: all but the control).
    genes
        Gene universe (default: genes expressed in the condition's full pseudobulks), the same
        for every half.
    gene_names
        Count column names.
    mode
        DE mode.
    n_jobs
        Parallel pydeseq2 fits.
    only
        Compute only fold ``only`` (an index into the output order; e.g. to cache folds one by
        one) and return it as a one-element list.

    Returns
    -------
    list of pandas.DataFrame
    """
    pert = _labels(perturbation_labels, None, "perturbation labels")
    rep = _labels(replicate_labels, pert.shape[0], "replicate labels")
    C = sparse.csr_matrix(counts)
    names = [str(g) for g in gene_names] if gene_names is not None else [f"g{i}" for i in range(C.shape[1])]
    universe = pd.Index([str(g) for g in genes]) if genes is not None else \
        expressed_genes(pseudobulk(C, pert, rep, gene_names=names)[0])
    want = None if perturbations is None else [str(p) for p in perturbations if str(p) != control]
    out = []
    masks = [h for half in halves for h in (half, ~half)]
    for i, h in enumerate(masks):
        if only is not None and i != only:
            continue
        if mode == "wilcoxon":  # the paper protocol's per-cell DE
            from sclstore.eval.de_wilcoxon import de_wilcoxon

            out.append(de_wilcoxon(C[h], pert[h], control, perturbations=want, gene_names=names, genes=universe).lfc)
            continue
        pb, meta = pseudobulk(C[h], pert[h], rep[h], gene_names=names)
        out.append(run_de(pb, meta, control, mode=mode, perturbations=want, genes=universe, n_jobs=n_jobs).lfc)
    return out


def score_perturbation_crossfit(
    emb: np.ndarray,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    de_folds: Sequence[pd.DataFrame],
    halves: Sequence[np.ndarray],
    *,
    variant: Variant = "shift",
    similarity: Similarity = "pearson",
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
    level: float = 0.95,
) -> PerturbationScore:
    """Cross-fitted RSA of one layer: DE of each half against centroids of the other half.

    Parameters
    ----------
    emb
        Embedding of the condition's cells, cells x dim.
    perturbation_labels
        Perturbation label per cell.
    control
        Control label.
    de_folds
        :func:`crossfit_de` on the same ``halves``.
    halves
        :func:`crossfit_halves` masks.
    variant, similarity, n_boot, n_perm, seed, level
        As in :func:`rsa_from_centroids`.

    Returns
    -------
    PerturbationScore
    """
    X = np.asarray(emb)
    lab = _labels(perturbation_labels, X.shape[0], "perturbation labels")
    if len(de_folds) != 2 * len(halves):
        msg = f"need two DE folds per split, got {len(de_folds)} for {len(halves)} splits; use crossfit_de on the same halves"
        raise InvalidInputError(msg)
    groups = [control, *{str(p) for d in de_folds for p in d.index}]
    cents = []
    for half in halves:
        cents.append(group_centroids(X[~half], lab[~half], groups=groups))  # pairs with DE of half A
        cents.append(group_centroids(X[half], lab[half], groups=groups))  # pairs with DE of half B
    return rsa_crossfit(cents, list(de_folds), control, variant=variant, similarity=similarity, n_boot=n_boot, n_perm=n_perm,
                        seed=seed, level=level)


def score_perturbation(
    emb: np.ndarray,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    de_lfc: pd.DataFrame,
    *,
    variant: Variant = "shift",
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
    level: float = 0.95,
    similarity: Similarity = "pearson",
) -> PerturbationScore:
    """RSA score of one layer's embedding in one condition (DE and embedding from the same cells).

    Parameters
    ----------
    emb
        Embedding of the condition's cells, cells x dim.
    perturbation_labels
        Perturbation label per cell (control included).
    control
        Control label (e.g. ``"NTC"``).
    de_lfc
        DE of each perturbation vs control in this condition (:class:`DEResult.lfc`).
    variant, n_boot, n_perm, seed, level, similarity
        As in :func:`rsa_from_centroids`.

    Returns
    -------
    PerturbationScore

    Raises
    ------
    EvaluationError
        Missing control label or fewer than 3 perturbations.

    Examples
    --------
    >>> de = de_fast(*pseudobulk(counts, pert, donor), "NTC")  # doctest: +SKIP
    >>> score_perturbation(layer_emb, pert, "NTC", de.lfc).score  # doctest: +SKIP
    """
    lab = _labels(perturbation_labels, np.asarray(emb).shape[0], "perturbation labels")
    if control not in set(lab.tolist()):
        raise _missing_control(control, lab)
    cents = group_centroids(emb, lab, groups=[control, *map(str, de_lfc.index)])
    return rsa_from_centroids(cents, control, de_lfc, variant=variant, similarity=similarity, n_boot=n_boot, n_perm=n_perm,
                              seed=seed, level=level)


def perturbation_paired_difference(
    score: PerturbationScore,
    other: PerturbationScore,
    *,
    level: float = 0.95,
) -> PairedDifference:
    """Paired bootstrap difference ``score - other`` (e.g. a layer vs the final layer).

    Parameters
    ----------
    score, other
        Scores from the same DE, perturbations, ``n_boot`` and seed (hence the same resamples).
    level
        Coverage of the interval.

    Returns
    -------
    PairedDifference

    Raises
    ------
    InvalidInputError
        If the two scores used different perturbations or bootstrap sizes.
    """
    if score.perturbations != other.perturbations or score.boot.shape != other.boot.shape:
        msg = "scores used different perturbations or bootstrap sizes; score both layers with the same DE, n_boot and seed"
        raise InvalidInputError(msg)
    return paired_difference(score.boot, other.boot, estimate=score.score - other.score, level=level)


def split_half_ceiling(
    counts: np.ndarray | sparse.spmatrix,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    replicate_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    *,
    perturbations: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
    mode: DEMode = "fast",
    n_splits: int = 5,
    seed: int = 0,
    similarity: Similarity = "pearson",
    n_jobs: int = 1,
) -> SplitHalfCeiling:
    """Split-half reliability of the DE similarity structure (a noise ceiling for RSA).

    Cells of every (perturbation, replicate) group are split at random into two halves; DE is
    computed on each half over one gene universe (genes expressed in all the condition's
    pseudobulks) and the RSA between the two halves' DE similarity matrices is reported.

    Parameters
    ----------
    counts
        Raw counts of one condition, cells x genes.
    perturbation_labels, replicate_labels
        Per-cell labels.
    control
        Control label.
    perturbations
        Perturbations to include (default: all with >=2 replicates in both halves).
    genes
        Gene universe (pass the columns of the condition's DE so both use the same genes);
        default: genes expressed in the condition's pseudobulks.
    gene_names
        Names of the count columns (needed with ``genes``).
    mode
        DE mode on the halves: pass the mode of the scores (``"pydeseq2"`` costs two fits per
        perturbation and split).
    similarity
        DE similarity, as used by the scores.
    n_jobs
        Parallel pydeseq2 fits.
    n_splits
        Number of random splits averaged.
    seed
        Seed of the splits.

    Returns
    -------
    SplitHalfCeiling

    Raises
    ------
    EvaluationError
        Missing control or fewer than 3 perturbations usable in both halves.
    """
    pert = _labels(perturbation_labels, None, "perturbation labels")
    rep = _labels(replicate_labels, pert.shape[0], "replicate labels")
    C = sparse.csr_matrix(counts)
    if C.shape[0] != pert.shape[0]:
        msg = f"counts have {C.shape[0]} cells but {pert.shape[0]} labels"
        raise InvalidInputError(msg)
    if control not in set(pert.tolist()):
        raise _missing_control(control, pert)
    names = [str(g) for g in gene_names] if gene_names is not None else [f"g{i}" for i in range(C.shape[1])]
    if genes is None:
        universe = expressed_genes(pseudobulk(C, pert, rep, gene_names=names)[0])
    elif gene_names is None:
        msg = "genes=... needs gene_names=... (the names of the count columns)"
        raise InvalidInputError(msg)
    else:
        universe = pd.Index([str(g) for g in genes])
    wanted = None if perturbations is None else {str(p) for p in perturbations}
    rng = np.random.default_rng(seed)
    groups = pd.Series(np.arange(pert.shape[0])).groupby([pert, rep]).indices
    values: list[float] = []
    k = 0
    for _ in range(n_splits):
        half = np.zeros(pert.shape[0], dtype=bool)
        for _key, ix in groups.items():
            ix = rng.permutation(ix)
            half[ix[: (len(ix) + int(rng.integers(0, 2))) // 2]] = True
        sims = []
        des = []
        for h in (half, ~half):
            pb, meta = pseudobulk(C[h], pert[h], rep[h], gene_names=names)
            nrep = meta.groupby("perturbation")["replicate"].nunique()
            des.append((pb, meta, nrep))
        ok = [p for p in des[0][2].index if p != control and all(d[2].get(p, 0) >= 2 for d in des)]
        if wanted is not None:
            ok = [p for p in ok if p in wanted]
        if len(ok) < 3:
            msg = f"only {len(ok)} perturbations have >=2 replicates in both halves; the split-half ceiling needs >=3"
            raise EvaluationError(msg)
        for pb, meta, _ in des:
            sims.append(de_similarity(run_de(pb, meta, control, mode=mode, perturbations=ok, genes=universe, n_jobs=n_jobs).lfc,
                                      method=similarity))
        mats, okf = _finite_folds([(sims[0], sims[1])], ok)
        values.append(rsa_folds(mats, n_boot=0, n_perm=0)[0])
        k = len(okf)
    r = float(np.nanmean(values))
    sb = float(2 * r / (1 + r)) if r > -1 else float("nan")
    return SplitHalfCeiling(rsa=r, spearman_brown=sb, values=tuple(float(v) for v in values), n_perturbations=k, mode=mode,
                            ceiling_full=float(np.sqrt(sb)) if sb > 0 else 0.0, ceiling_half=float(np.sqrt(r)) if r > 0 else 0.0,
                            similarity=similarity)


def ceiling_from_folds(de_folds: Sequence[pd.DataFrame], *, mode: str, similarity: Similarity = "pearson") -> SplitHalfCeiling:
    """Noise ceiling from the DE of the two halves of each cross-fitting split (no extra DE fits).

    ``de_folds`` is :func:`crossfit_de` output ``[DE(A_1), DE(B_1), DE(A_2), ...]``; the split-half
    reliability is the mean over splits of the RSA between ``DE(A_s)`` and ``DE(B_s)`` similarity
    matrices, exactly as :func:`split_half_ceiling` computes it on its own splits.

    Parameters
    ----------
    de_folds
        DE of both halves of every split, over one gene universe.
    mode
        DE mode the folds were computed with (recorded).
    similarity
        DE similarity of the scores.

    Returns
    -------
    SplitHalfCeiling
    """
    if len(de_folds) < 2 or len(de_folds) % 2:
        msg = f"need the DE of both halves of each split, got {len(de_folds)} folds"
        raise InvalidInputError(msg)
    values: list[float] = []
    k = 0
    for a, b in zip(de_folds[0::2], de_folds[1::2], strict=False):
        perts = [str(p) for p in a.index if p in set(map(str, b.index))]
        sa = de_similarity(a.set_axis([str(x) for x in a.index], axis=0).loc[perts], method=similarity)
        sb = de_similarity(b.set_axis([str(x) for x in b.index], axis=0).loc[perts], method=similarity)
        mats, okf = _finite_folds([(sa, sb)], perts)
        if len(okf) < 3:
            msg = f"only {len(okf)} perturbations have a defined DE similarity in both halves; the ceiling needs >=3"
            raise EvaluationError(msg)
        values.append(rsa_folds(mats, n_boot=0, n_perm=0)[0])
        k = len(okf)
    r = float(np.nanmean(values))
    sbv = float(2 * r / (1 + r)) if r > -1 else float("nan")
    return SplitHalfCeiling(rsa=r, spearman_brown=sbv, values=tuple(float(v) for v in values), n_perturbations=k, mode=mode,
                            ceiling_full=float(np.sqrt(sbv)) if sbv > 0 else 0.0, ceiling_half=float(np.sqrt(r)) if r > 0 else 0.0,
                            similarity=similarity)
