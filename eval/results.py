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

from sclstore.eval.claims import Claim
from sclstore.store.errors import InvalidInputError

__all__ = [
    "BASELINE_LAYER",
    "TABLE_COLUMNS",
    "LayerScore",
    "LayerSummary",
    "apply_claim",
    "claim_summary_row",
    "layer_depth",
    "layer_table",
    "summarize_layers",
]

#: Layer value used for rows that are not a model layer (e.g. the PCA-of-counts baseline).
BASELINE_LAYER = -1

TABLE_COLUMNS: tuple[str, ...] = (
    "representation", "layer", "depth", "pool", "condition", "metric", "score", "ci_low", "ci_high",
    "p_value", "diff_vs_final", "diff_ci_low", "diff_ci_high", "diff_p_value", "diff_p_adj", "best_set", "win_frequency",
    "claimed_best", "n",
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
        Paired difference against the final layer: simultaneous (max-statistic over the layers)
        interval and the unadjusted p-value.
    diff_p_adj
        The difference's p-value adjusted for the number of layers (max-statistic).
    best_set
        The layer is statistically indistinguishable from the best layer.
    win_frequency
        Fraction of calibrated resamples in which the layer scores highest.
    claimed_best
        The layer is the best one *and* its gain over the final layer is supported.
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
    diff_p_adj: float = _NAN
    best_set: bool | None = None
    win_frequency: float = _NAN
    claimed_best: bool | None = None
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
        out.append({**dict(zip(keys, key, strict=False)), **asdict(_summary(grp))})
    return pd.DataFrame(out)


def apply_claim(rows: Sequence[LayerScore], claim: Claim) -> list[LayerScore]:
    """Fill the comparison columns of one group's layer rows from its :class:`~sclstore.eval.claims.Claim`.

    Parameters
    ----------
    rows
        Layer rows of one (pool, condition, metric) group.
    claim
        Its claim (:func:`~sclstore.eval.claims.layer_claims`).

    Returns
    -------
    list of LayerScore
        Copies with ``diff_*``, ``best_set``, ``win_frequency`` and ``claimed_best`` set.
    """
    from dataclasses import replace

    out = []
    for r in rows:
        if r.representation != "layer" or r.layer not in claim.layers:
            out.append(r)
            continue
        li = r.layer
        is_final = li == claim.final_layer
        out.append(replace(
            r, diff_vs_final=0.0 if is_final else claim.diff[li],
            diff_ci_low=_NAN if is_final else claim.diff_ci_low[li], diff_ci_high=_NAN if is_final else claim.diff_ci_high[li],
            diff_p_value=_NAN if is_final else claim.diff_p[li], diff_p_adj=_NAN if is_final else claim.diff_p_adj[li],
            best_set=li in claim.indistinguishable, win_frequency=claim.win_frequency.get(li, _NAN),
            claimed_best=bool(claim.claimed and li == claim.best_layer)))
    return out


def claim_summary_row(claim: Claim, *, depths: dict[int, float], **keys: object) -> dict[str, object]:
    """One summary row (group keys + the claim) for an evaluation report.

    Parameters
    ----------
    claim
        The group's claim.
    depths
        ``{layer: relative depth}``.
    **keys
        Group keys (``pool``, ``condition``, ``metric``).

    Returns
    -------
    dict
    """
    rel = claim.gain / abs(claim.final_score) if claim.final_score else _NAN
    return {**keys, "best_layer": claim.best_layer, "best_depth": depths.get(claim.best_layer, _NAN), "best_score": claim.best_score,
            "final_layer": claim.final_layer, "final_score": claim.final_score, "gain": claim.gain, "relative_gain": rel,
            "gain_ci_low": claim.gain_ci_low, "gain_ci_high": claim.gain_ci_high, "claimed": claim.claimed,
            "best_set": list(claim.indistinguishable), "win_frequency": {str(k): v for k, v in claim.win_frequency.items()},
            "flagged": list(claim.flagged), "n_resamples": claim.n_resamples, "headline": claim.headline}
