"""Hints added to ingest errors, from what the input actually holds.

* gene ids of the wrong kind: name the var columns that look like the ids the model wants
  (never a column that does not exist);
* ``X`` is not raw counts: point at a layer that looks like counts, or at ``.raw``.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from .adapter import looks_like_ensembl

__all__ = ["amend_counts_error", "amend_gene_error", "counts_alternatives", "gene_column_candidates"]

_GENE_EG = re.compile(r",? ?\(?e\.g\. --gene-column [^\s)]+\)?")


def gene_column_candidates(var: pd.DataFrame | None, want_ensembl: bool) -> list[str]:
    """var columns (text, mostly distinct) whose values look like Ensembl ids (or like symbols)."""
    if var is None:
        return []
    out = []
    for name in var.columns:
        col = var[name]
        if not (col.dtype == object or isinstance(col.dtype, (pd.CategoricalDtype, pd.StringDtype))):
            continue
        values = [str(v) for v in col.dropna().astype(str).head(2000)]
        if not values or len(set(values)) < 0.5 * len(values):
            continue
        if not all(re.fullmatch(r"[A-Za-z0-9._:/-]+", v) for v in values[:200]):
            continue
        if looks_like_ensembl(values) == want_ensembl:
            out.append(str(name))
    return out


def amend_gene_error(message: str, var: pd.DataFrame | None) -> str:
    """Replace the generic ``e.g. --gene-column X`` of a gene-mapping error with real columns."""
    if "--gene-column" not in message:
        return message
    want_ensembl = "holding Ensembl ids" in message
    want = "Ensembl ids" if want_ensembl else "gene symbols"
    cands = gene_column_candidates(var, want_ensembl)
    if cands:
        hint = f" (var columns that look like {want}: {', '.join(cands[:5])}, e.g. --gene-column {cands[0]})"
    else:
        cols = ", ".join(map(str, var.columns[:10])) if var is not None and len(var.columns) else "(none)"
        hint = f" (no var column looks like {want}; var columns: {cols}: add one with your genes' {want} and pass --gene-column NAME)"
    stripped = _GENE_EG.sub("", message)
    if "with --gene-column" in stripped:
        return stripped.replace("with --gene-column", "with --gene-column" + hint, 1)
    return stripped + hint


def counts_alternatives(source: Any) -> tuple[list[str], bool]:
    """``(layer names, has .raw)`` of the source (an .h5ad file or an AnnData)."""
    adata = getattr(source, "adata", None)
    if adata is not None:
        return [str(k) for k in adata.layers], getattr(adata, "raw", None) is not None
    f = getattr(source, "_file", None)
    if f is None:
        return [], False
    layers = [str(k) for k in f["layers"]] if "layers" in f else []
    return layers, "raw" in f


def amend_counts_error(message: str, source: Any) -> str:
    """Add where raw counts probably are (a ``counts``-like layer, or ``.raw``) to an X error."""
    if getattr(source, "counts_key", "X") != "X":
        return message
    layers, has_raw = counts_alternatives(source)
    likely = [k for k in layers if re.search(r"count|raw|umi", k, re.IGNORECASE)]
    parts = []
    if likely:
        parts.append(f"the file has layer(s) {', '.join(map(repr, likely))}: try --counts-layer {likely[0]}")
    elif layers:
        parts.append(f"layers in the file: {', '.join(layers)}")
    if has_raw:
        parts.append("it also has .raw, which often holds the raw counts: write it out with "
                     "adata.raw.to_adata().write_h5ad('raw.h5ad') and ingest that")
    return message + ("; " + "; ".join(parts) if parts else "")
