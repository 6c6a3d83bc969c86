"""The trajectory task: kNN -> diffusion map -> DPT -> Spearman per stored layer (a registered Task)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sclstore.store.errors import EvaluationError, InvalidInputError
from threadpoolctl import threadpool_limits

from .report import EvalReport
from .results import BASELINE_LAYER, LayerScore, layer_table, summarize_layers
from .runner import _cached_intermediate, _counts, _finite
from .tasks import Task, TaskConfig, TaskContext, register_task
from .trajectory import (
    as_time,
    reference_pseudotime,
    score_trajectory,
    trajectory_paired_difference,
)

__all__ = ["TrajectoryConfig", "TrajectoryTask"]


@dataclass(frozen=True, kw_only=True)
class TrajectoryConfig(TaskConfig):
    """Parameters of the trajectory evaluation (every field except ``n_jobs``/``progress`` is in the cache key).

    Attributes
    ----------
    pseudotime_key
        obs column with the ground-truth time.
    root_cell
        Root cell name (default: the diffusion-extreme earliest cell).
    n_subsamples
        Subsamples for the intervals and the paired differences.
    n_neighbors
        k of the kNN graph.
    reference
        Also score against DPT on PCA of highly variable genes (needs the raw counts), and add
        the PCA-of-counts baseline row.
    """

    pseudotime_key: str
    root_cell: str | None = None
    n_subsamples: int = 20
    n_neighbors: int = 30
    reference: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_subsamples < 0 or self.n_neighbors < 2:
            raise InvalidInputError(f"n_subsamples must be >= 0 and n_neighbors >= 2 (got {self.n_subsamples}, {self.n_neighbors})")


class TrajectoryTask(Task):
    """Trajectory inference per layer (see :mod:`sclstore.eval.trajectory`)."""

    name = "trajectory"
    version = "1"
    title = "Trajectory inference (DPT vs time)"
    config_cls = TrajectoryConfig

    def primary_metric(self, config: TaskConfig) -> str:
        return "spearman_time"

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, TrajectoryConfig)
        ds, obs = ctx.dataset, ctx.obs
        raw_time = ctx.column(config.pseudotime_key, "pseudotime")
        try:
            time = as_time(raw_time)
        except (InvalidInputError, EvaluationError) as exc:
            numeric = [c.name for c in ds.obs_schema if c.kind in ("int", "float")]
            raise EvaluationError(f"{exc}; numeric obs columns: {', '.join(numeric) or '(none)'}") from None
        root: Any = "diffusion-extreme"
        if config.root_cell is not None:
            if config.root_cell not in obs.index:
                raise EvaluationError(f"root cell {config.root_cell!r} is not a cell of dataset {ds.name!r} (e.g. {', '.join(obs.index[:3])})")
            root = int(obs.index.get_loc(config.root_cell))
        state: dict[str, Any] = {"time": time, "root": root, "ref": None, "base": None, "ref_rho": float("nan")}
        if config.reference:
            ref_params = {"dataset": ds.content_hash, "time": config.pseudotime_key, "k": config.n_neighbors,
                          "root": config.root_cell or "diffusion-extreme", "seed": config.seed}

            def compute_ref() -> pd.DataFrame:
                counts, _genes = _counts(ds, ctx.counts_path, obs)
                res = reference_pseudotime(counts, time, n_neighbors=config.n_neighbors, root=root, seed=config.seed)
                pca = np.asarray(res.pca, dtype=float)
                return pd.DataFrame({"pseudotime": np.asarray(res.pseudotime, dtype=float),
                                     **{f"pc{i}": pca[:, i] for i in range(pca.shape[1])}})

            ref_df = _cached_intermediate(ctx.backend, "reference_pseudotime", ref_params, compute_ref)
            state["ref"] = ref_df["pseudotime"].to_numpy()
            pca = ref_df[[c for c in ref_df.columns if c.startswith("pc")]].to_numpy()
            with threadpool_limits(limits=1):
                state["base"] = score_trajectory(pca, time, reference=state["ref"], n_neighbors=config.n_neighbors, root=root,
                                                 n_subsamples=config.n_subsamples, seed=config.seed)
            state["ref_rho"] = state["base"].rho_time
        return state

    def worker_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: state[k] for k in ("time", "root", "ref")}

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: np.ndarray) -> Any:
        assert isinstance(config, TrajectoryConfig)
        if np.ptp(data, axis=0).max() == 0:
            return "the embedding is the same for every cell (e.g. cls at the input layer)"
        try:
            with threadpool_limits(limits=1):  # kNN/diffmap on these sizes: oversubscribed threads cost up to 10x
                return score_trajectory(data, state["time"], reference=state["ref"], n_neighbors=config.n_neighbors,
                                        root=state["root"], n_subsamples=config.n_subsamples, seed=config.seed)
        except EvaluationError as exc:
            return str(exc)

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        info, pool, ref_pt = ctx.info, ctx.pool, state["ref"]
        undefined = {layer: r for layer, r in results.items() if isinstance(r, str)}
        scores = {layer: (None if isinstance(r, str) else r) for layer, r in results.items()}
        final = scores.get(info.layers[-1])
        rows = []
        for layer, sc in scores.items():
            depth = info.depth(layer)
            for metric, against in (("spearman_time", "time"), ("spearman_ref", "reference")):
                if metric == "spearman_ref" and ref_pt is None:
                    continue
                if sc is None:
                    rows.append(LayerScore(layer=layer, depth=depth, score=float("nan"), pool=pool, metric=metric, n=0))
                    continue
                value, lo, hi = (sc.rho_time, sc.ci_low, sc.ci_high) if against == "time" else (sc.rho_ref, sc.ref_ci_low, sc.ref_ci_high)
                diff = trajectory_paired_difference(sc, final, against=against) if final is not None and sc is not final else None  # type: ignore[arg-type]
                rows.append(LayerScore(layer=layer, depth=depth, score=_finite(value), ci_low=_finite(lo), ci_high=_finite(hi),
                                       pool=pool, metric=metric, n=sc.n_cells - sc.n_dropped,
                                       diff_vs_final=diff.estimate if diff else (0.0 if sc is final else float("nan")),
                                       diff_ci_low=diff.ci_low if diff else float("nan"),
                                       diff_ci_high=diff.ci_high if diff else float("nan"),
                                       diff_p_value=diff.p_value if diff else float("nan")))
        base = state["base"]
        if base is not None:
            rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=_finite(base.rho_time), ci_low=_finite(base.ci_low),
                                   ci_high=_finite(base.ci_high), pool=pool, metric="spearman_time", representation="pca_hvg",
                                   n=base.n_cells - base.n_dropped))
        table = layer_table(rows)
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=table,
                          summary=summarize_layers(table),
                          notes={"n_cells": len(state["time"]), "pca_reference_rho": state["ref_rho"],
                                 "undefined_layers": {str(k): v for k, v in undefined.items()}})


register_task(TrajectoryTask())
