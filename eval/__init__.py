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

from sclstore.eval.celltype import ProbeScore, knn_predictions, logistic_predictions, macro_f1, nearest_neighbors, probe_score
from sclstore.eval.diagnostics import (
    anisotropy,
    cka_matrix,
    linear_cka,
    participation_ratio,
    participation_ratio_from_spectrum,
    top_coordinate_share,
    twonn_dimension,
)
from sclstore.eval.tasks import Task, TaskConfig, config_params, get_task, register_task, task_names

__all__ = [
    # tasks
    "Task", "TaskConfig", "config_params", "get_task", "register_task", "task_names",
    # diagnostics and label probes
    "anisotropy", "top_coordinate_share", "participation_ratio", "participation_ratio_from_spectrum", "twonn_dimension",
    "linear_cka", "cka_matrix", "ProbeScore", "nearest_neighbors", "knn_predictions", "logistic_predictions", "macro_f1",
    "probe_score",
    # claims (shared by every task)
    "Claim", "layer_claims", "simultaneous_critical_value", "apply_claim", "claim_summary_row",
    # trajectory, several layers on one common cell set
    "GraphOptions", "LayerPseudotimes", "TrajectoryLayers", "layer_pseudotimes", "combine_layer_pseudotimes",
    "score_trajectory_layers", "earliest_roots", "standardize_columns",
    # cross-fitted RSA and calibrated intervals
    "Similarity", "crossfit_halves", "crossfit_de", "rsa_crossfit", "score_perturbation_crossfit", "rsa_folds",
    "ceiling_from_folds",
    "calibrated_interval", "subsample_scale",
    # trajectory
    "ROOT_RULES", "RootRule", "DPTResult", "ReferencePseudotime", "TrajectoryScore", "SubsampleScores", "as_time",
    "dpt_pseudotime", "reference_pseudotime", "score_trajectory", "paired_subsample_scores",
    "trajectory_paired_difference",
    # DE
    "DE_MODES", "DEMode", "DEResult", "pseudobulk", "expressed_genes", "median_of_ratios",
    "de_fast", "de_pydeseq2", "pydeseq2_inputs", "run_de",
    # perturbation
    "VARIANTS", "Variant", "PerturbationScore", "SplitHalfCeiling", "select_perturbations",
    "group_centroids", "embedding_vectors", "cosine_similarity_matrix", "de_similarity",
    "rsa_from_centroids", "score_perturbation", "perturbation_paired_difference",
    "split_half_ceiling",
    # stats
    "PairedDifference", "percentile_ci", "paired_difference", "upper_triangle", "rsa_spearman",
    "mantel_test", "bootstrap_rsa",
    # results and plot
    "BASELINE_LAYER", "TABLE_COLUMNS", "LayerScore", "LayerSummary", "layer_depth", "layer_table",
    "summarize_layers", "plot_layer_scores",
    # simulators
    "CONTROL_LABEL", "PERTURBSEQ_CONDITIONS", "default_gene_names", "simulate_trajectory",
    "simulate_perturbseq", "simulate_layers", "log_pca",
]
