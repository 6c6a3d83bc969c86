"""Capture pooled per-layer embeddings with hooks during one forward pass.

Every adapter exposes its transformer blocks as an ordered sequence of modules. Stored layer
``0`` is the *input* of block 0 (the embedding-layer output, caught by a forward pre-hook), and
stored layer ``l`` (``1 <= l <= L``) is the *output* of block ``l - 1``. Each hook pools the
block's ``(B, S, d)`` hidden states right away with the batch's key-padding information and
keeps only a ``(B, d)`` float32 vector per pool, so the full token states of all layers are never
held at once.

Pools
-----
``mean``
    Mean over gene tokens: positions that are neither padding nor special tokens.
``max``
    Element-wise maximum over the same gene tokens.
position pools (``cls`` and any an adapter declares, e.g. scFoundation's ``T``/``S``)
    The hidden state at one position per cell, given in :attr:`PoolingInfo.positions`.

A cell without any gene token gets a zero vector for ``mean`` and ``max``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from sclstore.store.errors import ModelError

__all__ = ["REDUCTION_POOLS", "LayerCapture", "PoolingInfo", "first_tensor", "pool_hidden"]

logger = logging.getLogger(__name__)

REDUCTION_POOLS: tuple[str, ...] = ("mean", "max")
"""Pools computed by reducing over the gene tokens of a cell."""


@dataclass(frozen=True)
class PoolingInfo:
    """What the hooks need to pool one batch.

    Attributes
    ----------
    gene_mask
        ``(B, S)`` bool, True at gene tokens (not padding, not special tokens).
    positions
        Position pools: name -> ``(B,)`` int64 index of the token to take in each row
        (``{"cls": zeros}`` for models with ``<cls>`` first).
    """

    gene_mask: torch.Tensor
    positions: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this batch can produce: the position pools and ``mean``/``max``."""
        return (*self.positions.keys(), *REDUCTION_POOLS)


def first_tensor(output: Any) -> torch.Tensor:
    """Return the hidden-state tensor of a block's output (the first element of a tuple).

    Raises
    ------
    ModelError
        If no tensor can be found.
    """
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        msg = f"a hooked block returned {type(output).__name__}, expected a tensor or a tuple starting with one"
        raise ModelError(msg)
    return output


def pool_hidden(hidden: torch.Tensor, info: PoolingInfo, pools: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pool ``(B, S, d)`` hidden states into one float32 ``(B, d)`` tensor per pool.

    Parameters
    ----------
    hidden
        Hidden states of one layer, any floating dtype.
    info
        Gene-token mask and pooling positions of the batch.
    pools
        Names of the pools to compute (``mean``, ``max`` or a position pool).

    Returns
    -------
    dict of str to torch.Tensor
        ``{pool: (B, d) float32}`` on the device of ``hidden``.

    Raises
    ------
    ModelError
        If a pool is unknown or the mask does not match the hidden states.
    """
    if hidden.dim() != 3:
        msg = f"expected hidden states of shape (B, S, d), got {tuple(hidden.shape)}"
        raise ModelError(msg)
    if tuple(info.gene_mask.shape) != tuple(hidden.shape[:2]):
        msg = f"gene mask {tuple(info.gene_mask.shape)} does not match hidden states {tuple(hidden.shape)}"
        raise ModelError(msg)
    out: dict[str, torch.Tensor] = {}
    mask = info.gene_mask
    # pool in float32 even under bf16 autocast (bmm would otherwise run in bf16)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for pool in pools:
            if pool in info.positions:
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                out[pool] = hidden[rows, info.positions[pool]].float()
            elif pool == "mean":
                m = mask.to(torch.float32)
                total = torch.bmm(m.unsqueeze(1), hidden.float()).squeeze(1)
                out[pool] = total / m.sum(dim=1, keepdim=True).clamp_min(1.0)
            elif pool == "max":
                # the maximum is exact in the hidden dtype; no float32 copy of the states needed
                best = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1).float()
                out[pool] = torch.where(mask.any(dim=1, keepdim=True), best, torch.zeros_like(best))
            else:
                msg = f"unknown pool {pool!r}; this batch supports {', '.join(info.pools)}"
                raise ModelError(msg)
    return out


class LayerCapture:
    """Context manager that hooks the blocks of a model and pools every kept layer.

    Parameters
    ----------
    blocks
        The ``L`` transformer blocks in forward order.
    layers
        Stored layer numbers to keep, each in ``0..L``.
    pools
        Pools to compute for each kept layer.
    info
        Pooling information of the batch that the next forward pass will process.

    Examples
    --------
    >>> with LayerCapture(model.blocks, layers=[0, 6, 12], pools=["cls", "mean"], info=info) as cap:
    ...     model(batch)
    >>> cap.result()["mean"].shape   # (3, B, d)

    Several threads may each run a forward pass of the same model inside their own capture
    (CPU streams, :mod:`sclstore.ingest.embed`): a capture's hooks act only on forward passes of
    the thread that entered it, and accept either hook signature, because a pass may have taken
    a snapshot of the module's hooks just before another thread's capture removed its own.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        layers: Sequence[int],
        pools: Sequence[str],
        info: PoolingInfo,
    ) -> None:
        n_blocks = len(blocks)
        bad = [layer for layer in layers if not 0 <= int(layer) <= n_blocks]
        if bad or not layers:
            msg = f"layers {bad or list(layers)} out of range: this model has layers 0..{n_blocks}"
            raise ModelError(msg)
        if len(set(layers)) != len(layers):
            raise ModelError(f"layers repeat: {list(layers)}")
        unknown = [p for p in pools if p not in info.pools]
        if unknown or not pools:
            msg = f"unknown pools {unknown or list(pools)}; this model supports {', '.join(info.pools)}"
            raise ModelError(msg)
        self._blocks = list(blocks)
        self._layers = [int(layer) for layer in layers]
        self._slot = {layer: i for i, layer in enumerate(self._layers)}
        self._pools = list(pools)
        self._info = info
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out: dict[str, torch.Tensor] | None = None
        self._filled: set[int] = set()
        self._thread = threading.get_ident()

    def _store(self, layer: int, hidden: torch.Tensor) -> None:
        pooled = pool_hidden(hidden, self._info, self._pools)
        if self._out is None:
            n, b, d = len(self._layers), hidden.shape[0], hidden.shape[-1]
            self._out = {
                p: torch.empty((n, b, d), dtype=torch.float32, device=hidden.device) for p in self._pools
            }
        slot = self._slot[layer]
        for pool, vec in pooled.items():
            self._out[pool][slot] = vec
        self._filled.add(layer)

    def __enter__(self) -> LayerCapture:
        if 0 in self._slot:

            def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
                if threading.get_ident() != self._thread:
                    return  # another thread's forward pass
                hidden = args[0] if args else next(iter((kwargs or {}).values()))
                self._store(0, first_tensor(hidden))

            self._handles.append(self._blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in self._layers:
            if layer == 0:
                continue

            def hook(_module: nn.Module, _args: Any, *rest: Any, _layer: int = layer) -> None:
                if threading.get_ident() == self._thread:  # ``rest``: (output,) or (kwargs, output)
                    self._store(_layer, first_tensor(rest[-1]))

            self._handles.append(self._blocks[layer - 1].register_forward_hook(hook))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> dict[str, torch.Tensor]:
        """Return ``{pool: float32 (len(layers), B, d)}`` in the order of ``layers``.

        Raises
        ------
        ModelError
            If a kept layer was not reached by the forward pass.
        """
        missing = [layer for layer in self._layers if layer not in self._filled]
        if missing or self._out is None:
            msg = f"the forward pass did not reach layers {missing}; the adapter's block list is wrong"
            raise ModelError(msg)
        return self._out
