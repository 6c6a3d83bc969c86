"""Write query results to files; the extension picks the format.

=========== ===========================================================================
``.h5ad``   AnnData: obs plus one ``obsm`` matrix per layer (``X_<model>_L07_<pool>``)
``.npy``    the float32 ``(n_layers, n_rows, dim)`` array only
``.npz``    ``embeddings``, ``layers``, ``depths``, ``cells``, ``cell_idx``, ``src_idx`` (or ``counts``),
            and each obs column as ``obs_<name>``
``.parquet`` long format: one row per layer x cell, columns ``layer``, ``depth``, ``cell``,
            ``cell_idx``, ``src_idx``, the obs columns, then ``e0`` ... ``e{dim-1}``
``.csv``    the same long format as text (floats with 9 significant digits: exact float32)
=========== ===========================================================================

Rows come in the ingested AnnData's order (``src_idx``) unless the query has an ``ORDER BY``
or ``order="store"`` is passed (the store's cell order, which ``cluster_by`` changes).
Every writer consumes ``iter_blocks`` (one layer x one chunk of rows at a time), so a
:class:`~sclstore.query.result.QueryStream` larger than memory is written without holding it.
Files are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sclstore.store._translate import catalog_errors
from sclstore.store.errors import InvalidInputError, OutputError

from .result import QueryResult, QueryStream, _uns

if TYPE_CHECKING:
    from .plan import Backend

__all__ = ["FORMATS", "ROW_FORMATS", "check_output", "query_to_file", "write_result", "write_rows"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_CELLS = 65_536


def _need_embeddings(res: QueryResult | QueryStream, fmt: str) -> None:
    if res.pool is None:
        msg = f"{fmt} holds embeddings, but the query selects none: add `embedding` (or AVG(embedding)) to the select list, or write .csv/.parquet"
        raise InvalidInputError(msg)
    if len(res.pools) > 1:
        msg = f"{fmt} holds one pool, but the query selects {list(res.pools)}: write .h5ad, .parquet or .csv, or select one pool"
        raise InvalidInputError(msg)


def _npy_header(shape: tuple[int, ...]) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}


def _shape(res: QueryResult | QueryStream) -> tuple[int, int, int]:
    return (len(res.layers), res.n_rows, res.dim)


def _write_npy(res: QueryResult | QueryStream, path: Path, chunk: int) -> None:
    # plain sequential writes (blocks arrive layer by layer, rows in order = C order): a full
    # disk is an ordinary OSError here, never the SIGBUS of a memory-mapped write
    _need_embeddings(res, ".npy")
    shape = _shape(res)
    written = 0
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, _npy_header(shape))
        for _, _, block in res.iter_blocks(chunk_cells=chunk):
            data = np.ascontiguousarray(block, dtype=np.float32)
            fh.write(data.tobytes())
            written += data.size
        fh.flush()
        os.fsync(fh.fileno())
    if written != shape[0] * shape[1] * shape[2]:  # pragma: no cover - a reader bug, not user input
        raise RuntimeError(f"wrote {written} values for an array of shape {shape}")


def _text_array(values: pd.Series) -> np.ndarray:
    return np.array(["" if pd.isna(v) else str(v) for v in values.astype(object)], dtype=str)


def _obs_arrays(res: QueryResult | QueryStream) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"cells": _text_array(pd.Series(res.obs.index))}
    for name in res.obs.columns:
        col = res.obs[name]
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object:
            arrays[f"obs_{name}"] = _text_array(col)
        elif pd.api.types.is_bool_dtype(col.dtype) and not col.isna().any():
            arrays[f"obs_{name}"] = col.to_numpy(dtype=bool)
        elif pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
            arrays[f"obs_{name}"] = col.to_numpy(dtype=np.int64)
        else:
            arrays[f"obs_{name}"] = col.to_numpy(dtype=np.float64, na_value=np.nan)
    return arrays


def _write_npz(res: QueryResult | QueryStream, path: Path, chunk: int) -> None:
    _need_embeddings(res, ".npz")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("embeddings.npy", "w", force_zip64=True) as fp:
            np.lib.format.write_array_header_2_0(fp, _npy_header(_shape(res)))
            for _, _, block in res.iter_blocks(chunk_cells=chunk):
                fp.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        small: dict[str, np.ndarray] = {
            "layers": np.asarray(res.layers, dtype=np.int64),
            "depths": np.asarray(res.depths, dtype=np.float64),
            **_obs_arrays(res),
        }
        small.update(res._index_columns())
        if res.counts is not None:
            small["counts"] = np.asarray(res.counts, dtype=np.int64)
        for name, arr in small.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, arr, allow_pickle=False)


def source_counts(res: QueryResult | QueryStream, counts_from: Any) -> tuple[Any, pd.DataFrame]:
    """The source counts (CSR, rows in the result's order) and var of a cell result.

    ``counts_from`` is an open counts source (``take(rows)``, ``obs``, ``var``; e.g.
    :class:`sclstore.ingest.source.CountsSource`) of the file the dataset was ingested from.

    Raises
    ------
    InvalidInputError
        For a GROUP BY result, or a source whose cells are not the dataset's.
    """
    if res.grouped or res.src_idx is None:
        raise InvalidInputError("--with-counts needs cells: a GROUP BY result has no counts")
    src = np.asarray(res.src_idx, dtype=np.int64)
    names = pd.Index(counts_from.obs.index.astype(str))
    if src.size and (int(src.max()) >= len(names) or not np.array_equal(names[src], res.obs.index.astype(str))):
        msg = "the counts source does not hold this dataset's cells at their ingest rows: pass the file the dataset was ingested from"
        raise InvalidInputError(msg)
    var = pd.DataFrame(counts_from.var).copy()
    var.index = var.index.astype(str)
    return counts_from.take(src), var


def _write_h5ad(res: QueryResult | QueryStream, path: Path, chunk: int, counts_from: Any = None) -> None:
    import anndata as ad
    import h5py

    obs = res.obs.copy()
    obs.index = obs.index.astype(str)
    if not obs.index.is_unique:
        obs.index = pd.Index([f"{name}-{i}" for i, name in enumerate(obs.index)])
    if any(not str(c) for c in obs.columns):  # h5ad cannot hold an unnamed column (older catalogs allowed one)
        obs = obs.rename(columns={c: "unnamed" for c in obs.columns if not str(c)})
    for name, values in res._index_columns().items():
        obs[name] = values
    if res.counts is not None and "count" not in obs:
        obs["n_cells"] = np.asarray(res.counts, dtype=np.int64)
    if counts_from is not None:
        X, var = source_counts(res, counts_from)
        adata = ad.AnnData(X=X, obs=obs, var=var)
    else:
        adata = ad.AnnData(obs=obs)
    adata.uns["sclstore"] = {**_uns(res), "with_counts": counts_from is not None}
    adata.write_h5ad(path)
    if res.pool is None:
        return
    keys = res.obsm_keys()
    with h5py.File(path, "r+") as f:
        grp = f["obsm"]
        dsets = []
        for key in keys:
            ds = grp.create_dataset(key, shape=(res.n_rows, res.dim), dtype=np.float32)
            ds.attrs["encoding-type"] = "array"
            ds.attrs["encoding-version"] = "0.2.0"
            dsets.append(ds)
        for i, lo, block in res.iter_blocks(chunk_cells=chunk):
            if block.shape[0]:
                dsets[i][lo : lo + block.shape[0]] = block


def _long_frames(res: QueryResult | QueryStream, chunk: int, *, with_embeddings: bool = True) -> Iterator[pd.DataFrame]:
    """Yield long-format DataFrames (one row per layer x row) block by block.

    ``with_embeddings=False`` yields the metadata columns only, one frame per ``chunk`` rows
    of the first layer (used to infer the Parquet schema without reading any array data).
    """
    obs = res.obs
    base_cols = ["cell"] if not res.grouped else ["group"]
    emb_cols = [f"e{j}" for j in range(res.dim)]
    index_cols = res._index_columns()
    counts = None if res.counts is None else np.asarray(res.counts, dtype=np.int64)

    multi = len(res.pools) > 1

    def frame(lo: int, n: int, layer_pos: int | None, block: np.ndarray | None) -> pd.DataFrame:
        part = obs.iloc[lo : lo + n]
        data: dict[str, Any] = {}
        if layer_pos is not None:
            pool, layer = res.block_label(layer_pos)
            if multi:
                data["pool"] = np.full(n, pool, dtype=object)
            data["layer"] = np.full(n, layer, dtype=np.int64)
            data["depth"] = np.full(n, res.depths[res.layers.index(layer)], dtype=np.float64)
        data[base_cols[0]] = part.index.astype(str).to_numpy(dtype=object)
        for name, values in index_cols.items():
            data[name] = values[lo : lo + n]
        for name in part.columns:
            data[str(name)] = part[name].to_numpy() if not isinstance(part[name].dtype, pd.CategoricalDtype) else part[name].array
        if counts is not None and "count" not in part.columns:
            data["n_cells"] = counts[lo : lo + n]
        df = pd.DataFrame(data)
        if block is not None:
            emb = pd.DataFrame(np.asarray(block, dtype=np.float32), columns=emb_cols)
            df = pd.concat([df, emb], axis=1)
        return df

    if res.pool is None or not with_embeddings:
        layer0 = 0 if res.pool is not None else None
        for lo in range(0, max(res.n_rows, 1), chunk):
            yield frame(lo, min(chunk, res.n_rows - lo), layer0, None)
        return
    for i, lo, block in res.iter_blocks(chunk_cells=chunk):
        yield frame(lo, block.shape[0], i, block)


def _write_parquet(res: QueryResult | QueryStream, path: Path, chunk: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One schema for every block, inferred from all rows' metadata (a text column that is NULL
    # in the first block must still be text), plus float32 embedding columns.
    template = next(_long_frames(res, max(res.n_rows, 1), with_embeddings=False))
    schema = pa.Schema.from_pandas(template, preserve_index=False)
    for j in range(res.dim if res.pool is not None else 0):
        schema = schema.append(pa.field(f"e{j}", pa.float32()))
    schema = schema.with_metadata({**(schema.metadata or {}), b"sclstore": json.dumps(res.summary()).encode()})
    with pq.ParquetWriter(path, schema) as writer:
        for df in _long_frames(res, chunk):
            writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def _write_csv(res: QueryResult | QueryStream, path: Path, chunk: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        for k, df in enumerate(_long_frames(res, chunk)):
            df.to_csv(fh, index=False, header=(k == 0), float_format="%.9g")


ROW_FORMATS: tuple[str, ...] = ("csv", "tsv", "nl")


def write_rows(result: QueryResult | QueryStream, fh: Any, fmt: str = "csv", *, chunk_cells: int = 4096, order: str = "input") -> int:
    """Stream the long format (one row per layer x cell, as ``.csv``) to a text stream.

    ``fmt`` is ``csv``, ``tsv`` or ``nl`` (newline-delimited JSON, one object per row with the
    embedding as a list under ``"embedding"``). Returns the number of rows written.

    Raises
    ------
    InvalidInputError
        For another ``fmt``.
    """
    if fmt not in ROW_FORMATS:
        raise InvalidInputError(f"unknown row format {fmt!r}; use one of {', '.join(ROW_FORMATS)}")
    res = result.in_order(order)
    assert isinstance(res, (QueryResult, QueryStream))  # in_order returns self or a same-class copy
    n = 0
    emb_cols = [f"e{j}" for j in range(res.dim)]
    for k, df in enumerate(_long_frames(res, chunk_cells)):
        n += len(df)
        if fmt == "nl":
            if emb_cols and not df.empty:
                emb = df[emb_cols].to_numpy(dtype=np.float64).round(9).tolist()
                df = df.drop(columns=emb_cols).assign(embedding=emb)
            if not df.empty:
                fh.write(df.to_json(orient="records", lines=True, force_ascii=False, double_precision=9).rstrip("\n") + "\n")
        else:
            df.to_csv(fh, index=False, header=(k == 0), float_format="%.9g", sep="\t" if fmt == "tsv" else ",")
    return n


FORMATS: dict[str, Callable[[QueryResult | QueryStream, Path, int], None]] = {
    ".h5ad": _write_h5ad,
    ".npy": _write_npy,
    ".npz": _write_npz,
    ".parquet": _write_parquet,
    ".csv": _write_csv,
}


def _write_failure(exc: BaseException) -> str | None:
    """The reason of a failed file write (disk full, no permission, I/O error), or None for
    anything else. HDF5 reports a full disk as a RuntimeError naming errno 28."""
    if isinstance(exc, OSError):
        return exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, RuntimeError):
        match = re.search(r"errno = (\d+)", str(exc))
        if match:
            return os.strerror(int(match.group(1)))
    return None


def check_output(path: Path, *, overwrite: bool) -> None:
    """Refuse an output path that is a folder, or exists (unless ``overwrite``).

    Raises
    ------
    OutputError
        Naming the path and the fix (``--force`` to replace an existing file).
    """
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder: name a file inside it, e.g. {str(path / ('result' + path.suffix))!r}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"output {str(path)!r} already exists: pass --force (overwrite=True) to replace it, or choose another name")


def write_result(
    result: QueryResult | QueryStream,
    out_path: str | os.PathLike[str],
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    order: str = "input",
    counts_from: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a query result (or stream) to a file; the extension picks the format.

    Parameters
    ----------
    result
        From :func:`sclstore.query.execute_query` or :func:`sclstore.query.open_query`.
    out_path
        Target file ending in ``.h5ad``, ``.npy``, ``.npz``, ``.parquet`` or ``.csv``
        (see the module docstring for the layout of each).
    chunk_cells
        Rows per block while streaming.
    order
        ``"input"`` (default): rows in the ingested AnnData's order (``src_idx``), unless the
        query has its own ``ORDER BY``; ``"store"``: the store's cell order (as queried).
    counts_from
        .h5ad only: an open counts source of the ingested file (see :func:`source_counts`);
        the file then carries the selected cells' raw counts as ``X`` and the genes as ``var``.
    overwrite
        Replace an existing file (the CLI's ``--force``); by default an existing file is refused.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    InvalidInputError
        For an unknown extension, or a format that needs embeddings when none are selected.
    OutputError
        If the target is a folder or exists (without ``overwrite``), or writing fails (e.g.
        the disk is full); no partial file is left.

    Examples
    --------
    >>> write_result(open_query(backend, "SELECT * FROM embeddings WHERE run = 1"), "all.npy")  # doctest: +SKIP
    """
    path = Path(out_path).expanduser()
    suffix = path.suffix.lower()
    writer = FORMATS.get(suffix)
    if writer is None:
        msg = f"cannot write {path.name!r}: unknown extension {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}"
        raise InvalidInputError(msg)
    if chunk_cells < 1:
        raise InvalidInputError(f"chunk_cells must be >= 1, got {chunk_cells}")
    result = result.in_order(order)  # type: ignore[assignment]
    if counts_from is not None and suffix != ".h5ad":
        raise InvalidInputError(f"--with-counts writes .h5ad (or .soma), not {suffix}")
    check_output(path, overwrite=overwrite)
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot create folder {str(path.parent)!r} for {path.name!r}: {exc.strerror or exc}") from None
    # a temporary file in the target folder, renamed into place only when complete
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{suffix}")
    try:
        if counts_from is not None:
            _write_h5ad(result, tmp, chunk_cells, counts_from)
        else:
            writer(result, tmp, chunk_cells)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise OutputError(f"cannot write {str(path)!r}: {reason}; free space or choose another folder (nothing was written)") from None
    logger.info("wrote %s (%s)", path, suffix)
    return path


@catalog_errors
def query_to_file(
    backend: Backend,
    sql: str,
    out_path: str | os.PathLike[str],
    *,
    memory_budget: int | None = None,
    order: str = "input",
    into: str | os.PathLike[str] | None = None,
    counts_from: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a query and stream its result into ``out_path`` (no memory budget on cell data).

    The output path is checked (see :func:`check_output`) before any work; ``overwrite``
    replaces an existing file.

    With ``into`` (an .h5ad), ``out_path`` is a copy of that file with the layers added to its
    ``obsm``, rows matched by cell name (see :func:`sclstore.query.attach.write_into`).

    Returns
    -------
    dict
        The result's summary plus ``"path"``.

    Raises
    ------
    InvalidQueryError, RunNotFoundError, NotFoundError, InvalidInputError
        As :func:`sclstore.query.open_query` and :func:`write_result`.
    """
    from .read import open_query

    suffix = Path(out_path).suffix.lower()
    if suffix not in FORMATS:  # fail before any work
        raise InvalidInputError(f"unknown output extension {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    target = Path(out_path).expanduser()
    if into is None or target.resolve() != Path(into).expanduser().resolve():  # --into names its own clash
        check_output(target, overwrite=overwrite)
    res = open_query(backend, sql, memory_budget=memory_budget)
    if into is not None:
        from .attach import write_into

        return write_into(res, into, out_path)
    if callable(counts_from):  # a factory given the result (opens the dataset's source)
        counts_from = counts_from(res)
    path = write_result(res, out_path, order=order, counts_from=counts_from, overwrite=overwrite)
    return {**res.summary(), "path": str(path), "order": order, "with_counts": counts_from is not None}
