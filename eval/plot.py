"""Score-vs-depth figure: one line per condition with CI bands, best and final layers marked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sclstore.store.errors import InvalidInputError

__all__ = ["plot_layer_scores"]

logger = logging.getLogger(__name__)


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
    """Plot score vs relative depth, one line per condition, and write a PNG.

    Each line has its CI band (``ci_low``/``ci_high`` when present) and a ring at the final
    layer. With claim columns (``claimed_best``, ``best_set`` from
    :func:`~sclstore.eval.results.apply_claim`) the star marks the best layer only when its gain
    over the final layer is supported, and filled dots mark the layers indistinguishable from the
    best; without them the star marks the highest point estimate. ``noise_ceiling`` rows are
    drawn as dotted lines.
    Baseline rows (``representation`` in ``baselines``, e.g. the PCA-of-counts reference) are
    drawn as dashed horizontal lines in the colour of their group.

    Parameters
    ----------
    table
        Rows with at least ``depth``, ``layer`` and ``score`` (e.g. from ``layer_table``);
        optional ``ci_low``, ``ci_high``, ``representation`` and ``group_col``.
    out_png
        Output path.
    title, ylabel
        Figure title and y-axis label.
    group_col
        Column with one line per value (``None``, missing or all-empty: a single line).
    baselines
        Representation names drawn as reference lines.
    dpi
        Resolution.

    Returns
    -------
    pathlib.Path
        The written file.

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
    fig = Figure(figsize=(7.6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        c = colors[i % len(colors)]
        sel = layers if g is None else layers[layers[group_col] == g]
        sel = sel.sort_values("depth")
        x, y = sel["depth"].to_numpy(float), sel["score"].to_numpy(float)
        label = "layers" if g is None else str(g)
        ax.plot(x, y, "-o", color=c, ms=3.5, lw=1.6, label=label)
        if {"ci_low", "ci_high"} <= set(sel.columns) and np.isfinite(sel["ci_low"].astype(float)).any():
            ax.fill_between(x, sel["ci_low"].to_numpy(float), sel["ci_high"].to_numpy(float), color=c, alpha=0.18, lw=0)
        ok = np.isfinite(y)
        if ok.any():
            b = int(np.flatnonzero(ok)[np.argmax(y[ok])])
            f = int(np.argmax(x))
            with_claims = "claimed_best" in sel and sel["claimed_best"].notna().any()
            star = (b if bool(sel["claimed_best"].fillna(False).to_numpy(bool)[b]) else None) if with_claims else b
            if with_claims and "best_set" in sel:  # layers statistically indistinguishable from the best
                bs = sel["best_set"].fillna(False).to_numpy(bool)
                ax.plot(x[bs], y[bs], ls="none", marker="o", ms=6, color=c, mec="black", mew=0.5, zorder=4)
            ax.plot(x[f], y[f], marker="o", ms=10, mfc="none", mec=c, mew=1.8, zorder=5)
            if star is not None:  # a star only where the gain over the final layer is supported
                ax.plot(x[star], y[star], marker="*", ms=14, color=c, mec="black", mew=0.7, zorder=5)
                if star != f and np.isfinite(y[f]):
                    ax.annotate(f"+{y[star] - y[f]:.2f}", (x[star], y[star]), textcoords="offset points", xytext=(0, 9),
                                ha="left" if x[star] < 0.05 else ("right" if x[star] > 0.95 else "center"), fontsize=8, color=c)
        base = df[df["representation"].isin(baselines)]
        if g is not None and group_col in base:
            base = base[base[group_col] == g]
        for _, r in base.iterrows():
            ax.axhline(float(r["score"]), color=c, ls="--", lw=1.0, alpha=0.8)
        ceil = df[df["representation"] == "noise_ceiling"]
        if g is not None and group_col in ceil:
            ceil = ceil[ceil[group_col] == g]
        for _, r in ceil.iterrows():
            ax.axhline(float(r["score"]), color=c, ls=":", lw=1.4, alpha=0.9)
    claims = "claimed_best" in layers and layers["claimed_best"].notna().any()
    ax.plot([], [], ls="none", marker="*", ms=11, color="grey", mec="black", mew=0.7,
            label="best layer, gain supported (+gain vs final)" if claims else "best layer (+gain vs final)")
    if claims:
        ax.plot([], [], ls="none", marker="o", ms=6, color="grey", mec="black", mew=0.5, label="indistinguishable from the best")
    if (df["representation"] == "noise_ceiling").any():
        ax.plot([], [], color="grey", ls=":", lw=1.4, label="noise ceiling")
    ax.plot([], [], ls="none", marker="o", ms=9, mfc="none", mec="grey", mew=1.8, label="final layer")
    if df["representation"].isin(baselines).any():
        ax.plot([], [], color="grey", ls="--", lw=1.0, label="PCA-of-counts baseline")
    ax.set_xlabel("relative depth (layer / number of layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-0.03, 1.03)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.08 * (hi - lo))  # room for the gain labels above the stars
    ax.grid(alpha=0.3, lw=0.5)
    ax.axhline(0.0, color="black", lw=0.6, alpha=0.5)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    logger.info("wrote %s", out)
    return out
