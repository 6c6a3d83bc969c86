"""Two registered tasks beyond the paper's: label-free ``diagnostics`` and ``celltype`` label probing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from sclstore.store.errors import EvaluationError, InvalidInputError

from .celltype import encode_labels, knn_predictions, logistic_predictions, probe_score
from .diagnostics import (
    anisotropy,
    cka_matrix,
    linear_cka,
    participation_ratio,
    subsample_rows,
    top_coordinate_share,
    twonn_dimension,
)
from .report import EvalReport
from .results import LayerScore, layer_table, summarize_layers
from .runner import _claimed_rows
from .tasks import Task, TaskConfig, TaskContext, register_task

__all__ = ["DIAGNOSTIC_METRICS", "CelltypeConfig", "CelltypeTask", "DiagnosticsConfig", "DiagnosticsTask"]

#: Metrics of the diagnostics task, in display order.
DIAGNOSTIC_METRICS: tuple[str, ...] = ("anisotropy", "top_coordinate_share", "participation_ratio", "twonn_dimension",
                                       "cka_final", "cka_previous")


# ----------------------------------------------------------------------------------- diagnostics
@dataclass(frozen=True, kw_only=True)
class DiagnosticsConfig(TaskConfig):
    """Parameters of the label-free diagnostics.

    Attributes
    ----------
    n_pairs
        Random cell pairs for the anisotropy.
    twonn_cells
        Cells (seeded subsample) for the TwoNN intrinsic dimension.
    cka_cells
        Cells (seeded subsample, the same for every layer) for CKA.
    cka_map
        Also compute the full layer x layer CKA map (holds every layer's subsample in memory).
    """

    n_pairs: int = 20_000
    twonn_cells: int = 5_000
    cka_cells: int = 10_000
    cka_map: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.n_pairs, self.twonn_cells, self.cka_cells) < 10:
            raise InvalidInputError("n_pairs, twonn_cells and cka_cells must each be >= 10")


class DiagnosticsTask(Task):
    """Anisotropy, top-coordinate variance share, participation ratio, TwoNN dimension, CKA vs final and previous layer."""

    name = "diagnostics"
    version = "1"
    title = "Label-free layer diagnostics"
    config_cls = DiagnosticsConfig

    def primary_metric(self, config: TaskConfig) -> str:
        return "cka_final"

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, DiagnosticsConfig)
        idx = subsample_rows(ctx.info.n_cells, config.cka_cells, config.seed)
        final = ctx.read_layer(ctx.info.layers[-1])[idx].astype(np.float64)
        return {"idx": idx, "final": final, "prev": None, "subs": {}}

    def worker_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def layer_input(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], layer: int) -> dict[str, Any]:
        assert isinstance(config, DiagnosticsConfig)
        X = ctx.read_layer(layer)
        sub = X[state["idx"]].astype(np.float64)
        data = {"X": X, "sub": sub, "prev": state["prev"], "final": state["final"]}
        state["prev"] = sub
        if config.cka_map:
            state["subs"][layer] = sub
        return data

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: dict[str, Any]) -> dict[str, float]:
        assert isinstance(config, DiagnosticsConfig)
        X = data["X"]
        nan = float("nan")
        if np.ptp(X, axis=0).max() == 0:
            out = dict.fromkeys(DIAGNOSTIC_METRICS, nan)
            out["anisotropy"] = anisotropy(X, n_pairs=config.n_pairs, seed=config.seed)
            return out
        with threadpool_limits(limits=1):
            try:
                twonn = twonn_dimension(X, max_cells=config.twonn_cells, seed=config.seed)
            except InvalidInputError:
                twonn = nan
            return {
                "anisotropy": anisotropy(X, n_pairs=config.n_pairs, seed=config.seed),
                "top_coordinate_share": top_coordinate_share(X),
                "participation_ratio": participation_ratio(X),
                "twonn_dimension": twonn,
                "cka_final": linear_cka(data["sub"], data["final"]),
                "cka_previous": linear_cka(data["sub"], data["prev"]) if data["prev"] is not None else nan,
            }

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        assert isinstance(config, DiagnosticsConfig)
        info = ctx.info
        rows = [LayerScore(layer=layer, depth=info.depth(layer), score=float(res[m]), pool=ctx.pool, metric=m, n=info.n_cells)
                for m in DIAGNOSTIC_METRICS for layer, res in results.items()]
        notes: dict[str, Any] = {"n_cells": info.n_cells, "cka_cells": int(state["idx"].size),
                                 "twonn_cells": int(min(info.n_cells, config.twonn_cells))}
        if config.cka_map:
            layers = sorted(state["subs"])
            notes["cka_map"] = {"layers": layers, "matrix": cka_matrix([state["subs"][la] for la in layers]).tolist()}
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=layer_table(rows),
                          summary=pd.DataFrame(), notes=notes)

    def plot(self, report: EvalReport, out_png: str | Path) -> Path:
        from .figures import plot_diagnostics

        return plot_diagnostics(report.table, out_png, title=report.figure_title())


# ----------------------------------------------------------------------------------- celltype
@dataclass(frozen=True, kw_only=True)
class CelltypeConfig(TaskConfig):
    """Parameters of the cell-type probe.

    Attributes
    ----------
    label_key
        obs column with the labels to probe.
    k
        Neighbours of the leave-one-out kNN probe.
    folds
        Stratified folds of the logistic-regression probe.
    n_boot
        Bootstrap resamples of the cells for the macro-F1 intervals and paired differences.
    knn_method
        ``auto`` (approximate neighbours above 8,192 cells), ``exact`` or ``approx``.
    """

    label_key: str
    k: int = 15
    folds: int = 5
    n_boot: int = 200
    knn_method: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or self.folds < 2 or self.n_boot < 0:
            raise InvalidInputError(f"need k >= 1, folds >= 2, n_boot >= 0 (got {self.k}, {self.folds}, {self.n_boot})")
        if self.knn_method not in ("auto", "exact", "approx"):
            raise InvalidInputError(f"unknown knn_method {self.knn_method!r}; pass auto, exact or approx")


CELLTYPE_METRICS = {"logreg_f1": "logistic-regression probe, macro-F1", "knn_f1": "kNN probe, macro-F1"}


class CelltypeTask(Task):
    """Per-layer label probing: leave-one-out kNN and cross-validated logistic regression, macro-F1 with intervals."""

    name = "celltype"
    version = "1"
    title = "Cell-type probing (macro-F1)"
    config_cls = CelltypeConfig

    def primary_metric(self, config: TaskConfig) -> str:
        return "logreg_f1"

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, CelltypeConfig)
        col = ctx.column(config.label_key, "label")
        codes, classes = encode_labels(col.astype(object).where(col.notna(), None).to_numpy(), min_per_class=config.folds)
        return {"codes": codes, "classes": [str(c) for c in classes]}

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: np.ndarray) -> Any:
        assert isinstance(config, CelltypeConfig)
        codes = state["codes"]
        if np.ptp(data, axis=0).max() == 0:
            return "the embedding is the same for every cell (e.g. cls at the input layer)"
        X = np.asarray(data, dtype=np.float64)
        with threadpool_limits(limits=1):
            knn = knn_predictions(X, codes, k=min(config.k, X.shape[0] - 1), method=config.knn_method, seed=config.seed)
            lr = logistic_predictions(X, codes, folds=config.folds, seed=config.seed)
        return {"knn_f1": (probe_score(codes, knn, n_boot=config.n_boot, seed=config.seed)),
                "logreg_f1": (probe_score(codes, lr, n_boot=config.n_boot, seed=config.seed))}

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        assert isinstance(config, CelltypeConfig)
        info = ctx.info
        rows: list[LayerScore] = []
        summary: list[dict[str, Any]] = []
        notes: dict[str, Any] = {"n_cells": info.n_cells, "classes": state["classes"],
                                 "interval": "bootstrap over cells of out-of-fold predictions"}
        undefined = {str(la): r for la, r in results.items() if isinstance(r, str)}
        accuracy: dict[str, dict[str, float]] = {m: {} for m in CELLTYPE_METRICS}
        ok = [la for la, r in results.items() if not isinstance(r, str)]
        for metric in CELLTYPE_METRICS:
            rows += [LayerScore(layer=la, depth=info.depth(la), score=float("nan"), pool=ctx.pool, metric=metric, n=0)
                     for la in results if str(la) in undefined]
            grp = []
            for la in ok:
                sc = results[la][metric]
                accuracy[metric][str(la)] = sc.accuracy
                grp.append(LayerScore(layer=la, depth=info.depth(la), score=sc.macro_f1, ci_low=sc.ci_low, ci_high=sc.ci_high,
                                      pool=ctx.pool, metric=metric, n=sc.n_cells))
            if grp and config.n_boot >= 3 and ok[-1] == info.layers[-1]:  # claims from the paired bootstrap (same cells resampled)
                est = np.array([results[la][metric].macro_f1 for la in ok])
                R = np.vstack([results[la][metric].boot for la in ok])
                grp = _claimed_rows(grp, est, R, info, ok, scale=1.0, metric=metric, seed=config.seed, summary=summary, notes=notes,
                                    pool=ctx.pool)
            rows += grp
        notes.update({"accuracy": accuracy, "undefined_layers": undefined})
        table = layer_table(rows)
        if not np.isfinite(table["score"].astype(float)).any():
            raise EvaluationError("no layer could be probed: " + "; ".join(f"layer {k}: {v}" for k, v in undefined.items()))
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=table,
                          summary=pd.DataFrame(summary) if summary else summarize_layers(table), notes=notes)


    def plot(self, report: EvalReport, out_png: str | Path) -> Path:
        from .plot import plot_layer_scores

        return plot_layer_scores(report.metric_table(), out_png, title=report.figure_title(),
                                 ylabel="macro-F1, logistic-regression probe (5-fold CV)")


register_task(DiagnosticsTask())
register_task(CelltypeTask())
