"""Counts from an AnnData object (in memory or backed) instead of an .h5ad path.

:class:`AnnDataSource` offers what :class:`~sclstore.ingest.source.CountsSource` offers (obs,
gene ids, row blocks, ``scan``), so the pipeline treats both alike: the same checks run and
the same content hash comes out (counts, obs names, var names), so ingesting a file and the
same data already loaded is one dataset and a cache hit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sclstore.store.errors import DatasetError, InvalidInputError

from .source import CountsSource

__all__ = ["AnnDataSource", "is_anndata", "open_source", "source_provenance"]


def is_anndata(data: Any) -> bool:
    """Whether ``data`` is an ``anndata.AnnData`` (checked without importing anndata eagerly)."""
    return type(data).__name__ == "AnnData" and type(data).__module__.startswith("anndata")


class AnnDataSource(CountsSource):
    """Counts of an in-memory or backed ``AnnData`` (``X`` or ``layers[counts_layer]``).

    Raises
    ------
    InvalidInputError
        If the layer or gene column does not exist, or counts are missing.
    """

    def __init__(self, adata: Any, *, counts_layer: str | None = None, gene_column: str | None = None) -> None:
        self.adata = adata
        backed = bool(getattr(adata, "isbacked", False))
        self.backed_path: Path | None = Path(adata.filename) if backed and adata.filename is not None else None
        self.path = Path(f"<{'backed' if backed else 'in-memory'} AnnData {adata.n_obs} x {adata.n_vars}>")
        self.obs = pd.DataFrame(adata.obs).copy()
        var = pd.DataFrame(adata.var)
        self.counts_key = "X"
        if counts_layer is not None:
            layers = list(adata.layers.keys())
            if counts_layer not in layers:
                raise InvalidInputError(f"counts_layer {counts_layer!r} not in the AnnData; layers: {', '.join(layers) or '(none)'}")
            self.counts_key = f"layers/{counts_layer}"
            matrix = adata.layers[counts_layer]
        else:
            matrix = adata.X
            if matrix is None:
                raise InvalidInputError("the AnnData has no X matrix: pass counts_layer with the layer holding raw counts")
        if gene_column is not None:
            if gene_column not in var.columns:
                cols = ", ".join(map(str, var.columns)) or "(none)"
                raise InvalidInputError(f"gene_column {gene_column!r} not in var; var columns: {cols}")
            self.gene_ids = var[gene_column].astype(str).to_numpy()
        else:
            self.gene_ids = var.index.astype(str).to_numpy()
        self.var_names = var.index.astype(str).to_numpy()
        self.var = var
        self._matrix = matrix
        self._dense = not sp.issparse(matrix) and not hasattr(matrix, "format")
        self.dense = self._dense
        self.dtype = np.dtype(matrix.dtype)
        self.stored_entries = False
        self.stored_layout = "canonical"
        shape = tuple(int(x) for x in matrix.shape)
        self.n_obs, self.n_vars = shape[0], shape[1]
        if self.n_obs != self.obs.shape[0] or self.n_vars != len(self.gene_ids):
            raise DatasetError(f"{self.path}: counts shape {shape} does not match obs/var ({self.obs.shape[0]}, {len(self.gene_ids)})")

    def close(self) -> None:
        """Nothing to close: the caller owns the AnnData (and its backing file)."""
        return None

    def scan(self, *, block_rows: int = 8192) -> str:
        """:meth:`CountsSource.scan` without the HDF5 structure check (an in-memory scipy matrix
        is consistent by construction); a backed AnnData's file is checked like a path's."""
        if self.backed_path is not None and not self._dense:
            import h5py

            from .csr_check import check_sparse_structure

            with h5py.File(self.backed_path, "r") as f:
                check_sparse_structure(f[self.counts_key], self._matrix.format, (self.n_obs, self.n_vars),
                                       where=f"{self.backed_path.name}:{self.counts_key}")
        dense, self._dense = self._dense, True  # the base class checks only non-dense (HDF5) layouts
        try:
            return super().scan(block_rows=block_rows)
        finally:
            self._dense = dense

    def content_hash(self) -> str:
        """:meth:`scan` every time: an object in memory has no file to key a digest cache on."""
        return self.scan()

    def rows(self, lo: int, hi: int, *, canonical: bool | None = None) -> sp.csr_matrix:
        """Counts of cells ``lo..hi-1`` as float32 CSR with sorted indices.

        With ``stored_entries`` (or ``canonical=False``) sparse rows keep their stored entries.
        """
        block = self._matrix[lo:hi]
        if not sp.issparse(block) and hasattr(block, "to_memory"):  # anndata backed sparse slice
            block = block.to_memory()
        sparse = sp.issparse(block)
        m = sp.csr_matrix(block, dtype=np.float32) if sparse else sp.csr_matrix(np.asarray(block), dtype=np.float32)
        keep_stored = self.stored_entries if canonical is None else not canonical
        return m if keep_stored and sparse else self._canonical(m)


def open_source(data: Any, *, counts_layer: str | None = None, gene_column: str | None = None) -> CountsSource:
    """A counts source for an .h5ad path or an AnnData object.

    Raises
    ------
    InvalidInputError
        If ``data`` is neither a path nor an AnnData (names what was passed).
    """
    if is_anndata(data):
        return AnnDataSource(data, counts_layer=counts_layer, gene_column=gene_column)
    if isinstance(data, (str, os.PathLike)):
        return CountsSource(data, counts_layer=counts_layer, gene_column=gene_column)
    msg = f"cannot ingest a {type(data).__name__}: pass the path of an .h5ad file or an anndata.AnnData"
    raise InvalidInputError(msg)


def source_provenance(source: CountsSource) -> str:
    """What the catalog records as the dataset's source: a resolved path or ``in-memory``."""
    if isinstance(source, AnnDataSource):
        return str(source.backed_path.resolve()) if source.backed_path is not None else "in-memory"
    return str(source.path.resolve())
