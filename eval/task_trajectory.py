"""The trajectory task: kNN -> diffusion map -> DPT -> Spearman per stored layer (a registered Task).

Per layer (streamed, optionally in worker processes) :func:`~sclstore.eval.trajectory.layer_pseudotimes`
computes the DPT on all cells and on the shared subsamples; the summary combines the layers on one
common cell set (:func:`~sclstore.eval.trajectory.combine_layer_pseudotimes`), with calibrated
intervals and claims (:func:`~sclstore.eval.claims.layer_claims`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from sclstore.store.errors import EvaluationError, InvalidInputError

from .report import EvalReport
from .results import BASELINE_LAYER, LayerScore, layer_table, summarize_layers
from .runner import PROTOCOLS, _cached_intermediate, _claimed_rows, _counts, _finite
from .stats import subsample_indices
from .tasks import Task, TaskConfig, TaskContext, layer_threads, register_task
from .trajectory import (
    GraphOptions,
    as_time,
    combine_layer_pseudotimes,
    earliest_roots,
    layer_pseudotimes,
    reference_pseudotime,
)

__all__ = ["APPROX_KNN_ABOVE", "BLOCKED_KNN_ABOVE", "KNN_METHODS", "TrajectoryConfig", "TrajectoryTask"]

#: Above this many cells an exact search is the blocked one (scikit-learn's brute force below: scanpy's
#: exact search, ~4x slower at 20,000 cells).
BLOCKED_KNN_ABOVE = 8192
#: Above this many cells ``knn="auto"`` uses pynndescent's approximate neighbours. The blocked exact
#: search costs ~n^2 (60-72 s of one CPU at 100,000 cells x 512 dims, whatever the layer) and
#: pynndescent ~n^1.14 (75-90 s on a noise-dominated layer, recall 0.52; less on structured ones:
#: ``bench/eval_scale.py`` E8), so up to 2^17 cells ``auto`` keeps the search exact.
APPROX_KNN_ABOVE = 131072
KNN_METHODS = ("auto", "exact", "approx")
SUBSAMPLE_FRACTION = 0.8


@dataclass(frozen=True, kw_only=True)
class TrajectoryConfig(TaskConfig):
    """Parameters of the trajectory evaluation (every field except ``n_jobs``/``progress`` is in the cache key).

    Attributes
    ----------
    pseudotime_key
        obs column with the ground-truth time.
    root_cell
        Root cell name (default: the diffusion-extreme earliest cell; ``protocol="paper"``: the
        first earliest cell).
    n_subsamples
        Subsamples for the calibrated intervals and the claims.
    n_neighbors
        k of the kNN graph.
    reference
        Also score against DPT on PCA of highly variable genes (needs the raw counts), and add
        the PCA-of-counts baseline row.
    protocol
        ``default`` or ``paper`` (the authors' choices: first earliest root, scanpy's default kNN,
        15 diffusion components, each layer on its own cells, headline against the reference).
    standardize
        Z-score every coordinate before the graph.
    n_roots
        Random earliest-time roots of the root-sensitivity report.
    knn
        ``auto`` (exact up to 131,072 cells, pynndescent above), ``exact`` or ``approx``.
    """

    pseudotime_key: str
    root_cell: str | None = None
    n_subsamples: int = 20
    n_neighbors: int = 30
    reference: bool = True
    protocol: str = "default"
    standardize: bool = False
    n_roots: int = 5
    knn: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_subsamples < 0 or self.n_neighbors < 2 or self.n_roots < 0:
            raise InvalidInputError(f"need n_subsamples >= 0, n_neighbors >= 2, n_roots >= 0 "
                                    f"(got {self.n_subsamples}, {self.n_neighbors}, {self.n_roots})")
        if self.protocol not in PROTOCOLS:
            raise EvaluationError(f"unknown protocol {self.protocol!r}: pass one of {', '.join(PROTOCOLS)}")
        if self.knn not in KNN_METHODS:
            raise InvalidInputError(f"unknown knn {self.knn!r}: pass one of {', '.join(KNN_METHODS)}")


def _transformer(config: TrajectoryConfig, n_cells: int) -> str | None:
    if config.protocol == "paper":
        return None  # scanpy's own choice, as in the authors' code
    if config.knn == "approx" or (config.knn == "auto" and n_cells > APPROX_KNN_ABOVE):
        return "pynndescent"
    return "blocked" if n_cells > BLOCKED_KNN_ABOVE else "sklearn"


class TrajectoryTask(Task):
    """Trajectory inference per layer (see :mod:`sclstore.eval.trajectory`)."""

    name = "trajectory"
    version = "6"  # 3: one neighbour search per layer reused by the subsamples (approximate kNN results changed)
    # 4: diffusion maps with ARPACK tol 1e-8 and warm-started subsamples (DPT within ~1e-7)
    # 5: auto is exact (blocked search) up to 2^17 cells; a larger Lanczos basis (eigenpairs within the tolerance)
    # 6: the solver's products read the upper triangle (sums in another order: equal to rounding)
    title = "Trajectory inference (DPT vs time)"
    config_cls = TrajectoryConfig
    threaded_layers = True

    def primary_metric(self, config: TaskConfig) -> str:
        assert isinstance(config, TrajectoryConfig)
        return "spearman_ref" if config.protocol == "paper" and config.reference else "spearman_time"

    def derived_params(self, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, TrajectoryConfig)
        paper = config.protocol == "paper"
        return {"root": "explicit" if config.root_cell else ("first" if paper else "diffusion-extreme"),
                "subsample_fraction": SUBSAMPLE_FRACTION, "common_cells": not paper, "diffmap_comps": 15 if paper else None}

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, TrajectoryConfig)
        ds, obs = ctx.dataset, ctx.obs
        raw_time = ctx.column(config.pseudotime_key, "pseudotime")
        try:
            time = as_time(raw_time)
        except (InvalidInputError, EvaluationError) as exc:
            numeric = [c.name for c in ds.obs_schema if c.kind in ("int", "float")]
            raise EvaluationError(f"{exc}; numeric obs columns: {', '.join(numeric) or '(none)'}") from None
        paper = config.protocol == "paper"
        root: Any = "first" if paper else "diffusion-extreme"
        if config.root_cell is not None:
            if config.root_cell not in obs.index:
                raise EvaluationError(f"root cell {config.root_cell!r} is not a cell of dataset {ds.name!r} "
                                      f"(e.g. {', '.join(obs.index[:3])})")
            root = int(obs.index.get_loc(config.root_cell))
        transformer = _transformer(config, len(time))
        options = GraphOptions(n_neighbors=config.n_neighbors, n_dcs=10, diffmap_comps=15 if paper else None,
                               transformer=transformer, standardize=config.standardize, seed=config.seed,
                               fast_eigen=not paper)
        forced = None if isinstance(root, str) else int(root)
        idxs = subsample_indices(len(time), n_subsamples=config.n_subsamples, fraction=SUBSAMPLE_FRACTION, seed=config.seed,
                                 always_include=forced) if config.n_subsamples else []
        extra = earliest_roots(time, config.n_roots, seed=config.seed)
        state: dict[str, Any] = {"time": time, "root": root, "options": options, "idxs": idxs, "extra": extra, "ref": None,
                                 "base": None, "ref_rho": float("nan")}
        if config.reference:
            root_name = config.root_cell or (root if isinstance(root, str) else "explicit")
            ref_params = {"dataset": ds.content_hash, "time": config.pseudotime_key, "k": config.n_neighbors, "root": root_name,
                          "seed": config.seed}

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
                bpt = layer_pseudotimes(pca, time, subsamples=idxs, root=root, options=options)
            state["base"] = combine_layer_pseudotimes([bpt], time, subsamples=idxs, reference=state["ref"],
                                                      subsample_fraction=SUBSAMPLE_FRACTION, names=["PCA baseline"])
            state["ref_rho"] = float(state["base"].rho_time[0])
        return state

    def worker_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: state[k] for k in ("time", "root", "options", "idxs", "extra")}

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: np.ndarray) -> Any:
        if np.ptp(data, axis=0).max() == 0:
            return "the embedding is the same for every cell (e.g. cls at the input layer)"
        threads = layer_threads()
        try:
            # the runner's share of CPUs: BLAS in the neighbour search, a thread per subsample graph
            # (more BLAS threads than that oversubscribe the sparse work: up to 10x slower)
            with threadpool_limits(limits=threads):
                return layer_pseudotimes(data, state["time"], subsamples=state["idxs"], root=state["root"], options=state["options"],
                                         extra_roots=state["extra"], threads=threads)
        except EvaluationError as exc:
            return str(exc)

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        assert isinstance(config, TrajectoryConfig)
        info, pool, time, ref_pt = ctx.info, ctx.pool, state["time"], state["ref"]
        paper = config.protocol == "paper"
        undefined = {layer: r for layer, r in results.items() if isinstance(r, str)}
        scored = [layer for layer, r in results.items() if not isinstance(r, str)]
        pts = [results[layer] for layer in scored]
        notes: dict[str, Any] = {"n_cells": len(time), "pca_reference_rho": state["ref_rho"],
                                 "undefined_layers": {str(k): v for k, v in undefined.items()}, "protocol": config.protocol,
                                 "knn": state["options"].transformer or "scanpy-default"}
        rows: list[LayerScore] = []
        summary: list[dict[str, Any]] = []
        if pts:
            res = combine_layer_pseudotimes(pts, time, subsamples=state["idxs"], reference=ref_pt, subsample_fraction=SUBSAMPLE_FRACTION,
                                            common=not paper, extra_roots=state["extra"], names=[f"layer {li}" for li in scored])
            notes["cells"] = {"n_common": res.n_common,
                              "unreachable_per_layer": {str(li): int(u) for li, u in zip(scored, res.n_unreached, strict=False)},
                              "why": "not in the root's connected component of that layer's kNN graph (DPT infinite)",
                              "scored_on": "cells reached in every layer" if not paper else "each layer's own reached cells (paper)"}
            if state["extra"]:
                rr = res.root_rho_time
                notes["root_sensitivity"] = {"roots": [str(ctx.obs.index[e]) for e in state["extra"]],
                                             "per_layer": {str(li): {"mean": _finite(np.nanmean(rr[i])), "sd": _finite(np.nanstd(rr[i])),
                                                                     "min": _finite(np.nanmin(rr[i])), "max": _finite(np.nanmax(rr[i]))}
                                                           for i, li in enumerate(scored)}}
            n_scored = res.n_common if not paper else None
            for metric, est, lo, hi, R in (("spearman_time", res.rho_time, res.ci_low, res.ci_high, res.resamples_time),
                                           ("spearman_ref", res.rho_ref, res.ref_ci_low, res.ref_ci_high, res.resamples_ref)):
                if metric == "spearman_ref" and ref_pt is None:
                    continue
                grp = [LayerScore(layer=li, depth=info.depth(li), score=_finite(est[i]), ci_low=_finite(lo[i]), ci_high=_finite(hi[i]),
                                  pool=pool, metric=metric,
                                  n=n_scored if n_scored is not None else int(res.n_cells - res.n_unreached[i]))
                       for i, li in enumerate(scored)]
                if config.n_subsamples and scored[-1] == info.layers[-1]:
                    grp = _claimed_rows(grp, est, R, info, scored, scale=res.scale, metric=metric, seed=config.seed, summary=summary,
                                        notes=notes, pool=pool)
                rows.extend(grp)
        for layer in undefined:
            for metric in ("spearman_time", *(("spearman_ref",) if ref_pt is not None else ())):
                rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, metric=metric, n=0))
        base = state["base"]
        if base is not None:
            rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=_finite(base.rho_time[0]),
                                   ci_low=_finite(base.ci_low[0]), ci_high=_finite(base.ci_high[0]), pool=pool, metric="spearman_time",
                                   representation="pca_hvg", n=int(base.n_common)))
        table = layer_table(rows)
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=table,
                          summary=pd.DataFrame(summary) if summary else summarize_layers(table), notes=notes)


register_task(TrajectoryTask())
