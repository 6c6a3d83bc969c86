"""Plain-PyTorch Tahoe-X1 encoder with the official parameter names.

A faithful re-implementation of ``tahoe_x1.model.TXModel`` (encoder part only: gene encoder,
value encoder, pre-LN blocks, final norm) that needs neither llm-foundry, composer nor
flash-attn. Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` with a
boolean key-padding mask, so results do not depend on batch composition (the official torch path
attends to padding tokens, see ``research/models.md`` §1.7).

Parameter names match the official state dict (after stripping the ``model.`` prefix)::

    gene_encoder.embedding.weight, gene_encoder.enc_norm.{weight,bias}, flag_encoder.weight,
    expression_encoder.{linear1,linear2,norm}.{weight,bias},
    transformer_encoder.layers.{i}.self_attn.{Wqkv,out_proj}.{weight,bias},
    transformer_encoder.layers.{i}.{up_proj,down_proj,norm1,norm2}.{weight,bias},
    transformer_encoder.norm.{weight,bias}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sclstore.store.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["TXBlock", "TahoeConfig", "TahoeModel", "resolve_activation"]

_ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu", "tanh", "sigmoid", "elu", "selu")
_NORM_TYPES = ("layernorm", "low_precision_layernorm")


def resolve_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``torch.nn.functional.<name>`` as llm-foundry's ``resolve_ffn_act_fn`` does.

    Raises
    ------
    CheckpointError
        If the name is not a supported activation.
    """
    if name not in _ACTIVATIONS:
        msg = f"activation {name!r} in model_config.yml is not supported; expected one of {', '.join(_ACTIVATIONS)}"
        raise CheckpointError(msg)
    fn: Callable[[torch.Tensor], torch.Tensor] = getattr(F, name)
    return fn


def _get(cfg: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    if not cfg:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


@dataclass(frozen=True, kw_only=True)
class TahoeConfig:
    """The fields of ``model_config.yml`` and ``collator_config.yml`` the encoder and data path use."""

    vocab_size: int
    n_layers: int
    n_heads: int
    d_model: int
    expansion_ratio: float
    norm_scheme: str
    activation: str
    use_glu: bool
    norm_eps: float
    softmax_scale: float | None
    value_max: float
    value_activation: str
    value_use_norm: bool
    value_dropout: float
    gene_use_norm: bool
    cell_emb_style: str
    precision: str
    # collator
    pad_token_id: int
    pad_value: float
    num_bins: int
    right_binning: bool
    keep_first_n_tokens: int
    collator_max_length: int | None
    use_chem_token: bool
    do_binning: bool
    log_transform: bool
    target_sum: float

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the feed-forward block (``int(d_model * expansion_ratio)``)."""
        return int(self.d_model * self.expansion_ratio)

    @classmethod
    def from_dicts(
        cls, model_cfg: Mapping[str, Any], collator_cfg: Mapping[str, Any], *, apply_softmax_scale: bool = False
    ) -> TahoeConfig:
        """Build from the parsed YAML files, with the official defaults.

        ``attn_config.softmax_scale`` is ignored, as the official ``TXBlock`` (it builds its
        attention without passing it, so attention always scales by ``1/sqrt(head_dim)``);
        ``apply_softmax_scale=True`` (model option ``softmax_scale=config``) applies it instead.

        Raises
        ------
        CheckpointError
            If a required key is missing or a feature is not supported.
        """
        for key in ("vocab_size", "n_layers", "n_heads", "d_model", "expansion_ratio"):
            if model_cfg.get(key) is None:
                raise CheckpointError(f"model_config.yml lacks required key {key!r}")
        if collator_cfg.get("pad_token_id") is None or collator_cfg.get("pad_value") is None:
            raise CheckpointError("collator_config.yml lacks 'pad_token_id' or 'pad_value'")
        attn = model_cfg.get("attn_config") or {}
        norm = model_cfg.get("norm_config") or {}
        value = model_cfg.get("expression_encoder") or {}
        gene = model_cfg.get("gene_encoder") or {}
        d_model, n_heads = int(model_cfg["d_model"]), int(model_cfg["n_heads"])
        if d_model % n_heads:
            raise CheckpointError(f"d_model {d_model} is not divisible by n_heads {n_heads} in model_config.yml")
        kv_heads = attn.get("kv_n_heads")
        if kv_heads is not None and int(kv_heads) != n_heads:
            msg = f"grouped-query attention (kv_n_heads={kv_heads} != n_heads={n_heads}) is not supported"
            raise CheckpointError(msg)
        for flag in ("qk_ln", "qk_gn"):
            if attn.get(flag):
                raise CheckpointError(f"attn_config.{flag}=True is not supported by this Tahoe-X1 re-implementation")
        if attn.get("clip_qkv") is not None:
            raise CheckpointError("attn_config.clip_qkv is not supported by this Tahoe-X1 re-implementation")
        if gene.get("embeddings"):
            raise CheckpointError("gene_encoder.embeddings (extra pretrained gene embeddings) are not supported")
        norm_type = str(_get(norm, "norm_type", "low_precision_layernorm")).lower()
        if norm_type not in _NORM_TYPES:
            raise CheckpointError(f"norm_type {norm_type!r} is not supported; expected one of {', '.join(_NORM_TYPES)}")
        if _get(value, "input_emb_style", "continuous") != "continuous":
            raise CheckpointError("only expression_encoder.input_emb_style 'continuous' is supported (as upstream)")
        cell_emb_style = str(_get(model_cfg, "cell_emb_style", "cls"))
        if cell_emb_style != "cls":
            msg = f"cell_emb_style {cell_emb_style!r} is not supported; only 'cls' (all released models)"
            raise CheckpointError(msg)
        norm_scheme = str(_get(model_cfg, "norm_scheme", "pre"))
        if norm_scheme not in ("pre", "post"):
            raise CheckpointError(f"norm_scheme must be 'pre' or 'post', got {norm_scheme!r}")
        do_binning = bool(_get(collator_cfg, "do_binning", True))
        log_transform = bool(_get(collator_cfg, "log_transform", False))
        if do_binning and log_transform:
            raise CheckpointError("collator_config.yml sets both do_binning and log_transform; only one is allowed")
        max_len = collator_cfg.get("max_length")
        scale = attn.get("softmax_scale")
        if scale is not None and not apply_softmax_scale:
            logger.info("attn_config.softmax_scale=%s is ignored, as the official TXBlock does "
                        "(--model-option softmax_scale=config applies it)", scale)
            scale = None
        cfg = cls(
            vocab_size=int(model_cfg["vocab_size"]),
            n_layers=int(model_cfg["n_layers"]),
            n_heads=n_heads,
            d_model=d_model,
            expansion_ratio=float(model_cfg["expansion_ratio"]),
            norm_scheme=norm_scheme,
            activation=str(_get(model_cfg, "transformer_activation", "gelu")),
            use_glu=bool(_get(model_cfg, "use_glu", False)),
            norm_eps=float(_get(norm, "eps", 1e-5)),
            softmax_scale=None if scale is None else float(scale),
            value_max=float(_get(value, "max_value", 512)),
            value_activation=str(_get(value, "activation", "relu")),
            value_use_norm=bool(_get(value, "use_norm", False)),
            value_dropout=float(_get(value, "dropout", 0.1)),
            gene_use_norm=bool(_get(gene, "use_norm", False)),
            cell_emb_style=cell_emb_style,
            precision=str(_get(model_cfg, "precision", "amp_bf16")),
            pad_token_id=int(collator_cfg["pad_token_id"]),
            pad_value=float(collator_cfg["pad_value"]),
            num_bins=int(_get(collator_cfg, "num_bins", 51)),
            right_binning=bool(_get(collator_cfg, "right_binning", False)),
            keep_first_n_tokens=int(_get(collator_cfg, "keep_first_n_tokens", 1)),
            collator_max_length=None if max_len is None else int(max_len),
            use_chem_token=bool(_get(collator_cfg, "use_chem_token", False)),
            do_binning=do_binning,
            log_transform=log_transform,
            target_sum=float(_get(collator_cfg, "target_sum", 10000)),
        )
        resolve_activation(cfg.activation)
        resolve_activation(cfg.value_activation)
        return cfg


class GeneEncoder(nn.Module):
    """Token embedding followed by an optional LayerNorm (``enc_norm``, default eps)."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.gene_use_norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        return self.enc_norm(x) if self.enc_norm is not None else x


class ContinuousValueEncoder(nn.Module):
    """``clamp(max) -> linear1(1->d) -> act -> linear2 -> [norm] -> dropout`` on each value."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, cfg.d_model)
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.value_use_norm else None
        self.dropout = nn.Dropout(cfg.value_dropout)
        self.activation = resolve_activation(cfg.value_activation)
        self.max_value = cfg.value_max

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``Wqkv`` split into equal thirds."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_model = cfg.d_model
        self.softmax_scale = cfg.softmax_scale
        self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = self.Wqkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class TXBlock(nn.Module):
    """One Tahoe-X1 block: ``x + attn(norm1(x))``, then ``x + down(act(up(norm2(x))))`` (pre-LN)."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim) if cfg.use_glu else None
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.activation = resolve_activation(cfg.activation)
        self.pre_norm = cfg.norm_scheme == "pre"

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.activation(self.up_proj(x)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.norm1(x), attn_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.self_attn(x, attn_mask))
        return self.norm2(x + self._ff(x))


class TXEncoder(nn.Module):
    """The block stack plus the final norm (pre-LN models only, as upstream)."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TXBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.norm_scheme == "pre" else None


class TahoeModel(nn.Module):
    """The Tahoe-X1 encoder (``TXModel`` without decoders and chemistry encoder)."""

    def __init__(self, cfg: TahoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gene_encoder = GeneEncoder(cfg)
        self.flag_encoder = nn.Embedding(2, cfg.d_model)
        self.expression_encoder = ContinuousValueEncoder(cfg)
        self.transformer_encoder = TXEncoder(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.transformer_encoder.layers

    def embed_tokens(
        self, gene_ids: torch.Tensor, values: torch.Tensor, gen_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the input of block 0: gene embedding + value embedding (+ generative flag).

        ``gen_mask`` (True at positions whose value is hidden, training only) zeroes those value
        embeddings and adds ``flag_encoder(1)`` there, as upstream ``transformer_generate``.
        """
        token = self.gene_encoder(gene_ids)
        value = self.expression_encoder(values)
        if gen_mask is None:
            return token + value
        value = value.masked_fill(gen_mask.unsqueeze(-1), 0.0)
        flag = self.flag_encoder.weight[1].reshape(1, 1, -1)
        return token + value + gen_mask.unsqueeze(-1).to(token.dtype) * flag

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None,
        *,
        gen_mask: torch.Tensor | None = None,
        n_blocks: int | None = None,
    ) -> torch.Tensor:
        """Run the first ``n_blocks`` blocks (all when None); return the residual stream.

        Parameters
        ----------
        gene_ids, values
            ``(B, S)`` token ids and input values.
        attn_mask
            Boolean mask broadcastable to ``(B, H, S, S)``, True = may attend; for inference
            ``padding_mask[:, None, None, :]``.
        gen_mask
            Training only: positions whose values are masked.
        n_blocks
            Stop after this many blocks.

        Returns
        -------
        torch.Tensor
            ``(B, S, d)`` hidden states *before* the final norm.
        """
        x = self.embed_tokens(gene_ids, values, gen_mask)
        for block in self.blocks[: self.cfg.n_layers if n_blocks is None else n_blocks]:
            x = block(x, attn_mask)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``transformer_encoder.norm`` (identity for post-LN models)."""
        norm = self.transformer_encoder.norm
        return norm(x) if norm is not None else x
