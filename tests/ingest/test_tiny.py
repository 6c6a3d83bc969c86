"""The packaged built-in model ``sclstore-tiny``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sclstore.ingest.models import TINY_CHECKPOINT, load_adapter
from sclstore.ingest.models.tiny_card import ANISOTROPY_MAX, PR_MIN, embed_pbmc
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


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    """The packaged model's default pools on all 700 cells of pbmc68k_reduced, as ``sclstore ingest`` stores them."""
    return embed_pbmc(None, pools=("cls", "mean"))


def _mean_cosine_all_pairs(X: np.ndarray) -> float:
    u = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = u.astype(np.float64) @ u.T.astype(np.float64)
    return float(sims[~np.eye(len(X), dtype=bool)].mean())


def test_tiny_stored_layers_are_not_collapsed(stored: dict[str, np.ndarray]) -> None:
    from sclstore.eval.diagnostics import anisotropy, participation_ratio

    recorded = json.loads((TINY_CHECKPOINT / "training.json").read_text())["pbmc_geometry"]["pools"]
    assert set(stored) == set(load_adapter("sclstore-tiny").default_pools)
    for pool, emb in stored.items():
        assert emb.shape == (7, 700, 64)
        for layer, X in enumerate(emb):
            if pool == "cls" and layer == 0:  # the <cls> input embedding: one fixed vector for every cell, by construction
                assert np.ptp(X, axis=0).max() == 0 and recorded[pool][layer]["constant"]
                continue
            pr, cos = participation_ratio(X), _mean_cosine_all_pairs(X)
            # issue 15: every stored (pool, layer) but the constant <cls> input is spread out, no exception
            assert pr > PR_MIN and cos < ANISOTROPY_MAX, (pool, layer, pr, cos)
            assert not recorded[pool][layer]["constant"]
            assert anisotropy(X) == pytest.approx(cos, abs=0.02)  # the evaluation's sampled estimate agrees
            # the model card (README, training.json) records what the committed weights give
            assert pr == pytest.approx(recorded[pool][layer]["participation_ratio"], rel=1e-3)
            assert cos == pytest.approx(recorded[pool][layer]["anisotropy"], abs=1e-3)
    assert "**met**" in (TINY_CHECKPOINT / "README.md").read_text()  # the card's verdict, with no exception listed


def test_tiny_layers_carry_cell_type_structure(stored: dict[str, np.ndarray]) -> None:
    import scanpy as sc
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
    majority = float(np.unique(labels, return_counts=True)[1].max() / labels.size)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    shuffled = np.random.default_rng(0).permutation(labels)
    for pool in ("cls", "mean"):
        X = stored[pool][-1]  # the final layer (the official embedding's layer)
        acc = cross_val_score(KNeighborsClassifier(15), X, labels, cv=folds).mean()
        null = cross_val_score(KNeighborsClassifier(15), X, shuffled, cv=folds).mean()
        assert acc > majority + 0.15 and acc > null + 0.15, (pool, acc, majority, null)
