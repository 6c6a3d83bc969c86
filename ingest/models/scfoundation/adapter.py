"""scFoundation adapter: the official xTrimoGene encoder of ``biomap-research/scFoundation``.

Facts and pitfalls: ``research/models.md`` §3. In short:

* checkpoint: ``models.ckpt`` with sub-models ``cell`` (default), ``rde`` and ``gene``; the
  19,264-gene list ships with sclstore (``scfoundation/genes.txt``, the official
  ``OS_scRNA_gene_index.19264.tsv`` in order) unless the folder holds its own
  ``OS_scRNA_gene_index*.tsv``;
* input: raw counts aligned to the gene list, ``log1p(CP10k)``, then the T and S resolution
  tokens (option ``tgthighres``, default ``t4`` as the official script), values ``> 0`` only,
  position id = gene index (:mod:`.data`);
* model: soft-binned value embedding + gene position embedding, 12 post-LN blocks and a final
  LayerNorm (:mod:`.model`); fp32 (the official precision; see --precision);
* pools, for every layer: ``S`` and ``T`` (the two resolution tokens), ``max`` and ``mean`` over
  the gene tokens; stored layer ``L`` includes the final LayerNorm, so the official cell
  embedding is ``concat[S, T, max, mean]`` of layer ``L`` (``4 d``, no normalisation):
  :func:`official_from_pools`.

Options that change the numbers (``sub_model``, ``tgthighres``) are part of
:attr:`ScFoundationAdapter.checkpoint_hash`. From the command line: ``--model-option sub_model=rde
--model-option tgthighres=a5`` (``IngestConfig.model_options``), or after ``#`` in the checkpoint
path: ``--checkpoint 'model/models#sub_model=rde,tgthighres=a5'``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sclstore.store.errors import CheckpointError, InvalidInputError

from ...adapter import GeneMapping, ModelAdapter, OfficialEmbedding, TokenBatch, TokenRecord, hash_files, map_to_vocab
from ...capture import pool_hidden
from .._common import name_from_folder
from .checkpoint import (
    CheckpointFiles,
    check_state_dict,
    flatten_config,
    locate_checkpoint,
    open_checkpoint,
    read_state_dict,
    select_sub_model,
    sub_model_names,
)
from .data import (
    GENE_LIST_FILE,
    Resolution,
    ScFoundationTokenizer,
    collate_records,
    empty_rows,
    packaged_gene_list,
    read_gene_list,
)
from .model import ScFoundationConfig, ScFoundationModel

__all__ = [
    "OFFICIAL_POOLS",
    "ScFoundationAdapter",
    "official_from_pools",
    "scfoundation_factory",
    "split_checkpoint_options",
]

logger = logging.getLogger(__name__)

OFFICIAL_POOLS: tuple[str, ...] = ("S", "T", "max", "mean")
"""The pools of the official cell embedding, in its concatenation order."""

DEFAULT_SUB_MODEL = "cell"
DEFAULT_TGTHIGHRES = "t4"
_OPTIONS = ("sub_model", "tgthighres")
_OPTIONS_RE = re.compile(r"^\w+=[^,=#]+(,\w+=[^,=#]+)*$")


def official_from_pools(pools: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The official scFoundation cell embedding from the last layer's four pools.

    Parameters
    ----------
    pools
        ``{"S", "T", "max", "mean"}`` -> ``(B, d)`` vectors of stored layer ``L`` (more keys are
        ignored).

    Returns
    -------
    torch.Tensor
        ``(B, 4 d)`` float32 ``concat[S, T, max, mean]``, as ``get_embedding.py --pool_type all``.

    Raises
    ------
    InvalidInputError
        If a pool is missing or the shapes disagree.

    Examples
    --------
    >>> v = {p: torch.full((2, 3), float(i)) for i, p in enumerate(OFFICIAL_POOLS)}
    >>> official_from_pools(v)[0].tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    """
    missing = [p for p in OFFICIAL_POOLS if p not in pools]
    if missing:
        msg = (
            f"the official scFoundation embedding needs pools {', '.join(OFFICIAL_POOLS)}; missing {missing}: "
            "ingest with --pools S,T,max,mean"
        )
        raise InvalidInputError(msg)
    parts = [torch.as_tensor(pools[p]).float() for p in OFFICIAL_POOLS]
    if len({tuple(t.shape) for t in parts}) != 1 or parts[0].dim() != 2:
        raise InvalidInputError(f"pools must all be (B, d); got {[tuple(t.shape) for t in parts]}")
    return torch.cat(parts, dim=1)


def split_checkpoint_options(checkpoint: str | Path) -> tuple[Path, dict[str, str]]:
    """Split ``"PATH#sub_model=rde,tgthighres=a5"`` into the path and its options.

    A path that exists as given is never split.

    Raises
    ------
    InvalidInputError
        If an option is unknown.
    """
    text = str(checkpoint)
    if "#" not in text or Path(text).expanduser().exists():
        return Path(text), {}
    path, _, spec = text.rpartition("#")
    if not _OPTIONS_RE.match(spec):
        return Path(text), {}
    options = dict(item.split("=", 1) for item in spec.split(","))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        msg = (
            f"unknown scFoundation checkpoint option(s) {unknown} after '#'; "
            f"use {', '.join(_OPTIONS)}, e.g. DIR#sub_model=rde"
        )
        raise InvalidInputError(msg)
    return Path(path), {k: v.strip() for k, v in options.items()}


class ScFoundationAdapter(ModelAdapter[ScFoundationModel]):
    """One scFoundation sub-model as a :class:`ModelAdapter`.

    Constructing reads the configs (memory-mapped, no tensor data) and the gene list;
    :meth:`load` builds the encoder and loads its weights strictly.

    Parameters
    ----------
    checkpoint
        Folder holding ``models.ckpt`` (or the file itself, or scFoundation's ``model/`` folder
        with ``models/models.ckpt``).
    sub_model
        ``cell`` (cell embeddings, default), ``rde`` (read-depth enhancement) or ``gene``.
    tgthighres
        The T token: ``t<X>`` (default ``t4``), ``f<X>`` or ``a<X>`` (see :class:`Resolution`).
    name
        Model name; default ``<folder>-<sub_model>-<tgthighres>``.

    Raises
    ------
    CheckpointError
        If files are missing, belong to another model family, or the config/gene list is invalid.
    InvalidInputError
        If ``sub_model`` or ``tgthighres`` is not valid.
    """

    family = "scfoundation"
    official_precision = "fp32"  # get_embedding.py: no autocast
    supported_pools = OFFICIAL_POOLS
    default_pools = OFFICIAL_POOLS

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        sub_model: str = DEFAULT_SUB_MODEL,
        tgthighres: str = DEFAULT_TGTHIGHRES,
        name: str | None = None,
    ) -> None:
        self.resolution = Resolution.parse(tgthighres)
        self.files: CheckpointFiles = locate_checkpoint(checkpoint)
        self.sub_model = str(sub_model)
        self._where = f"{self.files.weights.name}[{self.sub_model!r}] in {str(self.files.weights.parent)!r}"
        ckpt = open_checkpoint(self.files.weights)
        sub = select_sub_model(ckpt, self.sub_model, path=self.files.weights)
        self.available_sub_models = sub_model_names(ckpt)
        self.config = ScFoundationConfig.from_flat(flatten_config(sub, where=self._where), where=self._where)
        del ckpt, sub
        cfg = self.config
        self.genes = read_gene_list(self.files.gene_list) if self.files.gene_list else packaged_gene_list()
        if len(self.genes) != cfg.n_genes:
            source = self.files.gene_list.name if self.files.gene_list else f"the packaged {GENE_LIST_FILE.name}"
            msg = (
                f"{self._where}: seq_len {cfg.seq_len} means {cfg.n_genes} genes but {source} has {len(self.genes)}; "
                "put this checkpoint's gene list next to it as OS_scRNA_gene_index.<n>.tsv"
            )
            raise CheckpointError(msg)
        self.vocab = {g: i for i, g in enumerate(self.genes)}
        folder = name_from_folder(self.files.weights.parent, "scfoundation")
        self.name = name or f"{folder}-{self.sub_model}-{self.resolution}"
        self.n_layers = cfg.n_layers
        self.d_model = cfg.d_model
        self._base_tokenizer = ScFoundationTokenizer(n_genes=cfg.n_genes, resolution=self.resolution)
        self.tokenizer = self._base_tokenizer

    # --- identity -------------------------------------------------------------------------
    def effective_options(self) -> dict[str, str]:
        """``sub_model`` and ``tgthighres`` as applied (defaults filled in)."""
        return {"sub_model": self.sub_model, "tgthighres": str(self.resolution)}

    @functools.cached_property
    def checkpoint_hash(self) -> str:
        """sha256 over ``models.ckpt``, the gene list, the sub-model and ``tgthighres``."""
        genes = self.files.gene_list or GENE_LIST_FILE
        h = hashlib.sha256(hash_files([self.files.weights, genes]).encode())
        h.update(f"\0sub_model={self.sub_model}\0tgthighres={self.resolution}".encode())
        return h.hexdigest()

    def _describe_checkpoint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "architecture": "scfoundation (MaeAutobin encoder: pytorchTransformerModule, post-LN)",
            "sub_model": self.sub_model,
            "available_sub_models": self.available_sub_models,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "ffn_dim": cfg.ffn_dim,
            "seq_len": cfg.seq_len,
            "n_genes": cfg.n_genes,
            "gene_list": self.files.gene_list.name if self.files.gene_list else f"packaged {GENE_LIST_FILE.name}",
            "gene_id_type": "symbol",
            "value_encoding": "log1p(CP10k of raw counts), soft-binned (AutoDiscretization)",
            "bin_num": cfg.bin_num,
            "bin_alpha": cfg.bin_alpha,
            "pad_value": cfg.pad_token_id,
            "mask_value": cfg.mask_token_id,
            "tgthighres": str(self.resolution),
            "resolution_tokens": "T per tgthighres, S = log10(total raw count); values <= 0 dropped as upstream",
            "max_length": None,
            "checkpoint_files": [p.name for p in (self.files.weights, self.files.gene_list) if p is not None],
        }

    def _describe_layers(self) -> dict[str, Any]:
        return {
            "layer_0": "input of block 0 (token_emb(value) + pos_emb(gene position))",
            "stored_layers_include_final_norm": "layer L only (the official encoder output)",
            "official_embedding": "concat[S, T, max, mean] of layer L (4*d_model), no normalisation",
        }

    # --- data -----------------------------------------------------------------------------
    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        """Map dataset gene symbols to the gene list and bind :attr:`tokenizer` to the mapping.

        Dataset columns that repeat a symbol are summed by the tokenizer.

        Raises
        ------
        InvalidInputError
            If the ids look like Ensembl ids (scFoundation uses HGNC symbols) or too few match.
        """
        mapping = map_to_vocab(gene_ids, self.vocab, model=f"{self.family} ({self.name})")
        n_dup = mapping.n_matched - np.unique(mapping.token_ids).shape[0]
        if n_dup:
            logger.warning("%d dataset columns repeat a gene symbol of %s; their counts are summed", n_dup, self.name)
        self.tokenizer = self._base_tokenizer.bind(mapping)
        return mapping

    def collate(self, records: list[TokenRecord]) -> TokenBatch:
        """Pad records (value ``pad_token_id``, position ``seq_len``); ``T``/``S`` per row."""
        return collate_records(records, pad_value=float(self.config.pad_token_id), pad_position=self.config.seq_len)

    # --- model ----------------------------------------------------------------------------
    def _new_model(self) -> ScFoundationModel:
        return ScFoundationModel(self.config)

    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The sub-model's encoder weights, checked strictly."""
        ckpt = open_checkpoint(self.files.weights)
        sub = select_sub_model(ckpt, self.sub_model, path=self.files.weights)
        return check_state_dict(read_state_dict(sub, where=self._where), expected, where=self._where)

    def blocks(self) -> Sequence[nn.Module]:
        """The ``L`` stages (blocks; the last one followed by the final LayerNorm), ``model.stages``."""
        return list(self._require_model().stages)

    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        model = self._require_model()
        return model(batch.gene_ids, batch.values, batch.padding_mask, n_blocks=n_blocks)

    @torch.no_grad()
    def embed(self, batch: TokenBatch, *, layers: Sequence[int], pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """As :meth:`ModelAdapter.embed`; cells without any token get zero vectors."""
        out = super().embed(batch, layers=layers, pools=pools)
        empty = empty_rows(batch, self.config.seq_len).to(self.device)
        if bool(empty.any()):
            for tensor in out.values():
                tensor[:, empty] = 0.0
        return out

    @property
    def official(self) -> OfficialEmbedding:
        """``concat[S, T, max, mean]`` of the final-LN encoder output = stored layer L (``get_embedding.py``)."""
        return OfficialEmbedding(layer=self.n_layers, pools=tuple(OFFICIAL_POOLS))

    @torch.no_grad()
    def official_embedding(self, batch: TokenBatch) -> torch.Tensor:
        """The official cell embedding ``concat[S, T, max, mean]`` of the encoder output, ``(B, 4 d)``."""
        self._require_model()
        batch = self._on_device(batch)
        with self.autocast():
            hidden = self._encode(batch)
        pooled = pool_hidden(hidden, batch.pooling_info(), OFFICIAL_POOLS)
        out = official_from_pools(pooled)
        out[empty_rows(batch, self.config.seq_len)] = 0.0
        return out

    @torch.no_grad()
    def final_transform(self, pooled_last: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map stored last-layer pools to the official embedding (their concatenation).

        Parameters
        ----------
        pooled_last
            ``{"S", "T", "max", "mean"} -> (B, d)`` from stored layer ``L``, or the same four
            stacked as a ``(4, B, d)`` tensor in :data:`OFFICIAL_POOLS` order.

        Raises
        ------
        InvalidInputError
            If a pool is missing or the shape is not one of the above.
        """
        if isinstance(pooled_last, Mapping):
            pools = pooled_last
        else:
            t = torch.as_tensor(pooled_last)
            if t.dim() != 3 or t.shape[0] != len(OFFICIAL_POOLS) or t.shape[-1] != self.d_model:
                msg = (
                    f"scFoundation's official embedding needs the four last-layer pools: pass "
                    f"{{'S', 'T', 'max', 'mean'}} -> (B, {self.d_model}) or a (4, B, {self.d_model}) stack; "
                    f"got a tensor of shape {tuple(t.shape)}"
                )
                raise InvalidInputError(msg)
            pools = dict(zip(OFFICIAL_POOLS, t.unbind(0), strict=False))
        bad = [p for p in OFFICIAL_POOLS if p in pools and torch.as_tensor(pools[p]).shape[-1] != self.d_model]
        if bad:
            raise InvalidInputError(f"pools {bad} are not {self.d_model}-dimensional vectors of {self.name}")
        return official_from_pools(pools)


def scfoundation_factory(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str] | None = None) -> ModelAdapter:
    """Registry factory: ``--checkpoint DIR[#sub_model=...,tgthighres=...]`` and/or ``options``
    (``--model-option sub_model=rde``); no ``--max-genes``.

    Raises
    ------
    InvalidInputError
        If no checkpoint is given, an option is unknown or given twice with different values,
        or ``max_genes`` is set.
    """
    if checkpoint is None:
        msg = (
            "model family 'scfoundation' needs --checkpoint DIR: the folder holding models.ckpt (scFoundation's "
            "model/models/); options: --model-option sub_model=rde (or DIR#sub_model=rde)"
        )
        raise InvalidInputError(msg)
    if max_genes is not None:
        msg = "scFoundation embeds every expressed gene, as the official code (no length cap): drop --max-genes"
        raise InvalidInputError(msg)
    path, in_path = split_checkpoint_options(checkpoint)
    extra = dict(options or {})
    unknown = sorted(set(extra) - set(_OPTIONS))
    if unknown:
        raise InvalidInputError(f"unknown scFoundation model option(s) {unknown}; use {', '.join(_OPTIONS)}, e.g. --model-option sub_model=rde")
    clash = sorted(k for k in extra if k in in_path and in_path[k] != extra[k])
    if clash:
        msg = f"scFoundation option(s) {clash} differ between the checkpoint path (after '#') and --model-option: give each once"
        raise InvalidInputError(msg)
    return ScFoundationAdapter(path, **{**in_path, **extra})
