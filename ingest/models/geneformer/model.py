"""Plain-PyTorch BERT encoder of Geneformer with the Hugging Face parameter names.

A faithful re-implementation of ``transformers.BertModel`` as Geneformer uses it (absolute
position embeddings, token type 0, post-LN blocks, no pooler), without depending on
transformers at run time. Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention` with a boolean key-padding mask, so a
cell's result does not depend on its batch.

Parameter names match ``BertModel.state_dict()`` (a ``BertForMaskedLM`` save without its
``bert.`` prefix)::

    embeddings.{word_embeddings,position_embeddings,token_type_embeddings}.weight,
    embeddings.LayerNorm.{weight,bias},
    encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias},
    encoder.layer.{i}.attention.output.{dense,LayerNorm}.{weight,bias},
    encoder.layer.{i}.intermediate.dense.{weight,bias},
    encoder.layer.{i}.output.{dense,LayerNorm}.{weight,bias}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sclstore.store.errors import CheckpointError

__all__ = ["BertEncoderConfig", "BertLayer", "GeneformerBert", "resolve_activation"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # transformers' "gelu" is the exact (erf) GELU
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def resolve_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation of a transformers ``hidden_act`` name.

    Raises
    ------
    CheckpointError
        If the name is not supported.
    """
    fn = _ACTIVATIONS.get(name)
    if fn is None:
        msg = f"hidden_act {name!r} in config.json is not supported; expected one of {', '.join(_ACTIVATIONS)}"
        raise CheckpointError(msg)
    return fn


@dataclass(frozen=True, kw_only=True)
class BertEncoderConfig:
    """The fields of an HF ``config.json`` that the BERT encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BertEncoderConfig:
        """Build from a parsed ``config.json`` with transformers' ``BertConfig`` defaults.

        Raises
        ------
        CheckpointError
            If a required key is missing or the architecture is one this encoder does not
            implement (relative positions, decoder, cross-attention, unknown activation).
        """
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if cfg.get(key) is None:
                raise CheckpointError(f"config.json lacks required key {key!r}")
        pos = cfg.get("position_embedding_type", "absolute") or "absolute"
        if pos != "absolute":
            msg = f"config.json position_embedding_type {pos!r} is not supported; Geneformer uses 'absolute'"
            raise CheckpointError(msg)
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            msg = "config.json describes a BERT decoder / cross-attention model; Geneformer is an encoder"
            raise CheckpointError(msg)
        out = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            hidden_act=str(cfg.get("hidden_act", "gelu")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
        )
        if out.hidden_size % out.num_attention_heads:
            msg = (
                f"hidden_size {out.hidden_size} is not divisible by num_attention_heads "
                f"{out.num_attention_heads} in config.json"
            )
            raise CheckpointError(msg)
        resolve_activation(out.hidden_act)
        return out


class BertEmbeddings(nn.Module):
    """``LayerNorm(word + position + token_type[0])`` (dropout is inactive at inference)."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:s].unsqueeze(0)
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Separate ``query``/``key``/``value`` projections, scaled dot-product attention."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = (p(x).reshape(b, s, h, d // h).transpose(1, 2) for p in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return out.transpose(1, 2).reshape(b, s, d)


class BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (``BertSelfOutput`` and ``BertOutput``)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """``attention.self`` then ``attention.output`` (post-LN residual)."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertDenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    """``act(dense(x))``."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = resolve_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN BERT block: attention + residual + LN, feed-forward + residual + LN."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attention(x, attn_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    """The block stack ``encoder.layer``."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class GeneformerBert(nn.Module):
    """The Geneformer encoder: ``BertModel`` without pooler."""

    def __init__(self, cfg: BertEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.encoder.layer

    def forward(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor, *, n_blocks: int | None = None
    ) -> torch.Tensor:
        """Run the first ``n_blocks`` blocks (all when None) and return the hidden states.

        Parameters
        ----------
        input_ids
            ``(B, S)`` token ids, ``S <= max_position_embeddings``.
        padding_mask
            ``(B, S)`` bool, True at real tokens. A row without any real token (an empty V1
            cell) attends to every position so that no NaN appears; its gene pools are zero.
        n_blocks
            Stop after this many blocks (``0``: the embedding output).

        Returns
        -------
        torch.Tensor
            ``(B, S, d)``: ``hidden_states[n_blocks]`` of ``BertModel``.
        """
        keep = padding_mask | ~padding_mask.any(dim=1, keepdim=True)
        attn_mask = keep[:, None, None, :]
        x = self.embeddings(input_ids)
        for block in self.blocks[: self.cfg.num_hidden_layers if n_blocks is None else n_blocks]:
            x = block(x, attn_mask)
        return x
