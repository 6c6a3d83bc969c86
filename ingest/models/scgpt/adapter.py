"""scGPT adapter: a faithful plain-PyTorch scGPT encoder behind :class:`ModelAdapter`.

Facts and pitfalls of the official model: ``research/models.md`` §2. In short:

* input: values of the genes whose symbols are in ``vocab.json``, nonzero genes in
  ``adata.var`` order, ``<cls>`` first with value ``pad_value`` (-2), values binned per cell into
  1..50 with random tie-breaking (seeded here per cell), at most 1200 tokens (a seeded random
  subset beyond that, ``<cls>`` kept), padding with ``<pad>``/-2;
* model: gene embedding (+LN) + value MLP (+LN), post-LN blocks (``nn.TransformerEncoderLayer``
  semantics, ReLU, eps 1e-5), no final norm;
* official cell embedding (``scgpt.tasks.embed_data``): ``<cls>`` of the last block's output,
  L2-normalised; so ``official == normalize(stored layer L cls)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sclstore.store.errors import CheckpointError, InvalidInputError

from ...adapter import GeneMapping, ModelAdapter, OfficialEmbedding, TokenBatch, TokenRecord, map_to_vocab
from .._common import name_from_folder
from ..tahoe.data import collate_records
from .checkpoint import (
    ScGPTFiles,
    check_state_dict,
    locate_checkpoint,
    read_args,
    read_state_dict,
    read_vocab,
    rename_flash_keys,
)
from .data import OFFICIAL_N_BINS, ScGPTTokenizer
from .model import ScGPTConfig, ScGPTModel

__all__ = ["INFERENCE_MAX_LENGTH", "ScGPTAdapter", "from_checkpoint"]

logger = logging.getLogger(__name__)

INFERENCE_MAX_LENGTH = 1200
"""Official inference sequence cap (``embed_data(max_length=1200)``), ``<cls>`` included."""


class ScGPTAdapter(ModelAdapter[ScGPTModel]):
    """scGPT checkpoint folder (``args.json``, ``vocab.json``, ``best_model.pt``) as a :class:`ModelAdapter`.

    Constructing reads only ``args.json`` and ``vocab.json``; :meth:`load` builds the encoder and
    loads its weights strictly.

    Parameters
    ----------
    checkpoint
        Checkpoint folder (or its ``best_model.pt``).
    max_genes
        Maximum sequence length in tokens, ``<cls>`` included; default 1200 as ``embed_data``
        (``args.json``'s ``max_seq_len`` is the training length and is not used, as upstream).
    name
        Model name; default: the checkpoint folder's name.

    Raises
    ------
    CheckpointError
        If files are missing (naming the family the folder looks like, if another), or
        ``args.json``/``vocab.json`` are invalid or describe an unsupported model.

    Examples
    --------
    >>> adapter = ScGPTAdapter("models/scGPT_human")              # doctest: +SKIP
    >>> adapter.map_genes(adata.var_names)                       # doctest: +SKIP
    >>> adapter.load("cuda")                                     # doctest: +SKIP
    """

    family = "scgpt"
    official_precision = "fp16"  # embed_data runs under torch.cuda.amp.autocast() (fp16)
    supported_pools = ("cls", "mean", "max")
    default_pools = ("cls", "mean", "max")

    def __init__(self, checkpoint: str | Path, *, max_genes: int | None = None, name: str | None = None) -> None:
        self.files: ScGPTFiles = locate_checkpoint(checkpoint)
        args = read_args(self.files.args)
        self.vocab, self.added_specials = read_vocab(self.files.vocab)
        self.config = ScGPTConfig.from_args(args, vocab_size=len(self.vocab))
        cfg = self.config
        if cfg.pad_token not in self.vocab:
            msg = f"args.json pad_token {cfg.pad_token!r} is not in vocab.json; the files do not belong together"
            raise CheckpointError(msg)
        if cfg.n_bins != OFFICIAL_N_BINS:
            logger.warning("args.json n_bins=%d, but the official embedding path bins into %d; following it",
                           cfg.n_bins, OFFICIAL_N_BINS)
        self.name = name or name_from_folder(self.files.folder, "scgpt")
        self.n_layers = cfg.n_layers
        self.d_model = cfg.d_model
        self.max_length = int(max_genes) if max_genes is not None else INFERENCE_MAX_LENGTH
        self.pad_token_id = int(self.vocab[cfg.pad_token])
        self._base_tokenizer = ScGPTTokenizer(
            cls_id=int(self.vocab["<cls>"]),
            pad_token_id=self.pad_token_id,
            pad_value=cfg.pad_value,
            max_length=self.max_length,
        )
        self.tokenizer = self._base_tokenizer

    # --- identity -------------------------------------------------------------------------
    def _describe_checkpoint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "architecture": "scgpt",
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "ffn_dim": cfg.d_hid,
            "activation": "relu",
            "norm_scheme": "post",
            "vocab_size": cfg.vocab_size,
            "n_genes_in_vocab": sum(1 for k in self.vocab if not k.startswith("<")),
            "specials_added": list(self.added_specials),
            "gene_id_type": "symbol",
            "max_length": self.max_length,
            "train_max_seq_len": cfg.max_seq_len,
            "value_encoding": "binning-random-ties",
            "num_bins": OFFICIAL_N_BINS,
            "pad_token": cfg.pad_token,
            "pad_value": cfg.pad_value,
            "checkpoint_format": "scgpt",
            "checkpoint_files": [p.name for p in self.files.all()],
        }

    def _describe_layers(self) -> dict[str, Any]:
        return {
            "layer_0": "input of block 0 (gene embedding + value embedding)",
            "final_norm": None,
            "stored_layers_include_final_norm": False,
            "official_embedding": "l2_normalize(layer L)[cls]",
        }

    # --- data -----------------------------------------------------------------------------
    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        """Map dataset gene symbols to the vocabulary and bind :attr:`tokenizer` to the mapping.

        Raises
        ------
        InvalidInputError
            If the ids look like Ensembl ids (scGPT uses gene symbols) or too few match.
        """
        mapping = map_to_vocab(gene_ids, self.vocab, model=f"{self.family} ({self.name})")
        self.tokenizer = self._base_tokenizer.bind(mapping)
        return mapping

    def collate(self, records: list[TokenRecord]) -> TokenBatch:
        """Pad records with the pad token / ``pad_value`` into a CPU batch (``cls`` at position 0)."""
        return collate_records(
            records,
            pad_token_id=self.pad_token_id,
            pad_value=self.config.pad_value,
            n_special=1,
            position_pools={"cls": 0},
        )

    # --- model ----------------------------------------------------------------------------
    def _new_model(self) -> ScGPTModel:
        return ScGPTModel(self.config)

    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        where = repr(str(self.files.weights))
        state = rename_flash_keys(read_state_dict(self.files), where=where)
        return check_state_dict(state, expected, where=where)

    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        model = self._require_model()
        mask = batch.padding_mask[:, None, None, :]
        return model(batch.gene_ids, batch.values, mask, n_blocks=n_blocks)

    @property
    def official(self) -> OfficialEmbedding:
        """Last-layer ``<cls>``, L2-normalised (``embed_data``)."""
        return OfficialEmbedding(layer=self.n_layers, pools=("cls",), l2_normalise=True)

    @torch.no_grad()
    def official_embedding(self, batch: TokenBatch) -> torch.Tensor:
        """The official cell embedding: ``<cls>`` of the last block's output, L2-normalised, float32."""
        self._require_model()
        batch = self._on_device(batch)
        with self.autocast():
            cls = self._encode(batch)[:, 0].float()
        return F.normalize(cls, p=2, dim=-1)

    @torch.no_grad()
    def final_transform(self, pooled_last: torch.Tensor) -> torch.Tensor:
        """Map stored last-layer ``cls`` vectors to the official embedding (L2 normalisation).

        Raises
        ------
        InvalidInputError
            If the vectors do not have ``d_model`` columns.
        """
        self._check_width(pooled_last)
        return F.normalize(pooled_last.to(dtype=torch.float32), p=2, dim=-1)


def from_checkpoint(checkpoint: Path | None, max_genes: int | None) -> ScGPTAdapter:
    """Registry factory for ``--model scgpt`` (no weights are loaded).

    Raises
    ------
    InvalidInputError
        If no checkpoint folder is given.
    CheckpointError
        If the folder is not a valid scGPT checkpoint.
    """
    if checkpoint is None:
        msg = (
            "model family 'scgpt' needs --checkpoint DIR: a folder with args.json, vocab.json and "
            "best_model.pt (e.g. the released scGPT_human folder)"
        )
        raise InvalidInputError(msg)
    return ScGPTAdapter(checkpoint, max_genes=max_genes)
