"""Reading raw counts from an .h5ad file in row blocks (never the whole matrix at once).

The counts come from ``X`` or ``layers[KEY]``; CSR, CSC and dense encodings are read through
h5py / ``anndata.io.sparse_dataset``, so a file larger than memory can be ingested.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from sclstore.store.errors import DatasetError, InvalidInputError, SclstoreError
from sclstore.store.hashcache import cached_digest

from .csr_check import check_sparse_layout, check_sparse_structure
from .csr_check import one_line as _one_line

__all__ = ["SCAN_VERSION", "CountsSource"]

logger = logging.getLogger(__name__)

SCAN_VERSION = "scan-v1"
"""Names the content-hash scheme of :meth:`CountsSource.scan`; change it whenever the hash changes."""


class CountsSource:
    """An open .h5ad file: obs, gene ids and row-block access to raw counts.

    Parameters
    ----------
    path
        The .h5ad file.
    counts_layer
        Read counts from ``layers[counts_layer]`` instead of ``X``.
    gene_column
        Take gene ids from ``var[gene_column]`` instead of the var index.

    Attributes
    ----------
    dense
        True when the counts are stored dense.
    dtype
        The dtype the counts are stored in.
    stored_entries
        When True, :meth:`rows` / :meth:`take` return sparse rows with their entries as stored
        (explicit zeros, duplicates and order kept), as official data loaders that read the CSR
        arrays directly see them; set it before :meth:`scan`, which then also fingerprints that
        storage in :attr:`stored_layout`.
    stored_layout
        After :meth:`scan` with ``stored_entries``: ``"canonical"`` when every stored row is
        sorted, duplicate-free and zero-free (so it equals the content hash's view), else a
        digest of the stored entries.

    Raises
    ------
    InvalidInputError
        If the file is missing or not an h5ad, or the layer / gene column does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], *, counts_layer: str | None = None, gene_column: str | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise InvalidInputError(f"data file {self.path} does not exist: pass the path of an .h5ad file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise InvalidInputError(f"{self.path} is not an .h5ad (HDF5) file: {exc}") from None
        try:
            self._open(counts_layer, gene_column)
        except SclstoreError:
            self._file.close()
            raise
        except BaseException as exc:
            self._file.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise DatasetError(f"{self.path} cannot be decoded as an .h5ad: {_one_line(exc)}") from None
        if self.n_obs != self.obs.shape[0] or self.n_vars != len(self.gene_ids):
            self.close()
            shape = (self.n_obs, self.n_vars)
            raise DatasetError(f"{self.path}: counts shape {shape} does not match obs/var ({self.obs.shape[0]}, {len(self.gene_ids)})")

    def _open(self, counts_layer: str | None, gene_column: str | None) -> None:
        self.obs: pd.DataFrame = read_elem(self._file["obs"])
        var: pd.DataFrame = read_elem(self._file["var"])
        self.counts_key = "X"
        if counts_layer is not None:
            layers = list(self._file["layers"].keys()) if "layers" in self._file else []
            if counts_layer not in layers:
                raise InvalidInputError(f"--counts-layer {counts_layer!r} not in the file; layers: {', '.join(layers) or '(none)'}")
            self.counts_key = f"layers/{counts_layer}"
        elif "X" not in self._file:
            raise InvalidInputError(f"{self.path} has no X matrix: pass --counts-layer with the layer holding raw counts")
        if gene_column is not None:
            if gene_column not in var.columns:
                raise InvalidInputError(f"--gene-column {gene_column!r} not in var; var columns: {', '.join(map(str, var.columns)) or '(none)'}")
            self.gene_ids = var[gene_column].astype(str).to_numpy()
        else:
            self.gene_ids = var.index.astype(str).to_numpy()
        self.var_names = var.index.astype(str).to_numpy()
        self.var = var  # for hints (ingest/hints.py)
        elem = self._file[self.counts_key]
        self._dense = isinstance(elem, h5py.Dataset)
        if not self._dense:
            check_sparse_layout(elem, where=f"{self.path.name}:{self.counts_key}")
        self.dense = self._dense
        self.dtype = np.dtype(elem.dtype if self._dense else elem["data"].dtype)
        self.stored_entries = False
        self.stored_layout = "canonical"
        self._matrix = elem if self._dense else sparse_dataset(elem)
        shape = tuple(elem.shape) if self._dense else tuple(self._matrix.shape)
        if len(shape) != 2:
            raise DatasetError(f"{self.path}: {self.counts_key} has shape {shape}, not (cells, genes)")
        self.n_obs, self.n_vars = int(shape[0]), int(shape[1])

    def __enter__(self) -> CountsSource:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def rows(self, lo: int, hi: int, *, canonical: bool | None = None) -> sp.csr_matrix:
        """Counts of cells ``lo..hi-1`` (file order) as float32 CSR with sorted indices.

        With ``stored_entries`` (or ``canonical=False``) sparse rows keep their stored entries.
        """
        block = self._matrix[lo:hi]
        m = sp.csr_matrix(block, dtype=np.float32) if not sp.issparse(block) else block.tocsr().astype(np.float32)
        keep_stored = self.stored_entries if canonical is None else not canonical
        return m if keep_stored and sp.issparse(block) else self._canonical(m)

    @staticmethod
    def _canonical(m: sp.csr_matrix) -> sp.csr_matrix:
        m.sum_duplicates()
        m.eliminate_zeros()
        m.sort_indices()
        return m

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of arbitrary file rows, in the order given (read in sorted runs)."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        parts = []
        lo = 0
        while lo < len(sorted_rows):  # contiguous runs of rows read as slices
            hi = lo + 1
            while hi < len(sorted_rows) and sorted_rows[hi] == sorted_rows[hi - 1] + 1:
                hi += 1
            parts.append(self.rows(int(sorted_rows[lo]), int(sorted_rows[hi - 1]) + 1))
            lo = hi
        stacked = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return stacked[inverse]

    def blocks(self, block_rows: int = 8192) -> Iterator[tuple[int, sp.csr_matrix]]:
        for lo in range(0, self.n_obs, block_rows):
            yield lo, self.rows(lo, min(lo + block_rows, self.n_obs))

    def content_hash(self) -> str:
        """:meth:`scan`'s hash, from the persistent digest cache when the file is unchanged.

        The cache entry names the counts matrix and the hash scheme, so another
        ``--counts-layer`` of the same file is scanned on its own; ``--rehash`` forces a scan.
        """
        if not self.stored_entries:
            return cached_digest(self.path, f"counts:{self.counts_key}:{SCAN_VERSION}", self.scan)

        def scan_with_layout() -> str:
            return f"{self.scan()}:{self.stored_layout}"

        # families reading stored entries also need the stored-layout fingerprint: cached with the hash
        value = cached_digest(self.path, f"counts:{self.counts_key}:{SCAN_VERSION}:stored-entries", scan_with_layout)
        digest, _, layout = value.partition(":")
        self.stored_layout = layout or "canonical"
        return digest

    def scan(self, *, block_rows: int = 8192) -> str:
        """Validate the counts and return the dataset's content hash.

        The hash covers the counts (values and sparsity, independent of storage dtype and
        encoding), the obs names and the var names.

        The sparse structure is validated first (:func:`.csr_check.check_sparse_structure`), so
        a corrupt file never reaches scipy's indexing; any decoding error is one line.

        Raises
        ------
        DatasetError
            On an empty or all-zero matrix, a corrupt sparse structure, an undecodable block,
            negative, NaN/inf or non-integer counts.
        """
        if self.n_obs == 0 or self.n_vars == 0:
            raise DatasetError(f"{self.path} is empty ({self.n_obs} cells x {self.n_vars} genes): nothing to ingest")
        where = "X" if self.counts_key == "X" else self.counts_key
        if not self._dense:  # before scipy/anndata index anything with these arrays
            check_sparse_structure(self._file[self.counts_key], self._matrix.format, (self.n_obs, self.n_vars),
                                   where=f"{self.path.name}:{where}")
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported below, as one line
                digest, nnz = self._hash_counts(where, block_rows)
        except SclstoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise DatasetError(f"{self.path}: {where} cannot be decoded: {_one_line(exc)}") from None
        if nnz == 0:
            msg = (f"{where} of {self.path.name} holds no non-zero count: every cell would embed as an empty cell; "
                   "pass --counts-layer with the raw counts")
            raise DatasetError(msg)
        return digest

    def _hash_counts(self, where: str, block_rows: int) -> tuple[str, int]:
        h = hashlib.sha256()
        h.update(f"{self.n_obs}x{self.n_vars}".encode())
        nnz = 0
        empty = 0
        layout = hashlib.sha256() if self.stored_entries and not self._dense else None
        raw_differs = False
        for lo in range(0, self.n_obs, block_rows):
            m = self.rows(lo, min(lo + block_rows, self.n_obs), canonical=layout is None)
            if layout is not None and not (m.has_canonical_format and m.data.all()):
                # stored zeros, duplicates or unsorted rows: fingerprint the stored entries
                layout.update(np.array([lo], dtype=np.int64).tobytes())
                layout.update(np.diff(m.indptr).astype(np.int64).tobytes())
                layout.update(m.indices.astype(np.int64).tobytes())
                layout.update(m.data.astype(np.float64).tobytes())
                raw_differs = True
                m = self._canonical(m.copy())
            data = m.data
            if not np.all(np.isfinite(data)):
                raise DatasetError(f"{where} has NaN or infinite values (rows {lo}..): sclstore needs raw integer counts")
            if (data < 0).any():
                msg = f"{where} has negative values (rows {lo}..): sclstore needs raw counts, not scaled data; pass --counts-layer with raw counts"
                raise DatasetError(msg)
            if not np.all(data == np.round(data)):
                msg = f"{where} has non-integer values (rows {lo}..): it looks normalised; pass --counts-layer with raw integer counts"
                raise DatasetError(msg)
            nnz += int(m.nnz)
            empty += int((np.diff(m.indptr) == 0).sum())
            h.update(np.diff(m.indptr).astype(np.int64).tobytes())
            h.update(m.indices.astype(np.int64).tobytes())
            h.update(data.astype(np.float64).tobytes())
        self.stored_layout = layout.hexdigest() if layout is not None and raw_differs else "canonical"
        for names in (self.obs.index.astype(str), self.var_names):
            for name in names:
                h.update(name.encode())
                h.update(b"\0")
        if empty and nnz:
            logger.warning("%d of %d cells of %s have no counts at all; models that need a gene token cannot embed them "
                           "(stored as NaN, listed as unembeddable)",
                           empty, self.n_obs, self.path.name)
        return h.hexdigest(), nnz
