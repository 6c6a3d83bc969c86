"""Tahoe-X1 encoder: hooked per-layer pools against an independent reference forward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from sclstore.ingest.adapter import TokenRecord
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.tahoe import TahoeAdapter
from sclstore.store.errors import InvalidInputError, ModelError

POOLS = ("cls", "mean", "max")
Counts = Callable[..., scipy.sparse.csr_matrix]


def ens(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def reference_forward(folder: Path, rec: TokenRecord) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Un-hooked float64 re-computation of one cell (no padding) from the raw checkpoint files.

    Attention goes through ``torch.nn.functional.multi_head_attention_forward`` with ``Wqkv`` as
    its packed in-projection, an implementation independent of the adapter's.
    Returns the residual stream of layers 0..L, ``(S, d)`` each, and the official embedding.
    """
    cfg = yaml.safe_load((folder / "model_config.yml").read_text())
    sd = {k.removeprefix("model."): v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    act = {"relu": F.relu, "gelu": F.gelu}[cfg["transformer_activation"]]
    d, h = cfg["d_model"], cfg["n_heads"]
    ids = torch.from_numpy(rec.gene_ids)
    vals = torch.from_numpy(rec.values).double().unsqueeze(-1).clamp(max=512)
    tok = _ln(sd["gene_encoder.embedding.weight"][ids], sd, "gene_encoder.enc_norm")
    val = _ln(_lin(F.relu(_lin(vals, sd, "expression_encoder.linear1")), sd, "expression_encoder.linear2"), sd,
              "expression_encoder.norm")
    x = tok + val
    layers = [x]
    for i in range(cfg["n_layers"]):
        p = f"transformer_encoder.layers.{i}."
        y = _ln(x, sd, p + "norm1").unsqueeze(1)  # (S, 1, d)
        att, _ = F.multi_head_attention_forward(
            y, y, y, d, h, sd[p + "self_attn.Wqkv.weight"], sd[p + "self_attn.Wqkv.bias"], None, None, False, 0.0,
            sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"], training=False, need_weights=False,
        )
        x = x + att.squeeze(1)
        x = x + _lin(act(_lin(_ln(x, sd, p + "norm2"), sd, p + "up_proj")), sd, p + "down_proj")
        layers.append(x)
    official = F.normalize(_ln(x, sd, "transformer_encoder.norm")[0], dim=-1)
    return layers, official


def _pools(x: torch.Tensor) -> dict[str, torch.Tensor]:
    genes = x[1:]
    return {"cls": x[0], "mean": genes.mean(0), "max": genes.amax(0)}


def _setup(folder: Path, counts: scipy.sparse.csr_matrix, *, seed: int = 0) -> tuple[TahoeAdapter, list[TokenRecord]]:
    adapter = load_adapter("tahoe-x1", folder)
    assert isinstance(adapter, TahoeAdapter)
    adapter.map_genes(ens(counts.shape[1]))
    adapter.load(torch.device("cpu"))
    return adapter, adapter.tokenizer.tokenize(counts, np.arange(counts.shape[0]), seed=seed)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_hooked_pools_equal_reference_forward(
    activation: str, tiny_tahoe_factory: Callable[..., Path], random_counts: Counts
) -> None:
    folder = tiny_tahoe_factory(activation=activation, n_layers=3, seed=7)
    counts = random_counts(6, 40, seed=2)
    adapter, recs = _setup(folder, counts)
    layers = list(range(adapter.n_layers + 1))
    batch = adapter.collate(recs)
    assert len(set(batch.padding_mask.sum(1).tolist())) > 2  # really padded
    out = adapter.embed(batch, layers=layers, pools=POOLS)
    official = adapter.official_embedding(batch)
    for i, rec in enumerate(recs):
        ref_layers, ref_official = reference_forward(folder, rec)
        for layer in layers:
            ref = _pools(ref_layers[layer])
            for pool in POOLS:
                torch.testing.assert_close(out[pool][layer, i].double(), ref[pool], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(official[i].double(), ref_official, atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_each_cell_alone(tiny_tahoe_hf: Path, random_counts: Counts) -> None:
    counts = random_counts(9, 40, seed=11)
    adapter, recs = _setup(tiny_tahoe_hf, counts)
    layers = list(range(adapter.n_layers + 1))
    out = adapter.embed(adapter.collate(recs), layers=layers, pools=POOLS)
    for pool in POOLS:
        assert out[pool].shape == (len(layers), 9, 32) and out[pool].dtype == torch.float32
    for i, rec in enumerate(recs):
        alone = adapter.embed(adapter.collate([rec]), layers=layers, pools=POOLS)
        for pool in POOLS:
            torch.testing.assert_close(out[pool][:, i], alone[pool][:, 0], atol=1e-5, rtol=0)
    # another batch composition and order
    order = [8, 3, 0, 5]
    other = adapter.embed(adapter.collate([recs[j] for j in order]), layers=layers, pools=POOLS)
    for pool in POOLS:
        torch.testing.assert_close(other[pool], out[pool][:, order], atol=1e-5, rtol=0)


def test_layer_subsets_and_order(tiny_tahoe_factory: Callable[..., Path], random_counts: Counts) -> None:
    folder = tiny_tahoe_factory(n_layers=4, seed=3)
    adapter, recs = _setup(folder, random_counts(4, 40, seed=5))
    batch = adapter.collate(recs)
    full = adapter.embed(batch, layers=range(5), pools=["mean", "cls"])
    part = adapter.embed(batch, layers=[3, 0, 1], pools=["mean"])  # stops after block 3
    assert list(part) == ["mean"]
    torch.testing.assert_close(part["mean"], full["mean"][[3, 0, 1]], atol=0, rtol=0)
    for block in adapter.blocks():
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_official_embedding_equals_final_transform_of_last_cls(tiny_tahoe_hf: Path, random_counts: Counts) -> None:
    adapter, recs = _setup(tiny_tahoe_hf, random_counts(7, 40, seed=8))
    batch = adapter.collate(recs)
    last = adapter.embed(batch, layers=[adapter.n_layers], pools=["cls"])["cls"][0]
    official = adapter.official_embedding(batch)
    torch.testing.assert_close(adapter.final_transform(last), official, atol=1e-6, rtol=0)
    torch.testing.assert_close(official.norm(dim=1), torch.ones(7), atol=1e-6, rtol=0)
    # the stored vector is the residual stream, not the official one
    assert (last - official).abs().max() > 1e-2


def test_hf_and_composer_formats_give_identical_embeddings(
    tiny_tahoe_hf: Path, tiny_tahoe_composer: Path, random_counts: Counts
) -> None:
    counts = random_counts(5, 40, seed=9)
    a, recs = _setup(tiny_tahoe_hf, counts)
    b, _ = _setup(tiny_tahoe_composer, counts)
    assert a.describe()["checkpoint_format"] == "hf" and b.describe()["checkpoint_format"] == "composer"
    batch = a.collate(recs)
    out_a = a.embed(batch, layers=[0, 2], pools=POOLS)
    out_b = b.embed(batch, layers=[0, 2], pools=POOLS)
    for pool in POOLS:
        torch.testing.assert_close(out_a[pool], out_b[pool], atol=0, rtol=0)


def test_embed_errors(tiny_tahoe_hf: Path, random_counts: Counts) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    adapter.map_genes(ens(40))
    batch = adapter.collate(adapter.tokenizer.tokenize(random_counts(2, 40), np.arange(2), seed=0))
    with pytest.raises(ModelError, match="not loaded"):
        adapter.embed(batch, layers=[0], pools=["cls"])
    adapter.load(torch.device("cpu"))
    with pytest.raises(InvalidInputError, match="out of range"):
        adapter.embed(batch, layers=[3], pools=["cls"])
    with pytest.raises(InvalidInputError, match="not supported"):
        adapter.embed(batch, layers=[0], pools=["T"])


def test_empty_cell_has_cls_and_zero_gene_pools(tiny_tahoe_hf: Path) -> None:
    counts = scipy.sparse.csr_matrix(np.vstack([np.zeros(40), np.arange(40) % 3]).astype(np.float32))
    adapter, recs = _setup(tiny_tahoe_hf, counts)
    assert len(recs[0]) == 1
    out = adapter.embed(adapter.collate(recs), layers=[0, 1, 2], pools=POOLS)
    assert torch.all(out["mean"][:, 0] == 0) and torch.all(out["max"][:, 0] == 0)
    assert torch.isfinite(out["cls"]).all() and out["cls"][:, 0].abs().sum() > 0


def test_softmax_scale_is_ignored_as_official_unless_opted_in(
    tiny_tahoe_factory: Callable[..., Path], random_counts: Counts
) -> None:
    """Upstream ``TXBlock`` builds its attention without ``softmax_scale``: a config value has no effect."""
    plain = tiny_tahoe_factory(seed=5)
    cfg_attn = {"attn_type": "grouped_query_attention", "attn_impl": "flash", "use_attn_mask": False, "softmax_scale": 0.05}
    scaled = tiny_tahoe_factory(seed=5, model_overrides={"attn_config": cfg_attn})
    counts = random_counts(5, 40, seed=4)
    layers = list(range(3))
    a, recs = _setup(plain, counts)
    b, _ = _setup(scaled, counts)
    out_a = a.embed(a.collate(recs), layers=layers, pools=POOLS)
    out_b = b.embed(b.collate(recs), layers=layers, pools=POOLS)
    for pool in POOLS:
        torch.testing.assert_close(out_b[pool], out_a[pool], atol=0, rtol=0)
    opted = load_adapter("tahoe-x1", scaled, options={"softmax_scale": "config"})
    assert isinstance(opted, TahoeAdapter) and opted.config.softmax_scale == 0.05
    assert opted.checkpoint_hash != b.checkpoint_hash
    opted.map_genes(ens(40))
    opted.load(torch.device("cpu"))
    out_c = opted.embed(opted.collate(recs), layers=layers, pools=POOLS)
    assert (out_c["cls"][2] - out_a["cls"][2]).abs().max() > 1e-3
    torch.testing.assert_close(out_c["cls"][0], out_a["cls"][0])  # the input layer has no attention
    with pytest.raises(InvalidInputError, match="softmax_scale=official"):
        load_adapter("tahoe-x1", scaled, options={"softmax_scale": "yes"})
