"""Geneformer data path: median-normalised rank encoding, truncation, collating.

Official path (``geneformer.TranscriptomeTokenizer.tokenize_anndata`` + ``create_dataset``):

1. keep the genes that are in the token dictionary (duplicate Ensembl ids are summed, the sums
   placed after the other genes, as ``sum_ensembl_ids``);
2. ``X / n_counts * 10_000 / gene_median`` per cell, where ``n_counts`` is the cell's total raw
   count over *all* genes (``obs['n_counts']``; here the row sum of all genes when that column
   is absent);
3. rank the non-zero genes by ``np.argsort(-normalised)`` — numpy's default sort, applied to
   the same float64 vector in the same gene order as upstream, so ties come out exactly as in
   the official tokenizer;
4. V1: keep the first ``model_input_size`` (2048) genes; V2: keep the first
   ``model_input_size - 2`` (4094) and add ``<cls>`` in front and ``<eos>`` at the end;
5. pad with ``<pad>`` and an attention mask.

A cell without any known gene is dropped upstream; here it stays (V2: ``<cls>``/``<eos>``
only; V1: no token at all) and gets zero ``mean``/``max`` vectors, so every cell has a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse
import torch

from sclstore.store.errors import InvalidInputError, ModelError

from ..adapter import GeneMapping, TokenBatch, TokenRecord
from ._common import NOT_BOUND, csr_row, drop_zeros, pad_records, validate_counts

__all__ = ["TARGET_SUM", "N_COUNTS", "GeneformerTokenizer", "collate_geneformer"]

logger = logging.getLogger(__name__)

TARGET_SUM = 10_000.0
"""Counts are scaled to this total per cell before the median normalisation (upstream ``target_sum``)."""
N_COUNTS = "n_counts"
"""The obs column holding each cell's total raw count (upstream's required column)."""


def _check_totals(values: Any, where: str) -> np.ndarray:
    try:
        arr = pd.to_numeric(pd.Series(np.asarray(values).reshape(-1)), errors="raise").to_numpy()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where} must be numeric total counts per cell: {exc}") from None
    if arr.dtype not in (np.float32, np.float64):  # integers, bools, float16: float64 as numpy promotes them
        arr = arr.astype(np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0):
        msg = (
            f"{where} has missing, infinite or negative values; fix the column or drop it to use the row sums "
            "of the counts"
        )
        raise InvalidInputError(msg)
    return arr


@dataclass(frozen=True, kw_only=True)
class GeneformerTokenizer:
    """Picklable Geneformer tokenizer (configuration and the bound gene table, no weights).

    Bind it to a gene mapping with :meth:`bind` (``adapter.map_genes`` does it) before
    :meth:`tokenize`. Upstream normalises by each cell's total count over *all* genes, which
    :meth:`tokenize` cannot see; the pipeline passes it as ``totals=`` (from
    :meth:`cell_totals`) when :attr:`needs_cell_totals` is set. Ranks do not depend on it.

    Attributes
    ----------
    max_length
        Input size in tokens, special tokens included (V1 2048, V2 4096 upstream).
    cls_id, eos_id
        Ids of ``<cls>`` and ``<eos>`` (V2), or None (V1).
    token_ids, medians
        Per collapsed gene slot: token id and gene median (bound by :meth:`bind`).
    col_slot
        Per mapping column: its collapsed slot (duplicate Ensembl ids share one slot).
    """

    needs_cell_totals: ClassVar[bool] = True

    max_length: int
    cls_id: int | None = None
    eos_id: int | None = None
    target_sum: float = TARGET_SUM
    token_ids: np.ndarray | None = None
    medians: np.ndarray | None = None
    col_slot: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.cls_id is None) != (self.eos_id is None):
            raise ModelError("a Geneformer tokenizer needs both <cls> and <eos> (V2) or neither (V1)")
        if self.max_length <= self.n_special:
            msg = (
                f"max length {self.max_length} leaves no room for genes after {self.n_special} special tokens; "
                "pass a larger --max-genes"
            )
            raise InvalidInputError(msg)

    @property
    def n_special(self) -> int:
        """Number of special tokens per cell (V1 0, V2 2)."""
        return 0 if self.cls_id is None else 2

    def bind(self, mapping: GeneMapping, medians: Sequence[float] | np.ndarray) -> GeneformerTokenizer:
        """Return a copy that tokenizes count columns in the order of ``mapping``.

        Parameters
        ----------
        mapping
            The dataset genes found in the dictionaries, in ``adata.var`` order.
        medians
            Gene median of each mapped column.

        Columns that map to the same token (duplicate Ensembl ids) are summed into one slot; as
        upstream, the summed slots come after the others, in first-occurrence order.
        """
        tokens = np.asarray(mapping.token_ids, dtype=np.int64)
        meds = np.asarray(medians, dtype=np.float64)
        if meds.shape != tokens.shape:
            raise ModelError(f"{meds.shape[0]} medians for {tokens.shape[0]} mapped genes")
        counts = Counter(tokens.tolist())
        dups = [t for t in dict.fromkeys(tokens.tolist()) if counts[t] > 1]
        if not dups:
            return dataclasses.replace(self, token_ids=tokens.copy(), medians=meds.copy(), col_slot=None)
        uniq_cols = [i for i, t in enumerate(tokens.tolist()) if counts[t] == 1]
        slot_of_token = {int(tokens[c]): s for s, c in enumerate(uniq_cols)}
        slot_of_token |= {t: len(uniq_cols) + j for j, t in enumerate(dups)}
        col_slot = np.array([slot_of_token[t] for t in tokens.tolist()], dtype=np.int64)
        slot_tokens = np.empty(len(slot_of_token), dtype=np.int64)
        slot_meds = np.empty(len(slot_of_token), dtype=np.float64)
        slot_tokens[col_slot] = tokens
        slot_meds[col_slot] = meds
        logger.info("summing the counts of %d duplicated Ensembl ids, as the official tokenizer", len(dups))
        return dataclasses.replace(self, token_ids=slot_tokens, medians=slot_meds, col_slot=col_slot)

    # --- cell totals ---------------------------------------------------------------------
    @staticmethod
    def check_obs(obs: pd.DataFrame | None) -> str:
        """Validate ``obs['n_counts']`` up front; return where the totals will come from.

        Returns
        -------
        str
            ``"obs['n_counts']"`` or ``"row sums of the raw counts"``.

        Raises
        ------
        InvalidInputError
            If ``n_counts`` is present but not numeric, finite and non-negative.
        """
        if obs is not None and N_COUNTS in obs.columns:
            _check_totals(obs[N_COUNTS].to_numpy(), f"obs[{N_COUNTS!r}]")
            return f"obs[{N_COUNTS!r}]"
        return "row sums of the raw counts"

    @staticmethod
    def cell_totals(counts: scipy.sparse.spmatrix | np.ndarray, obs: pd.DataFrame | None = None) -> np.ndarray:
        """Total raw count of each cell: ``obs['n_counts']`` when present, else the row sums.

        Parameters
        ----------
        counts
            Raw counts of the cells over **all** dataset genes (not only the mapped ones).
        obs
            The same cells' obs rows (same order), or None.

        Returns
        -------
        numpy.ndarray
            ``(n_cells,)`` totals (float64, or float32 when ``n_counts`` is stored as float32,
            which upstream's arithmetic then follows).

        Raises
        ------
        InvalidInputError
            If ``n_counts`` is invalid or its length does not match the counts.
        """
        if obs is not None and N_COUNTS in obs.columns:
            totals = _check_totals(obs[N_COUNTS].to_numpy(), f"obs[{N_COUNTS!r}]")
            if totals.shape[0] != counts.shape[0]:
                raise InvalidInputError(f"{totals.shape[0]} n_counts values for {counts.shape[0]} cells")
            return totals
        return np.asarray(counts.sum(axis=1), dtype=np.float64).reshape(-1)

    # --- tokenizing ----------------------------------------------------------------------
    def seq_len(self, record: TokenRecord) -> int:
        """Number of tokens of a record (special tokens included)."""
        return len(record)

    def tokenize(
        self,
        counts: scipy.sparse.csr_matrix,
        cell_idx: np.ndarray,
        *,
        seed: int,
        totals: np.ndarray | None = None,
    ) -> list[TokenRecord]:
        """Rank-encode raw counts, one :class:`TokenRecord` per row.

        Parameters
        ----------
        counts
            Raw counts, rows = cells, columns = the bound mapping's genes in mapping order.
        cell_idx
            Global index of each row.
        seed
            Run seed (unused: the Geneformer encoding is deterministic).
        totals
            Each cell's total raw count over all genes (:meth:`cell_totals`). When None, the
            row sums of ``counts`` (the mapped genes only) are used. The rank order does not
            depend on this per-cell scale, so only ``values`` and float rounding of exact
            near-ties differ; pass the totals to match the official tokenizer bit for bit.

        Returns
        -------
        list of TokenRecord
            ``gene_ids`` in rank order (with ``<cls>``/``<eos>`` for V2); ``values`` hold the
            normalised expression of each gene token (0 for special tokens).

        Raises
        ------
        ModelError
            If the tokenizer is not bound.
        InvalidInputError
            If shapes disagree, counts are negative or not finite, or a cell with counts has a
            total of 0.
        """
        if self.token_ids is None or self.medians is None:
            raise ModelError(NOT_BOUND)
        counts = scipy.sparse.csr_matrix(counts)
        totals = np.asarray(self.cell_totals(counts) if totals is None else totals).reshape(-1)
        n_cols = self.token_ids.shape[0] if self.col_slot is None else self.col_slot.shape[0]
        counts, cell_idx = validate_counts(counts, cell_idx, n_cols, totals=totals)
        return [self._tokenize_row(counts, i, int(cell_idx[i]), totals[i]) for i in range(counts.shape[0])]

    def _tokenize_row(self, counts: scipy.sparse.csr_matrix, row: int, cell: int, total: Any) -> TokenRecord:
        assert self.token_ids is not None and self.medians is not None
        slots, data = csr_row(counts, row)
        slots = slots.astype(np.int64)
        if self.col_slot is not None and slots.size:
            slots = self.col_slot[slots]
            order = np.argsort(slots, kind="stable")
            slots, data = slots[order], data[order]
            slots, start = np.unique(slots, return_index=True)
            data = np.add.reduceat(data, start) if data.size else data
        slots, data = drop_zeros(slots, data)
        if data.size and not total > 0:
            msg = f"cell {cell} has counts but a total count of {total!r}; fix obs['n_counts'] or drop it"
            raise InvalidInputError(msg)
        # upstream: X (float32) / n_counts * target_sum / gene_median, in numpy's type promotion
        work = np.result_type(data.dtype, np.asarray(total).dtype)
        norm = data.astype(work) / np.asarray(total, dtype=work) * work.type(self.target_sum) / self.medians[slots]
        ranked = np.argsort(-norm)[: self.max_length - self.n_special]
        genes = self.token_ids[slots][ranked]
        values = norm[ranked].astype(np.float32)
        if self.cls_id is not None:
            assert self.eos_id is not None
            genes = np.concatenate(([self.cls_id], genes, [self.eos_id]))
            values = np.concatenate(([0.0], values, [0.0])).astype(np.float32)
        return TokenRecord(cell_idx=cell, gene_ids=genes.astype(np.int64), values=values)


def collate_geneformer(records: Sequence[TokenRecord], *, pad_token_id: int, n_special: int) -> TokenBatch:
    """Pad records with ``<pad>`` into a CPU batch.

    Parameters
    ----------
    records
        Token records of one batch.
    pad_token_id
        Id of ``<pad>``.
    n_special
        0 (V1) or 2 (V2: ``<cls>`` first and ``<eos>`` last, both excluded from ``mean``/``max``;
        ``cls`` is position 0).

    Returns
    -------
    TokenBatch
        At least one column, even if every record is empty.

    Raises
    ------
    ModelError
        If ``records`` is empty.
    """
    padded = pad_records(records, pad_id=pad_token_id, pad_value=0.0)
    pos, n = padded.pos, padded.n
    padding_mask = pos < n
    if n_special:
        gene_mask = padding_mask & (pos >= 1) & (pos < n - 1)
        positions = {"cls": torch.zeros(len(records), dtype=torch.int64)}
    else:
        gene_mask = padding_mask.clone()
        positions = {}
    return padded.batch(padding_mask=padding_mask, gene_mask=gene_mask, positions=positions)
