"""The packaged built-in model ``sclstore-tiny``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sclstore.ingest.models import TINY_CHECKPOINT, load_adapter
from sclstore.ingest.models.train_tiny import evaluate_checkpoint, load_pbmc_counts
from sclstore.store.errors import InvalidInputError


@pytest.fixture(scope="module")
def pbmc() -> tuple[object, list[str]]:
    return load_pbmc_counts()


def test_tiny_checkpoint_is_a_tahoe_hf_folder() -> None:
    names = {p.name for p in TINY_CHECKPOINT.iterdir()}
    assert {"model_config.yml", "collator_config.yml", "vocab.json", "model.safetensors", "README.md"} <= names
    assert (TINY_CHECKPOINT / "model.safetensors").stat().st_size < 8 * 2**20
    with safe_open(str(TINY_CHECKPOINT / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("model.") for k in keys)
    assert "model.expression_decoder.out_proj.weight" in keys and "model.mvc_decoder.W.weight" in keys
    vocab = json.loads((TINY_CHECKPOINT / "vocab.json").read_text())
    assert len(vocab) == 768 and [vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [765, 766, 767]
    readme = (TINY_CHECKPOINT / "README.md").read_text()
    assert "python -m sclstore.ingest.models.train_tiny" in readme and "real checkpoints" in readme


def test_tiny_loads_without_checkpoint_and_embeds_pbmc(pbmc: tuple[object, list[str]]) -> None:
    counts, genes = pbmc
    adapter = load_adapter("sclstore-tiny")
    info = adapter.describe()
    assert (adapter.family, adapter.name) == ("sclstore-tiny", "sclstore-tiny")
    assert (info["n_layers"], info["d_model"], info["vocab_size"], info["gene_id_type"]) == (6, 64, 768, "symbol")
    mapping = adapter.map_genes(genes)
    assert mapping.stats() == {"n_vars": 765, "n_matched": 765, "matched_fraction": 1.0}
    recs = adapter.tokenizer.tokenize(counts[:12], np.arange(12), seed=0)  # type: ignore[index]
    adapter.load(torch.device("cpu"))
    batch = adapter.collate(recs)
    out = adapter.embed(batch, layers=range(7), pools=["cls", "mean", "max"])
    for pool, arr in out.items():
        assert arr.shape == (7, 12, 64) and torch.isfinite(arr).all(), pool
    official = adapter.official_embedding(batch)
    torch.testing.assert_close(adapter.final_transform(out["cls"][6]), official, atol=1e-6, rtol=0)
    # cells are not collapsed onto one vector
    sims = official @ official.T
    assert sims[~torch.eye(12, dtype=torch.bool)].min() < 0.99


def test_tiny_rejects_ensembl_ids() -> None:
    with pytest.raises(InvalidInputError, match="look like Ensembl ids"):
        load_adapter("sclstore-tiny").map_genes([f"ENSG{i:011d}" for i in range(50)])


def test_tiny_learned_something_and_readme_numbers_reproduce() -> None:
    recorded = json.loads((TINY_CHECKPOINT / "training.json").read_text())["val_after_training"]
    again = evaluate_checkpoint(TINY_CHECKPOINT)
    assert again["n_masked"] == recorded["n_masked"]
    for key in ("mse_expr", "mse_mvc", "mse_mean_bin", "mse_gene_mean_bin"):
        assert again[key] == pytest.approx(recorded[key], rel=1e-3), key
    assert again["mse_expr"] < 0.9 * again["mse_mean_bin"]
    assert again["mse_expr"] < again["mse_gene_mean_bin"]
