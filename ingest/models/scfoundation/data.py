"""scFoundation data path: gene list, resolution tokens, tokenizing and collating.

This follows the official single-cell inference script (``model/get_embedding.py`` of
``biomap-research/scFoundation``, ``--input_type singlecell --pre_normalized F``):

1. the raw counts are aligned to the model's gene list (19,264 HGNC symbols), genes the
   dataset lacks are zero (``main_gene_selection``);
2. ``x = log1p(counts / total * 1e4)`` with ``total`` the cell's raw count over that list;
3. two "resolution" tokens are appended: **T** (the target total count, option
   ``tgthighres``) and **S** ``= log10(total)``; ``tgthighres`` is ``tX`` (``T = X``; the
   script's default is ``t4``), ``fX`` (``T = log10(total * X)``) or ``aX`` (``T = S + X``);
4. only the values ``> 0`` are kept, in gene-list order (``gatherData`` with
   ``value_labels = x > 0``); each token's position id is its index in the ``G + 2`` long
   sequence (genes ``0..G-1``, T ``G``, S ``G+1``).

As upstream, the alignment pads with float64 zeros, so all arithmetic is float64 and the values
are rounded to float32 once, when the tensor is built. Upstream runs one cell at a time; in a
padded batch the pad tokens get the *value* ``pad_token_id`` (103, embedded as ``emb_pad``) and
the position ``seq_len`` (as upstream's gene path), and are masked out of attention.

Pools follow the official cell embedding (``geneemb[:, -1]``, ``[:, -2]`` and max/mean over
``[:, :-2]``), taken per row: ``S`` is the last real token, ``T`` the one before it and the gene
pools run over all tokens before those two.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse
import torch

from sclstore.store.errors import CheckpointError, InvalidInputError, ModelError

from ...adapter import GeneMapping, TokenBatch, TokenRecord
from .._common import NOT_BOUND, csr_row, pad_records, validate_counts

__all__ = [
    "GENE_LIST_FILE",
    "N_OFFICIAL_GENES",
    "Resolution",
    "ScFoundationTokenizer",
    "cell_values",
    "collate_records",
    "empty_rows",
    "gather_positive",
    "packaged_gene_list",
    "read_gene_list",
]

logger = logging.getLogger(__name__)

GENE_LIST_FILE = Path(__file__).resolve().with_name("genes.txt")
"""The official 19,264-gene list (``OS_scRNA_gene_index.19264.tsv``), one symbol per line, in order."""

N_OFFICIAL_GENES = 19264

_RESOLUTION_RE = re.compile(r"^([tfa])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class Resolution:
    """The target-resolution option ``tgthighres`` of the official script.

    Attributes
    ----------
    mode
        ``"t"``: T is the number itself; ``"f"``: T = log10(total * number);
        ``"a"``: T = log10(total) + number.
    value
        The number after the letter.
    """

    mode: Literal["t", "f", "a"]
    value: float

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """Parse ``"t4"``, ``"f1"``, ``"a5"``, ``"t4.5"``...

        Raises
        ------
        InvalidInputError
            If the text is not a letter t/f/a followed by a number, or gives no usable T.
        """
        match = _RESOLUTION_RE.match(str(text).strip())
        if match is None:
            msg = (
                f"tgthighres {text!r} is not valid: use t<X> (T = X, official default t4), "
                "f<X> (T = log10(total*X)) or a<X> (T = log10(total)+X), e.g. t4, f1, a5"
            )
            raise InvalidInputError(msg)
        mode, value = match.group(1), float(match.group(2))
        if not math.isfinite(value) or (mode in "tf" and value <= 0):
            msg = f"tgthighres {text!r}: the number must be finite{' and > 0' if mode in 'tf' else ''}"
            raise InvalidInputError(msg)
        return cls(mode=mode, value=value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.mode}{self.value:g}"

    def tokens(self, total: float) -> tuple[float, float]:
        """Return the float64 ``(T, S)`` values of a cell with raw total count ``total``.

        A total of 0 gives ``S = -inf`` (dropped later, as upstream).
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            s = float(np.log10(np.float64(total)))
            if self.mode == "t":
                t = self.value
            elif self.mode == "f":
                t = float(np.log10(np.float64(total) * self.value))
            else:
                t = s + self.value
        return t, s


def read_gene_list(path: Path) -> tuple[str, ...]:
    """Read a gene list: the official TSV (column ``gene_name``) or one symbol per line.

    Raises
    ------
    CheckpointError
        If the file cannot be read, is empty, lacks the ``gene_name`` column or repeats a gene.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise CheckpointError(f"cannot read gene list {str(path)!r}: {exc}") from exc
    if path.suffix == ".tsv":
        rows = list(csv.reader(text.splitlines(), delimiter="\t"))
        if not rows or "gene_name" not in rows[0]:
            msg = f"gene list {str(path)!r} has no 'gene_name' column; expected the official TSV (gene_name<TAB>index)"
            raise CheckpointError(msg)
        col = rows[0].index("gene_name")
        genes = tuple(row[col].strip() for row in rows[1:] if len(row) > col and row[col].strip())
    else:
        genes = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not genes:
        raise CheckpointError(f"gene list {str(path)!r} is empty")
    if len(set(genes)) != len(genes):
        counts: dict[str, int] = {}
        for g in genes:
            counts[g] = counts.get(g, 0) + 1
        dup = next(g for g, n in counts.items() if n > 1)
        raise CheckpointError(f"gene list {str(path)!r} repeats gene {dup!r}; each gene must appear once")
    return genes


@functools.lru_cache(maxsize=1)
def packaged_gene_list() -> tuple[str, ...]:
    """The official 19,264-gene list shipped with sclstore (:data:`GENE_LIST_FILE`)."""
    genes = read_gene_list(GENE_LIST_FILE)
    if len(genes) != N_OFFICIAL_GENES:
        raise ModelError(f"packaged {GENE_LIST_FILE.name} has {len(genes)} genes, expected {N_OFFICIAL_GENES}")
    return genes


def cell_values(counts: np.ndarray, resolution: Resolution) -> np.ndarray:
    """The ``G + 2`` input values of one cell, before dropping zeros (float32).

    Parameters
    ----------
    counts
        Raw counts of the cell aligned to the gene list (length ``G``, zeros for missing genes).
    resolution
        The ``tgthighres`` option.

    Returns
    -------
    numpy.ndarray
        ``log1p(counts / total * 1e4)`` followed by T and S, computed in float64 and rounded
        to float32 (NaN/-inf for an empty cell, dropped by :func:`gather_positive`).

    Examples
    --------
    >>> [round(float(v), 4) for v in cell_values(np.array([0.0, 3.0, 7.0]), Resolution.parse("t4"))]
    [0.0, 8.0067, 8.8538, 4.0, 1.0]
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    t, s = resolution.tokens(total)
    with np.errstate(divide="ignore", invalid="ignore"):
        genes = np.log1p(counts / total * 1e4)
    return np.concatenate([genes, np.array([t, s])]).astype(np.float32)


def gather_positive(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the values ``> 0`` in order, with their indices (upstream ``gatherData``, one cell).

    Examples
    --------
    >>> pos, val = gather_positive(np.array([0, 2.3, 0, 1.1, 0, 0.5, 4, 3.2], dtype=np.float32))
    >>> pos.tolist(), [round(float(v), 2) for v in val]
    ([1, 3, 5, 6, 7], [2.3, 1.1, 0.5, 4.0, 3.2])
    """
    values = np.asarray(values, dtype=np.float32)
    keep = np.flatnonzero(values > 0)
    return keep.astype(np.int64), values[keep]


@dataclass(frozen=True, kw_only=True)
class ScFoundationTokenizer:
    """Picklable scFoundation tokenizer: gene-list size, T option and the bound gene positions.

    Use :meth:`bind` (``adapter.map_genes`` binds ``adapter.tokenizer``) before :meth:`tokenize`.
    Records hold position ids in ``gene_ids`` (genes ``0..G-1``, T ``G``, S ``G+1``) and the
    float32 input values in ``values``.
    """

    n_genes: int
    resolution: Resolution
    positions: np.ndarray | None = None

    def bind(self, mapping: GeneMapping) -> ScFoundationTokenizer:
        """Return a copy that reads count columns in the order of ``mapping``."""
        return dataclasses.replace(self, positions=np.asarray(mapping.token_ids, dtype=np.int64).copy())

    def seq_len(self, record: TokenRecord) -> int:
        """Number of tokens of a record (genes kept plus the kept resolution tokens)."""
        return len(record)

    def tokenize(self, counts: scipy.sparse.csr_matrix, cell_idx: np.ndarray, *, seed: int) -> list[TokenRecord]:
        """Tokenize raw counts, one :class:`TokenRecord` per row (deterministic; ``seed`` unused).

        Parameters
        ----------
        counts
            Raw counts, rows = cells, columns = the bound mapping's genes in mapping order.
            Several columns mapped to the same gene are summed.
        cell_idx
            Global index of each row.
        seed
            Run seed (scFoundation's preprocessing has no randomness).

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
        del seed
        if self.positions is None:
            raise ModelError(NOT_BOUND)
        counts, cell_idx = validate_counts(counts, cell_idx, self.positions.shape[0], canonical=False)
        records = []
        dense = np.zeros(self.n_genes, dtype=np.float64)
        for i in range(counts.shape[0]):
            cols, data = csr_row(counts, i)
            dense[:] = 0.0
            np.add.at(dense, self.positions[cols], data)
            pos, val = gather_positive(cell_values(dense, self.resolution))
            records.append(TokenRecord(cell_idx=int(cell_idx[i]), gene_ids=pos, values=val,
                                       embeddable=bool((pos < self.n_genes).any())))
        return records


def collate_records(records: Sequence[TokenRecord], *, pad_value: float, pad_position: int) -> TokenBatch:
    """Pad scFoundation records into a CPU batch with per-row ``T``/``S`` positions.

    Parameters
    ----------
    records
        Token records of one batch.
    pad_value
        Value of pad tokens (the checkpoint's ``pad_token_id``, 103).
    pad_position
        Position id of pad tokens (the checkpoint's ``seq_len``).

    Returns
    -------
    TokenBatch
        ``gene_ids`` hold position ids. ``S`` is at ``len - 1`` and ``T`` at ``len - 2``
        (clamped to 0), the gene mask covers the first ``len - 2`` tokens. A record without any
        token (a cell with no counts and no positive T) gets one pad token that attends only to
        itself; :func:`empty_rows` finds such rows.

    Raises
    ------
    ModelError
        If ``records`` is empty.
    """
    padded = pad_records(records, pad_id=pad_position, pad_value=pad_value)
    pos, n, lengths = padded.pos, padded.n, padded.lengths
    padding_mask = (pos < n) | ((n == 0) & (pos == 0))
    gene_mask = pos < n - 2
    t = torch.from_numpy(np.maximum(lengths - 2, 0))
    s_pos = torch.from_numpy(np.maximum(lengths - 1, 0))
    return padded.batch(padding_mask=padding_mask, gene_mask=gene_mask, positions={"T": t, "S": s_pos})


def empty_rows(batch: TokenBatch, pad_position: int) -> torch.Tensor:
    """``(B,)`` bool: rows collated from a record without tokens (their first id is the pad position)."""
    return batch.gene_ids[:, 0] == pad_position
