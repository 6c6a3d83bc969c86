"""A self-contained HTML report of one run: every cached evaluation, its figure and a recommendation.

The page has no external assets and needs no JavaScript: figures are PNGs embedded as base64,
the style is inline. Every piece of text from the store (names, labels, parameters) is escaped.
The recommendation per task and condition states a better layer only when the paired interval
of its difference to the final layer excludes 0; otherwise it says that no layer is
distinguishable from the final one.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .report import EvalReport
from .tasks import get_task

__all__ = ["recommendations", "render_run_report", "write_run_report"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-bottom:.3em} .meta{color:#555} table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left}
.rec{background:#eef6ee;border-left:4px solid #3a7;padding:.5em .8em;margin:.5em 0}
.rec.none{background:#f6f3e8;border-left-color:#c93} img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 3px} .small{font-size:.8em;color:#666}
"""


def _f(x: Any, nd: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return html.escape(str(x)) if x is not None else ""
    return f"{v:.{nd}f}" if math.isfinite(v) else ""


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _claim_rows(report: EvalReport) -> dict[str, dict[str, Any]]:
    """Claim-aware summary rows of the primary metric, by condition ("" when none)."""
    s, metric = report.summary, report.params.get("primary_metric")
    if s is None or s.empty or "claimed" not in s:
        return {}
    s = s[s["metric"] == metric] if "metric" in s else s
    out = {}
    for r in s.to_dict(orient="records"):
        cond = r.get("condition")
        out["" if cond is None or (isinstance(cond, float) and math.isnan(cond)) else str(cond)] = r
    return out


def recommendations(report: EvalReport) -> list[dict[str, Any]]:
    """Per condition (primary metric): the recommended layer and whether the data support it.

    A better layer than the final one is recommended only when the claims of the evaluation
    (:func:`~sclstore.eval.claims.layer_claims`: simultaneous intervals over all layers) support
    it; without claims (too few resamples) the per-layer paired interval vs the final layer is used.

    Returns
    -------
    list of dict
        ``condition``, ``best_layer``, ``best_depth``, ``best_score``, ``ci_low``, ``ci_high``,
        ``final_layer``, ``final_score``, ``gain``, ``gain_ci_low``, ``gain_ci_high``,
        ``supported``, ``recommended_layer`` (the best layer when supported, else the final
        layer), ``best_set`` and ``win_frequency`` (when claims exist) and ``text``.
    """
    df = report.metric_table()
    if df.empty or "representation" not in df:
        return []
    df = df[df["representation"] == "layer"]
    claims = _claim_rows(report)
    metric = report.params.get("primary_metric")
    out = []
    conds = df["condition"].astype(object).where(df["condition"].notna(), "") if "condition" in df else pd.Series("", index=df.index)
    for cond, g in df.groupby(conds, sort=False):
        g = g[np.isfinite(g["score"].astype(float))]
        if g.empty:
            continue
        final = g.loc[g["layer"].astype(int).idxmax()]
        claim = claims.get(str(cond))
        if claim is not None:
            best = g[g["layer"].astype(int) == int(claim["best_layer"])].iloc[0]
            lo, hi, supported = float(claim["gain_ci_low"]), float(claim["gain_ci_high"]), bool(claim["claimed"])
            kind = "simultaneous 95% CI over all layers"
        else:
            best = g.loc[g["score"].astype(float).idxmax()]
            lo, hi = float(best["diff_ci_low"]), float(best["diff_ci_high"])
            supported = int(best["layer"]) != int(final["layer"]) and math.isfinite(lo) and lo > 0
            kind = "paired 95% CI"
        gain = float(best["score"]) - float(final["score"])
        if int(best["layer"]) == int(final["layer"]):
            text = f"The final layer {int(final['layer'])} scores highest ({metric} {_f(final['score'])}); keep it."
        elif supported:
            text = (f"Use layer {int(best['layer'])} (depth {float(best['depth']):.2f}): {metric} {_f(best['score'])} "
                    f"[{_f(best['ci_low'])}, {_f(best['ci_high'])}], {gain:+.3f} over the final layer "
                    f"{int(final['layer'])} ({kind} {_f(lo)} to {_f(hi)}).")
        else:
            text = (f"No layer is distinguishable from the final layer {int(final['layer'])} ({metric} {_f(final['score'])}): "
                    f"the highest, layer {int(best['layer'])}, is {gain:+.3f} with a {kind} {_f(lo)} to {_f(hi)} that includes 0. "
                    "Keep the final layer.")
        rec: dict[str, Any] = {"condition": cond or None, "best_layer": int(best["layer"]), "best_depth": float(best["depth"]),
               "best_score": float(best["score"]), "ci_low": float(best["ci_low"]), "ci_high": float(best["ci_high"]),
               "final_layer": int(final["layer"]), "final_score": float(final["score"]), "gain": gain, "gain_ci_low": lo,
               "gain_ci_high": hi, "supported": bool(supported),
               "recommended_layer": int(best["layer"]) if supported else int(final["layer"]), "text": text}
        if claim is not None:
            rec["best_set"] = [int(x) for x in claim.get("best_set") or []]
            wins = claim.get("win_frequency") or {}
            top = [kv for kv in sorted(wins.items(), key=lambda kv: -float(kv[1]))[:3] if float(kv[1]) > 0]
            rec["win_frequency"] = {str(k): float(v) for k, v in wins.items()}
            rec["text"] += (f" Layers statistically indistinguishable from the best: {', '.join(map(str, rec['best_set'])) or '-'}; "
                            "most frequent winners across resamples: " + ", ".join(f"layer {k} {float(v):.0%}" for k, v in top) + ".")
        out.append(rec)
    return out


def _layer_table(df: pd.DataFrame) -> str:
    show_cond = "condition" in df and df["condition"].notna().any()
    show_p = "p_value" in df and np.isfinite(df["p_value"].astype(float)).any()
    head = ["layer", "depth", *(["condition"] if show_cond else []), "metric", "score", "95% CI", *(["p"] if show_p else []),
            "vs final", "vs final 95% CI", "n"]
    rows = []
    for r in df.to_dict(orient="records"):
        layer = str(int(r["layer"])) if r.get("representation", "layer") == "layer" else str(r["representation"])
        cells = [html.escape(layer), _f(r["depth"], 2), *([html.escape(str(r["condition"] or ""))] if show_cond else []),
                 html.escape(str(r["metric"])), _f(r["score"]) or "undefined",
                 f"{_f(r.get('ci_low'))} – {_f(r.get('ci_high'))}" if _f(r.get("ci_low")) else "",
                 *([_f(r.get("p_value"), 4)] if show_p else []), _f(r.get("diff_vs_final")),
                 f"{_f(r.get('diff_ci_low'))} – {_f(r.get('diff_ci_high'))}" if _f(r.get("diff_ci_low")) else "",
                 "" if r.get("n") is None or (isinstance(r.get("n"), float) and math.isnan(r["n"])) else str(int(r["n"]))]
        rows.append("<tr>" + "".join(f"<td{' class=l' if i in (2, 3) else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _wide(df: pd.DataFrame) -> str:
    t = df.pivot_table(index="layer", columns="metric", values="score", sort=False)
    head = "<tr><th>layer</th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns) + "</tr>"
    body = "".join("<tr><td>" + str(int(i)) + "</td>" + "".join(f"<td>{_f(v)}</td>" for v in row) + "</tr>"
                   for i, row in zip(t.index, t.to_numpy(), strict=False))
    return f"<table>{head}{body}</table>"


def _section(ev: dict[str, Any], report: EvalReport, tmp: Path) -> str:
    task = get_task(report.task) if report.task else None
    title = task.title if task is not None and task.title else report.task
    params = {k: v for k, v in report.params.items() if k not in ("task", "version")}
    parts = [f"<h2>{html.escape(title)} <span class=small>(evaluation {ev['id']}, {html.escape(str(ev.get('created_at') or ''))})</span></h2>",
             "<p class=small>parameters: " + ", ".join(f"<code>{html.escape(str(k))}={html.escape(str(v))}</code>"
                                                     for k, v in params.items()) + "</p>"]
    stale = task is not None and str(report.params.get("version")) != str(task.version)
    if stale:
        assert task is not None  # stale implies a task
        parts.append(f"<div class='rec none'>Computed by an older version of this task (version {html.escape(str(report.params.get('version')))}, "
                     f"now {html.escape(str(task.version))}): shown for the record, no recommendation; rerun the evaluation.</div>")
    if report.task != "diagnostics" and not stale:
        recs = recommendations(report)
        for rec in recs:
            cond = f"<b>[{html.escape(str(rec['condition']))}]</b> " if rec["condition"] else ""
            parts.append(f"<div class='rec{'' if rec['supported'] or rec['best_layer'] == rec['final_layer'] else ' none'}'>"
                         f"{cond}{html.escape(rec['text'])}</div>")
        lines = report.headline()
        if lines:
            parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
    png = tmp / f"eval{ev['id']}.png"
    try:
        (task.plot(report, png) if task is not None else report.plot(png))
        parts.append(f"<img alt='{html.escape(title)} by depth' src='{_png(png)}'>")
    except Exception as exc:  # a figure that cannot be drawn must not lose the tables
        parts.append(f"<p class=small>figure unavailable: {html.escape(str(exc))}</p>")
    if report.task == "diagnostics":
        parts.append(_wide(report.table))
        cmap = report.notes.get("cka_map")
        if cmap:
            from .figures import plot_cka_map

            heat = plot_cka_map(cmap["matrix"], cmap["layers"], tmp / f"cka{ev['id']}.png", title=f"linear CKA - {report.run_label}")
            parts.append(f"<img alt='CKA map' src='{_png(heat)}'>")
    else:
        parts.append(_layer_table(report.metric_table()))
        extra = sorted(set(report.table["metric"]) - {report.params.get("primary_metric")})
        if extra:
            parts.append(f"<details><summary>other metrics ({html.escape(', '.join(extra))})</summary>"
                         f"{_layer_table(report.table[report.table['metric'].isin(extra)])}</details>")
    if report.task == "perturbation":
        for cond, note in report.notes.get("conditions", {}).items():
            bits = ", ".join(f"{html.escape(str(k))}: {_f(v) if isinstance(v, float) else html.escape(str(v))}"
                             for k, v in note.items() if not isinstance(v, dict))
            parts.append(f"<p class=small>[{html.escape(str(cond))}] {bits}</p>")
    return "\n".join(parts)


def render_run_report(store: Any, info: Any) -> str:
    """The HTML text of the report of one run (``store``: an open :class:`sclstore.Store`)."""
    evs = store.evaluations(info.id)
    with tempfile.TemporaryDirectory() as td:
        sections = []
        for ev in evs:
            report = store.evaluation(ev["id"])
            sections.append(_section(ev, report, Path(td)))
    meta = (f"dataset <b>{html.escape(info.dataset_name)}</b>, model <b>{html.escape(info.model_name)}</b>; "
            f"{info.n_cells} cells × {len(info.layers)} layers (0..{info.layers[-1]}), pools {html.escape(', '.join(info.pools))}, "
            f"{html.escape(info.dtype)}; {len(evs)} cached evaluation(s)")
    body = "\n".join(sections) if sections else "<p>No cached evaluation of this run yet: run <code>sclstore eval …</code> first.</p>"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>sclstore report: run {info.id} "
            f"{html.escape(info.label)}</title><style>{_CSS}</style></head><body>"
            f"<h1>Layer report: run {info.id} ({html.escape(info.label)})</h1><p class=meta>{meta}</p>"
            "<p class=small>A better layer is recommended only when the paired interval of its difference to the final layer "
            "excludes 0; scores are per layer, intervals 95%.</p>"
            f"{body}<p class=small>generated by sclstore on {now}</p></body></html>\n")


def write_run_report(store: Any, info: Any, out_html: str | os.PathLike[str]) -> Path:
    """Write :func:`render_run_report` to ``out_html`` (parent folders created)."""
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_run_report(store, info), encoding="utf-8")
    return out
