"""Plain-PyTorch scGPT encoder with the official parameter names.

A faithful re-implementation of the embedding path of ``scgpt.model.TransformerModel._encode``
as built by the official zero-shot loader ``scgpt.tasks.embed_data`` (continuous value
encoding, post-LN blocks, no batch labels, no final norm)::

    total = enc_norm(embedding(gene_ids)) + norm(linear2(relu(linear1(clamp(values, max=512)))))
    x = norm1(x + self_attn(x));  x = norm2(x + linear2(relu(linear1(x))))     # each block

Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean
key-padding mask, so hooks always see dense ``(B, S, d)`` tensors (the official
``nn.TransformerEncoder`` converts padded batches to NestedTensors on its fast path,
``research/models.md`` §2.6) and results do not depend on batch composition.

Parameter names match the official state dict after the flash-attention rename::

    encoder.embedding.weight, encoder.enc_norm.{weight,bias},
    value_encoder.{linear1,linear2,norm}.{weight,bias},
    transformer_encoder.layers.{i}.self_attn.{in_proj_weight,in_proj_bias},
    transformer_encoder.layers.{i}.self_attn.out_proj.{weight,bias},
    transformer_encoder.layers.{i}.{linear1,linear2,norm1,norm2}.{weight,bias}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sclstore.store.errors import CheckpointError

__all__ = ["REQUIRED_ARGS", "ScGPTBlock", "ScGPTConfig", "ScGPTModel"]

REQUIRED_ARGS: tuple[str, ...] = ("embsize", "nheads", "d_hid", "nlayers", "pad_token", "pad_value")
"""``args.json`` keys the official ``embed_data`` reads (``n_layers_cls``/``dropout`` only matter for training)."""

LAYER_NORM_EPS = 1e-5
"""``nn.TransformerEncoderLayer`` and ``nn.LayerNorm`` default, used by every scGPT norm."""

VALUE_MAX = 512.0
"""``ContinuousValueEncoder.max_value``: input values are clamped to at most this."""


@dataclass(frozen=True, kw_only=True)
class ScGPTConfig:
    """The fields of ``args.json`` (and the vocabulary size) the encoder and data path use."""

    vocab_size: int
    d_model: int
    n_heads: int
    d_hid: int
    n_layers: int
    pad_token: str
    pad_value: float
    n_bins: int
    max_seq_len: int | None
    dropout: float

    @classmethod
    def from_args(cls, args: Mapping[str, Any], *, vocab_size: int) -> ScGPTConfig:
        """Build from a parsed ``args.json``.

        Raises
        ------
        CheckpointError
            If a required key is missing or a setting is not what the official embedding path
            builds (continuous value encoding, post-LN, ``cls`` cell embedding).
        """
        for key in REQUIRED_ARGS:
            if args.get(key) is None:
                raise CheckpointError(f"args.json lacks required key {key!r} (the official embed_data reads it)")
        try:
            d_model, n_heads = int(args["embsize"]), int(args["nheads"])
            d_hid, n_layers = int(args["d_hid"]), int(args["nlayers"])
            pad_value = float(args["pad_value"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"args.json has a non-numeric size or pad_value: {exc}") from exc
        if min(d_model, n_heads, d_hid, n_layers) < 1 or d_model % n_heads:
            msg = f"args.json: embsize {d_model} must be a multiple of nheads {n_heads}, and all sizes >= 1"
            raise CheckpointError(msg)
        style = args.get("input_emb_style", "continuous")
        if style != "continuous":
            msg = f"args.json input_emb_style {style!r} is not supported; the official embed_data uses 'continuous'"
            raise CheckpointError(msg)
        if args.get("pre_norm"):
            msg = "args.json sets pre_norm=true; only post-LN scGPT models (all released ones) are supported"
            raise CheckpointError(msg)
        cell_emb_style = args.get("cell_emb_style", "cls")
        if cell_emb_style != "cls":
            raise CheckpointError(f"args.json cell_emb_style {cell_emb_style!r} is not supported; only 'cls'")
        max_seq_len = args.get("max_seq_len")
        return cls(
            vocab_size=int(vocab_size),
            d_model=d_model,
            n_heads=n_heads,
            d_hid=d_hid,
            n_layers=n_layers,
            pad_token=str(args["pad_token"]),
            pad_value=pad_value,
            n_bins=int(args.get("n_bins", 51)),
            max_seq_len=None if max_seq_len is None else int(max_seq_len),
            dropout=float(args.get("dropout", 0.2)),
        )


class GeneEncoder(nn.Module):
    """``nn.Embedding`` followed by ``enc_norm`` (LayerNorm)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.enc_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """``clamp(max=512) -> linear1(1->d) -> ReLU -> linear2 -> norm`` (dropout is off at inference)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, cfg.d_model)
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=VALUE_MAX)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (packed ``in_proj``)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0 / math.sqrt(d // h))
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class ScGPTBlock(nn.Module):
    """One post-LN ``nn.TransformerEncoderLayer`` (ReLU, eps 1e-5): ``norm1(x + attn(x))``, ``norm2(x + ff(x))``."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_hid)
        self.linear2 = nn.Linear(cfg.d_hid, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, attn_mask))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class _Encoder(nn.Module):
    """Holds the blocks as ``layers`` (the official ``nn.TransformerEncoder`` has no final norm here)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ScGPTBlock(cfg) for _ in range(cfg.n_layers)])


class ScGPTModel(nn.Module):
    """The scGPT encoder (``TransformerModel`` without decoders, batch encoders and heads)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = GeneEncoder(cfg)
        self.value_encoder = ContinuousValueEncoder(cfg)
        self.transformer_encoder = _Encoder(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.transformer_encoder.layers

    def embed_tokens(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Return the input of block 0: gene embedding + value embedding (``total_embs``)."""
        return self.encoder(gene_ids) + self.value_encoder(values)

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None,
        *,
        n_blocks: int | None = None,
    ) -> torch.Tensor:
        """Run the first ``n_blocks`` blocks (all when None) and return the hidden states.

        Parameters
        ----------
        gene_ids, values
            ``(B, S)`` token ids and input values.
        attn_mask
            Boolean mask broadcastable to ``(B, H, S, S)``, True = may attend; for inference
            ``padding_mask[:, None, None, :]``.
        n_blocks
            Stop after this many blocks.

        Returns
        -------
        torch.Tensor
            ``(B, S, d)`` output of the last block run (the official output after all blocks).
        """
        x = self.embed_tokens(gene_ids, values)
        for block in self.blocks[: self.cfg.n_layers if n_blocks is None else n_blocks]:
            x = block(x, attn_mask)
        return x
