"""The perturbation task: RSA between DE similarity and embedding-shift similarity per layer and condition.

Cross-fitted by default (DE from one half of each group's cells, the layer's centroids from the
other, both ways): the task streams each layer's cells of every condition to
:func:`~sclstore.eval.perturbation.score_perturbation_crossfit`. ``crossfit=False`` scores DE and
centroids of the same cells (leak-prone, labelled ``_samecells``) from one GROUP BY query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sclstore.store.errors import EvaluationError, InvalidInputError

from .de import DE_MODES, DEResult, pseudobulk, run_de
from .de_wilcoxon import de_wilcoxon
from .perturbation import (
    VARIANTS,
    ceiling_from_folds,
    crossfit_de,
    crossfit_halves,
    rsa_from_centroids,
    score_perturbation_crossfit,
    select_perturbations,
)
from .report import EvalReport
from .results import BASELINE_LAYER, LayerScore, layer_table, summarize_layers
from .runner import (
    PROTOCOLS,
    _cached_intermediate,
    _claimed_rows,
    _counts,
    cpu_allowance,
)
from .tasks import Task, TaskConfig, TaskContext, register_task

__all__ = ["PerturbationConfig", "PerturbationTask"]


@dataclass(frozen=True, kw_only=True)
class PerturbationConfig(TaskConfig):
    """Parameters of the perturbation evaluation (every field except ``n_jobs``/``progress`` is in the cache key).

    Attributes
    ----------
    perturbation_key, control
        obs column naming the perturbation, and the control label.
    condition_key, replicate_key
        obs columns of the cell state (scored separately, never pooled) and of donors/replicates.
    de_mode
        ``pydeseq2``, ``fast`` or ``wilcoxon`` (the paper's code: scanpy's per-cell Wilcoxon log fold changes;
        ``None``: ``wilcoxon`` with ``protocol="paper"``, else ``pydeseq2``).
    variant
        ``shift`` or the paper's ``centroid`` (``None``: ``centroid`` with ``protocol="paper"``, else ``shift``).
    n_boot, n_perm, min_cells, ceiling
        Bootstrap size, Mantel permutations, minimum cells per group, noise ceiling.
    protocol
        ``default`` or ``paper`` (raw centroids, Spearman between DE profiles, same cells).
    crossfit
        DE and centroids from disjoint halves (``None``: yes unless ``protocol="paper"``).
    n_splits
        Cross-fitting splits averaged.
    similarity
        ``pearson`` or ``spearman`` between DE profiles (``None``: by protocol).
    """

    perturbation_key: str
    control: str
    condition_key: str | None = None
    replicate_key: str | None = None
    de_mode: str | None = None
    variant: str | None = None
    n_boot: int = 200
    n_perm: int = 999
    min_cells: int = 10
    ceiling: bool = True
    protocol: str = "default"
    crossfit: bool | None = None
    n_splits: int = 1
    similarity: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise EvaluationError(f"unknown protocol {self.protocol!r}: pass one of {', '.join(PROTOCOLS)}")
        paper = self.protocol == "paper"
        # resolve the protocol's defaults here, so the cache key holds what was actually computed
        object.__setattr__(self, "variant", self.variant or ("centroid" if paper else "shift"))
        object.__setattr__(self, "de_mode", self.de_mode or ("wilcoxon" if paper else "pydeseq2"))
        object.__setattr__(self, "similarity", self.similarity or ("spearman" if paper else "pearson"))
        object.__setattr__(self, "crossfit", (not paper) if self.crossfit is None else bool(self.crossfit))
        if self.de_mode not in DE_MODES:
            raise EvaluationError(f"unknown DE mode {self.de_mode!r}: pass one of {', '.join(DE_MODES)}")
        if self.variant not in VARIANTS:
            raise EvaluationError(f"unknown variant {self.variant!r}: pass one of {', '.join(VARIANTS)}")
        if self.similarity not in ("pearson", "spearman"):
            raise EvaluationError(f"unknown DE similarity {self.similarity!r}: pass pearson or spearman")
        if (self.crossfit and self.n_splits < 1) or self.n_boot < 0 or self.n_perm < 0 or self.min_cells < 1:
            raise InvalidInputError("need n_splits >= 1 (cross-fitted), n_boot >= 0, n_perm >= 0, min_cells >= 1")
        if not self.crossfit:
            object.__setattr__(self, "n_splits", 0)


def _pseudo_replicates(cells: Sequence[str], seed: int, n: int = 2) -> np.ndarray:
    """Random pseudo-replicates when the data have no replicate column (p-values anti-conservative)."""
    rng = np.random.default_rng(seed)
    return np.asarray([f"pseudo{i}" for i in rng.integers(0, n, size=len(cells))])


def _centroids(ctx: TaskContext, key: str, where: dict[str, Any] | None) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {label: centroid}} from one streaming GROUP BY query per condition (slice API, no SQL text)."""
    from sclstore.query import centroids_query, execute

    res = execute(ctx.backend, centroids_query(ctx.info.id, key, pool=ctx.pool, where=where))
    labels = res.obs[key].astype(str).to_numpy()
    return {int(layer): {lab: res.embeddings[li, gi] for gi, lab in enumerate(labels)} for li, layer in enumerate(res.layers)}


class PerturbationTask(Task):
    """Perturbation response per layer, per condition (see :mod:`sclstore.eval.perturbation`)."""

    name = "perturbation"
    version = "2"
    title = "Perturbation response (RSA of DE vs embedding shifts)"
    config_cls = PerturbationConfig

    def primary_metric(self, config: TaskConfig) -> str:
        assert isinstance(config, PerturbationConfig)
        return f"rsa_{config.variant}" + ("" if config.crossfit else "_samecells")

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> dict[str, Any]:
        assert isinstance(config, PerturbationConfig)
        ds, obs = ctx.dataset, ctx.obs
        perts = ctx.column(config.perturbation_key, "perturbation").astype(str)
        if config.control not in set(perts):
            have = ", ".join(sorted(perts.unique())[:12])
            raise EvaluationError(f"control label {config.control!r} is not a value of {config.perturbation_key!r}; values include: {have}")
        conds = (ctx.column(config.condition_key, "condition").astype(str) if config.condition_key
                 else pd.Series("all", index=obs.index))
        reps = ctx.column(config.replicate_key, "replicate").astype(str) if config.replicate_key else None
        jobs = min(int(config.n_jobs), cpu_allowance())  # --jobs: parallel pydeseq2 fits
        counts: list[Any] = [None, None]

        def need_counts() -> tuple[sp.csr_matrix, np.ndarray]:
            if counts[0] is None:
                counts[0], counts[1] = _counts(ds, ctx.counts_path, obs)
            return counts[0], counts[1]

        notes: dict[str, Any] = {"de_mode": config.de_mode, "conditions": {}, "protocol": config.protocol,
                                 "scoring": ("cross-fitted: DE from one half of the cells, centroids from the other" if config.crossfit
                                             else "DE and centroids from the same cells (leak-prone)")}
        conditions: dict[str, dict[str, Any]] = {}
        for cond in sorted(conds.unique()):
            mask = (conds == cond).to_numpy()
            rep = reps[mask] if reps is not None else _pseudo_replicates(obs.index[mask], config.seed)
            keep = select_perturbations(perts[mask], rep, config.control, min_cells=config.min_cells)
            de_params = {"dataset": ds.content_hash, "condition_key": config.condition_key, "condition": cond,
                         "key": config.perturbation_key, "replicate_key": config.replicate_key, "control": config.control,
                         "mode": config.de_mode, "min_cells": config.min_cells, "perturbations": sorted(keep), "seed": config.seed}
            others = [p for p in keep if p != config.control]
            labels = perts[mask].to_numpy()

            def compute_de(mask: np.ndarray = mask, rep: Any = rep, others: list[str] = others) -> pd.DataFrame:
                c, g = need_counts()
                if config.de_mode == "wilcoxon":
                    return de_wilcoxon(c[mask], perts[mask].to_numpy(), config.control, perturbations=others, gene_names=list(g)).lfc
                pb, meta = pseudobulk(c[mask], perts[mask].to_numpy(), np.asarray(rep), gene_names=list(g))
                res: DEResult = run_de(pb, meta, config.control, mode=config.de_mode, perturbations=others, n_jobs=jobs)  # type: ignore[arg-type]
                return res.lfc

            lfc = _cached_intermediate(ctx.backend, "de", de_params, compute_de)
            note: dict[str, Any] = {"perturbations": int(lfc.shape[0]), "genes": int(lfc.shape[1])}
            # the halves serve the cross-fitted scores and the noise ceiling (DE(A) vs DE(B): no extra fits)
            n_splits = max(1, config.n_splits)
            halves = (crossfit_halves(labels, np.asarray(rep), n_splits=n_splits, seed=config.seed)
                      if config.crossfit or config.ceiling else [])
            de_folds: list[pd.DataFrame] = []
            for s_i in range(len(halves)):
                for h_i in range(2):
                    def compute_fold(s_i: int = s_i, h_i: int = h_i, mask: np.ndarray = mask, rep: Any = rep, others: list[str] = others,
                                     halves: list[np.ndarray] = halves, lfc: pd.DataFrame = lfc) -> pd.DataFrame:
                        c, g = need_counts()
                        return crossfit_de(c[mask], perts[mask].to_numpy(), np.asarray(rep), config.control, [halves[s_i]],
                                           perturbations=others, genes=lfc.columns, gene_names=list(g), mode=config.de_mode,  # type: ignore[arg-type]
                                           n_jobs=jobs, only=h_i)[0]
                    de_folds.append(_cached_intermediate(ctx.backend, "de_crossfit", {**de_params, "split": s_i, "half": h_i,
                                                                                      "n_splits": n_splits}, compute_fold))
            ceil_value = float("nan")
            if config.ceiling:
                ce = ceiling_from_folds(de_folds, mode=config.de_mode, similarity=config.similarity)  # type: ignore[arg-type]
                note["split_half_rsa"] = ce.rsa
                note["spearman_brown"] = ce.spearman_brown
                ceil_value = ce.ceiling_half if config.crossfit else ce.ceiling_full
                note["noise_ceiling"] = ceil_value
                note["noise_ceiling_rule"] = ("sqrt(split-half RSA): the DE side uses half of the cells" if config.crossfit
                                              else "sqrt(Spearman-Brown corrected split-half RSA)")
            notes["conditions"][cond] = note
            where = {config.condition_key: cond.item() if isinstance(cond, np.generic) else cond} if config.condition_key else None
            conditions[cond] = {"where": where, "lfc": lfc, "labels": labels, "halves": halves, "de_folds": de_folds,
                                "ceiling": ceil_value,
                                "cents": None if config.crossfit else _centroids(ctx, config.perturbation_key, where)}
        return {"conditions": conditions, "notes": notes}

    def worker_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"conditions": {c: {k: v for k, v in d.items() if k != "cents"} for c, d in state["conditions"].items()}}

    def layer_input(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], layer: int) -> dict[str, Any]:
        assert isinstance(config, PerturbationConfig)
        if config.crossfit:  # the layer's cells of each condition (one layer in memory at a time)
            return {cond: ctx.read_layer(layer, d["where"]) for cond, d in state["conditions"].items()}
        return {cond: d["cents"][layer] for cond, d in state["conditions"].items()}

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(config, PerturbationConfig)
        out: dict[str, Any] = {}
        for cond, x in data.items():
            d = state["conditions"][cond]
            try:
                if config.crossfit:
                    out[cond] = score_perturbation_crossfit(x, d["labels"], config.control, d["de_folds"], d["halves"],
                                                            variant=config.variant, similarity=config.similarity,  # type: ignore[arg-type]
                                                            n_boot=config.n_boot, n_perm=config.n_perm, seed=config.seed)
                else:
                    out[cond] = rsa_from_centroids(x, config.control, d["lfc"], variant=config.variant,  # type: ignore[arg-type]
                                                   similarity=config.similarity, n_boot=config.n_boot, n_perm=config.n_perm,  # type: ignore[arg-type]
                                                   seed=config.seed)
            except EvaluationError as exc:  # e.g. cls at the input layer: every shift is zero
                out[cond] = str(exc)
        return out

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        assert isinstance(config, PerturbationConfig)
        info, pool, notes = ctx.info, ctx.pool, state["notes"]
        metric = self.primary_metric(config)
        rows: list[LayerScore] = []
        summary: list[dict[str, Any]] = []
        for cond, d in state["conditions"].items():
            cond_note = notes["conditions"][cond]
            scores: dict[int, Any] = {layer: (None if isinstance(res[cond], str) else res[cond]) for layer, res in results.items()}
            for layer, res in results.items():
                if isinstance(res[cond], str):
                    cond_note.setdefault("undefined_layers", {})[str(layer)] = res[cond]
            label = None if cond == "all" and not config.condition_key else cond
            grp: list[LayerScore] = []
            for layer, sc in scores.items():
                if sc is None:
                    rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, condition=label,
                                           metric=metric, n=0))
                    continue
                grp.append(LayerScore(layer=layer, depth=info.depth(layer), score=sc.score, ci_low=sc.ci_low, ci_high=sc.ci_high,
                                      p_value=sc.p_value, pool=pool, condition=label, metric=metric, n=sc.n_perturbations))
            ok_layers = [li for li, sc in scores.items() if sc is not None]
            same_perts = len({scores[li].perturbations for li in ok_layers}) == 1
            if grp and config.n_boot >= 3 and ok_layers[-1] == info.layers[-1] and same_perts:
                est = np.array([scores[li].score for li in ok_layers])
                R = np.vstack([scores[li].boot for li in ok_layers])
                grp = _claimed_rows(grp, est, R, info, ok_layers, scale=1.0, metric=metric, seed=config.seed, summary=summary,
                                    notes=notes, pool=pool, condition=label)
            rows.extend(grp)
            if np.isfinite(d["ceiling"]):
                rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=d["ceiling"], pool=pool, condition=label,
                                       metric=metric, representation="noise_ceiling"))
        table = layer_table(rows)
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=table,
                          summary=pd.DataFrame(summary) if summary else summarize_layers(table), notes=notes)


register_task(PerturbationTask())
