"""Figures of the diagnostics task: one panel per metric vs depth, and the layer x layer CKA heatmap."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sclstore.store.errors import InvalidInputError

__all__ = ["plot_cka_map", "plot_diagnostics"]

logger = logging.getLogger(__name__)

_LABELS = {"anisotropy": "anisotropy (mean cosine)", "top_coordinate_share": "top-coordinate variance share",
           "participation_ratio": "participation ratio", "twonn_dimension": "TwoNN intrinsic dimension",
           "cka_final": "linear CKA vs final layer", "cka_previous": "linear CKA vs previous layer"}


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | Path, dpi: int) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    logger.info("wrote %s", out)
    return out


def plot_diagnostics(table: pd.DataFrame, out_png: str | Path, *, title: str = "diagnostics", dpi: int = 150) -> Path:
    """One small panel per diagnostic metric, value vs relative depth; writes a PNG."""
    if not {"metric", "depth", "score"} <= set(table.columns) or table.empty:
        raise InvalidInputError("pass the table of a diagnostics report (columns metric, depth, score)")
    metrics = list(dict.fromkeys(table["metric"]))
    cols = 3
    rows = (len(metrics) + cols - 1) // cols
    fig = _figure((3.3 * cols, 2.5 * rows))
    fig.suptitle("\n".join(textwrap.fill(line, 100) for line in title.splitlines()), fontsize=10)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        sel = table[table["metric"] == m].sort_values("depth")
        x, y = sel["depth"].to_numpy(float), sel["score"].to_numpy(float)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], "-o", ms=3, lw=1.4)
        if not ok.all():  # undefined values (e.g. a constant layer) are marked on the axis, not dropped silently
            ax.plot(x[~ok], np.zeros((~ok).sum()), ls="none", marker="x", ms=7, mew=1.8, color="black",
                    transform=ax.get_xaxis_transform(), clip_on=False)
        undefined = ", ".join(str(int(v)) for v in sel["layer"].to_numpy()[~ok]) if "layer" in sel and not ok.all() else ""
        ax.set_title(_LABELS.get(m, m), fontsize=9)
        ax.set_xlabel("relative depth" + (f"   (× undefined: layer {undefined})" if undefined else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
        if m.startswith("cka") or m in ("anisotropy", "top_coordinate_share"):
            lo = min(0.0, float(np.nanmin(sel["score"].to_numpy(float)))) if np.isfinite(sel["score"].astype(float)).any() else 0.0
            ax.set_ylim(lo - 0.03, 1.03)
    return _save(fig, out_png, dpi)


def plot_cka_map(matrix: Sequence[Sequence[float]] | np.ndarray, layers: Sequence[int], out_png: str | Path, *,
                 title: str = "linear CKA between layers", dpi: int = 150) -> Path:
    """Heatmap of a layer x layer CKA matrix; writes a PNG."""
    M = np.asarray(matrix, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] != len(layers):
        raise InvalidInputError(f"CKA map must be square with one row per layer; got {M.shape} for {len(layers)} layers")
    k = len(layers)
    fig = _figure((1.2 + 0.32 * k + 1.2, 0.8 + 0.32 * k + 0.6))
    ax = fig.add_subplot()
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", origin="lower")
    step = max(1, k // 16)
    ticks = list(range(0, k, step))
    ax.set_xticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")
    return _save(fig, out_png, dpi)
