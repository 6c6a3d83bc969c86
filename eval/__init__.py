"""Per-layer evaluation metrics (pure functions: arrays in, numbers out; no store access).

* :mod:`~sclstore.eval.dpt` and :mod:`~sclstore.eval.trajectory`: kNN -> diffusion map -> DPT
  -> Spearman per representation, with subsampling intervals and paired differences.
* :mod:`~sclstore.eval.de` and :mod:`~sclstore.eval.perturbation`: pseudobulk DE (pydeseq2 or
  fast) and RSA between DE similarity and embedding-shift similarity, with Mantel p-values,
  perturbation bootstrap and a split-half DE ceiling.
* :mod:`~sclstore.eval.diagnostics` (label-free layer geometry, CKA) and
  :mod:`~sclstore.eval.celltype` (kNN and logistic-regression label probes, macro-F1).
* :mod:`~sclstore.eval.tasks`: the task registry (frozen configs = cache keys) run by
  :func:`sclstore.eval.runner.run_task`.
* :mod:`~sclstore.eval.claims`: what a per-layer result may claim (best-layer set, win
  frequencies, max-statistic gain vs final), shared by every task;
* :mod:`~sclstore.eval.stats`: resampling helpers; :mod:`~sclstore.eval.results`: per-layer
  tables; :mod:`~sclstore.eval.plot`: the score-vs-depth figure;
  :mod:`~sclstore.eval.simulate`: seeded simulators with a known answer.

Lifecycle: experimental.
"""

from __future__ import annotations

from sclstore.eval.celltype import ProbeScore, knn_predictions, logistic_predictions, macro_f1, nearest_neighbors, probe_score
from sclstore.eval.claims import Claim, layer_claims, simultaneous_critical_value
from sclstore.eval.de import (
    DE_MODES,
    DEMode,
    DEResult,
    de_fast,
    de_pydeseq2,
    expressed_genes,
    median_of_ratios,
    pseudobulk,
    pydeseq2_inputs,
    run_de,
)
from sclstore.eval.de_wilcoxon import de_wilcoxon
from sclstore.eval.diagnostics import (
    anisotropy,
    cka_matrix,
    linear_cka,
    participation_ratio,
    participation_ratio_from_spectrum,
    top_coordinate_share,
    twonn_dimension,
)
from sclstore.eval.dpt import (
    ROOT_RULES,
    DPTResult,
    ReferencePseudotime,
    RootRule,
    as_time,
    dpt_pseudotime,
    reference_pseudotime,
    standardize_columns,
)
from sclstore.eval.perturbation import (
    VARIANTS,
    PerturbationScore,
    Similarity,
    SplitHalfCeiling,
    Variant,
    ceiling_from_folds,
    crossfit_de,
    crossfit_halves,
    embedding_vectors,
    group_centroids,
    perturbation_paired_difference,
    rsa_crossfit,
    rsa_from_centroids,
    score_perturbation,
    score_perturbation_crossfit,
    select_perturbations,
    split_half_ceiling,
)
from sclstore.eval.plot import plot_layer_scores
from sclstore.eval.results import (
    BASELINE_LAYER,
    TABLE_COLUMNS,
    LayerScore,
    LayerSummary,
    apply_claim,
    claim_summary_row,
    layer_depth,
    layer_table,
    summarize_layers,
)
from sclstore.eval.simulate import (
    CONTROL_LABEL,
    PERTURBSEQ_CONDITIONS,
    default_gene_names,
    log_pca,
    simulate_layers,
    simulate_perturbseq,
    simulate_trajectory,
)
from sclstore.eval.stats import (
    PairedDifference,
    bootstrap_rsa,
    calibrated_interval,
    cosine_similarity_matrix,
    de_similarity,
    mantel_test,
    paired_difference,
    percentile_ci,
    rsa_folds,
    rsa_spearman,
    subsample_scale,
    upper_triangle,
)
from sclstore.eval.tasks import Task, TaskConfig, config_params, get_task, register_task, task_names
from sclstore.eval.trajectory import (
    GraphOptions,
    LayerPseudotimes,
    SubsampleScores,
    TrajectoryLayers,
    TrajectoryScore,
    combine_layer_pseudotimes,
    earliest_roots,
    layer_pseudotimes,
    paired_subsample_scores,
    score_trajectory,
    score_trajectory_layers,
    trajectory_paired_difference,
)

__all__ = [
    # results and plot
    "BASELINE_LAYER",
    # simulators
    "CONTROL_LABEL",
    # DE
    "DE_MODES",
    "PERTURBSEQ_CONDITIONS",
    # trajectory
    "ROOT_RULES",
    "TABLE_COLUMNS",
    # perturbation
    "VARIANTS",
    # claims (shared by every task)
    "Claim",
    "DEMode",
    "DEResult",
    "DPTResult",
    # trajectory, several layers on one common cell set
    "GraphOptions",
    "LayerPseudotimes",
    "LayerScore",
    "LayerSummary",
    # stats
    "PairedDifference",
    "PerturbationScore",
    "ProbeScore",
    "ReferencePseudotime",
    "RootRule",
    # cross-fitted RSA and calibrated intervals
    "Similarity",
    "SplitHalfCeiling",
    "SubsampleScores",
    # tasks
    "Task",
    "TaskConfig",
    "TrajectoryLayers",
    "TrajectoryScore",
    "Variant",
    # diagnostics and label probes
    "anisotropy",
    "apply_claim",
    "as_time",
    "bootstrap_rsa",
    "calibrated_interval",
    "ceiling_from_folds",
    "cka_matrix",
    "claim_summary_row",
    "combine_layer_pseudotimes",
    "config_params",
    "cosine_similarity_matrix",
    "crossfit_de",
    "crossfit_halves",
    "de_fast",
    "de_pydeseq2",
    "de_similarity",
    "de_wilcoxon",
    "default_gene_names",
    "dpt_pseudotime",
    "earliest_roots",
    "embedding_vectors",
    "expressed_genes",
    "get_task",
    "group_centroids",
    "knn_predictions",
    "layer_claims",
    "layer_depth",
    "layer_pseudotimes",
    "layer_table",
    "linear_cka",
    "log_pca",
    "logistic_predictions",
    "macro_f1",
    "mantel_test",
    "median_of_ratios",
    "nearest_neighbors",
    "paired_difference",
    "paired_subsample_scores",
    "participation_ratio",
    "participation_ratio_from_spectrum",
    "percentile_ci",
    "perturbation_paired_difference",
    "plot_layer_scores",
    "probe_score",
    "pseudobulk",
    "pydeseq2_inputs",
    "reference_pseudotime",
    "register_task",
    "rsa_crossfit",
    "rsa_folds",
    "rsa_from_centroids",
    "rsa_spearman",
    "run_de",
    "score_perturbation",
    "score_perturbation_crossfit",
    "score_trajectory",
    "score_trajectory_layers",
    "select_perturbations",
    "simulate_layers",
    "simulate_perturbseq",
    "simulate_trajectory",
    "simultaneous_critical_value",
    "split_half_ceiling",
    "standardize_columns",
    "subsample_scale",
    "summarize_layers",
    "task_names",
    "top_coordinate_share",
    "trajectory_paired_difference",
    "twonn_dimension",
    "upper_triangle",
]
