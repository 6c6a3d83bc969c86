"""Tahoe-X1 checkpoints: both official formats, strict loading, clear errors, lazy weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import sclstore.ingest.models.tahoe.adapter as tahoe
import sclstore.ingest.models.tahoe.checkpoint as tahoe_checkpoint
from sclstore.ingest.models import FAMILIES, load_adapter
from sclstore.store.errors import CheckpointError, InvalidInputError

Factory = Callable[..., Path]
L1_UP = "transformer_encoder.layers.1.up_proj.weight"


def ens(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


@pytest.mark.parametrize("fmt", ["hf", "composer"])
def test_missing_encoder_weight_names_the_key(fmt: str, tiny_tahoe_factory: Factory) -> None:
    folder = tiny_tahoe_factory(fmt, drop_keys=["transformer_encoder.layers.1.norm2.bias"])
    adapter = load_adapter("tahoe-x1", folder)  # configs only: fine
    with pytest.raises(CheckpointError, match=r"lacks encoder weight 'transformer_encoder\.layers\.1\.norm2\.bias'"):
        adapter.load(torch.device("cpu"))
    assert not adapter.is_loaded


@pytest.mark.parametrize("fmt", ["hf", "composer"])
def test_misshapen_encoder_weight_names_key_and_shapes(fmt: str, tiny_tahoe_factory: Factory) -> None:
    folder = tiny_tahoe_factory(fmt, reshape={L1_UP: (64, 32)})
    pattern = r"'transformer_encoder\.layers\.1\.up_proj\.weight' has shape \[64, 32\].*implies \[128, 32\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("tahoe-x1", folder).load(torch.device("cpu"))


def test_unexpected_key_fails_but_ignored_heads_load(tiny_tahoe_factory: Factory) -> None:
    bad = tiny_tahoe_factory(extra_keys={"cls_decoder.fc.weight": (3, 32)})
    with pytest.raises(CheckpointError, match=r"unexpected weights \['cls_decoder\.fc\.weight'\]"):
        load_adapter("tahoe-x1", bad).load(torch.device("cpu"))
    good = tiny_tahoe_factory(with_chem=True)  # + expression_decoder.*, mvc_decoder.* (always written)
    adapter = load_adapter("tahoe-x1", good)
    adapter.load(torch.device("cpu"))
    assert adapter.is_loaded


def test_missing_files_are_named(tiny_tahoe_factory: Factory, tmp_path: Path) -> None:
    folder = tiny_tahoe_factory()
    copy = tmp_path / "ck"
    shutil.copytree(folder, copy)
    (copy / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing vocab\.json;"):
        load_adapter("tahoe-x1", copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing vocab\.json, model\.safetensors or best-model\.pt"):
        load_adapter("tahoe-x1", copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter("tahoe-x1", tmp_path / "nowhere")


def test_weight_file_path_is_accepted(tiny_tahoe_composer: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_composer / "best-model.pt")
    assert adapter.describe()["checkpoint_format"] == "composer"


def test_constructing_the_adapter_loads_no_weights(
    tiny_tahoe_hf: Path, monkeypatch: pytest.MonkeyPatch, random_counts: Callable[..., object]
) -> None:
    calls: list[str] = []

    def forbidden(*_args: object, **_kwargs: object) -> None:
        calls.append("read")
        raise AssertionError("weights were read")

    monkeypatch.setattr(tahoe_checkpoint, "read_state_dict", forbidden)
    monkeypatch.setattr(tahoe, "read_state_dict", forbidden)
    monkeypatch.setattr("safetensors.torch.load_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    info = json.loads(json.dumps(adapter.describe()))  # JSON-able
    assert (info["n_layers"], info["d_model"], info["n_heads"], info["vocab_size"]) == (2, 32, 4, 43)
    assert info["max_length"] == 2048 and info["gene_id_type"] == "ensembl"
    assert len(adapter.checkpoint_hash) == 64
    adapter.map_genes(ens(40))
    recs = adapter.tokenizer.tokenize(random_counts(3, 40), np.arange(3), seed=0)  # type: ignore[operator]
    adapter.collate(recs)
    assert not adapter.is_loaded and adapter.model is None and calls == []
    with pytest.raises(AssertionError, match="weights were read"):
        adapter.load(torch.device("cpu"))
    assert calls == ["read"]


def test_load_is_idempotent(tiny_tahoe_hf: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    adapter.load(torch.device("cpu"))
    model = adapter.model
    adapter.load("cpu")
    assert adapter.model is model and adapter.device == torch.device("cpu")


def test_checkpoint_hash_is_content_based(tiny_tahoe_factory: Factory, tmp_path: Path) -> None:
    a = tiny_tahoe_factory(seed=1)
    b = tiny_tahoe_factory(seed=1)
    c = tiny_tahoe_factory(seed=2)
    h = load_adapter("tahoe-x1", a).checkpoint_hash
    assert load_adapter("tahoe-x1", b).checkpoint_hash == h  # same content elsewhere
    assert load_adapter("tahoe-x1", c).checkpoint_hash != h  # other weights
    copy = tmp_path / "cfg"
    shutil.copytree(a, copy)
    (copy / "collator_config.yml").write_text((copy / "collator_config.yml").read_text() + "\n# edited\n")
    assert load_adapter("tahoe-x1", copy).checkpoint_hash != h


def test_unsupported_configs_fail_clearly(tiny_tahoe_factory: Factory) -> None:
    gqa = tiny_tahoe_factory(model_overrides={"attn_config": {"attn_impl": "flash", "kv_n_heads": 2}})
    with pytest.raises(CheckpointError, match="kv_n_heads=2"):
        load_adapter("tahoe-x1", gqa)
    act = tiny_tahoe_factory(activation="swish")
    with pytest.raises(CheckpointError, match="activation 'swish'"):
        load_adapter("tahoe-x1", act)
    small = tiny_tahoe_factory(model_overrides={"vocab_size": 10})
    with pytest.raises(CheckpointError, match="vocab_size is 10"):
        load_adapter("tahoe-x1", small)


def test_load_adapter_registry(tiny_tahoe_hf: Path) -> None:
    assert set(FAMILIES) >= {"tahoe-x1", "sclstore-tiny"}
    with pytest.raises(InvalidInputError, match=r"unknown model family 'scgpt2'; choose one of: .*sclstore-tiny.*tahoe-x1"):
        load_adapter("scgpt2", tiny_tahoe_hf)
    with pytest.raises(InvalidInputError, match="needs --checkpoint"):
        load_adapter("tahoe-x1", None)
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf, max_genes=16)
    assert adapter.family == "tahoe-x1" and adapter.describe()["max_length"] == 16
    with pytest.raises(InvalidInputError, match="max length 1"):
        load_adapter("tahoe-x1", tiny_tahoe_hf, max_genes=1)
