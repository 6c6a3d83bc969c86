"""Validate the sparse structure of an .h5ad counts matrix before anything decodes it.

A corrupt ``indptr``/``indices`` (a flipped block, a truncated array, out-of-range column
numbers) makes scipy's fancy indexing read out of bounds and crash the process. These checks
read the raw HDF5 arrays in bounded blocks and turn every inconsistency into one
:class:`~sclstore.store.errors.DatasetError` line.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from sclstore.store.errors import DatasetError

__all__ = ["check_sparse_layout", "check_sparse_structure", "one_line"]

_FORMATS = {"csr_matrix": "csr", "csc_matrix": "csc"}
_BLOCK = 1 << 22  # entries read at a time (32 MiB of int64)


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (h5py/anndata messages can span many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _attr(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_sparse_layout(group: Any, *, where: str) -> None:
    """Check a sparse group has the members and encoding of a CSR/CSC matrix.

    Raises
    ------
    DatasetError
        If it is not an HDF5 group encoded as ``csr_matrix``/``csc_matrix`` with ``data``,
        ``indices`` and ``indptr`` 1-d datasets and a 2-element ``shape``.
    """
    fix = "the file is damaged or not written by anndata: re-export it (adata.write_h5ad)"
    if not isinstance(group, h5py.Group):
        raise DatasetError(f"{where} is neither a dense array nor a sparse matrix group; {fix}")
    enc = _attr(group.attrs.get("encoding-type", ""))
    if enc not in _FORMATS:
        raise DatasetError(f"{where} has encoding-type {enc!r}, expected csr_matrix or csc_matrix; {fix}")
    missing = [k for k in ("data", "indices", "indptr") if not isinstance(group.get(k), h5py.Dataset)]
    if missing:
        raise DatasetError(f"{where} is a {enc} without {', '.join(missing)}; {fix}")
    bad = [k for k in ("data", "indices", "indptr") if group[k].ndim != 1]
    if bad:
        raise DatasetError(f"{where}: {', '.join(bad)} must be 1-d arrays; {fix}")
    for k in ("indices", "indptr"):
        if group[k].dtype.kind not in "iu":
            raise DatasetError(f"{where}: {k} has dtype {group[k].dtype}, not integers; {fix}")
    shape = np.asarray(group.attrs.get("shape", ()))
    if shape.shape != (2,) or (shape < 0).any():
        raise DatasetError(f"{where}: the 'shape' attribute is {shape.tolist()!r}, not (cells, genes); {fix}")


def check_sparse_structure(group: h5py.Group, fmt: str, shape: tuple[int, int], *, where: str) -> None:
    """Check ``indptr`` and ``indices`` of a CSR (``fmt="csr"``) or CSC matrix against ``shape``.

    ``indptr`` has ``n_major + 1`` entries, starts at 0, never decreases and ends at
    ``len(indices) == len(data)``; every index is in ``0..n_minor-1``.

    Raises
    ------
    DatasetError
        Naming the first inconsistency and the fix.
    """
    fix = "the file is damaged: re-export or re-download it"
    n_major, n_minor = (shape[0], shape[1]) if fmt == "csr" else (shape[1], shape[0])
    indptr_ds, indices_ds, data_ds = group["indptr"], group["indices"], group["data"]
    try:
        if indptr_ds.shape[0] != n_major + 1:
            raise DatasetError(f"{where}: indptr has {indptr_ds.shape[0]} entries but a {shape[0]}x{shape[1]} {fmt} matrix "
                               f"needs {n_major + 1}; {fix}")
        indptr = indptr_ds[()].astype(np.int64, copy=False)
        nnz = int(indices_ds.shape[0])
        if int(data_ds.shape[0]) != nnz:
            raise DatasetError(f"{where}: data has {data_ds.shape[0]} entries but indices {nnz}; {fix}")
        if indptr[0] != 0 or indptr[-1] != nnz:
            raise DatasetError(f"{where}: indptr runs from {indptr[0]} to {indptr[-1]}, expected 0 to {nnz} (the number of "
                               f"stored entries); {fix}")
        steps = np.diff(indptr)
        if (steps < 0).any():
            at = int(np.argmax(steps < 0))
            raise DatasetError(f"{where}: indptr decreases at {'row' if fmt == 'csr' else 'column'} {at} "
                               f"({indptr[at]} -> {indptr[at + 1]}); {fix}")
        for lo in range(0, nnz, _BLOCK):
            block = indices_ds[lo : min(lo + _BLOCK, nnz)]
            if block.size and (int(block.min()) < 0 or int(block.max()) >= n_minor):
                bad = int(np.argmax((block < 0) | (block >= n_minor)))
                raise DatasetError(f"{where}: entry {lo + bad} has index {int(block[bad])}, outside 0..{n_minor - 1} "
                                   f"({'genes' if fmt == 'csr' else 'cells'}); {fix}")
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DatasetError(f"{where} cannot be decoded: {one_line(exc)}; {fix}") from None
