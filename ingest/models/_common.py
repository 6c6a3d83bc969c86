"""Pieces the model families share: the strict state-dict check, count validation, CSR-row and
padding helpers for the tokenizers and collators, and the model name of a checkpoint folder.

Each family keeps its own public entry points (``<family>.checkpoint.check_state_dict``,
``<family>.data.collate_*``, the tokenizers); they call into this module with their own labels
and allow-lists, so messages name the family as before. The adapter boilerplate (``load``,
``build_model``, ``blocks``, ``describe``) lives in :class:`~sclstore.ingest.adapter.ModelAdapter`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import numpy as np
import scipy.sparse
import torch

from sclstore.store.errors import CheckpointError, InvalidInputError, ModelError

from ..adapter import GeneMapping, TokenBatch, TokenRecord

__all__ = [
    "NOT_BOUND",
    "PaddedRecords",
    "RowTokenizer",
    "check_state_dict_strict",
    "csr_row",
    "drop_zeros",
    "name_from_folder",
    "pad_records",
    "validate_counts",
]

logger = logging.getLogger(__name__)

_RowTokenizerT = TypeVar("_RowTokenizerT", bound="RowTokenizer")

NOT_BOUND = "tokenizer is not bound to a gene mapping: call adapter.map_genes(gene_ids) first"
"""Message of the :class:`ModelError` raised by a tokenizer used before ``bind``."""


def name_from_folder(folder: Path, default: str) -> str:
    """A model name from a checkpoint folder's name (characters outside ``[A-Za-z0-9._-]`` -> ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", folder.resolve().name).strip("-.") or default


# --- strict state-dict check -----------------------------------------------------------------
def check_state_dict_strict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    *,
    subject: str,
    model: str,
    encoder: str,
    ignored: tuple[str, ...] | re.Pattern[str],
    config_source: str | Callable[[str], str],
    ignored_heads: str | None = None,
    mismatch: str = "the config does not match the weights",
    key_hint: Callable[[str], str] | None = None,
    skipped: str = "heads",
) -> dict[str, torch.Tensor]:
    """Check a checkpoint against the encoder strictly and return the encoder weights.

    Every expected key must be present with its exact shape; every other key must be ignored
    (start with one of the ``ignored`` prefixes, or match the ``ignored`` pattern at its start).

    Parameters
    ----------
    state
        The checkpoint's weights, keys as in the encoder's ``state_dict()``.
    expected
        Shape of every encoder weight.
    subject
        Start of every message, e.g. ``"checkpoint '/path/model.safetensors'"``.
    model
        What a checkpoint lacking a weight is not, e.g. ``"Tahoe-X1"``, ``"a Geneformer BERT"``.
    encoder
        What an unexpected key is not part of, e.g. ``"Tahoe-X1 encoder"``.
    ignored
        Prefixes of the skipped heads, or a pattern matched at the start of each key.
    config_source
        The file the expected shapes come from (``"model_config.yml"``), or a function of the
        misshapen key returning it.
    ignored_heads
        The skipped heads as named in messages; default: the prefixes without their final dot.
    mismatch
        Conclusion of the message about a misshapen weight.
    key_hint
        Function of a missing key returning text put after its name (default: none).
    skipped
        What the debug line calls the skipped parts.

    Raises
    ------
    CheckpointError
        Naming the first missing, misshapen or unexpected key(s).
    """
    missing = [k for k in expected if k not in state]
    if missing:
        k = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = key_hint(k) if key_hint is not None else ""
        msg = (
            f"{subject} lacks encoder weight {k!r}{hint} of shape {list(expected[k])}{more}; "
            f"the checkpoint is incomplete or not {model}"
        )
        raise CheckpointError(msg)
    bad = [k for k, shape in expected.items() if tuple(state[k].shape) != tuple(shape)]
    if bad:
        k = bad[0]
        source = config_source if isinstance(config_source, str) else config_source(k)
        msg = (
            f"{subject}: weight {k!r} has shape {list(state[k].shape)} but {source} implies "
            f"{list(expected[k])}; {mismatch}"
        )
        raise CheckpointError(msg)
    if isinstance(ignored, re.Pattern):
        unexpected = [k for k in state if k not in expected and not ignored.match(k)]
        heads = ignored.pattern if ignored_heads is None else ignored_heads
    else:
        unexpected = [k for k in state if k not in expected and not k.startswith(ignored)]
        heads = ", ".join(p.rstrip(".") for p in ignored) if ignored_heads is None else ignored_heads
    if unexpected:
        msg = (
            f"{subject} has unexpected weights {unexpected[:5]} that are neither part of the {encoder} "
            f"nor of an ignored head ({heads})"
        )
        raise CheckpointError(msg)
    parts = sorted({k.split(".", 1)[0] for k in state if k not in expected})
    if parts:
        logger.debug("ignoring checkpoint %s %s", skipped, parts)
    return {k: state[k] for k in expected}


# --- tokenizers ------------------------------------------------------------------------------
def validate_counts(
    counts: scipy.sparse.spmatrix | np.ndarray,
    cell_idx: np.ndarray,
    n_genes: int,
    *,
    totals: np.ndarray | None = None,
    canonical: bool = True,
) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """Check a block of counts handed to ``tokenize`` and return it as CSR with int64 cell indices.

    Parameters
    ----------
    counts
        Rows = cells, columns = the bound mapping's genes.
    cell_idx
        Global index of each row.
    n_genes
        Number of columns the bound mapping expects.
    totals
        Per-cell totals that must have one value per row too (Geneformer), or None.
    canonical
        Return the rows with sorted column indices and duplicate entries summed.

    Raises
    ------
    InvalidInputError
        If the shapes disagree or the counts are negative or not finite.
    """
    counts = scipy.sparse.csr_matrix(counts)
    cell_idx = np.asarray(cell_idx, dtype=np.int64).reshape(-1)
    if counts.shape[1] != n_genes:
        raise InvalidInputError(f"counts have {counts.shape[1]} columns but the gene mapping has {n_genes} genes")
    if totals is None:
        if counts.shape[0] != cell_idx.shape[0]:
            raise InvalidInputError(f"{counts.shape[0]} count rows but {cell_idx.shape[0]} cell indices")
    elif not counts.shape[0] == cell_idx.shape[0] == totals.shape[0]:
        msg = f"{counts.shape[0]} count rows, {cell_idx.shape[0]} cell indices and {totals.shape[0]} totals differ"
        raise InvalidInputError(msg)
    if counts.nnz and (not np.all(np.isfinite(counts.data)) or counts.data.min() < 0):
        raise InvalidInputError("counts must be finite and non-negative raw counts; check --counts-layer")
    if canonical and not counts.has_canonical_format:  # unsorted or duplicate entries: var order, summed
        counts = counts.copy()
        counts.sum_duplicates()
    return counts, cell_idx


def csr_row(counts: scipy.sparse.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the stored entries of one row (views, no copy)."""
    lo, hi = counts.indptr[row], counts.indptr[row + 1]
    return counts.indices[lo:hi], counts.data[lo:hi]


def drop_zeros(cols: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the entries whose value is not zero (explicitly stored zeros are dropped)."""
    keep = data != 0
    return cols[keep], data[keep]


class RowTokenizer:
    """What the tokenizers that bind ``token_ids`` and encode each cell on its own share.

    Subclasses are frozen dataclasses with a ``token_ids: np.ndarray | None`` field and implement
    :meth:`_tokenize_row` (Tahoe-X1, scGPT).
    """

    token_ids: np.ndarray | None
    canonical_counts: ClassVar[bool] = True
    """Sum duplicate entries and sort each row before :meth:`_tokenize_row` (False: rows as stored)."""

    def bind(self: _RowTokenizerT, mapping: GeneMapping) -> _RowTokenizerT:
        """Return a copy that tokenizes count columns in the order of ``mapping``."""
        return dataclasses.replace(cast("Any", self), token_ids=np.asarray(mapping.token_ids, dtype=np.int64).copy())

    def seq_len(self, record: TokenRecord) -> int:
        """Number of tokens of a record (``<cls>`` included)."""
        return len(record)

    def tokenize(self, counts: scipy.sparse.csr_matrix, cell_idx: np.ndarray, *, seed: int) -> list[TokenRecord]:
        """Tokenize count rows, one :class:`TokenRecord` per row.

        Parameters
        ----------
        counts
            Raw counts, rows = cells, columns = the bound mapping's genes in mapping order.
        cell_idx
            Global index of each row (seeds the per-cell generator).
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
            raise ModelError(NOT_BOUND)
        counts, cell_idx = validate_counts(counts, cell_idx, self.token_ids.shape[0], canonical=self.canonical_counts)
        return [self._tokenize_row(counts, i, int(cell_idx[i]), seed) for i in range(counts.shape[0])]

    def _tokenize_row(self, counts: scipy.sparse.csr_matrix, row: int, cell: int, seed: int) -> TokenRecord:
        """The record of row ``row`` (global index ``cell``) of canonical CSR counts."""
        raise NotImplementedError


# --- collators -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaddedRecords:
    """Token records padded to a common length (CPU tensors), before the family's masks.

    Attributes
    ----------
    gene_ids, values
        ``(B, S)`` int64 ids and float32 values, padded.
    lengths
        ``(B,)`` int64 number of tokens of each record.
    pos, n
        ``(1, S)`` token positions and ``(B, 1)`` lengths, to build masks by broadcasting.
    cell_idx
        ``(B,)`` int64 global cell indices.
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    lengths: np.ndarray
    pos: torch.Tensor
    n: torch.Tensor
    cell_idx: np.ndarray

    def batch(
        self, *, padding_mask: torch.Tensor, gene_mask: torch.Tensor, positions: Mapping[str, torch.Tensor]
    ) -> TokenBatch:
        """The :class:`TokenBatch` of these records with the given masks and position pools."""
        return TokenBatch(
            gene_ids=self.gene_ids,
            values=self.values,
            padding_mask=padding_mask,
            gene_mask=gene_mask,
            positions=positions,
            cell_idx=self.cell_idx,
        )


def pad_records(
    records: Sequence[TokenRecord], *, pad_id: int, pad_value: float, min_width: int = 1
) -> PaddedRecords:
    """Pad records to the longest one (at least ``min_width`` columns) with ``pad_id``/``pad_value``.

    Raises
    ------
    ModelError
        If ``records`` is empty.
    """
    if not records:
        raise ModelError("cannot collate an empty list of records")
    b = len(records)
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    s = max(int(lengths.max()), min_width)
    gene_ids = np.full((b, s), pad_id, dtype=np.int64)
    values = np.full((b, s), pad_value, dtype=np.float32)
    for i, rec in enumerate(records):
        gene_ids[i, : len(rec)] = rec.gene_ids
        values[i, : len(rec)] = rec.values
    return PaddedRecords(
        gene_ids=torch.from_numpy(gene_ids),
        values=torch.from_numpy(values),
        lengths=lengths,
        pos=torch.arange(s).unsqueeze(0),
        n=torch.from_numpy(lengths).unsqueeze(1),
        cell_idx=np.asarray([r.cell_idx for r in records], dtype=np.int64),
    )
