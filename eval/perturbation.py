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

from sclstore.eval.de import DEMode, _missing_control, expressed_genes, pseudobulk, run_de
from sclstore.eval.stats import (
    PairedDifference,
    bootstrap_rsa,
    cosine_similarity_matrix,
    de_similarity,
    finite_subset,
    mantel_test,
    paired_difference,
    percentile_ci,
    rsa_spearman,
)
from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "Variant",
    "VARIANTS",
    "PerturbationScore",
    "SplitHalfCeiling",
    "select_perturbations",
    "group_centroids",
    "embedding_vectors",
    "rsa_from_centroids",
    "score_perturbation",
    "perturbation_paired_difference",
    "split_half_ceiling",
]

logger = logging.getLogger(__name__)

Variant = Literal["shift", "centroid"]
VARIANTS: tuple[str, ...] = get_args(Variant)


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


@dataclass(frozen=True, kw_only=True)
class SplitHalfCeiling:
    """Reproducibility of the DE similarity structure between two halves of the cells.

    Read a layer's RSA against it: a score near the ceiling is as good as the DE noise allows.
    The layers embed the same cells the DE is computed from (the paper's leakage caveat), so
    shared sampling noise can let a layer's RSA exceed the half-data value.

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
    """

    rsa: float
    spearman_brown: float
    values: tuple[float, ...]
    n_perturbations: int
    mode: str


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
    n_boot: int = 1000,
    n_perm: int = 999,
    seed: int = 0,
    level: float = 0.95,
) -> PerturbationScore:
    """RSA score of one layer from per-group centroids (e.g. returned by a GROUP BY query).

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
    if variant not in VARIANTS:
        msg = f"unknown variant {variant!r}; pass one of {list(VARIANTS)}"
        raise InvalidInputError(msg)
    cents = {str(k): v for k, v in centroids.items()}
    if variant == "shift" and control not in cents:
        raise _missing_control(control, np.asarray(list(cents)))
    idx = [str(p) for p in de_lfc.index]
    perts = [p for p in idx if p in cents and p != control]
    if len(perts) < len(idx):
        logger.info("%d DE perturbations have no centroid and are skipped", len(idx) - len(perts))
    if len(perts) < 3:
        msg = f"RSA needs >=3 perturbations with both DE and embedding, got {len(perts)}; pass more perturbations (labels in DE: {idx[:5]})"
        raise EvaluationError(msg)
    S_de = de_similarity(de_lfc.set_axis(idx, axis=0).loc[perts])
    S_emb = cosine_similarity_matrix(embedding_vectors(cents, control, perts, variant=variant))
    S_de, S_emb, perts = finite_subset(S_de, S_emb, perts)
    if len(perts) < 3:
        msg = f"only {len(perts)} perturbations have a defined similarity; RSA needs >=3"
        raise EvaluationError(msg)
    score = rsa_spearman(S_de, S_emb)
    boot = bootstrap_rsa(S_de, S_emb, n_boot=n_boot, seed=seed) if n_boot > 0 else np.empty(0)
    lo, hi = percentile_ci(boot, level=level) if n_boot > 0 else (float("nan"), float("nan"))
    p = mantel_test(S_de, S_emb, n_perm=n_perm, seed=seed) if n_perm > 0 else float("nan")
    k = len(perts)
    return PerturbationScore(score=score, ci_low=lo, ci_high=hi, p_value=p, n_perturbations=k,
                             n_pairs=k * (k - 1) // 2, variant=variant, perturbations=tuple(perts), boot=boot)


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
) -> PerturbationScore:
    """RSA score of one layer's embedding in one condition.

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
    variant, n_boot, n_perm, seed, level
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
    return rsa_from_centroids(cents, control, de_lfc, variant=variant, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level)


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
        DE mode on the halves (``"fast"`` by default; ``"pydeseq2"`` costs two fits per
        perturbation and split).
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
            sims.append(de_similarity(run_de(pb, meta, control, mode=mode, perturbations=ok, genes=universe).lfc))
        S0, S1, okf = finite_subset(sims[0], sims[1], ok)
        values.append(rsa_spearman(S0, S1))
        k = len(okf)
    r = float(np.nanmean(values))
    return SplitHalfCeiling(rsa=r, spearman_brown=float(2 * r / (1 + r)) if r > -1 else float("nan"),
                            values=tuple(float(v) for v in values), n_perturbations=k, mode=mode)
