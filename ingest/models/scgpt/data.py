"""scGPT data path: random-tie binning, tokenizing and subsampling, as the official zero-shot code.

Official path (``scgpt.tasks.cell_emb.get_batch_cell_embeddings`` with ``DataCollator(do_binning=True,
do_mlm=False, sampling=True, keep_first_n_tokens=1, max_length=1200)``):

1. per cell, the nonzero entries of the row (genes in ``adata.var`` order, vocabulary genes
   only), as float32; ``<cls>`` prepended with value ``pad_value`` (-2);
2. the values after ``<cls>`` binned by ``scgpt.preprocess.binning(row, n_bins=51)``: boundaries
   ``np.quantile(nonzero, linspace(0, 1, 50))``, then ``_digitize(side="both")``, which places a
   value tied with boundaries *uniformly at random* between its right- and left-sided bin,
   ``ceil(u * (right - left) + left)`` with ``u = np.random.rand()``; bins 1..50;
3. if the cell has more than ``max_length`` tokens, ``torch.randperm`` keeps ``<cls>`` and a random
   ``max_length - 1`` of the genes, in permuted order;
4. padding with ``<pad>`` / ``pad_value`` and a key-padding mask.

Upstream draws from the global numpy and torch generators, so its embeddings change from run to
run. Here one generator per cell, seeded from ``(seed, cell_idx)`` only
(:func:`~sclstore.ingest.adapter.cell_generator`), draws first the tie-breaking uniforms (float64,
one per nonzero value) and then the subsampling permutation, so a cell's tokens depend neither on
its batch nor on where a run resumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from sclstore.store.errors import InvalidInputError, ModelError

from ...adapter import TokenRecord, cell_generator
from .._common import RowTokenizer, csr_row, drop_zeros

__all__ = ["OFFICIAL_N_BINS", "ScGPTTokenizer", "binning", "digitize_random"]

logger = logging.getLogger(__name__)

OFFICIAL_N_BINS = 51
"""``DataCollator`` calls ``binning(row, n_bins=51)`` whatever ``args.json`` says: bins 1..50."""


def digitize_random(x: np.ndarray, bins: np.ndarray, rands: np.ndarray) -> np.ndarray:
    """Digitize ``x`` into ``bins``, spreading ties uniformly: upstream ``_digitize(side="both")``.

    ``left = np.digitize(x, bins)`` (number of boundaries <= x), ``right = np.digitize(x, bins,
    right=True)`` (number of boundaries < x); the bin is ``ceil(u * (right - left) + left)`` for a
    uniform ``u`` in ``[0, 1)``, i.e. ``left`` when no boundary equals ``x`` and otherwise one of
    ``right + 1 .. left``.

    Parameters
    ----------
    x
        Values (1-d).
    bins
        Increasing boundaries.
    rands
        One uniform number in ``[0, 1)`` per value.

    Returns
    -------
    numpy.ndarray
        int64 bin of each value.

    Examples
    --------
    >>> digitize_random(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.9, 0.5])).tolist()
    [2, 1, 3]
    """
    if x.ndim != 1 or bins.ndim != 1 or rands.shape != x.shape:
        msg = f"digitize_random needs 1-d x, bins and rands of x's shape; got {x.shape}, {bins.shape}, {rands.shape}"
        raise ModelError(msg)
    left = np.digitize(x, bins)
    right = np.digitize(x, bins, right=True)
    return np.ceil(rands * (right - left) + left).astype(np.int64)


def binning(row: np.ndarray, n_bins: int = OFFICIAL_N_BINS, *, generator: torch.Generator) -> np.ndarray:
    """Bin one cell's values into ``1..n_bins-1`` exactly as upstream ``scgpt.preprocess.binning``.

    Boundaries are ``np.quantile`` of the cell's nonzero float32 values at
    ``linspace(0, 1, n_bins - 1)``; ties are spread by :func:`digitize_random` with uniforms
    drawn from ``generator`` (one float64 per nonzero value, in order). Zeros stay 0 (never present
    in the official inference path); an all-zero or empty row gives zeros.

    Parameters
    ----------
    row
        Values of one cell (1-d); cast to float32 as upstream (``torch.from_numpy(...).float()``).
    n_bins
        51 in the official collator (bins 1..50).
    generator
        Source of the tie-breaking uniforms.

    Returns
    -------
    numpy.ndarray
        float32 bin of each value.
    """
    arr = np.asarray(row, dtype=np.float32).reshape(-1)
    out = np.zeros(arr.shape, dtype=np.int64)
    if arr.size == 0 or arr.max() == 0:
        return out.astype(np.float32)
    nz = np.nonzero(arr)[0] if arr.min() <= 0 else np.arange(arr.size)
    x = arr[nz]
    bins = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    rands = torch.rand(x.size, generator=generator, dtype=torch.float64).numpy()
    out[nz] = digitize_random(x, bins, rands)
    return out.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class ScGPTTokenizer(RowTokenizer):
    """Picklable scGPT tokenizer (configuration and the bound gene -> token ids, no weights).

    Use :meth:`bind` (or ``adapter.map_genes``, which binds ``adapter.tokenizer``) before
    :meth:`tokenize` (both from :class:`RowTokenizer`). :meth:`tokenize` takes expression values,
    raw counts in practice: the binning is invariant to any monotone per-cell transform.

    Attributes
    ----------
    cls_id, pad_token_id
        Ids of ``<cls>`` and of the pad token.
    pad_value
        Value of ``<cls>`` and of padding (``args.json`` ``pad_value``, -2).
    max_length
        Most tokens per cell, ``<cls>`` included (1200 in ``embed_data``).
    n_bins
        Number of bins + 1 (51).
    token_ids
        Token id of each mapped gene column (set by :meth:`bind`).
    """

    cls_id: int
    pad_token_id: int
    pad_value: float
    max_length: int
    n_bins: int = OFFICIAL_N_BINS
    token_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            msg = f"max length {self.max_length} leaves no room for genes after <cls>; pass --max-genes 2 or more"
            raise InvalidInputError(msg)

    def _tokenize_row(self, counts: scipy.sparse.csr_matrix, row: int, cell: int, seed: int) -> TokenRecord:
        assert self.token_ids is not None
        cols, data = csr_row(counts, row)
        cols, data = drop_zeros(cols, data.astype(np.float32))
        gen = cell_generator(seed, cell)
        genes = np.concatenate(([self.cls_id], self.token_ids[cols])).astype(np.int64)
        values = np.concatenate(([self.pad_value], binning(data, self.n_bins, generator=gen))).astype(np.float32)
        if genes.shape[0] > self.max_length:
            perm = torch.randperm(genes.shape[0] - 1, generator=gen)[: self.max_length - 1].numpy()
            idx = np.concatenate(([0], perm + 1))
            genes, values = genes[idx], values[idx]
        return TokenRecord(cell_idx=cell, gene_ids=genes, values=values, embeddable=genes.shape[0] > 1)
