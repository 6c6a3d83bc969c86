"""Per-layer result tables: rows, best layer, final layer, gain.

A runner fills one :class:`LayerScore` per (layer, pool[, condition]) (plus optional baseline
rows such as the PCA-of-counts representation), turns them into a long DataFrame with
:func:`layer_table` and summarises each group with :func:`summarize_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from sclstore.store.errors import InvalidInputError

__all__ = [
    "TABLE_COLUMNS",
    "BASELINE_LAYER",
    "LayerScore",
    "LayerSummary",
    "layer_depth",
    "layer_table",
    "summarize_layers",
]

#: Layer value used for rows that are not a model layer (e.g. the PCA-of-counts baseline).
BASELINE_LAYER = -1

TABLE_COLUMNS: tuple[str, ...] = (
    "representation", "layer", "depth", "pool", "condition", "metric", "score", "ci_low", "ci_high",
    "p_value", "diff_vs_final", "diff_ci_low", "diff_ci_high", "diff_p_value", "n",
)

_NAN = float("nan")


@dataclass(frozen=True, kw_only=True)
class LayerScore:
    """One row of a per-layer result table.

    Attributes
    ----------
    layer
        Layer index (0 = embedding-layer output), or :data:`BASELINE_LAYER` for a baseline.
    depth
        ``layer / L`` (``nan`` for baselines).
    score, ci_low, ci_high, p_value
        The score, its interval and p-value (``nan`` when not computed).
    pool, condition
        Pooling and condition (``None`` when not applicable).
    metric
        What the score is (e.g. ``"spearman_time"``, ``"rsa_shift"``).
    representation
        ``"layer"`` or a baseline name such as ``"pca_hvg"``.
    diff_vs_final, diff_ci_low, diff_ci_high, diff_p_value
        Paired difference against the final layer.
    n
        Cells or perturbations scored.
    """

    layer: int
    depth: float
    score: float
    ci_low: float = _NAN
    ci_high: float = _NAN
    p_value: float = _NAN
    pool: str | None = None
    condition: str | None = None
    metric: str = "score"
    representation: str = "layer"
    diff_vs_final: float = _NAN
    diff_ci_low: float = _NAN
    diff_ci_high: float = _NAN
    diff_p_value: float = _NAN
    n: int | None = None


@dataclass(frozen=True, kw_only=True)
class LayerSummary:
    """Best and final layer of one (pool, condition, metric) group.

    Attributes
    ----------
    best_layer, best_depth, best_score
        The layer with the highest score.
    final_layer, final_score
        The deepest layer.
    gain
        ``best_score - final_score``.
    relative_gain
        ``gain / |final_score|`` (``nan`` when the final score is 0).
    """

    best_layer: int
    best_depth: float
    best_score: float
    final_layer: int
    final_score: float
    gain: float
    relative_gain: float


def layer_depth(layer: int, n_layers: int) -> float:
    """Relative depth ``layer / n_layers`` of layer ``0..n_layers`` (0 = input, 1 = last block).

    Parameters
    ----------
    layer
        Layer index.
    n_layers
        Number of transformer blocks ``L`` (layers are ``0..L``).

    Returns
    -------
    float
    """
    if n_layers <= 0 or not 0 <= layer <= n_layers:
        msg = f"layer {layer} outside 0..{n_layers}; pass n_layers = number of blocks"
        raise InvalidInputError(msg)
    return layer / n_layers


def layer_table(rows: Iterable[LayerScore]) -> pd.DataFrame:
    """Long DataFrame of per-layer rows with the columns :data:`TABLE_COLUMNS`.

    Parameters
    ----------
    rows
        Scores, one per (representation/layer, pool, condition, metric).

    Returns
    -------
    pandas.DataFrame
        Grouped by pool, condition and metric (in order of first appearance); within a group
        the layers by index, then the baselines.
    """
    recs = [asdict(r) for r in rows]
    df = pd.DataFrame(recs, columns=list(TABLE_COLUMNS))
    if df.empty:
        return df
    keys = []
    for col in ("pool", "condition", "metric"):  # groups keep their order of first appearance
        df[f"_{col}"] = pd.factorize(df[col].astype(object).where(df[col].notna(), ""))[0]
        keys.append(f"_{col}")
    df["_b"] = df["representation"] != "layer"
    df = df.sort_values([*keys, "_b", "layer"], kind="stable")
    return df.drop(columns=[*keys, "_b"]).reset_index(drop=True)


def _summary(group: pd.DataFrame) -> LayerSummary:
    g = group[(group["representation"] == "layer") & np.isfinite(group["score"].astype(float))]
    if g.empty:
        msg = "no finite layer score in this group; nothing to summarise"
        raise InvalidInputError(msg)
    best = g.loc[g["score"].astype(float).idxmax()]
    final = g.loc[g["layer"].astype(int).idxmax()]
    gain = float(best["score"]) - float(final["score"])
    rel = gain / abs(float(final["score"])) if float(final["score"]) != 0 else _NAN
    return LayerSummary(best_layer=int(best["layer"]), best_depth=float(best["depth"]), best_score=float(best["score"]),
                        final_layer=int(final["layer"]), final_score=float(final["score"]), gain=gain,
                        relative_gain=float(rel) if not math.isnan(rel) else _NAN)


def summarize_layers(table: pd.DataFrame, *, by: Sequence[str] = ("pool", "condition", "metric")) -> pd.DataFrame:
    """Best layer, final layer and gain per group of a :func:`layer_table`.

    Parameters
    ----------
    table
        Output of :func:`layer_table`.
    by
        Grouping columns (missing columns and all-``None`` columns are ignored).

    Returns
    -------
    pandas.DataFrame
        One row per group: the group keys and the fields of :class:`LayerSummary`.

    Raises
    ------
    InvalidInputError
        If the table lacks the ``layer``/``score`` columns or a group has no finite score.
    """
    missing = {"layer", "score", "depth", "representation"} - set(table.columns)
    if missing:
        msg = f"table lacks columns {sorted(missing)}; build it with layer_table()"
        raise InvalidInputError(msg)
    keys = [k for k in by if k in table.columns and table[k].notna().any()]
    out = []
    groups = table.groupby(keys, dropna=False, sort=False) if keys else [((), table)]
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(keys, key)), **asdict(_summary(grp))})
    return pd.DataFrame(out)
