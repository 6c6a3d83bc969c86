"""The paper protocol's DE: scanpy's Wilcoxon ``rank_genes_groups`` log fold changes on single cells.

The authors' code (``vincenzocivale/scfm-mid-layer-analysis``,
``src/scfm_eval/benchmarks/perturbation/reference.py``; ``research/data_eval.md`` §2.3) builds
each perturbation's DE profile as: ``normalize_total(target_sum=1e4)`` and ``log1p`` per cell,
``sc.tl.rank_genes_groups(groupby=perturbation, groups=perturbations, reference=control,
method="wilcoxon", use_raw=False, n_genes=all)``, then the ``logfoldchanges`` of every gene
(missing values filled with 0). scanpy's log fold change is
``log2((expm1(mean log1p in group) + 1e-9) / (expm1(mean log1p in control) + 1e-9))``.
Unlike the pseudobulk modes it needs no replicates; its p-values treat cells as independent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from sclstore.store.errors import EvaluationError, InvalidInputError

from .de import DEResult, _missing_control

__all__ = ["de_wilcoxon"]


def de_wilcoxon(
    counts: np.ndarray | sparse.spmatrix,
    perturbation_labels: Sequence[str] | np.ndarray | pd.Series,
    control: str,
    *,
    perturbations: Sequence[str] | None = None,
    gene_names: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
) -> DEResult:
    """Per-cell Wilcoxon DE of each perturbation against control, as the paper's code computes it.

    Parameters
    ----------
    counts
        Raw counts of one condition, cells x genes.
    perturbation_labels
        Perturbation (or control) label per cell.
    control
        Control label.
    perturbations
        Perturbations to contrast (default: every other label).
    gene_names
        Names of the count columns (default ``g0, g1, ...``).
    genes
        Gene universe of the output columns (default: all genes, as the paper's code).

    Returns
    -------
    DEResult
        ``mode="wilcoxon"``; ``lfc`` is perturbations x genes.

    Raises
    ------
    EvaluationError
        Missing control or no perturbation to contrast.
    InvalidInputError
        Shapes disagree or the counts are negative.
    """
    import anndata as ad
    import scanpy as sc

    C = sparse.csr_matrix(counts, dtype=np.float32)
    lab = np.asarray(perturbation_labels).astype(str)
    if lab.shape[0] != C.shape[0]:
        raise InvalidInputError(f"counts have {C.shape[0]} cells but {lab.shape[0]} perturbation labels")
    if C.nnz and C.data.min() < 0:
        raise InvalidInputError("counts hold negative values; pass raw counts (adata.raw.X or the counts layer)")
    names = [str(g) for g in gene_names] if gene_names is not None else [f"g{i}" for i in range(C.shape[1])]
    if control not in set(lab.tolist()):
        raise _missing_control(control, lab)
    perts = sorted({p for p in lab.tolist() if p != control}) if perturbations is None else \
        [str(p) for p in perturbations if str(p) != control]
    missing = sorted(set(perts) - set(lab.tolist()))
    if missing:
        raise EvaluationError(f"perturbations {missing[:5]} have no cells; pass labels of this condition")
    if not perts:
        raise EvaluationError("no perturbation besides the control; pass data with perturbed cells")
    keep = np.isin(lab, [*perts, control])
    a = ad.AnnData(C[keep], obs=pd.DataFrame({"p": pd.Categorical(lab[keep])}, index=[str(i) for i in range(int(keep.sum()))]),
                   var=pd.DataFrame(index=names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.tl.rank_genes_groups(a, groupby="p", groups=perts, reference=control, method="wilcoxon", use_raw=False,
                                n_genes=a.n_vars)
    res = a.uns["rank_genes_groups"]
    rows = {p: pd.Series(np.asarray(res["logfoldchanges"][p], dtype=float), index=np.asarray(res["names"][p]).astype(str))
            for p in perts}
    universe = pd.Index(names) if genes is None else pd.Index([str(g) for g in genes])
    lfc = pd.DataFrame({p: s.reindex(universe) for p, s in rows.items()}).T.fillna(0.0)
    lfc.index.name, lfc.columns.name = "perturbation", "gene"
    return DEResult(lfc=lfc.loc[perts], mode="wilcoxon", control=control)
