"""The result of evaluating every layer of a run: a per-layer table plus its summary.

An :class:`EvalReport` round-trips through JSON (that is how it is cached in the catalog),
renders as a rich table, and plots score vs depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from .plot import plot_layer_scores

__all__ = ["EvalReport"]


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [_clean(r) for r in df.astype(object).where(df.notna(), None).to_dict(orient="records")]


@dataclass(frozen=True)
class EvalReport:
    """Per-layer scores of one run on one task.

    Attributes
    ----------
    task
        ``"trajectory"`` or ``"perturbation"``.
    run_id, run_label
        The evaluated run.
    params
        Everything that determined the result (its hash is the cache key).
    table
        One row per (layer or baseline) x pool x condition x metric (see
        :data:`sclstore.eval.TABLE_COLUMNS`).
    summary
        Best layer, final layer and gain per (pool, condition, metric).
    notes
        Extra facts (DE mode, ceilings, dropped cells, whether the result came from the cache).
    """

    task: str
    run_id: int
    run_label: str
    params: dict[str, Any]
    table: pd.DataFrame
    summary: pd.DataFrame
    notes: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes null)."""
        return {
            "task": self.task, "run": self.run_id, "run_label": self.run_label, "params": _clean(self.params),
            "table": _records(self.table), "summary": _records(self.summary), "notes": _clean(self.notes),
            "cached": self.cached,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, cached: bool = False) -> EvalReport:
        table = pd.DataFrame(data["table"])
        for col in ("score", "ci_low", "ci_high", "p_value", "diff_vs_final", "diff_ci_low", "diff_ci_high", "diff_p_value", "depth",
                    "diff_p_adj", "win_frequency"):
            if col in table:
                table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
        return cls(task=data["task"], run_id=int(data["run"]), run_label=data["run_label"], params=data["params"],
                   table=table, summary=pd.DataFrame(data["summary"]), notes=data.get("notes", {}), cached=cached)

    def metric_table(self, metric: str | None = None) -> pd.DataFrame:
        """Rows of one metric (default: the task's primary metric)."""
        metric = metric or self.params.get("primary_metric")
        return self.table if metric is None else self.table[self.table["metric"] == metric]

    def rich_table(self) -> Table:
        """The primary metric per layer, conditions side by side."""
        df = self.metric_table()
        title = f"{self.task}: run {self.run_id} {self.run_label} ({self.params.get('primary_metric')}, pool {self.params.get('pool')})"
        table = Table(title=title + (" [cached]" if self.cached else ""))
        show_cond = bool(df["condition"].notna().any()) if "condition" in df else False
        show_p = bool(np.isfinite(df["p_value"].astype(float)).any()) if "p_value" in df else False
        show_claims = "best_set" in df and df["best_set"].notna().any()
        cols = ["layer", "depth", *(["condition"] if show_cond else []), "score", "95% CI", *(["p"] if show_p else []),
                "vs final (95% simult. CI)", *(["p adj", "wins", "best set"] if show_claims else [])]
        for col in cols:
            table.add_column(col, justify="left" if col == "condition" else "right")

        def f(x: Any, nd: int = 3) -> str:
            return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"

        for r in df.itertuples(index=False):
            is_layer = r.representation == "layer"
            layer = str(int(r.layer)) if is_layer else str(r.representation)
            final = is_layer and math.isfinite(r.diff_vs_final) and r.diff_vs_final == 0 and not math.isfinite(r.diff_ci_low)
            diff = ("final" if final else "" if not math.isfinite(r.diff_vs_final)
                    else f"{r.diff_vs_final:+.3f} ({f(r.diff_ci_low)}, {f(r.diff_ci_high)})")
            ci = f"{f(r.ci_low)}, {f(r.ci_high)}" if math.isfinite(r.ci_low) else ""
            cells = [layer, f(r.depth, 2), *([str(r.condition or "")] if show_cond else []),
                     f(r.score) if math.isfinite(r.score) else "undefined", ci, *([f(r.p_value, 4)] if show_p else []), diff]
            if show_claims:
                rec = r._asdict()
                win = rec.get("win_frequency")
                cells += [f(rec.get("diff_p_adj"), 4), "" if win is None or not math.isfinite(win) else f"{win:.0%}",
                          ("*" if rec.get("claimed_best") is True else "yes") if rec.get("best_set") is True else ""]
            table.add_row(*cells)
        return table

    def headline(self) -> list[str]:
        """One sentence per condition: best layer, final layer, gain."""
        lines = []
        metric = self.params.get("primary_metric")
        s = self.summary[self.summary["metric"] == metric] if "metric" in self.summary else self.summary
        for r in s.to_dict(orient="records"):
            cond = f"[{r['condition']}] " if r.get("condition") else ""
            if r.get("headline"):  # claim-aware summary (layer_claims)
                lines.append(f"{cond}{r['headline']}")
                continue
            lines.append(  # estimates only (no resamples to support a claim)
                f"{cond}highest point estimate: layer {r['best_layer']} (depth {r['best_depth']:.2f}, {metric} {r['best_score']:.3f}) vs "
                f"final layer {r['final_layer']} ({r['final_score']:.3f}); no interval, so no claim"
            )
        roots = self.notes.get("root_sensitivity") if isinstance(self.notes, dict) else None
        if roots and roots.get("per_layer"):
            sds = {k: v.get("sd") for k, v in roots["per_layer"].items() if v.get("sd") is not None}
            if sds:
                worst = max(sds, key=lambda k: sds[k])
                lines.append(f"root sensitivity over {len(roots['roots'])} random earliest-time roots: sd of spearman_time "
                             f"up to {sds[worst]:.3f} (layer {worst}); see notes.root_sensitivity")
        cells = self.notes.get("cells") if isinstance(self.notes, dict) else None
        if cells and any(cells.get("unreachable_per_layer", {}).values()):
            lost = {k: v for k, v in cells["unreachable_per_layer"].items() if v}
            lines.append(f"all layers scored on the same {cells['n_common']} cells; dropped because unreachable from the root: "
                         + ", ".join(f"layer {k}: {v}" for k, v in lost.items()))
        base = self.metric_table()
        base = base[base["representation"] != "layer"] if "representation" in base else base.iloc[0:0]
        for r in base.to_dict(orient="records"):
            cond = f"[{r['condition']}] " if r.get("condition") else ""
            if r["representation"] == "noise_ceiling":
                lines.append(f"{cond}noise ceiling (sqrt of the DE split-half reliability): {r['score']:.3f}")
                continue
            lines.append(f"{cond}baseline {r['representation']} (PCA of highly variable genes of the counts): {metric} {r['score']:.3f}")
        return lines

    def plot(self, out_png: str | Path) -> Path:
        """Score vs depth with CI bands, best and final layer marked."""
        ylabel = {"spearman_time": "Spearman ρ (DPT vs time)", "spearman_ref": "Spearman ρ (DPT vs reference DPT)",
                  "rsa_shift": "RSA (Spearman, cross-fitted)", "rsa_centroid": "RSA (Spearman, centroid variant, cross-fitted)",
                  "rsa_shift_samecells": "RSA (Spearman, same cells: leak-prone)",
                  "rsa_centroid_samecells": "RSA (Spearman, centroid variant, same cells: leak-prone)",
                  }.get(str(self.params.get("primary_metric")), "score")
        return plot_layer_scores(self.metric_table(), out_png, title=self.figure_title(), ylabel=ylabel)

    def figure_title(self) -> str:
        """``task - run, pool P`` and, on a second line, the keys and settings that define the scores."""
        p = self.params
        keys = {"trajectory": ("pseudotime_key", "n_neighbors", "root_cell", "protocol"),
                "perturbation": ("perturbation_key", "control", "condition_key", "replicate_key", "de_mode", "protocol"),
                "celltype": ("label_key", "k", "folds")}.get(self.task, ())
        shown = [f"{k.removesuffix('_key') if k != 'pseudotime_key' else 'time'}={p[k]}" for k in keys
                 if p.get(k) is not None and not (k == "protocol" and p[k] == "default")]
        first = f"{self.task} - run {self.run_id} {self.run_label}, pool {p.get('pool')}"
        return first + ("\n" + ", ".join(shown) if shown else "")
