"""The perturbation task: RSA between DE similarity and embedding-shift similarity per layer and condition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sclstore.store.errors import EvaluationError, InvalidInputError

from .de import DE_MODES, DEResult, pseudobulk, run_de
from .perturbation import (
    VARIANTS,
    perturbation_paired_difference,
    rsa_from_centroids,
    select_perturbations,
    split_half_ceiling,
)
from .report import EvalReport
from .results import LayerScore, layer_table, summarize_layers
from .runner import (
    _cached_intermediate,
    _counts,
    _quote_ident,
    _quote_value,
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
        ``pydeseq2`` (paper-faithful) or ``fast``.
    variant
        ``shift`` (default) or the paper's ``centroid``.
    n_boot, n_perm, min_cells, ceiling
        Bootstrap size, Mantel permutations, minimum cells per group, split-half ceiling.
    """

    perturbation_key: str
    control: str
    condition_key: str | None = None
    replicate_key: str | None = None
    de_mode: str = "pydeseq2"
    variant: str = "shift"
    n_boot: int = 200
    n_perm: int = 999
    min_cells: int = 10
    ceiling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.de_mode not in DE_MODES:
            raise EvaluationError(f"unknown DE mode {self.de_mode!r}: pass one of {', '.join(DE_MODES)}")
        if self.variant not in VARIANTS:
            raise InvalidInputError(f"unknown RSA variant {self.variant!r}: pass one of {', '.join(VARIANTS)}")


def _pseudo_replicates(cells: Sequence[str], seed: int, n: int = 2) -> np.ndarray:
    """Random pseudo-replicates when the data have no replicate column (p-values anti-conservative)."""
    rng = np.random.default_rng(seed)
    return np.asarray([f"pseudo{i}" for i in rng.integers(0, n, size=len(cells))])


def _centroids(ctx: TaskContext, key: str, where: str) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {label: centroid}} from one streaming GROUP BY query per condition."""
    from sclstore.query import execute_query

    sql = (f"SELECT {_quote_ident(key)}, layer, AVG(embedding.{ctx.pool}), COUNT(*) FROM embeddings "
           f"WHERE run = {ctx.info.id}{where} GROUP BY {_quote_ident(key)}, layer")
    res = execute_query(ctx.backend, sql)
    labels = res.obs[key].astype(str).to_numpy()
    return {int(layer): {lab: res.embeddings[li, gi] for gi, lab in enumerate(labels)} for li, layer in enumerate(res.layers)}


class PerturbationTask(Task):
    """Perturbation response per layer, per condition (see :mod:`sclstore.eval.perturbation`)."""

    name = "perturbation"
    version = "1"
    title = "Perturbation response (RSA of DE vs embedding shifts)"
    config_cls = PerturbationConfig

    def primary_metric(self, config: TaskConfig) -> str:
        assert isinstance(config, PerturbationConfig)
        return f"rsa_{config.variant}"

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
        counts: list[Any] = [None, None]

        def need_counts() -> tuple[sp.csr_matrix, np.ndarray]:
            if counts[0] is None:
                counts[0], counts[1] = _counts(ds, ctx.counts_path, obs)
            return counts[0], counts[1]

        notes: dict[str, Any] = {"de_mode": config.de_mode, "conditions": {}}
        lfcs: dict[str, pd.DataFrame] = {}
        cents: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        for cond in sorted(conds.unique()):
            mask = (conds == cond).to_numpy()
            rep = reps[mask] if reps is not None else _pseudo_replicates(obs.index[mask], config.seed)
            keep = select_perturbations(perts[mask], rep, config.control, min_cells=config.min_cells)
            de_params = {"dataset": ds.content_hash, "condition_key": config.condition_key, "condition": cond,
                         "key": config.perturbation_key, "replicate_key": config.replicate_key, "control": config.control,
                         "mode": config.de_mode, "min_cells": config.min_cells, "perturbations": sorted(keep), "seed": config.seed}
            others = [p for p in keep if p != config.control]

            def compute_de(mask: np.ndarray = mask, rep: Any = rep, others: list[str] = others) -> pd.DataFrame:
                c, g = need_counts()
                pb, meta = pseudobulk(c[mask], perts[mask].to_numpy(), np.asarray(rep), gene_names=list(g))
                res: DEResult = run_de(pb, meta, config.control, mode=config.de_mode, perturbations=others,  # type: ignore[arg-type]
                                       n_jobs=min(int(config.n_jobs), cpu_allowance()))  # --jobs: parallel pydeseq2 fits
                return res.lfc

            lfcs[cond] = _cached_intermediate(ctx.backend, "de", de_params, compute_de)
            note: dict[str, Any] = {"perturbations": int(lfcs[cond].shape[0]), "genes": int(lfcs[cond].shape[1])}
            if config.ceiling:
                def compute_ceiling(mask: np.ndarray = mask, rep: Any = rep, others: list[str] = others) -> pd.DataFrame:
                    c, _g = need_counts()
                    ce = split_half_ceiling(c[mask], perts[mask].to_numpy(), np.asarray(rep), config.control,
                                            perturbations=others, mode="fast", seed=config.seed)
                    return pd.DataFrame({"rsa": [ce.rsa], "spearman_brown": [ce.spearman_brown]})

                ce = _cached_intermediate(ctx.backend, "de_ceiling", de_params, compute_ceiling)
                note["split_half_ceiling"] = float(ce["rsa"].iloc[0])
                note["spearman_brown_ceiling"] = float(ce["spearman_brown"].iloc[0])
            notes["conditions"][cond] = note
            where = f" AND {_quote_ident(config.condition_key)} = {_quote_value(cond)}" if config.condition_key else ""
            cents[cond] = _centroids(ctx, config.perturbation_key, where)
        return {"lfcs": lfcs, "cents": cents, "notes": notes}

    def worker_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"lfcs": state["lfcs"]}

    def layer_input(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], layer: int) -> dict[str, Any]:
        return {cond: c[layer] for cond, c in state["cents"].items()}

    def compute_layer(self, config: TaskConfig, state: dict[str, Any], layer: int, data: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(config, PerturbationConfig)
        out: dict[str, Any] = {}
        for cond, cent in data.items():
            try:
                out[cond] = rsa_from_centroids(cent, config.control, state["lfcs"][cond], variant=config.variant,  # type: ignore[arg-type]
                                               n_boot=config.n_boot, n_perm=config.n_perm, seed=config.seed)
            except EvaluationError as exc:  # e.g. cls at the input layer: every shift is zero
                out[cond] = str(exc)
        return out

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: dict[str, Any], results: dict[int, Any],
                  params: dict[str, Any]) -> EvalReport:
        assert isinstance(config, PerturbationConfig)
        info, pool, notes = ctx.info, ctx.pool, state["notes"]
        metric = self.primary_metric(config)
        rows: list[LayerScore] = []
        for cond in notes["conditions"]:
            scores = {layer: res[cond] for layer, res in results.items()}
            for layer, sc in scores.items():
                if isinstance(sc, str):
                    notes["conditions"][cond].setdefault("undefined_layers", {})[str(layer)] = sc
            final = scores.get(info.layers[-1])
            final = None if isinstance(final, str) else final
            label = None if cond == "all" and not config.condition_key else cond
            for layer, sc in scores.items():
                if isinstance(sc, str):
                    rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, condition=label,
                                           metric=metric, n=0))
                    continue
                diff = perturbation_paired_difference(sc, final) if final is not None and sc is not final and config.n_boot > 0 else None
                rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=sc.score, ci_low=sc.ci_low, ci_high=sc.ci_high,
                                       p_value=sc.p_value, pool=pool, condition=label, metric=metric, n=sc.n_perturbations,
                                       diff_vs_final=diff.estimate if diff else (0.0 if sc is final else float("nan")),
                                       diff_ci_low=diff.ci_low if diff else float("nan"),
                                       diff_ci_high=diff.ci_high if diff else float("nan"),
                                       diff_p_value=diff.p_value if diff else float("nan")))
        table = layer_table(rows)
        return EvalReport(task=self.name, run_id=info.id, run_label=info.label, params=params, table=table,
                          summary=summarize_layers(table), notes=notes)


register_task(PerturbationTask())
