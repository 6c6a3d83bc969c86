"""A toy model family living in its own package, found by sclstore through the ``sclstore.models``
entry-point group (``toy = "sclstore_toy_model:factory"``).

The model: ``<cls>`` + the expressed genes of a cell (token = gene, value = log1p(count)), an
embedding ``token_emb + value * value_emb``, two post-LN ``nn.TransformerEncoderLayer`` blocks
with deterministic (seeded) weights. Gene ids are ``TOY0`` .. ``TOY{n-1}``. Its official cell
embedding is the last block's ``<cls>``, L2-normalised. It needs no checkpoint: ``--checkpoint``
may name a seed (an integer) to get other weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
from torch import nn

from sclstore.ingest.adapter import (
    GeneMapping,
    ModelAdapter,
    OfficialEmbedding,
    TokenBatch,
    TokenRecord,
    map_to_vocab,
)
from sclstore.store.errors import InvalidInputError

__all__ = ["D_MODEL", "N_GENES", "N_LAYERS", "ToyAdapter", "factory"]

N_GENES, D_MODEL, N_LAYERS, N_HEADS = 30, 16, 2, 2
CLS = N_GENES
PAD = N_GENES + 1
VOCAB = {f"TOY{i}": i for i in range(N_GENES)}


@dataclass(frozen=True)
class ToyTokenizer:
    """Immutable and picklable: ``<cls>`` then the expressed genes in var order, values log1p(count)."""

    token_ids: np.ndarray | None = None

    def bind(self, mapping: GeneMapping) -> ToyTokenizer:
        return dataclasses.replace(self, token_ids=np.asarray(mapping.token_ids, dtype=np.int64).copy())

    def seq_len(self, record: TokenRecord) -> int:
        return len(record)

    def tokenize(self, counts: Any, cell_idx: np.ndarray, *, seed: int) -> list[TokenRecord]:
        assert self.token_ids is not None
        counts = scipy.sparse.csr_matrix(counts)
        counts.sum_duplicates()
        out = []
        for i in range(counts.shape[0]):
            lo, hi = counts.indptr[i], counts.indptr[i + 1]
            cols, data = counts.indices[lo:hi], counts.data[lo:hi]
            keep = data != 0
            genes = np.concatenate(([CLS], self.token_ids[cols[keep]])).astype(np.int64)
            values = np.concatenate(([0.0], np.log1p(data[keep]))).astype(np.float32)
            out.append(TokenRecord(cell_idx=int(cell_idx[i]), gene_ids=genes, values=values, embeddable=len(genes) > 1))
        return out


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(N_GENES + 2, D_MODEL)
        self.value_emb = nn.Parameter(torch.empty(D_MODEL).normal_())
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(D_MODEL, N_HEADS, 2 * D_MODEL, dropout=0.0, batch_first=True)
            for _ in range(N_LAYERS)
        )

    def forward(self, ids: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        x = self.token_emb(ids) + values.unsqueeze(-1) * self.value_emb
        for block in list(self.blocks)[: n_blocks if n_blocks is not None else N_LAYERS]:
            x = block(x, src_key_padding_mask=~keep)
        return x


class ToyAdapter(ModelAdapter[ToyNet]):
    family = "toy"
    official_precision = "fp32"
    supported_pools = ("cls", "mean", "max")
    default_pools = ("cls", "mean")

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.name = f"toy-{self.seed}"
        self.n_layers, self.d_model = N_LAYERS, D_MODEL
        self._base = ToyTokenizer()
        self.tokenizer = self._base

    @property
    def checkpoint_hash(self) -> str:  # type: ignore[override]
        return hashlib.sha256(f"toy\0{self.seed}".encode()).hexdigest()

    @property
    def official(self) -> OfficialEmbedding:
        return OfficialEmbedding(layer=N_LAYERS, pools=("cls",), l2_normalise=True)

    def _describe_checkpoint(self) -> dict[str, Any]:
        return {"architecture": "toy (2 post-LN torch blocks)", "seed": self.seed, "n_genes_in_vocab": N_GENES}

    def _describe_layers(self) -> dict[str, Any]:
        return {"official_embedding": "last-layer cls, L2-normalised"}

    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        mapping = map_to_vocab(gene_ids, VOCAB, model="toy")
        self.tokenizer = self._base.bind(mapping)
        return mapping

    def collate(self, records: list[Any]) -> TokenBatch:
        b, s = len(records), max(len(r) for r in records)
        ids = np.full((b, s), PAD, dtype=np.int64)
        vals = np.zeros((b, s), dtype=np.float32)
        for i, r in enumerate(records):
            ids[i, : len(r)], vals[i, : len(r)] = r.gene_ids, r.values
        lengths = torch.tensor([len(r) for r in records]).unsqueeze(1)
        pos = torch.arange(s).unsqueeze(0)
        keep = pos < lengths
        return TokenBatch(gene_ids=torch.from_numpy(ids), values=torch.from_numpy(vals), padding_mask=keep,
                          gene_mask=keep & (pos >= 1), positions={"cls": torch.zeros(b, dtype=torch.int64)},
                          cell_idx=np.array([r.cell_idx for r in records], dtype=np.int64))

    def _new_model(self) -> ToyNet:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            return ToyNet()
        finally:
            torch.random.set_rng_state(gen_state)

    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> Mapping[str, torch.Tensor]:
        return self._new_model().state_dict()

    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        return self._require_model()(batch.gene_ids, batch.values, batch.padding_mask, n_blocks)

    @torch.no_grad()
    def official_embedding(self, batch: TokenBatch) -> torch.Tensor:
        batch = self._on_device(batch)
        with self.autocast():
            cls = self._encode(batch)[:, 0].float()
        return torch.nn.functional.normalize(cls, dim=-1)


def factory(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str]) -> ToyAdapter:
    """The entry point: ``--checkpoint`` may be an integer seed; no options, no --max-genes."""
    if options or max_genes is not None:
        raise InvalidInputError("model family 'toy' takes no model options and no --max-genes")
    try:
        seed = int(str(checkpoint.name if isinstance(checkpoint, Path) else checkpoint or 0))
    except ValueError:
        raise InvalidInputError(f"toy --checkpoint must be an integer seed, got {checkpoint}") from None
    return ToyAdapter(seed)
