"""Score-vs-depth figure: one line per condition with CI bands, best and final layers marked."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclstore.store.errors import InvalidInputError

__all__ = ["layer_scores_figure", "plot_layer_scores"]

logger = logging.getLogger(__name__)


def layer_scores_figure(
    table: pd.DataFrame,
    *,
    title: str = "Score by layer depth",
    ylabel: str = "score",
    group_col: str | None = "condition",
    baselines: Sequence[str] = ("pca_hvg",),
) -> Any:
    """Score vs relative depth, one line per condition, as a matplotlib ``Figure`` (Agg canvas).

    Every layer of the table appears: a layer with a score is a point of its condition's line, a
    layer without one (in every condition) is an × on the x axis and named in the legend. One
    condition gets a CI band (``ci_low``/``ci_high``); several get dodged error bars instead, since
    overlapping translucent bands hide each other. A ring marks the final layer. With claim columns
    (``claimed_best``, ``best_set`` from :func:`~sclstore.eval.results.apply_claim`) a star marks the
    best layer only when its gain over the final layer is supported, and filled dots mark the layers
    indistinguishable from the best; without them the star marks the highest point estimate. The
    gain goes into the condition's legend entry (labels on the axes overlap). Baseline rows
    (``representation`` in ``baselines``, e.g. the PCA-of-counts reference) are dashed and
    ``noise_ceiling`` rows dotted horizontal lines in their condition's colour, and the legend
    shows them in that colour (with one condition) or says so (with several). The top axis shows
    the layer numbers.

    Parameters
    ----------
    table
        Rows with at least ``depth``, ``layer`` and ``score`` (e.g. from ``layer_table``);
        optional ``ci_low``, ``ci_high``, ``representation`` and ``group_col``.
    title, ylabel
        Figure title (lines wrapped at 80 characters) and y-axis label.
    group_col
        Column with one line per value (``None``, missing or all-empty: a single line).
    baselines
        Representation names drawn as reference lines.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InvalidInputError
        If required columns are missing or no finite score exists.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no open-figure registry.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    missing = {"depth", "layer", "score"} - set(table.columns)
    if missing:
        msg = f"table lacks columns {sorted(missing)}; pass a layer_table() DataFrame"
        raise InvalidInputError(msg)
    df = table.copy()
    if "representation" not in df:
        df["representation"] = "layer"
    use_groups = group_col is not None and group_col in df and df[group_col].notna().any()
    groups = list(dict.fromkeys(df[group_col].dropna())) if use_groups else [None]
    layers = df[df["representation"] == "layer"]
    if not np.isfinite(layers["score"].astype(float)).any():
        msg = "no finite layer score to plot"
        raise InvalidInputError(msg)
    fig = Figure(figsize=(8.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(groups) > 1
    # several conditions: intervals as dodged error bars (overlapping translucent bands turn to mud)
    dodge = 0.012 if many else 0.0
    undefined: dict[int, list[str]] = {}  # layer -> groups in which it has no score
    baseline_drawn = ceiling_drawn = False
    stars = 0
    for i, g in enumerate(groups):
        c = colors[i % len(colors)]
        sel = layers if g is None else layers[layers[group_col] == g]
        sel = sel.sort_values("depth")
        x, y = sel["depth"].to_numpy(float), sel["score"].to_numpy(float)
        ok = np.isfinite(y)
        for v in sel["layer"].to_numpy()[~ok]:
            undefined.setdefault(int(v), []).append("" if g is None else str(g))
        xs = x + (i - (len(groups) - 1) / 2) * dodge
        label = "layers" if g is None else str(g)
        has_ci = {"ci_low", "ci_high"} <= set(sel.columns) and np.isfinite(sel["ci_low"].astype(float)).any()
        if ok.any():
            b = int(np.flatnonzero(ok)[np.argmax(y[ok])])
            f = int(np.argmax(x))
            with_claims = "claimed_best" in sel and sel["claimed_best"].notna().any()
            claimed = sel["claimed_best"].astype(object).eq(True).to_numpy(bool) if with_claims else None
            star = (b if claimed is not None and claimed[b] else None) if with_claims else b
            if star is not None and star != f and np.isfinite(y[f]):  # the gain goes into the legend: labels never overlap
                label += f"  (layer {int(sel['layer'].to_numpy()[star])}: {y[star] - y[f]:+.2f} vs final)"
        ax.plot(xs[ok], y[ok], "-o", color=c, ms=3.5, lw=1.6, label=label, zorder=3)
        if has_ci:
            lo_ci, hi_ci = sel["ci_low"].to_numpy(float), sel["ci_high"].to_numpy(float)
            if many:
                ax.errorbar(xs[ok], y[ok], yerr=[y[ok] - lo_ci[ok], hi_ci[ok] - y[ok]], fmt="none", ecolor=c, elinewidth=1.1,
                            capsize=2.5, alpha=0.9, zorder=2)
            else:
                ax.fill_between(xs[ok], lo_ci[ok], hi_ci[ok], color=c, alpha=0.18, lw=0)
        if ok.any():
            if with_claims and "best_set" in sel:  # layers statistically indistinguishable from the best
                bs = sel["best_set"].astype(object).eq(True).to_numpy(bool) & ok
                ax.plot(xs[bs], y[bs], ls="none", marker="o", ms=6, color=c, mec="black", mew=0.5, zorder=4)
            if np.isfinite(y[f]):
                ax.plot(xs[f], y[f], marker="o", ms=10, mfc="none", mec=c, mew=1.8, zorder=5)
            if star is not None:  # a star only where the gain over the final layer is supported
                stars += 1
                ax.plot(xs[star], y[star], marker="*", ms=14, color=c, mec="black", mew=0.7, zorder=5)
        base = df[df["representation"].isin(baselines)]
        if g is not None and group_col in base:
            base = base[base[group_col] == g]
        for _, r in base.iterrows():
            ax.axhline(float(r["score"]), color=c, ls="--", lw=1.0, alpha=0.8)
            baseline_drawn = True
        ceil = df[df["representation"] == "noise_ceiling"]
        if g is not None and group_col in ceil:
            ceil = ceil[ceil[group_col] == g]
        for _, r in ceil.iterrows():
            ax.axhline(float(r["score"]), color=c, ls=":", lw=1.4, alpha=0.9)
            ceiling_drawn = True
    # reference lines take their condition's colour; the legend says so (one condition: that colour)
    ref = colors[0] if not many else "grey"
    colour_note = "" if not many else ", colour of its condition"
    claims = "claimed_best" in layers and layers["claimed_best"].notna().any()
    if stars:
        ax.plot([], [], ls="none", marker="*", ms=11, color="grey", mec="black", mew=0.7,
                label="best layer, gain over final supported" if claims else "highest layer (no interval: no claim)")
    elif claims:
        ax.plot([], [], ls="none", label="no layer beats the final one\n(simultaneous 95% CI of the gain includes 0)")
    if claims:
        ax.plot([], [], ls="none", marker="o", ms=6, color="grey", mec="black", mew=0.5, label="indistinguishable from the best")
    ax.plot([], [], ls="none", marker="o", ms=9, mfc="none", mec="grey", mew=1.8, label="final layer")
    if ceiling_drawn:
        ax.plot([], [], color=ref, ls=":", lw=1.4, label=f"noise ceiling{colour_note}")
    if baseline_drawn:
        ax.plot([], [], color=ref, ls="--", lw=1.0, label=f"PCA-of-counts baseline{colour_note}")
    ax.set_xlabel("relative depth (layer / number of layers)")
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.fill(line, 80) for line in title.splitlines()), fontsize=9.5)
    ax.set_xlim(-0.04, 1.04)
    ax.grid(alpha=0.3, lw=0.5)
    ax.axhline(0.0, color="black", lw=0.6, alpha=0.5)
    if undefined:  # every layer appears: one without a score is marked on the axis, not silently dropped
        depth = layers.drop_duplicates("layer").set_index("layer")["depth"].astype(float)
        bits = []
        for la, gs in sorted(undefined.items()):
            everywhere = len(gs) == len(groups)
            bits.append(f"layer {la}" + ("" if everywhere else f" ({', '.join(gs)})"))
            if everywhere:
                ax.plot([depth[la]], [0.0], marker="x", ms=9, mew=2, color="black", ls="none",
                        transform=ax.get_xaxis_transform(), clip_on=False, zorder=6)
        ax.plot([], [], marker="x", ms=8, mew=2, color="black", ls="none", label="no score (undefined): " + ", ".join(bits))
    depth_of = layers.drop_duplicates("layer").sort_values("layer")
    if 1 < len(depth_of) <= 30:  # the layer numbers on top, so a reader need not convert depths
        top = ax.secondary_xaxis("top")
        step = max(1, len(depth_of) // 13)
        top.set_xticks(depth_of["depth"].to_numpy(float)[::step], [str(int(v)) for v in depth_of["layer"].to_numpy()[::step]])
        top.tick_params(labelsize=7)
        top.set_xlabel("layer", fontsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_layer_scores(
    table: pd.DataFrame,
    out_png: str | Path,
    *,
    title: str = "Score by layer depth",
    ylabel: str = "score",
    group_col: str | None = "condition",
    baselines: Sequence[str] = ("pca_hvg",),
    dpi: int = 200,
) -> Path:
    """Draw :func:`layer_scores_figure` and write it as a PNG; returns the written file."""
    fig = layer_scores_figure(table, title=title, ylabel=ylabel, group_col=group_col, baselines=baselines)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    logger.info("wrote %s", out)
    return out
