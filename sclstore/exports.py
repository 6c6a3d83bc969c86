"""Exports that need more than the store: source counts (``--with-counts``) and SOMA.

``--with-counts`` reads the selected cells' raw counts and the genes from the file the dataset
was ingested from (the catalog records its path), so the .h5ad is a complete AnnData that
``tiledbsoma.io.from_h5ad`` or scanpy accept. ``-o out.soma`` writes a SOMA Experiment
(measurement ``RNA``: ``X/data`` = counts, ``var``, and one ``obsm`` matrix per stored layer)
with :mod:`tiledbsoma` (optional extra ``sclstore[soma]``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sclstore.store.errors import InvalidInputError

__all__ = ["open_counts", "require_tiledbsoma", "write_soma"]

logger = logging.getLogger(__name__)


def require_tiledbsoma() -> Any:
    """Import :mod:`tiledbsoma` or say how to install it."""
    try:
        import tiledbsoma
        import tiledbsoma.io
    except ImportError:
        raise InvalidInputError("SOMA needs tiledbsoma: pip install 'sclstore[soma]' (or pip install tiledbsoma)") from None
    return tiledbsoma


def open_counts(result: Any, source: Any = None) -> Any:
    """An open counts source for ``result``'s dataset: ``source`` (path or AnnData) or the
    file recorded at ingest. Close it when done (a context manager).

    Raises
    ------
    InvalidInputError
        If the dataset came from memory (and no ``source`` is given) or its file is gone.
    """
    from sclstore.ingest.anndata_source import open_source

    prov = result.provenance
    counts = str(prov.get("counts", "X"))
    layer = counts.split("/", 1)[1] if counts.startswith("layers/") else None
    if source is None:
        path = str(prov.get("source_path") or "")
        if not path or path == "in-memory" or "://" in path or "?" in path:
            what = "from memory" if path in ("", "in-memory") else f"from {path}"
            msg = (f"dataset {result.run_info.dataset_name!r} was ingested {what}: pass the AnnData or .h5ad holding its counts "
                   "(counts_from=... in Python, --counts-from FILE on the command line)")
            raise InvalidInputError(msg)
        if not Path(path).is_file():
            raise InvalidInputError(f"the dataset's source file {path} is gone: pass its new location with --counts-from FILE")
        source = path
    return open_source(source, counts_layer=layer)


def write_soma(
    result: Any, uri: str | os.PathLike[str], *, counts_from: Any, order: str = "input", measurement: str = "RNA"
) -> dict[str, Any]:
    """Write a cell result as a SOMA Experiment at ``uri`` (a new folder).

    ``obs`` holds the result's obs plus ``cell_idx``/``src_idx``; measurement ``RNA`` holds the
    source counts as ``X/data``, ``var``, one ``obsm`` array per (pool, layer) (keys as in
    ``to_anndata``) and the provenance in ``uns/sclstore``.

    Raises
    ------
    InvalidInputError
        If tiledbsoma is missing, ``uri`` exists, or the result is grouped.
    """
    tiledbsoma = require_tiledbsoma()
    from sclstore.query.export import source_counts

    target = Path(uri).expanduser()
    if target.exists():
        raise InvalidInputError(f"{target} exists: choose a new .soma path (or remove it)")
    if result.grouped:
        raise InvalidInputError("a SOMA Experiment holds cells: a GROUP BY result cannot be written as .soma")
    res = result.materialize() if hasattr(result, "materialize") else result
    adata = res.to_anndata(order=order)
    ordered = res.in_order(order)
    X, var = source_counts(ordered, counts_from)
    import anndata as ad

    full = ad.AnnData(X=X, obs=adata.obs, var=var, obsm=dict(adata.obsm))
    full.uns["sclstore"] = {k: v for k, v in adata.uns["sclstore"].items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        tiledbsoma.io.from_anndata(str(tmp), full, measurement_name=measurement)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote SOMA experiment %s (%d cells, %d obsm arrays)", target, full.n_obs, len(full.obsm))
    return {**res.summary(), "path": str(target), "order": order, "with_counts": True, "format": "soma"}
