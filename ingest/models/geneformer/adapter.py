"""Geneformer adapter: a faithful plain-PyTorch BERT encoder behind :class:`ModelAdapter`.

Facts and pitfalls of the official model: ``research/models.md`` §4. In short:

* checkpoint: one folder with the HF model files (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, a ``BertForMaskedLM`` or ``BertModel`` save) and the release's
  ``*token_dictionary*.pkl`` and ``*gene_median*.pkl``;
* version: token dictionary without ``<cls>`` -> V1 (genes only, input size 2048, official cell
  embedding = mean over gene tokens); with ``<cls>``/``<eos>`` -> V2 (``<cls>`` + genes +
  ``<eos>``, input size 4096, official cell embedding = ``<cls>``). The input size is the
  model's ``max_position_embeddings`` (2048 for V1, 4096 for V2 releases);
* input: genes matched by Ensembl id, ``counts / n_counts * 10_000 / gene_median``, non-zero
  genes ranked by decreasing value, truncated (:mod:`.data`);
* model: post-LN BERT, absolute positions, token type 0, no final norm
  (:mod:`.model`);
* official cell embedding (``EmbExtractor``, default ``emb_layer=-1``): ``hidden_states[L-1]``
  of ``BertModel``, the output of the **second-to-last** block. Stored layer ``l`` equals
  ``hidden_states[l]`` (0 = embeddings), so the official embedding is the stored ``cls`` (V2)
  or ``mean`` (V1) vector of stored layer ``L - 1`` (:attr:`GeneformerAdapter.official_layer`),
  with no transform (:meth:`GeneformerAdapter.final_transform` is the identity).

Upstream divides by each cell's total count over **all** genes; the pipeline passes it to
``tokenize(..., totals=adapter.tokenizer.cell_totals(all_gene_counts, obs_rows))``. The rank
order is invariant to that per-cell scale, so without it only the recorded ``values`` (and the
rounding of exact near-ties) differ.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch

from sclstore.store.errors import CheckpointError, InvalidInputError

from ...adapter import GeneMapping, ModelAdapter, OfficialEmbedding, TokenBatch, TokenRecord, map_to_vocab
from ...capture import pool_hidden
from .._common import name_from_folder
from .checkpoint import (
    GeneformerFiles,
    check_state_dict,
    locate_checkpoint,
    read_config,
    read_dictionaries,
    read_state_dict,
)
from .data import GeneformerTokenizer, collate_geneformer, official_gene_layout
from .model import BertEncoderConfig, GeneformerBert

__all__ = ["GeneformerAdapter", "from_checkpoint"]

logger = logging.getLogger(__name__)

_VERSION_SUFFIX = re.compile(r"\.\d+$")


class GeneformerAdapter(ModelAdapter[GeneformerBert]):
    """A Geneformer (V1 or V2) checkpoint folder as a :class:`ModelAdapter`.

    Constructing reads ``config.json`` and the two dictionaries only; :meth:`load` builds the
    encoder and loads its weights strictly.

    Parameters
    ----------
    checkpoint
        The checkpoint folder (or its ``config.json`` / weight file).
    max_genes
        Input size in tokens, special tokens included; default and maximum: the model's
        ``max_position_embeddings`` (the official ``model_input_size``).
    name
        Model name; default: the folder's name.

    Attributes
    ----------
    version
        ``"V1"`` or ``"V2"``.
    official_layer
        Stored layer holding the official embedding (``L - 1``, upstream ``emb_layer=-1``).
    official_pool
        Pool holding it: ``"cls"`` (V2) or ``"mean"`` (V1).

    Raises
    ------
    CheckpointError
        If files are missing, the folder belongs to another family, or the config and the
        dictionaries are invalid or do not belong together.
    InvalidInputError
        If ``max_genes`` is out of range.

    Examples
    --------
    >>> adapter = GeneformerAdapter("Geneformer-V2-104M")      # doctest: +SKIP
    >>> adapter.version, adapter.official_layer, adapter.official_pool  # doctest: +SKIP
    ('V2', 11, 'cls')
    """

    family = "geneformer"
    official_precision = "fp32"  # EmbExtractor: no autocast

    def __init__(self, checkpoint: str | Path, *, max_genes: int | None = None, name: str | None = None) -> None:
        self.files: GeneformerFiles = locate_checkpoint(checkpoint)
        self.raw_config = read_config(self.files)
        self.config = BertEncoderConfig.from_dict(self.raw_config)
        self.dicts = read_dictionaries(self.files)
        cfg, dicts = self.config, self.dicts
        top = max(dicts.tokens.values())
        if top >= cfg.vocab_size or min(dicts.tokens.values()) < 0:
            msg = (
                f"{self.files.token_dictionary.name} has token ids up to {top} but config.json vocab_size is "
                f"{cfg.vocab_size}; the dictionary and the model are of different releases"
            )
            raise CheckpointError(msg)
        self.version = dicts.version
        self.pad_token_id = int(dicts.tokens["<pad>"])
        if self.pad_token_id != cfg.pad_token_id:
            logger.warning(
                "token dictionary <pad>=%d differs from config.json pad_token_id=%d; padding with the dictionary's "
                "(as upstream; padded positions are masked either way)", self.pad_token_id, cfg.pad_token_id,
            )
        limit = cfg.max_position_embeddings
        self.max_length = limit if max_genes is None else int(max_genes)
        if self.max_length > limit:
            msg = f"--max-genes {self.max_length} exceeds the model's input size {limit} (max_position_embeddings)"
            raise InvalidInputError(msg)
        v2 = self.version == "V2"
        self.name = name or name_from_folder(self.files.folder, "geneformer")
        self.n_layers = cfg.num_hidden_layers
        self.d_model = cfg.hidden_size
        self.supported_pools = ("cls", "mean", "max") if v2 else ("mean", "max")
        self.default_pools = ("cls", "mean") if v2 else ("mean",)
        self.official_layer = max(self.n_layers - 1, 0)
        self.official_pool = "cls" if v2 else "mean"
        self._genes = dicts.genes
        self._base_tokenizer = GeneformerTokenizer(
            max_length=self.max_length,
            cls_id=int(dicts.tokens["<cls>"]) if v2 else None,
            eos_id=int(dicts.tokens["<eos>"]) if v2 else None,
        )
        self.tokenizer = self._base_tokenizer
        logger.info(
            "Geneformer %s %s: %d layers, d=%d, %d genes, input size %d",
            self.version, self.name, self.n_layers, self.d_model, len(self._genes), self.max_length,
        )

    # --- identity -------------------------------------------------------------------------
    def _describe_checkpoint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "architecture": "bert (post-LN, absolute positions)",
            "version": self.version,
            "n_layers": cfg.num_hidden_layers,
            "d_model": cfg.hidden_size,
            "n_heads": cfg.num_attention_heads,
            "ffn_dim": cfg.intermediate_size,
            "activation": cfg.hidden_act,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "n_genes_in_vocab": len(self._genes),
            "gene_id_type": "ensembl",
            "max_length": self.max_length,
            "special_tokens": ["<cls>", "<eos>"] if self.version == "V2" else [],
            "value_encoding": "rank of counts / n_counts * 10000 / gene median (descending)",
            "cell_totals": "obs['n_counts'] when present, else row sums of the raw counts",
            "checkpoint_format": self.files.fmt,
            "checkpoint_files": [p.name for p in self.files.all()],
        }

    def _describe_layers(self) -> dict[str, Any]:
        return {
            "layer_0": "embedding output (hidden_states[0]: LayerNorm(word + position + token_type))",
            "stored_layers_include_final_norm": False,
            "official_embedding": (
                f"stored layer {self.official_layer} (hidden_states[L-1]), pool {self.official_pool!r}, no transform"
            ),
            "official_layer": self.official_layer,
            "official_pool": self.official_pool,
        }

    # --- data -----------------------------------------------------------------------------
    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        """Map dataset Ensembl ids to the token dictionary and bind :attr:`tokenizer`.

        Raises
        ------
        InvalidInputError
            If the ids are gene symbols (pass ``--gene-column`` with Ensembl ids) or too few match.
        """
        ids = [str(g) for g in gene_ids]
        layout = official_gene_layout(ids, self.dicts.tokens, self.dicts.medians, self.dicts.ensembl_mapping)
        if layout.mapping.n_matched == 0:
            # upstream would match nothing (e.g. versioned ids): match the unversioned ids instead
            ids = [_VERSION_SUFFIX.sub("", g) for g in ids]
            layout = official_gene_layout(ids, self.dicts.tokens, self.dicts.medians, self.dicts.ensembl_mapping)
            if layout.mapping.n_matched:
                logger.warning("no gene id matched as given; matching %d ids without their version suffix",
                               layout.mapping.n_matched)
        if layout.mapping.n_matched < min(10, len(ids)) or layout.mapping.n_matched < 0.1 * len(ids):
            # too few: the generic mapper names the problem (symbols vs Ensembl ids, too few genes)
            map_to_vocab(gene_ids, self._genes, model=f"{self.family} ({self.name})")
            if layout.mapping.n_matched == 0:
                raise InvalidInputError(f"none of the dataset's gene ids is known to {self.name}; pass the var "
                                        "column holding Ensembl ids with --gene-column")
        self.tokenizer = self._base_tokenizer.bind_layout(layout)
        return layout.mapping

    def observe_source(self, *, dense: bool, dtype: Any) -> None:
        """Reproduce upstream's arithmetic for counts stored dense or sparse with ``dtype``."""
        self._base_tokenizer = self._base_tokenizer.for_storage(dense=dense, dtype=dtype)
        self.tokenizer = cast("GeneformerTokenizer", self.tokenizer).for_storage(dense=dense, dtype=dtype)

    def check_obs(self, obs: pd.DataFrame | None) -> str:
        """Validate the cells' total counts before anything is written (see :meth:`GeneformerTokenizer.check_obs`)."""
        where = self._base_tokenizer.check_obs(obs)
        logger.info("Geneformer normalises by the total count per cell from %s", where)
        return where

    def collate(self, records: list[TokenRecord]) -> TokenBatch:
        """Pad records with ``<pad>`` into a CPU batch (V2: ``cls`` at position 0, ``<eos>`` last)."""
        return collate_geneformer(records, pad_token_id=self.pad_token_id, n_special=self._base_tokenizer.n_special)

    # --- model ----------------------------------------------------------------------------
    def _new_model(self) -> GeneformerBert:
        return GeneformerBert(self.config)

    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        return check_state_dict(read_state_dict(self.files), expected, where=repr(str(self.files.weights)))

    def _check_request(self, layers: Sequence[int], pools: Sequence[str]) -> None:
        if self.version == "V1" and "cls" in pools:
            msg = (
                "pool 'cls' is not available for Geneformer V1: its input has no <cls> token "
                "(the official V1 cell embedding is 'mean'); use --pool mean,max"
            )
            raise InvalidInputError(msg)
        super()._check_request(layers, pools)

    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        return self._require_model()(batch.gene_ids, batch.padding_mask, n_blocks=n_blocks)

    @property
    def official(self) -> OfficialEmbedding:
        """``EmbExtractor`` default: V2 ``<cls>`` / V1 mean of ``hidden_states[L-1]``, no transform."""
        return OfficialEmbedding(layer=self.official_layer, pools=(self.official_pool,))

    @torch.no_grad()
    def official_embedding(self, batch: TokenBatch, *, layer: int | None = None) -> torch.Tensor:
        """The official cell embedding (``EmbExtractor``), float32 ``(B, d)``.

        V2: ``<cls>`` of ``hidden_states[layer]``; V1: mean over gene tokens (no special
        tokens, no padding). No L2 normalisation, as upstream.

        Parameters
        ----------
        batch
            A batch from :meth:`collate`.
        layer
            ``hidden_states`` index = stored layer; default :attr:`official_layer` (``L - 1``,
            upstream ``emb_layer=-1``); ``n_layers`` is upstream ``emb_layer=0``.

        Raises
        ------
        InvalidInputError
            If ``layer`` is out of range.
        """
        layer = self.official_layer if layer is None else int(layer)
        if not 0 <= layer <= self.n_layers:
            raise InvalidInputError(f"layer {layer} out of range: {self.name} has layers 0..{self.n_layers}")
        batch = self._on_device(batch)
        with self.autocast():
            hidden = self._encode(batch, n_blocks=layer)
        return pool_hidden(hidden, batch.pooling_info(), [self.official_pool])[self.official_pool]

    @torch.no_grad()
    def final_transform(self, pooled_last: torch.Tensor) -> torch.Tensor:
        """Identity: the official embedding *is* the stored vector.

        Apply it to the stored :attr:`official_pool` vectors of layer :attr:`official_layer`
        (``L - 1``), not of the last layer.

        Raises
        ------
        InvalidInputError
            If the vectors do not have ``d_model`` columns.
        """
        self._check_width(pooled_last)
        return pooled_last.to(dtype=torch.float32).clone()


def from_checkpoint(checkpoint: Path | None, max_genes: int | None) -> GeneformerAdapter:
    """Registry factory of the ``geneformer`` family (:data:`sclstore.ingest.models.FAMILIES`).

    Raises
    ------
    InvalidInputError
        If no checkpoint folder is given.
    """
    if checkpoint is None:
        msg = (
            "model family 'geneformer' needs --checkpoint DIR: a folder with config.json, model.safetensors "
            "(or pytorch_model.bin) and the release's *token_dictionary*.pkl and *gene_median*.pkl"
        )
        raise InvalidInputError(msg)
    return GeneformerAdapter(checkpoint, max_genes=max_genes)
