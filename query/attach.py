"""Join stored embeddings onto an AnnData by cell name (``Store.attach``, ``query --into``).

The store keeps cells in its own order (``cluster_by`` changes it), so embeddings are matched to
the user's AnnData by ``obs_names``, never by position. Keys are the same as
:meth:`QueryResult.to_anndata` writes: ``X_<model>_L<layer>_<pool>`` (see :func:`obsm_key`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sclstore.store.errors import InvalidInputError, NotFoundError

from .result import QueryResult, QueryStream, _uns

if TYPE_CHECKING:
    import anndata

    from .plan import Backend

__all__ = ["align_rows", "attach", "write_into"]

logger = logging.getLogger(__name__)


def align_rows(target_names: Sequence[str] | pd.Index, result_names: Sequence[str] | pd.Index, *, what: str) -> np.ndarray:
    """Row of each ``target_names`` entry in ``result_names``.

    Raises
    ------
    InvalidInputError
        If target names repeat, or some are not among the result's cells (the message names
        a few and how many).
    """
    target = pd.Index([str(x) for x in target_names])
    if not target.is_unique:
        dup = target[target.duplicated()][0]
        msg = f"{what} has repeated obs names (e.g. {dup!r}): make them unique (adata.obs_names_make_unique()) first"
        raise InvalidInputError(msg)
    source = pd.Index([str(x) for x in result_names])
    pos = source.get_indexer(target)
    missing = pos < 0
    if missing.any():
        examples = ", ".join(repr(x) for x in target[missing][:3])
        msg = (
            f"{int(missing.sum())} of {len(target)} cells of {what} are not in the selected cells of the store "
            f"(e.g. {examples}): subset the AnnData to stored cells (adata[adata.obs_names.isin(names)]) or ingest it"
        )
        raise InvalidInputError(msg)
    return pos.astype(np.int64)


def _sql(run: int, layers: Sequence[int] | None, pool: str) -> str:
    where = f"run = {int(run)}"
    if layers is not None:
        where += " AND layer IN (" + ", ".join(str(int(x)) for x in layers) + ")"
    return f"SELECT cell, embedding.{pool} FROM embeddings WHERE {where}"


def attach(
    backend: Backend,
    adata: anndata.AnnData,
    run: int | str,
    *,
    layers: Sequence[int] | None = None,
    pools: Sequence[str] | None = None,
    memory_budget: int | None = None,
) -> list[str]:
    """Write stored embeddings into ``adata.obsm``, row-aligned by ``obs_names``.

    Parameters
    ----------
    backend
        An open backend.
    adata
        The AnnData to annotate (in memory; modified in place). Every cell must be stored.
    run
        Run id or ``dataset/model``.
    layers
        Stored layers to attach (default: all).
    pools
        Pools to attach (default: all of the run's).

    Returns
    -------
    list of str
        The ``obsm`` keys written (``X_<model>_L<layer>_<pool>``).

    Raises
    ------
    InvalidInputError
        If a cell of ``adata`` is not stored, or obs names repeat.
    NotFoundError
        For a pool or layer the run does not hold.
    """
    from .read import execute_query

    info = backend.get_run(run)
    chosen = list(pools) if pools is not None else list(info.pools)
    for pool in chosen:
        if pool not in info.pools:
            raise NotFoundError(f"pool {pool!r} is not stored in run {info.id}; stored pools: {list(info.pools)}")
    keys: list[str] = []
    pos: np.ndarray | None = None
    for pool in chosen:
        res = execute_query(backend, _sql(info.id, layers, pool), memory_budget=memory_budget)
        if pos is None:
            pos = align_rows(adata.obs_names, res.obs.index, what="the AnnData")
        assert res.embeddings is not None
        for key, i in zip(res.obsm_keys(), range(len(res.layers)), strict=True):
            adata.obsm[key] = np.ascontiguousarray(res.embeddings[i][pos])
            keys.append(key)
        adata.uns.setdefault("sclstore", {})
        adata.uns["sclstore"][f"attach_{pool}"] = _uns(res)
    logger.info("attached %d obsm matrices of run %s to %d cells", len(keys), info.id, adata.n_obs)
    return keys


def write_into(
    result: QueryResult | QueryStream, source: str | os.PathLike[str], out_path: str | os.PathLike[str], *, chunk_cells: int = 65_536
) -> dict[str, Any]:
    """Copy the .h5ad ``source`` to ``out_path`` and add the result's layers to its ``obsm``.

    Rows are matched by cell name: every selected cell must be in ``source``; source cells the
    query did not select get NaN rows (their count is returned as ``"unfilled"``). Existing
    ``obsm`` keys of the same name are replaced. The copy is written under a temporary name and
    renamed into place when complete; ``source`` is never modified.

    Raises
    ------
    InvalidInputError
        If ``source`` is not a readable .h5ad, a selected cell is not in it, or the query selects
        no embeddings / groups.
    """
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    src, out = Path(source).expanduser(), Path(out_path).expanduser()
    if out.suffix.lower() != ".h5ad" or src.suffix.lower() != ".h5ad":
        raise InvalidInputError(f"--into writes a copy of an .h5ad: both {src.name!r} and {out.name!r} must end in .h5ad")
    if src.resolve() == out.resolve():
        raise InvalidInputError(f"--into would overwrite its source {str(src)!r}: choose another -o")
    if result.pool is None or result.grouped:
        raise InvalidInputError("--into needs cell embeddings: select `embedding` (not AVG/GROUP BY) in the query")
    try:
        names = ad.read_h5ad(src, backed="r").obs_names.astype(str)
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {str(src)!r} as .h5ad: {exc}") from None
    if not pd.Index(names).is_unique:
        raise InvalidInputError(f"{src.name!r} has repeated obs names: cells cannot be matched by name; make them unique first")
    where = pd.Index(names).get_indexer(pd.Index(result.obs.index.astype(str)))
    if (where < 0).any():
        bad = result.obs.index[where < 0]
        msg = (f"{len(bad)} selected cells are not in {src.name!r} (e.g. {bad[0]!r}): --into needs the file the "
               "dataset was ingested from (or one holding its cells)")
        raise InvalidInputError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}.h5ad")
    try:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            grp = f.require_group("obsm")
            if "encoding-type" not in grp.attrs:
                grp.attrs["encoding-type"] = "dict"
                grp.attrs["encoding-version"] = "0.1.0"
            dsets = []
            for key in result.obsm_keys():
                if key in grp:
                    del grp[key]
                ds = grp.create_dataset(key, shape=(len(names), result.dim), dtype=np.float32, fillvalue=np.nan)
                ds.attrs["encoding-type"] = "array"
                ds.attrs["encoding-version"] = "0.2.0"
                dsets.append(ds)
            for i, lo, block in result.iter_blocks(chunk_cells=chunk_cells):
                rows = where[lo : lo + block.shape[0]]
                order = np.argsort(rows, kind="stable")
                if rows.size:
                    dsets[i][rows[order]] = block[order]  # h5py wants increasing row lists
            uns = f.require_group("uns")
            if "sclstore" in uns:
                del uns["sclstore"]
            write_elem(uns, "sclstore", _uns(result))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**result.summary(), "path": str(out), "into": str(src), "unfilled": int(len(names) - len(set(where.tolist())))}
