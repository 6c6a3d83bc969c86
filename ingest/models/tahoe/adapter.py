"""Tahoe-X1 adapter: a faithful plain-PyTorch Tahoe-X1 encoder behind :class:`ModelAdapter`.

Facts and pitfalls of the official model: ``research/models.md`` §1. In short:

* input: raw counts of the genes in the vocabulary (Ensembl ids for the released checkpoints),
  nonzero genes in ``adata.var`` order, ``<cls>`` first with value ``pad_value`` (-2), values
  binned per cell into 1..50, at most ``max_length`` tokens (2048 at inference; a seeded random
  subset beyond that), padding with ``<pad>``/-2;
* model: gene embedding (+LN) + value MLP (+LN), pre-LN blocks with fused ``Wqkv``, final LN;
* official cell embedding: ``<cls>`` of the final-LN output, L2-normalised;
* stored layer ``l`` is the residual stream (before the final LN), so
  ``official == normalize(final_norm(stored layer L cls))``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sclstore.store.errors import CheckpointError

from ...adapter import (
    GeneMapping,
    ModelAdapter,
    OfficialEmbedding,
    TokenBatch,
    TokenRecord,
    hash_files,
    looks_like_ensembl,
    map_to_vocab,
)
from .._common import name_from_folder
from .checkpoint import (
    CheckpointFiles,
    check_state_dict,
    locate_checkpoint,
    read_state_dict,
    read_vocab,
    read_yaml,
)
from .data import TahoeTokenizer, collate_records
from .model import TahoeConfig, TahoeModel

__all__ = ["INFERENCE_MAX_LENGTH", "TahoeAdapter"]

logger = logging.getLogger(__name__)

INFERENCE_MAX_LENGTH = 2048
"""Official inference sequence cap (``predict_embeddings.py``: ``seq_len_dataset`` default 2048)."""


_PRECISIONS = {"fp32": "fp32", "amp_bf16": "bf16", "bf16": "bf16", "amp_fp16": "fp16", "fp16": "fp16"}


class TahoeAdapter(ModelAdapter[TahoeModel]):
    """Tahoe-X1 checkpoint (HF layout or Composer ``best-model.pt``) as a :class:`ModelAdapter`.

    Constructing reads only the configs and the vocabulary; :meth:`load` builds the encoder and
    loads its weights strictly.

    Parameters
    ----------
    checkpoint
        Checkpoint folder (or its weight file).
    max_genes
        Maximum sequence length in tokens, ``<cls>`` included (the collator's ``max_length``);
        default 2048 as the official inference code.
    family
        Family name recorded in the catalog (``"tahoe-x1"``; ``"sclstore-tiny"`` for the
        built-in model).
    name
        Model name; default: the checkpoint folder's name.

    Raises
    ------
    CheckpointError
        If files are missing or the configs/vocabulary are invalid or unsupported.
    """

    family = "tahoe-x1"
    supported_pools = ("cls", "mean", "max")
    default_pools = ("cls", "mean")

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        max_genes: int | None = None,
        family: str | None = None,
        name: str | None = None,
        apply_softmax_scale: bool = False,
    ) -> None:
        self.files: CheckpointFiles = locate_checkpoint(checkpoint)
        model_cfg = read_yaml(self.files.model_config)
        collator_cfg = read_yaml(self.files.collator_config)
        self.apply_softmax_scale = bool(apply_softmax_scale)
        self.config = TahoeConfig.from_dicts(model_cfg, collator_cfg, apply_softmax_scale=self.apply_softmax_scale)
        self.vocab = read_vocab(self.files.vocab)
        cfg = self.config
        if max(self.vocab.values()) >= cfg.vocab_size:
            msg = (
                f"vocab.json has ids up to {max(self.vocab.values())} but model_config.yml vocab_size "
                f"is {cfg.vocab_size}; the files do not belong together"
            )
            raise CheckpointError(msg)
        if self.vocab["<pad>"] != cfg.pad_token_id:
            logger.warning(
                "collator pad_token_id %d differs from vocab['<pad>'] %d; using the collator's, as upstream",
                cfg.pad_token_id,
                self.vocab["<pad>"],
            )
        if cfg.use_chem_token:
            logger.info("checkpoint was trained with a <drug> token; running without chemistry (use_chem_inf=False)")
        if cfg.keep_first_n_tokens > 1:
            logger.warning(
                "keep_first_n_tokens=%d: as upstream, the first %d expressed gene(s) of each cell are fed unbinned",
                cfg.keep_first_n_tokens,
                cfg.keep_first_n_tokens - 1,
            )
        # get_batch_embeddings autocasts to model_config's precision (amp_bf16 in every release)
        self.official_precision = _PRECISIONS.get(cfg.precision.lower(), "bf16")
        if family is not None:
            self.family = family
        self.name = name or name_from_folder(self.files.folder, "tahoe-x1")
        self.n_layers = cfg.n_layers
        self.d_model = cfg.d_model
        self.max_length = int(max_genes) if max_genes is not None else INFERENCE_MAX_LENGTH
        self._base_tokenizer = TahoeTokenizer(
            cls_id=int(self.vocab["<cls>"]),
            pad_token_id=cfg.pad_token_id,
            pad_value=cfg.pad_value,
            num_bins=cfg.num_bins,
            right_binning=cfg.right_binning,
            keep_first_n_tokens=cfg.keep_first_n_tokens,
            max_length=self.max_length,
            do_binning=cfg.do_binning,
            log_transform=cfg.log_transform,
            target_sum=cfg.target_sum,
        )
        self.tokenizer = self._base_tokenizer

    # --- identity -------------------------------------------------------------------------
    @functools.cached_property
    def checkpoint_hash(self) -> str:
        """sha256 over the checkpoint files, plus the non-official ``softmax_scale=config`` option when set."""
        base = hash_files(self.files.all())
        if not self.apply_softmax_scale:
            return base
        return hashlib.sha256(f"{base}\0softmax_scale=config".encode()).hexdigest()

    def _describe_checkpoint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "architecture": "tahoe-x1",
            "softmax_scale": cfg.softmax_scale if self.apply_softmax_scale else "1/sqrt(head_dim) (config value ignored, as upstream)",
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "ffn_dim": cfg.ffn_dim,
            "activation": cfg.activation,
            "norm_scheme": cfg.norm_scheme,
            "use_glu": cfg.use_glu,
            "vocab_size": cfg.vocab_size,
            "n_genes_in_vocab": sum(1 for k in self.vocab if not k.startswith("<")),
            "gene_id_type": "ensembl" if self._vocab_is_ensembl() else "symbol",
            "max_length": self.max_length,
            "keep_first_n_tokens": cfg.keep_first_n_tokens,
            "value_encoding": "binning" if cfg.do_binning else ("log1p" if cfg.log_transform else "raw"),
            "num_bins": cfg.num_bins,
            "pad_value": cfg.pad_value,
            "checkpoint_format": self.files.fmt,
            "checkpoint_files": [p.name for p in self.files.all()],
        }

    def _describe_layers(self) -> dict[str, Any]:
        return {
            "layer_0": "input of block 0 (gene embedding + value embedding)",
            "stored_layers_include_final_norm": False,
            "official_embedding": "l2_normalize(transformer_encoder.norm(layer L))[cls]",
        }

    def _vocab_is_ensembl(self) -> bool:
        return looks_like_ensembl([k for k in list(self.vocab)[:2000] if not k.startswith("<")])

    # --- data -----------------------------------------------------------------------------
    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        """Map dataset gene ids to the vocabulary and bind :attr:`tokenizer` to the mapping.

        Raises
        ------
        InvalidInputError
            If the ids are of the wrong type (symbols vs Ensembl ids) or too few match.
        """
        mapping = map_to_vocab(gene_ids, self.vocab, model=f"{self.family} ({self.name})")
        self.tokenizer = self._base_tokenizer.bind(mapping)
        return mapping

    def collate(self, records: list[TokenRecord]) -> TokenBatch:
        """Pad records with ``<pad>`` / ``pad_value`` into a CPU batch (``cls`` at position 0)."""
        return collate_records(
            records,
            pad_token_id=self.config.pad_token_id,
            pad_value=self.config.pad_value,
            n_special=1,
            position_pools={"cls": 0},
        )

    # --- model ----------------------------------------------------------------------------
    def _new_model(self) -> TahoeModel:
        return TahoeModel(self.config)

    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        return check_state_dict(read_state_dict(self.files), expected, where=repr(str(self.files.weights)))

    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        model = self._require_model()
        mask = batch.padding_mask[:, None, None, :]
        return model(batch.gene_ids, batch.values, mask, n_blocks=n_blocks)

    @property
    def official(self) -> OfficialEmbedding:
        """Final-LayerNorm ``<cls>`` of the last block, L2-normalised (``get_batch_embeddings``)."""
        return OfficialEmbedding(layer=self.n_layers, pools=("cls",), final_norm=True, l2_normalise=True)

    @torch.no_grad()
    def apply_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's final LayerNorm on pooled vectors (on the model's device, float32 out)."""
        model = self._require_model()
        with self.autocast():
            return model.final_norm(x.to(self.device, dtype=torch.float32)).float()

    @torch.no_grad()
    def official_embedding(self, batch: TokenBatch) -> torch.Tensor:
        """The official cell embedding: ``<cls>`` of the final-LN output, L2-normalised, float32."""
        model = self._require_model()
        with self.autocast():
            hidden = model.final_norm(self._encode(batch))
            cls = hidden[:, 0].float()
        return F.normalize(cls, p=2, dim=-1)

    @torch.no_grad()
    def final_transform(self, pooled_last: torch.Tensor) -> torch.Tensor:
        """Map stored last-layer ``cls`` vectors to the official embedding (final LN, then L2).

        Raises
        ------
        InvalidInputError
            If the vectors do not have ``d_model`` columns.
        """
        model = self._require_model()
        self._check_width(pooled_last)
        x = pooled_last.to(self.device, dtype=torch.float32)
        with self.autocast():
            y = model.final_norm(x).float()
        return F.normalize(y, p=2, dim=-1)
