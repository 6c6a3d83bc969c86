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

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse
import torch

from sclstore.store.errors import InvalidInputError

from ...adapter import TokenBatch, TokenRecord, cell_generator
from .._common import RowTokenizer, csr_row, pad_records

__all__ = ["TahoeTokenizer", "binning", "collate_records", "log_transform"]

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
class TahoeTokenizer(RowTokenizer):
    """Picklable Tahoe-X1 tokenizer (configuration and the bound gene -> token ids, no weights).

    Use :meth:`bind` (or ``adapter.map_genes``, which binds ``adapter.tokenizer``) before
    :meth:`tokenize` (both from :class:`RowTokenizer`).
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

    reads_stored_entries: ClassVar[bool] = True
    """Upstream's ``CountDataset`` takes a CSR row's entries as stored: explicit zeros become
    tokens (bin 1), duplicate entries two tokens, in stored order."""
    canonical_counts: ClassVar[bool] = False

    def _tokenize_row(self, counts: scipy.sparse.csr_matrix, row: int, cell: int, seed: int) -> TokenRecord:
        assert self.token_ids is not None
        cols, data = csr_row(counts, row)
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
        return TokenRecord(cell_idx=cell, gene_ids=genes, values=values, embeddable=genes.shape[0] > k)


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
    padded = pad_records(records, pad_id=pad_token_id, pad_value=pad_value, min_width=0)
    padding_mask = padded.pos < padded.n
    gene_mask = padding_mask & (padded.pos >= n_special)
    b = len(records)
    positions = {name: torch.full((b,), p, dtype=torch.int64) for name, p in (position_pools or {}).items()}
    return padded.batch(padding_mask=padding_mask, gene_mask=gene_mask, positions=positions)
