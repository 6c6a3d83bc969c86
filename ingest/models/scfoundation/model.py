"""Plain-PyTorch scFoundation encoder with the official parameter names.

A re-implementation of the encoder part of the official ``MaeAutobin`` (``token_emb``,
``pos_emb``, ``encoder``; ``model/pretrainmodels`` of ``biomap-research/scFoundation``):

* ``token_emb`` (``AutoDiscretizationEmbedding2``): each value ``v`` goes through
  ``mlp`` (1 -> bin_num), LeakyReLU(0.1), ``h = bin_alpha * h + mlp2(h)``, softmax over the bins,
  then the weights mix the rows of ``emb.weight`` (bin_num x d); tokens whose *value* equals
  ``mask_token_id`` (102) or ``pad_token_id`` (103) get ``emb_mask`` / ``emb_pad`` instead;
* ``pos_emb``: ``nn.Embedding(seq_len + 1, d)`` over the gene position ids, added;
* ``encoder`` (``pytorchTransformerModule``): a ``ModuleList`` ``transformer_encoder`` of
  ``nn.TransformerEncoderLayer(d, heads, 4 d, batch_first=True)`` -- post-LN, ReLU, eps 1e-5,
  dropout off at inference -- called one by one, then the final LayerNorm ``encoder.norm``.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean
key-padding mask, so a cell's result does not depend on the rest of its batch.

Hooks: :attr:`ScFoundationModel.stages` holds the ``L`` blocks in forward order, the last one
wrapped together with ``encoder.norm``. Stored layer ``L`` is therefore the official encoder
output (final LayerNorm included), which is what the official cell embedding pools; layers
``1..L-1`` are the (post-LN) block outputs and layer 0 is ``token_emb + pos_emb``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sclstore.store.errors import CheckpointError

__all__ = ["AutoDiscretizationEmbedding", "EncoderLayer", "FinalStage", "ScFoundationConfig", "ScFoundationModel"]


@dataclass(frozen=True, kw_only=True)
class ScFoundationConfig:
    """The fields of the flattened checkpoint config that the encoder and data path use."""

    model_type: str
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    bin_num: int
    bin_alpha: float
    pad_token_id: int
    mask_token_id: int
    n_class: int | None = None
    norm_eps: float = 1e-5

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the feed-forward block (``4 * d_model``, as ``pytorchTransformerModule``)."""
        return 4 * self.d_model

    @property
    def n_genes(self) -> int:
        """Genes in the position vocabulary (``seq_len - 2``: the two resolution tokens follow)."""
        return self.seq_len - 2

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, where: str) -> ScFoundationConfig:
        """Build from a config flattened as the official ``convertconfig``.

        Raises
        ------
        CheckpointError
            If a required key is missing, the model is not ``mae_autobin`` or the encoder is not
            the ``transformer`` module.
        """
        model_type = str(flat.get("model_type", flat.get("model", "")))
        model = str(flat.get("model", model_type))
        if model_type != "mae_autobin" or model != "mae_autobin":
            bad = model if model != "mae_autobin" else model_type
            msg = f"{where}: model {bad!r} is not supported; only 'mae_autobin' (the released scFoundation)"
            raise CheckpointError(msg)
        for key in ("seq_len", "encoder", "bin_num", "bin_alpha", "pad_token_id", "mask_token_id"):
            if flat.get(key) is None:
                raise CheckpointError(f"{where}: config lacks required key {key!r}")
        enc = flat["encoder"]
        if not isinstance(enc, Mapping):
            raise CheckpointError(f"{where}: config 'encoder' must be a mapping, got {type(enc).__name__}")
        for key in ("hidden_dim", "depth", "heads", "module_type"):
            if enc.get(key) is None:
                raise CheckpointError(f"{where}: config lacks required key 'encoder.{key}'")
        if enc["module_type"] != "transformer":
            msg = f"{where}: encoder module_type {enc['module_type']!r} is not supported; only 'transformer'"
            raise CheckpointError(msg)
        d, heads = int(enc["hidden_dim"]), int(enc["heads"])
        if d % heads:
            raise CheckpointError(f"{where}: encoder hidden_dim {d} is not divisible by heads {heads}")
        if int(flat["seq_len"]) < 3:
            raise CheckpointError(f"{where}: seq_len {flat['seq_len']} must be at least 3 (genes + T + S)")
        n_class = flat.get("n_class")
        return cls(
            model_type=model_type,
            seq_len=int(flat["seq_len"]),
            d_model=d,
            n_layers=int(enc["depth"]),
            n_heads=heads,
            bin_num=int(flat["bin_num"]),
            bin_alpha=float(flat["bin_alpha"]),
            pad_token_id=int(flat["pad_token_id"]),
            mask_token_id=int(flat["mask_token_id"]),
            n_class=None if n_class is None else int(n_class),
        )


class AutoDiscretizationEmbedding(nn.Module):
    """Learned soft binning of a scalar value into a ``d``-vector (``AutoDiscretizationEmbedding2``)."""

    def __init__(self, cfg: ScFoundationConfig) -> None:
        super().__init__()
        self.mlp = nn.Linear(1, cfg.bin_num)
        self.mlp2 = nn.Linear(cfg.bin_num, cfg.bin_num)
        self.emb = nn.Embedding(cfg.bin_num, cfg.d_model)
        self.emb_mask = nn.Embedding(1, cfg.d_model)
        self.emb_pad = nn.Embedding(1, cfg.d_model)
        self.bin_alpha = cfg.bin_alpha
        self.mask_value = float(cfg.mask_token_id)
        self.pad_value = float(cfg.pad_token_id)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` float values -> ``(B, S, d)`` embeddings."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        h = self.bin_alpha * h + self.mlp2(h)
        weight = torch.softmax(h, dim=-1)
        out = torch.matmul(weight, self.emb.weight.to(weight.dtype))
        out = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0].to(out.dtype), out)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0].to(out.dtype), out)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout.

    ``in_proj_weight`` stacks the q, k and v projections (``[3d, d]``); the scale is
    ``1/sqrt(d/heads)``.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-LN, ReLU) at inference, with its parameter names."""

    def __init__(self, cfg: ScFoundationConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads)
        self.linear1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, attn_mask))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class Encoder(nn.Module):
    """``pytorchTransformerModule``: the block list and the final LayerNorm."""

    def __init__(self, cfg: ScFoundationConfig) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)


class FinalStage(nn.Module):
    """The last block followed by ``encoder.norm`` (wraps existing modules; no parameters of its own)."""

    def __init__(self, block: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.norm = norm

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block(x, attn_mask))


class ScFoundationModel(nn.Module):
    """The scFoundation encoder (``MaeAutobin`` without decoder and heads).

    Its ``state_dict`` keys are the official ones after stripping ``model.``:
    ``token_emb.*``, ``pos_emb.weight``, ``encoder.transformer_encoder.{i}.*``, ``encoder.norm.*``.
    """

    def __init__(self, cfg: ScFoundationConfig) -> None:
        super().__init__()
        if cfg.n_layers < 1:
            raise CheckpointError(f"encoder depth must be at least 1, got {cfg.n_layers}")
        self.cfg = cfg
        self.token_emb = AutoDiscretizationEmbedding(cfg)
        self.pos_emb = nn.Embedding(cfg.seq_len + 1, cfg.d_model)
        self.encoder = Encoder(cfg)
        blocks = list(self.encoder.transformer_encoder)
        # a plain list: the stages share the encoder's modules and add no state_dict entries
        self._stages: list[nn.Module] = [*blocks[:-1], FinalStage(blocks[-1], self.encoder.norm)]

    @property
    def stages(self) -> Sequence[nn.Module]:
        """The ``L`` hookable stages in forward order; the last includes ``encoder.norm``."""
        return tuple(self._stages)

    def embed(self, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Input of block 0: ``token_emb(values) + pos_emb(positions)``."""
        return self.token_emb(values) + self.pos_emb(positions)

    def forward(
        self,
        positions: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        *,
        n_blocks: int | None = None,
    ) -> torch.Tensor:
        """Run the first ``n_blocks`` stages (all when None).

        Parameters
        ----------
        positions, values
            ``(B, S)`` position ids and input values.
        keep
            ``(B, S)`` bool, True at real tokens (keys that may be attended to).
        n_blocks
            Stop after this many stages.

        Returns
        -------
        torch.Tensor
            ``(B, S, d)``; after all ``L`` stages this is the official encoder output (final
            LayerNorm applied).
        """
        x = self.embed(positions, values)
        mask = keep[:, None, None, :]
        for stage in self._stages[: self.cfg.n_layers if n_blocks is None else n_blocks]:
            x = stage(x, mask)
        return x
