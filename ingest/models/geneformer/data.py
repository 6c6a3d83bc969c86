"""Geneformer data path: median-normalised rank encoding, truncation, collating.

Official path (``geneformer.TranscriptomeTokenizer.tokenize_anndata`` + ``create_dataset``,
``collapse_gene_ids=True``), reproduced exactly, including float rounding and tie order:

1. genes: :func:`official_gene_layout` (upstream ``sum_ensembl_ids``): dataset ids mapped
   through the release's Ensembl mapping dictionary (upper-cased); nothing is collapsed when
   the mapping is 1:1 on the dataset (an exact duplicate id then stays two tokens), else the
   counts of ids mapped to the same gene are summed into one column placed after the others;
2. ``X / n_counts * 10_000 / gene_median`` per cell, where ``n_counts`` is ``obs['n_counts']``
   in its stored dtype (here the float64 row sums of all genes when that column is absent).
   The arithmetic follows how ``X`` is stored: for **sparse** ``X`` scipy evaluates both
   divisions as multiplications by reciprocals (``1 / n_counts``, ``1 / gene_median``) and
   keeps explicitly stored zeros, which become tokens ranked last; for **dense** ``X`` numpy
   divides elementwise and zeros are dropped. Both run in numpy's promotion of ``X``'s dtype
   and ``n_counts``'s dtype, so the values are bit-identical to upstream's;
3. rank the entries of each CSR row (sorted columns) by ``np.argsort(-normalised)``: the same
   call on the same vector, so ties and near-ties come out in upstream's order;
4. V1: keep the first ``model_input_size`` (2048) genes; V2: keep the first
   ``model_input_size - 2`` (4094) and add ``<cls>`` in front and ``<eos>`` at the end;
5. pad with ``<pad>`` and an attention mask.

A cell without any gene token is dropped upstream; here it keeps its row, its record is marked
``embeddable=False`` and the pipeline stores NaN for it (and records it in the run).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import scipy.sparse
import torch

from sclstore.store.errors import InvalidInputError, ModelError

from ...adapter import GeneMapping, TokenBatch, TokenRecord
from .._common import NOT_BOUND, csr_row, pad_records, validate_counts

__all__ = ["N_COUNTS", "TARGET_SUM", "GeneLayout", "GeneformerTokenizer", "collate_geneformer", "official_gene_layout"]

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
    if arr.dtype not in (np.float16, np.float32, np.float64):  # integers, bools: float64, as 1 / n_counts upstream
        arr = arr.astype(np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0):
        msg = (
            f"{where} has missing, infinite or negative values; fix the column or drop it to use the row sums "
            "of the counts"
        )
        raise InvalidInputError(msg)
    return arr


@dataclass(frozen=True)
class GeneLayout:
    """Which dataset columns the official tokenizer keeps, and in which column order.

    Attributes
    ----------
    mapping
        The kept dataset columns (``var_index`` increasing) and the token of each.
    col_slot
        Per kept column: its position in the official (possibly collapsed) matrix.
    slot_tokens, slot_medians
        Token id and gene median of each slot; the medians keep the dtype numpy gives the
        official ``np.array([gene_median_dict[g] ...])``.
    summed
        Per slot: True when it sums the counts of several dataset columns (collapsed ids).
    """

    mapping: GeneMapping
    col_slot: np.ndarray
    slot_tokens: np.ndarray
    slot_medians: np.ndarray
    summed: np.ndarray


def official_gene_layout(
    gene_ids: Sequence[str],
    tokens: Mapping[str, int],
    medians: Mapping[str, Any],
    ensembl_mapping: Mapping[str, str] | None,
) -> GeneLayout:
    """The official ``sum_ensembl_ids`` + ``tokenize_anndata`` gene selection (``collapse_gene_ids=True``).

    The mapping dictionary is first restricted to values that are tokens (no mapping file: the
    identity over the token dictionary). If the dataset ids found in it and their mapped values
    are equally many distinct ids, nothing is collapsed: every column whose upper-cased id maps to
    a token is kept in ``var`` order, so an exact duplicate Ensembl id becomes two tokens.
    Otherwise the columns are collapsed by their mapped id: columns of ids mapped only once keep
    ``var`` order, then one summed column per id mapped several times, in first-occurrence order.
    Genes whose token has no median are dropped (upstream raises ``KeyError``).

    Parameters
    ----------
    gene_ids
        Dataset Ensembl id of each column, in ``var`` order.
    tokens, medians
        Token dictionary (specials included) and gene-median dictionary.
    ensembl_mapping
        The release's Ensembl mapping dictionary, or None.

    Returns
    -------
    GeneLayout
    """
    ids = [str(g) for g in gene_ids]
    source = ensembl_mapping if ensembl_mapping is not None else {k: k for k in tokens}
    mapped = {k: v for k, v in source.items() if v in tokens}
    in_map = [g for g in ids if g in mapped]
    collapse = len(set(in_map)) != len({mapped[g] for g in in_map})
    target = [mapped.get(g.upper()) for g in ids]
    keep = [i for i, t in enumerate(target) if t is not None and t in medians]
    if not collapse:
        slot_ids = cast("list[str]", [target[i] for i in keep])  # keep holds only mapped genes
        col_slot = np.arange(len(keep), dtype=np.int64)
    else:
        counts = Counter(target[i] for i in keep)
        single = [i for i in keep if counts[target[i]] == 1]
        dups = [t for t in dict.fromkeys(target[i] for i in keep) if counts[t] > 1]
        slot_of = {target[i]: s for s, i in enumerate(single)} | {t: len(single) + j for j, t in enumerate(dups)}
        slot_ids = cast("list[str]", [target[i] for i in single] + dups)
        col_slot = np.array([slot_of[target[i]] for i in keep], dtype=np.int64)
        if dups:
            logger.info("summing the counts of %d genes mapped from several Ensembl ids, as the official tokenizer", len(dups))
    slot_tokens = np.array([tokens[t] for t in slot_ids], dtype=np.int64)
    slot_medians = np.array([medians[t] for t in slot_ids]) if slot_ids else np.zeros(0)
    summed = np.bincount(col_slot, minlength=len(slot_ids)) > 1 if slot_ids else np.zeros(0, dtype=bool)
    mapping = GeneMapping(var_index=np.asarray(keep, dtype=np.int64), token_ids=slot_tokens[col_slot], n_vars=len(ids))
    return GeneLayout(mapping=mapping, col_slot=col_slot, slot_tokens=slot_tokens, slot_medians=slot_medians,
                      summed=np.asarray(summed, dtype=bool))


@dataclass(frozen=True, kw_only=True)
class GeneformerTokenizer:
    """Picklable Geneformer tokenizer (configuration and the bound gene table, no weights).

    Bind it with :meth:`bind_layout` (``adapter.map_genes`` does it) or :meth:`bind` before
    :meth:`tokenize`, and tell it how the dataset stores its counts with :meth:`for_storage`
    (dense or sparse ``X``, and its dtype: the official arithmetic depends on both). Upstream
    normalises by each cell's total count over *all* genes, which :meth:`tokenize` cannot see;
    the pipeline passes it as ``totals=`` (from :meth:`cell_totals`) when
    :attr:`needs_cell_totals` is set.

    Attributes
    ----------
    max_length
        Input size in tokens, special tokens included (V1 2048, V2 4096 upstream).
    cls_id, eos_id
        Ids of ``<cls>`` and ``<eos>`` (V2), or None (V1).
    token_ids, medians
        Per gene slot (a column of the official, possibly collapsed, matrix): token id and
        gene median (dtype as upstream's ``norm_factor_vector``).
    col_slot
        Per mapping column: its slot (None: column ``i`` is slot ``i``).
    summed
        Per slot: True when the slot sums the counts of several columns (collapsed ids).
    dense_input
        True when the dataset stores ``X`` dense (upstream then divides elementwise; for sparse
        ``X`` scipy multiplies by reciprocals and keeps stored zeros as tokens).
    count_dtype
        The dtype ``X`` is stored in (the arithmetic runs in numpy's promotion of it).
    """

    needs_cell_totals: ClassVar[bool] = True
    reads_stored_entries: ClassVar[bool] = True

    max_length: int
    cls_id: int | None = None
    eos_id: int | None = None
    target_sum: int = int(TARGET_SUM)
    token_ids: np.ndarray | None = None
    medians: np.ndarray | None = None
    col_slot: np.ndarray | None = None
    summed: np.ndarray | None = None
    dense_input: bool = False
    count_dtype: str = "float32"

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
        """Return a copy that tokenizes count columns in the order of ``mapping``, one slot per column.

        This is upstream's layout when nothing is collapsed (an exact duplicate Ensembl id stays
        two tokens); use :meth:`bind_layout` with :func:`official_gene_layout` for the general case.
        """
        tokens = np.asarray(mapping.token_ids, dtype=np.int64)
        meds = np.asarray(medians)
        if meds.shape != tokens.shape:
            raise ModelError(f"{meds.shape[0]} medians for {tokens.shape[0]} mapped genes")
        return dataclasses.replace(self, token_ids=tokens.copy(), medians=meds.copy(), col_slot=None, summed=None)

    def bind_layout(self, layout: GeneLayout) -> GeneformerTokenizer:
        """Return a copy bound to an official gene layout (:func:`official_gene_layout`)."""
        collapsed = bool(layout.summed.any())
        return dataclasses.replace(
            self, token_ids=layout.slot_tokens.copy(), medians=layout.slot_medians.copy(),
            col_slot=layout.col_slot.copy() if collapsed else None, summed=layout.summed.copy() if collapsed else None,
        )

    def storage_key(self) -> str:
        """How the counts are stored, for the cache key (the arithmetic depends on it)."""
        return f"{'dense' if self.dense_input else 'sparse'}:{self.count_dtype}"

    def for_storage(self, *, dense: bool, dtype: Any) -> GeneformerTokenizer:
        """Return a copy that reproduces upstream's arithmetic for counts stored ``dense`` with ``dtype``."""
        return dataclasses.replace(self, dense_input=bool(dense), count_dtype=np.dtype(dtype).name)

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
            ``(n_cells,)`` totals: ``n_counts`` in its stored float dtype (integers as float64,
            which gives the same reciprocals as upstream), or float64 row sums.

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
            Raw counts, rows = cells, columns = the bound mapping's genes in mapping order, with
            the entries as stored (for sparse input, stored zeros and duplicates matter).
        cell_idx
            Global index of each row.
        seed
            Run seed (unused: the Geneformer encoding is deterministic).
        totals
            Each cell's total raw count over all genes (:meth:`cell_totals`). When None, the
            row sums of ``counts`` (the mapped genes only) are used.

        Returns
        -------
        list of TokenRecord
            ``gene_ids`` in rank order (with ``<cls>``/``<eos>`` for V2); ``values`` hold the
            normalised expression of each gene token (0 for special tokens). A cell without any
            gene token (upstream drops it) has ``embeddable=False``.

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
        counts, cell_idx = validate_counts(counts, cell_idx, n_cols, totals=totals, canonical=False)
        inv_medians = np.divide(1, self.medians)
        return [self._tokenize_row(counts, i, int(cell_idx[i]), totals[i : i + 1], inv_medians)
                for i in range(counts.shape[0])]

    def _slot_entries(self, cols: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots and counts of a row's entries; counts of collapsed slots summed first (upstream ``sum_ensembl_ids``)."""
        if self.col_slot is None:
            return cols.astype(np.int64), x
        slots = self.col_slot[cols]
        assert self.summed is not None
        multi = self.summed[slots]
        if not multi.any():
            return slots, x
        m_slots, inverse = np.unique(slots[multi], return_inverse=True)
        sums = np.zeros(m_slots.shape[0], dtype=x.dtype)
        np.add.at(sums, inverse, x[multi])
        nz = sums != 0  # a zero sum is not stored by upstream's sparse sum
        return np.concatenate((slots[~multi], m_slots[nz])), np.concatenate((x[~multi], sums[nz]))

    def _tokenize_row(
        self, counts: scipy.sparse.csr_matrix, row: int, cell: int, total: np.ndarray, inv_medians: np.ndarray
    ) -> TokenRecord:
        assert self.token_ids is not None and self.medians is not None
        cols, data = csr_row(counts, row)
        slots, x = self._slot_entries(cols, data.astype(self.count_dtype))
        if self.dense_input:
            keep = x != 0
            slots, x = slots[keep], x[keep]
        if x.size and not total[0] > 0:
            msg = f"cell {cell} has counts but a total count of {float(total[0]):g}; fix obs['n_counts'] or drop it"
            raise InvalidInputError(msg)
        if not x.size:
            norm = np.zeros(0)
        elif self.dense_input:
            # upstream on dense X: X / n_counts * target_sum / norm_factor_vector, elementwise
            norm = x / total * self.target_sum / self.medians[slots]
        else:
            # upstream on sparse X: scipy multiplies by 1 / n_counts and by 1 / norm_factor_vector
            norm = np.multiply(np.multiply(x, np.divide(1, total)) * self.target_sum, inv_medians[slots])
        order = np.argsort(slots, kind="stable")  # the CSR upstream ranks has sorted columns ...
        slots, norm = slots[order], norm[order]
        if slots.size > 1 and (slots[1:] == slots[:-1]).any():  # ... and stored duplicates summed after scaling
            slots, start = np.unique(slots, return_index=True)
            norm = np.add.reduceat(norm, start)
        ranked = np.argsort(-norm)[: self.max_length - self.n_special]
        genes = self.token_ids[slots][ranked]
        values = norm[ranked].astype(np.float32)
        embeddable = genes.size > 0
        if self.cls_id is not None:
            assert self.eos_id is not None
            genes = np.concatenate(([self.cls_id], genes, [self.eos_id]))
            values = np.concatenate(([0.0], values, [0.0])).astype(np.float32)
        return TokenRecord(cell_idx=cell, gene_ids=genes.astype(np.int64), values=values, embeddable=embeddable)


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
