"""Tahoe-X1 data path: binning, tokenizing and collating, as the official inference code.

Official path (``tahoe_x1.data.CountDataset`` + ``DataCollator`` with ``do_mlm=False``):
nonzero genes of the raw-count row in ``adata.var`` order, ``<cls>`` prepended with value
``pad_value``; the values after the first ``keep_first_n_tokens`` are binned per cell into
``1..num_bins-1`` (50 quantile boundaries over the cell's nonzero values, ties to the lower bin);
if the sequence is longer than ``max_length`` a ``randperm`` subset is kept (first
``keep_first_n_tokens`` always kept, kept genes in permuted order); then padding with
``pad_token_id`` / ``pad_value``. Here the subsampling generator is seeded from
``(seed, cell_idx)`` so a cell's tokens never depend on its batch or on resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from sclstore.store.errors import InvalidInputError, ModelError

from ..adapter import GeneMapping, TokenBatch, TokenRecord, cell_generator

__all__ = ["binning", "log_transform", "TahoeTokenizer", "collate_records"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _grades(n_bins: int) -> torch.Tensor:
    return torch.linspace(0, 1, n_bins - 1, dtype=torch.float32)


@torch.no_grad()
def binning(row: np.ndarray | torch.Tensor, n_bins: int = 51, *, right: bool = False) -> np.ndarray:
    """Bin one cell's expression values into ``1..n_bins-1`` exactly as upstream ``binning``.

    The ``n_bins - 1`` boundaries are ``torch.quantile`` of the cell's nonzero values (float32,
    linear interpolation) at ``linspace(0, 1, n_bins - 1)``; each value gets
    ``torch.bucketize(value, boundaries, right=right) + 1`` (``right=False``: ties go to the
    lower bin). Zeros (never present in the official inference path) are binned to 1, as upstream.

    Parameters
    ----------
    row
        Values of one cell (1-d).
    n_bins
        ``num_bins`` of the collator config (51 gives bins 1..50).
    right
        ``right_binning`` of the collator config.

    Returns
    -------
    numpy.ndarray
        float32 bin of each value.

    Examples
    --------
    >>> binning(np.array([1, 1, 1, 2, 3, 5, 8, 13, 1, 2, 40, 1, 1], dtype=np.float32)).astype(int).tolist()
    [1, 1, 1, 26, 34, 38, 42, 46, 1, 26, 50, 1, 1]
    """
    arr = np.asarray(row, dtype=np.float32).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.float32)
    x = torch.from_numpy(arr)
    grades = _grades(n_bins)
    if arr.min() <= 0:
        nz = x.nonzero().reshape(-1)
        out = torch.zeros_like(x, dtype=torch.int64)
        if nz.numel():
            bounds = torch.quantile(x[nz], grades)
            out[nz] = torch.bucketize(x[nz], bounds, right=right)
    else:
        bounds = torch.quantile(x, grades)
        out = torch.bucketize(x, bounds, right=right)
    if not right:
        out = out + 1
    return out.numpy().astype(np.float32)


def log_transform(row: np.ndarray, target_sum: float, eps: float = 1e-9) -> np.ndarray:
    """``log1p(row / (sum(row) + eps) * target_sum)`` in float32, as upstream ``log_transform``."""
    x = torch.as_tensor(np.asarray(row), dtype=torch.float32)
    return torch.log1p(x / (x.sum() + eps) * target_sum).numpy()


@dataclass(frozen=True, kw_only=True)
class TahoeTokenizer:
    """Picklable Tahoe-X1 tokenizer (configuration and the bound gene -> token ids, no weights).

    Use :meth:`bind` (or ``adapter.map_genes``, which binds ``adapter.tokenizer``) before
    :meth:`tokenize`.
    """

    cls_id: int
    pad_token_id: int
    pad_value: float
    num_bins: int
    right_binning: bool
    keep_first_n_tokens: int
    max_length: int
    do_binning: bool = True
    log_transform: bool = False
    target_sum: float = 10000.0
    token_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.max_length <= self.keep_first_n_tokens:
            msg = (
                f"max length {self.max_length} must exceed keep_first_n_tokens={self.keep_first_n_tokens} "
                "(it counts <cls>); pass a larger --max-genes"
            )
            raise InvalidInputError(msg)

    def bind(self, mapping: GeneMapping) -> TahoeTokenizer:
        """Return a copy that tokenizes count columns in the order of ``mapping``."""
        return dataclasses.replace(self, token_ids=np.asarray(mapping.token_ids, dtype=np.int64).copy())

    def seq_len(self, record: TokenRecord) -> int:
        """Number of tokens of a record (``<cls>`` included)."""
        return len(record)

    def tokenize(self, counts: scipy.sparse.csr_matrix, cell_idx: np.ndarray, *, seed: int) -> list[TokenRecord]:
        """Tokenize raw counts, one :class:`TokenRecord` per row.

        Parameters
        ----------
        counts
            Raw counts, rows = cells, columns = the bound mapping's genes in mapping order.
        cell_idx
            Global index of each row (seeds the per-cell subsampling generator).
        seed
            Run seed.

        Returns
        -------
        list of TokenRecord

        Raises
        ------
        ModelError
            If the tokenizer is not bound to a gene mapping.
        InvalidInputError
            If shapes disagree or counts are negative or not finite.
        """
        if self.token_ids is None:
            raise ModelError("tokenizer is not bound to a gene mapping: call adapter.map_genes(gene_ids) first")
        counts = scipy.sparse.csr_matrix(counts)
        cell_idx = np.asarray(cell_idx, dtype=np.int64).reshape(-1)
        if counts.shape[1] != self.token_ids.shape[0]:
            msg = f"counts have {counts.shape[1]} columns but the gene mapping has {self.token_ids.shape[0]} genes"
            raise InvalidInputError(msg)
        if counts.shape[0] != cell_idx.shape[0]:
            raise InvalidInputError(f"{counts.shape[0]} count rows but {cell_idx.shape[0]} cell indices")
        if counts.nnz and (not np.all(np.isfinite(counts.data)) or counts.data.min() < 0):
            raise InvalidInputError("counts must be finite and non-negative raw counts; check --counts-layer")
        if not counts.has_canonical_format:  # unsorted or duplicate entries: var order, summed
            counts = counts.copy()
            counts.sum_duplicates()
        return [self._tokenize_row(counts, i, int(cell_idx[i]), seed) for i in range(counts.shape[0])]

    def _tokenize_row(self, counts: scipy.sparse.csr_matrix, row: int, cell: int, seed: int) -> TokenRecord:
        assert self.token_ids is not None
        lo, hi = counts.indptr[row], counts.indptr[row + 1]
        cols, data = counts.indices[lo:hi], counts.data[lo:hi]
        keep = data != 0
        cols, data = cols[keep], data[keep]
        genes = np.concatenate(([self.cls_id], self.token_ids[cols])).astype(np.int64)
        values = np.concatenate(([self.pad_value], data)).astype(np.float32)
        k = self.keep_first_n_tokens
        if values.shape[0] > k:
            if self.do_binning:
                values[k:] = binning(values[k:], self.num_bins, right=self.right_binning)
            elif self.log_transform:
                values[k:] = log_transform(values[k:], self.target_sum)
        if genes.shape[0] > self.max_length:
            gen = cell_generator(seed, cell)
            perm = torch.randperm(genes.shape[0] - k, generator=gen)[: self.max_length - k].numpy()
            idx = np.concatenate((np.arange(k), perm + k))
            genes, values = genes[idx], values[idx]
        return TokenRecord(cell_idx=cell, gene_ids=genes, values=values)


def collate_records(
    records: Sequence[TokenRecord],
    *,
    pad_token_id: int,
    pad_value: float,
    n_special: int = 1,
    position_pools: dict[str, int] | None = None,
) -> TokenBatch:
    """Pad token records to the longest one.

    Parameters
    ----------
    records
        Token records of one batch.
    pad_token_id, pad_value
        Padding token id and value.
    n_special
        Number of leading special tokens per record (excluded from ``mean``/``max``).
    position_pools
        Position pools at fixed positions, e.g. ``{"cls": 0}``.

    Returns
    -------
    TokenBatch
        CPU tensors.

    Raises
    ------
    ModelError
        If ``records`` is empty.
    """
    if not records:
        raise ModelError("cannot collate an empty list of records")
    b = len(records)
    s = max(len(r) for r in records)
    gene_ids = np.full((b, s), pad_token_id, dtype=np.int64)
    values = np.full((b, s), pad_value, dtype=np.float32)
    lengths = np.empty(b, dtype=np.int64)
    for i, rec in enumerate(records):
        n = len(rec)
        gene_ids[i, :n] = rec.gene_ids
        values[i, :n] = rec.values
        lengths[i] = n
    pos = torch.arange(s).unsqueeze(0)
    padding_mask = pos < torch.from_numpy(lengths).unsqueeze(1)
    gene_mask = padding_mask & (pos >= n_special)
    positions = {name: torch.full((b,), p, dtype=torch.int64) for name, p in (position_pools or {}).items()}
    return TokenBatch(
        gene_ids=torch.from_numpy(gene_ids),
        values=torch.from_numpy(values),
        padding_mask=padding_mask,
        gene_mask=gene_mask,
        positions=positions,
        cell_idx=np.asarray([r.cell_idx for r in records], dtype=np.int64),
    )
