"""Pseudobulk differential expression of each perturbation against control.

Two modes, both returning a perturbations x genes matrix of log2 fold changes over one fixed
gene universe (genes expressed in the condition; never zero-filled):

* ``"pydeseq2"`` (paper-faithful): per perturbation, pydeseq2 on the pseudobulks of that
  perturbation and of the control, ``design="~replicate + condition"``, explicit contrast
  ``["condition", perturbation, control]``; perturbations can run in parallel processes.
* ``"fast"``: median-of-ratios size factors, then
  ``log2((mean normalised counts in perturbation + 1) / (mean normalised counts in control + 1))``
  (r≈0.96–0.98 against pydeseq2; milliseconds).

See ``research/data_eval.md`` §2.2 for the pydeseq2 0.5 API and its cost (7–35 s per fit).
"""

from __future__ import annotations

import difflib
import logging
import time as _time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import pandas as pd
from scipy import sparse

from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "DE_MODES",
    "DEMode",
    "DEResult",
    "de_fast",
    "de_pydeseq2",
    "expressed_genes",
    "median_of_ratios",
    "pseudobulk",
    "pydeseq2_inputs",
    "run_de",
]

logger = logging.getLogger(__name__)

DEMode = Literal["pydeseq2", "fast", "wilcoxon"]  # wilcoxon: per cell (the paper's code), :mod:`.de_wilcoxon`
DE_MODES: tuple[str, ...] = get_args(DEMode)

_SEP = "|"


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class DEResult:
    """Log2 fold changes of each perturbation against control.

    Attributes
    ----------
    lfc
        DataFrame perturbations x genes of log2 fold changes.
    mode
        ``"pydeseq2"`` or ``"fast"``.
    control
        The control label.
    padj
        Adjusted p-values (pydeseq2 only), same shape as ``lfc``.
    """

    lfc: pd.DataFrame = field(repr=False)
    mode: str
    control: str
    padj: pd.DataFrame | None = field(default=None, repr=False)


def pseudobulk(
    counts: np.ndarray | sparse.spmatrix,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    replicate_labels: Sequence[str] | np.ndarray | pd.Series,
    *,
    gene_names: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sum raw counts per (perturbation, replicate).

    Parameters
    ----------
    counts
        Raw counts, cells x genes (dense or sparse).
    perturbation_labels
        Perturbation (or control) label per cell.
    replicate_labels
        Replicate (donor) label per cell.
    gene_names
        Gene names (columns); default ``g0, g1, ...``.

    Returns
    -------
    tuple of pandas.DataFrame
        ``(counts, meta)``: counts is samples x genes (int64), indexed ``"pert|replicate"``;
        meta has columns ``perturbation``, ``replicate``, ``n_cells`` with the same index.

    Raises
    ------
    InvalidInputError
        If the lengths disagree or the counts are negative or not integers.
    """
    C = sparse.csr_matrix(counts)
    n, g = C.shape
    pert = np.asarray(perturbation_labels).astype(str)
    rep = np.asarray(replicate_labels).astype(str)
    if pert.shape[0] != n or rep.shape[0] != n:
        msg = f"counts have {n} cells but {pert.shape[0]} perturbation and {rep.shape[0]} replicate labels"
        raise InvalidInputError(msg)
    if C.nnz and (C.data.min() < 0 or not np.allclose(C.data, np.round(C.data))):
        msg = "pseudobulk needs raw integer counts; pass adata.raw.X or the counts layer, not normalised values"
        raise InvalidInputError(msg)
    names = list(gene_names) if gene_names is not None else [f"g{i}" for i in range(g)]
    if len(names) != g:
        msg = f"{len(names)} gene names for {g} genes"
        raise InvalidInputError(msg)
    key = pd.Series(pert, dtype=object) + _SEP + pd.Series(rep, dtype=object)
    codes, uniq = pd.factorize(key, sort=True)
    ind = sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(len(uniq), n))
    summed = np.asarray((ind @ C).todense()).round().astype(np.int64)
    index = pd.Index(uniq, name="sample")
    out = pd.DataFrame(summed, index=index, columns=pd.Index(names, name="gene"))
    parts = [u.rsplit(_SEP, 1) for u in uniq]
    meta = pd.DataFrame(
        {
            "perturbation": [p for p, _ in parts],
            "replicate": [r for _, r in parts],
            "n_cells": np.bincount(codes, minlength=len(uniq)),
        },
        index=index,
    )
    return out, meta


def expressed_genes(pb_counts: pd.DataFrame, *, min_counts: int = 10, min_samples: int = 2) -> pd.Index:
    """Genes with at least ``min_counts`` counts in at least ``min_samples`` pseudobulk samples.

    Use it on all pseudobulks of one condition to fix the gene universe of every contrast.

    Parameters
    ----------
    pb_counts
        Pseudobulk counts, samples x genes.
    min_counts, min_samples
        Expression thresholds.

    Returns
    -------
    pandas.Index
        The kept gene names, in their original order.
    """
    ok = (pb_counts.to_numpy() >= min_counts).sum(axis=0) >= min_samples
    return pb_counts.columns[ok]


def median_of_ratios(pb_counts: np.ndarray) -> np.ndarray:
    """DESeq2 median-of-ratios size factors (samples in rows).

    Genes with a zero in any sample are excluded from the geometric means; if none is left, the
    geometric mean over positive counts is used (``poscounts``).

    Parameters
    ----------
    pb_counts
        Counts, samples x genes.

    Returns
    -------
    numpy.ndarray
        One size factor per sample.
    """
    c = np.asarray(pb_counts, dtype=float)
    with np.errstate(divide="ignore"):
        logc = np.log(c)
    allpos = np.isfinite(logc).all(axis=0)
    if allpos.sum() > 0:
        logmean = logc[:, allpos].mean(axis=0)
        ratios = logc[:, allpos] - logmean
        sf = np.exp(np.median(ratios, axis=1))
    else:  # poscounts
        lpos = np.where(c > 0, logc, 0.0)
        logmean = lpos.sum(axis=0) / c.shape[0]
        use = (c > 0).any(axis=0)
        ratios = np.where(c[:, use] > 0, logc[:, use] - logmean[use], np.nan)
        sf = np.exp(np.nanmedian(ratios, axis=1))
        sf = sf / np.exp(np.mean(np.log(sf)))
    return sf


def _missing_control(control: str, labels: np.ndarray, weights: np.ndarray | None = None) -> EvaluationError:
    """One-line error naming the existing labels (largest group first) and a close match."""
    uniq, inv = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    counts = np.bincount(inv, weights=weights)
    order = [str(u) for u in uniq[np.argsort(-counts, kind="stable")]]  # the control is usually the largest group
    shown = ", ".join(repr(u) for u in order[:10]) + (" ..." if len(order) > 10 else "")
    lower = {o.lower(): o for o in reversed(order)}
    close = difflib.get_close_matches(control.lower(), list(lower), n=1)
    hint = f" (did you mean {lower[close[0]]!r}?)" if close else ""
    return EvaluationError(
        f"control label {control!r} not found among {len(order)} labels (largest first: {shown}){hint}; pass control=<one of them>"
    )


def _contrasts(
    pb_meta: pd.DataFrame,
    control: str,
    perturbations: Sequence[str] | None,
) -> list[str]:
    have = pb_meta["perturbation"].astype(str)
    if control not in set(have):
        weights = pb_meta["n_cells"].to_numpy(dtype=float) if "n_cells" in pb_meta else None
        raise _missing_control(control, have.to_numpy(), weights)
    nrep_c = pb_meta.loc[have == control, "replicate"].nunique()
    if nrep_c < 2:
        msg = f"control {control!r} has {nrep_c} replicate; DE needs >=2 per group: pass a replicate key with >=2 values (or pseudo-replicates)"
        raise EvaluationError(msg)
    perts = [p for p in dict.fromkeys(have) if p != control] if perturbations is None else [str(p) for p in perturbations]
    present = set(have)
    missing = [p for p in perts if p not in present]
    if missing:
        msg = f"perturbations {missing[:5]} have no pseudobulk samples; pass labels from {sorted(present)[:10]}"
        raise EvaluationError(msg)
    n_reps = pb_meta.groupby(have.to_numpy())["replicate"].nunique()  # one pass, not one scan per perturbation
    few = [p for p in perts if n_reps[p] < 2]
    if few:
        msg = f"perturbations {few[:5]} have fewer than 2 replicates; DE needs >=2 per group: drop them (select_perturbations does) or add replicates"
        raise EvaluationError(msg)
    if not perts:
        msg = "no perturbation besides the control; pass data with perturbed cells"
        raise EvaluationError(msg)
    return perts


def _genes(pb_counts: pd.DataFrame, genes: Sequence[str] | None) -> pd.Index:
    if genes is None:
        return expressed_genes(pb_counts)
    g = pd.Index([str(x) for x in genes])
    missing = g.difference(pb_counts.columns)
    if len(missing):
        msg = f"{len(missing)} genes of the universe are not in the counts (e.g. {list(missing[:3])}); pass genes from the counts' columns"
        raise InvalidInputError(msg)
    return g


def de_fast(
    pb_counts: pd.DataFrame,
    pb_meta: pd.DataFrame,
    control: str,
    *,
    perturbations: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
) -> DEResult:
    """Fast DE: median-of-ratios normalisation and the log2 ratio of mean normalised counts.

    Size factors are computed per contrast on the samples of that perturbation and of the
    control (as a per-perturbation pydeseq2 fit does), over the gene universe.

    Parameters
    ----------
    pb_counts, pb_meta
        Output of :func:`pseudobulk` (one condition).
    control
        Control label.
    perturbations
        Perturbations to contrast; default every non-control label.
    genes
        Gene universe; default :func:`expressed_genes` of all samples.

    Returns
    -------
    DEResult
        ``mode="fast"``, no adjusted p-values.

    Raises
    ------
    EvaluationError
        Missing control, unknown perturbations, or fewer than 2 replicates in a group.
    """
    perts = _contrasts(pb_meta, control, perturbations)
    g = _genes(pb_counts, genes)
    X = pb_counts.loc[:, g].to_numpy(dtype=float)
    lab = pb_meta["perturbation"].astype(str).to_numpy()
    cmask = lab == control
    out = np.empty((len(perts), len(g)))
    for i, p in enumerate(perts):
        pmask = lab == p
        sub = X[pmask | cmask]
        sf = median_of_ratios(sub)
        norm = sub / sf[:, None]
        is_p = pmask[pmask | cmask]
        out[i] = np.log2((norm[is_p].mean(axis=0) + 1.0) / (norm[~is_p].mean(axis=0) + 1.0))
    lfc = pd.DataFrame(out, index=pd.Index(perts, name="perturbation"), columns=pd.Index(g, name="gene"))
    return DEResult(lfc=lfc, mode="fast", control=control)


def _pydeseq2_one(
    counts: pd.DataFrame,
    meta: pd.DataFrame,
    pert: str,
    control: str,
    n_cpus: int,
) -> tuple[str, np.ndarray, np.ndarray]:
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    inference = DefaultInference(n_cpus=n_cpus)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        dds = DeseqDataSet(counts=counts, metadata=meta, design="~replicate + condition", inference=inference, quiet=True)
        dds.deseq2()
        st = DeseqStats(dds, contrast=["condition", pert, control], inference=inference, quiet=True)
        st.summary()
    for msg in dict.fromkeys(str(w.message) for w in caught):
        logger.info("pydeseq2 (%s vs %s): %s", pert, control, msg)
    res = st.results_df
    return pert, res["log2FoldChange"].to_numpy(dtype=float), res["padj"].to_numpy(dtype=float)


def pydeseq2_inputs(
    pb_counts: pd.DataFrame,
    pb_meta: pd.DataFrame,
    perturbation: str,
    control: str,
    genes: pd.Index,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The exact ``counts`` and ``metadata`` frames one pydeseq2 contrast is fitted on.

    Parameters
    ----------
    pb_counts, pb_meta
        Output of :func:`pseudobulk`.
    perturbation, control
        The two groups.
    genes
        Gene universe.

    Returns
    -------
    tuple of pandas.DataFrame
        ``counts`` (samples x genes, int) and ``metadata`` with columns ``replicate`` and
        ``condition`` (values ``perturbation`` / ``control``).
    """
    lab = pb_meta["perturbation"].astype(str)
    m = (lab == perturbation) | (lab == control)
    counts = pb_counts.loc[m, genes].astype(np.int64)
    meta = pd.DataFrame(
        {"replicate": pb_meta.loc[m, "replicate"].astype(str).to_numpy(), "condition": lab[m].to_numpy()},
        index=counts.index,
    )
    return counts, meta


def de_pydeseq2(
    pb_counts: pd.DataFrame,
    pb_meta: pd.DataFrame,
    control: str,
    *,
    perturbations: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_jobs: int = 1,
    n_cpus: int = 1,
) -> DEResult:
    """Paper-faithful DE with pydeseq2, one fit per perturbation against the control.

    Each fit uses the pseudobulks of the perturbation and of the control only, the design
    ``~replicate + condition`` and the contrast ``["condition", perturbation, control]``
    (:func:`pydeseq2_inputs` returns the exact frames).

    Parameters
    ----------
    pb_counts, pb_meta
        Output of :func:`pseudobulk` (one condition).
    control
        Control label.
    perturbations
        Perturbations to contrast; default every non-control label.
    genes
        Gene universe; default :func:`expressed_genes` of all samples.
    n_jobs
        Perturbations fitted in parallel processes (joblib/loky).
    n_cpus
        Threads/processes pydeseq2 uses inside one fit.

    Returns
    -------
    DEResult
        ``mode="pydeseq2"`` with ``log2FoldChange`` in ``lfc`` and ``padj``.

    Raises
    ------
    EvaluationError
        Missing control, unknown perturbations, or fewer than 2 replicates in a group.
    """
    perts = _contrasts(pb_meta, control, perturbations)
    g = _genes(pb_counts, genes)
    jobs = [(*pydeseq2_inputs(pb_counts, pb_meta, p, control, g), p, control, n_cpus) for p in perts]
    t0 = _time.perf_counter()
    if n_jobs > 1 and len(jobs) > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=min(n_jobs, len(jobs)), backend="loky")(delayed(_pydeseq2_one)(*j) for j in jobs)
    else:
        results = [_pydeseq2_one(*j) for j in jobs]
    logger.info("pydeseq2: %d contrasts x %d genes in %.1fs", len(perts), len(g), _time.perf_counter() - t0)
    by = {p: (lfc, padj) for p, lfc, padj in results}
    idx = pd.Index(perts, name="perturbation")
    cols = pd.Index(g, name="gene")
    lfc = pd.DataFrame(np.vstack([by[p][0] for p in perts]), index=idx, columns=cols)
    padj = pd.DataFrame(np.vstack([by[p][1] for p in perts]), index=idx, columns=cols)
    return DEResult(lfc=lfc, mode="pydeseq2", control=control, padj=padj)


def run_de(
    pb_counts: pd.DataFrame,
    pb_meta: pd.DataFrame,
    control: str,
    *,
    mode: DEMode = "pydeseq2",
    perturbations: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_jobs: int = 1,
) -> DEResult:
    """Dispatch to :func:`de_pydeseq2` or :func:`de_fast` by ``mode``.

    Parameters
    ----------
    pb_counts, pb_meta, control, perturbations, genes, n_jobs
        As in :func:`de_pydeseq2`.
    mode
        ``"pydeseq2"`` or ``"fast"`` (``"wilcoxon"`` needs cells: :func:`~sclstore.eval.de_wilcoxon.de_wilcoxon`).

    Returns
    -------
    DEResult

    Raises
    ------
    InvalidInputError
        Unknown mode, or ``"wilcoxon"``.
    """
    if mode not in DE_MODES:
        msg = f"unknown DE mode {mode!r}; pass one of {list(DE_MODES)}"
        raise InvalidInputError(msg)
    if mode == "fast":
        return de_fast(pb_counts, pb_meta, control, perturbations=perturbations, genes=genes)
    if mode == "wilcoxon":
        msg = "wilcoxon DE works on single cells, not pseudobulks: call sclstore.eval.de_wilcoxon.de_wilcoxon on the counts"
        raise InvalidInputError(msg)
    return de_pydeseq2(pb_counts, pb_meta, control, perturbations=perturbations, genes=genes, n_jobs=n_jobs)
