"""Generic hook capture: pre-hook for layer 0, hooks on blocks, pooling inside the hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sclstore.ingest.capture import LayerCapture, PoolingInfo, pool_hidden
from sclstore.store.errors import ModelError


class TupleBlock(nn.Module):
    """A block that returns ``(hidden, aux)`` like many HF layers."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(d, d, generator=gen) / d**0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.tanh(x @ self.weight) + x, None


class Stack(nn.Module):
    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TupleBlock(d, seed=i) for i in range(n)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        states = [x]
        for block in self.blocks:
            x = block(x)[0]
            states.append(x)
        return states


def _info(lengths: list[int], s: int, n_special: int = 1) -> PoolingInfo:
    pos = torch.arange(s)[None, :]
    real = pos < torch.tensor(lengths)[:, None]
    return PoolingInfo(
        gene_mask=real & (pos >= n_special),
        positions={"cls": torch.zeros(len(lengths), dtype=torch.long), "last": torch.tensor(lengths) - 1},
    )


def _oracle(x: torch.Tensor, lengths: list[int], pool: str, n_special: int = 1) -> torch.Tensor:
    rows = []
    for i, n in enumerate(lengths):
        genes = x[i, n_special:n]
        if pool == "cls":
            rows.append(x[i, 0])
        elif pool == "last":
            rows.append(x[i, n - 1])
        elif pool == "mean":
            rows.append(genes.mean(0) if len(genes) else torch.zeros(x.shape[-1]))
        else:
            rows.append(genes.max(0).values if len(genes) else torch.zeros(x.shape[-1]))
    return torch.stack(rows)


def test_capture_equals_explicit_pooling_of_every_layer() -> None:
    torch.manual_seed(0)
    model = Stack()
    lengths = [6, 3, 1, 5]
    x = torch.randn(4, 6, 8) * 3
    info = _info(lengths, 6)
    pools = ["cls", "mean", "max", "last"]
    with LayerCapture(list(model.blocks), layers=[0, 1, 2, 3], pools=pools, info=info) as cap:
        states = model(x)
    out = cap.result()
    for pool in pools:
        assert out[pool].shape == (4, 4, 8) and out[pool].dtype == torch.float32
        for layer in range(4):
            torch.testing.assert_close(out[pool][layer], _oracle(states[layer], lengths, pool), atol=1e-6, rtol=0)
    # the row with only <cls> gets zeros for the gene pools
    assert torch.all(out["mean"][:, 2] == 0) and torch.all(out["max"][:, 2] == 0)
    for block in model.blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_mean_and_max_ignore_padding_and_special_tokens() -> None:
    hidden = torch.tensor([[[100.0], [1.0], [3.0], [-49.0]], [[7.0], [2.0], [1e6], [1e6]]])
    info = PoolingInfo(gene_mask=torch.tensor([[False, True, True, True], [False, True, False, False]]))
    out = pool_hidden(hidden, info, ["mean", "max"])
    assert out["mean"].tolist() == [[-15.0], [2.0]]
    assert out["max"].tolist() == [[3.0], [2.0]]


def test_bf16_hidden_states_are_pooled_in_float32() -> None:
    hidden = torch.full((1, 3, 2), 1.0, dtype=torch.bfloat16)
    hidden[0, 2] = 2.0
    info = _info([3], 3)
    out = pool_hidden(hidden, info, ["cls", "mean", "max"])
    assert all(v.dtype == torch.float32 for v in out.values())
    assert out["mean"].tolist() == [[1.5, 1.5]]


def test_only_requested_layers_and_order() -> None:
    model = Stack(n=4)
    x = torch.randn(2, 5, 8)
    info = _info([5, 4], 5)
    with LayerCapture(list(model.blocks), layers=[4, 0, 2], pools=["mean"], info=info) as cap:
        states = model(x)
    out = cap.result()["mean"]
    for slot, layer in enumerate([4, 0, 2]):
        torch.testing.assert_close(out[slot], _oracle(states[layer], [5, 4], "mean"))


def test_errors_and_cleanup() -> None:
    model = Stack(n=2)
    info = _info([3], 3)
    with pytest.raises(ModelError, match="out of range"):
        LayerCapture(list(model.blocks), layers=[3], pools=["cls"], info=info)
    with pytest.raises(ModelError, match="unknown pools"):
        LayerCapture(list(model.blocks), layers=[1], pools=["T"], info=info)
    with pytest.raises(ModelError, match="did not reach layers \\[2\\]"):
        with LayerCapture(list(model.blocks), layers=[1, 2], pools=["cls"], info=info) as cap:
            model.blocks[0](torch.randn(1, 3, 8))
        cap.result()
    with pytest.raises(RuntimeError, match="boom"), LayerCapture(list(model.blocks), layers=[0, 1], pools=["cls"], info=info):
        raise RuntimeError("boom")
    for block in model.blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_captures_in_concurrent_threads_see_only_their_own_forward_passes() -> None:
    """CPU streams: threads run the same model at once, each inside its own capture. Each thread's
    result is the explicit pooling of its own states (the oracle), for every pass, while the other
    threads' captures enter and leave on the same blocks all the while."""
    import threading

    model = Stack(d=16, n=4)
    lengths = [7, 2, 5]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def stream(seed: int) -> None:
        try:
            start.wait()
            for step in range(60):
                x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(seed * 1000 + step))
                with LayerCapture(list(model.blocks), layers=[0, 2, 4], pools=["mean", "cls"], info=_info(lengths, 7)) as cap:
                    states = model(x)
                out = cap.result()
                for slot, layer in enumerate([0, 2, 4]):
                    for pool in ("mean", "cls"):
                        torch.testing.assert_close(out[pool][slot], _oracle(states[layer], lengths, pool), atol=1e-6, rtol=0)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for block in model.blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks
