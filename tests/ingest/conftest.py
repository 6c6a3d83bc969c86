"""Fixtures for model tests: tiny random Tahoe-X1 checkpoints in the official on-disk formats.

:func:`make_tiny_tahoe` (fixture ``write_tiny_tahoe``) writes a folder exactly like a released Tahoe-X1 checkpoint
(``model_config.yml``, ``collator_config.yml``, ``vocab.json`` and ``model.safetensors`` or a
Composer ``best-model.pt``), with ``model.``-prefixed keys listed explicitly from the official
``TXModel`` state dict (``research/models.md`` §1.5), decoder heads included. The pipeline tests
reuse it through the fixtures below (``write_tiny_tahoe``, ``tiny_tahoe_factory``,
``random_counts``, ``tiny_gene_ids``), which avoids importing ``conftest`` by name.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse
import torch
import yaml


def make_gene_ids(n_genes: int, *, kind: str = "ensembl") -> list[str]:
    """Fake gene ids: ``ENSG00000000001…`` (kind ``"ensembl"``) or ``GENE1…`` (``"symbol"``)."""
    if kind == "ensembl":
        return [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    return [f"GENE{i}" for i in range(1, n_genes + 1)]


def tahoe_keys(
    *, vocab_size: int, d_model: int, n_layers: int, expansion_ratio: int = 4, with_chem: bool = False
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official ``TXModel`` state dict (without the ``model.`` prefix)."""
    d, f = d_model, d_model * expansion_ratio
    keys: dict[str, tuple[int, ...]] = {
        "gene_encoder.embedding.weight": (vocab_size, d),
        "gene_encoder.enc_norm.weight": (d,),
        "gene_encoder.enc_norm.bias": (d,),
        "flag_encoder.weight": (2, d),
        "expression_encoder.linear1.weight": (d, 1),
        "expression_encoder.linear1.bias": (d,),
        "expression_encoder.linear2.weight": (d, d),
        "expression_encoder.linear2.bias": (d,),
        "expression_encoder.norm.weight": (d,),
        "expression_encoder.norm.bias": (d,),
    }
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        keys |= {
            p + "self_attn.Wqkv.weight": (3 * d, d),
            p + "self_attn.Wqkv.bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "up_proj.weight": (f, d),
            p + "up_proj.bias": (f,),
            p + "down_proj.weight": (d, f),
            p + "down_proj.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    keys |= {
        "transformer_encoder.norm.weight": (d,),
        "transformer_encoder.norm.bias": (d,),
        "expression_decoder.linear_layers.0.weight": (d, d),
        "expression_decoder.linear_layers.0.bias": (d,),
        "expression_decoder.out_proj.weight": (1, d),
        "expression_decoder.out_proj.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d),
        "mvc_decoder.gene2query.bias": (d,),
        "mvc_decoder.W.weight": (d, d),
    }
    if with_chem:
        keys |= {
            "chem_encoder.embedding.weight": (5, 16),
            "chem_encoder.fc.weight": (d, 16),
            "chem_encoder.fc.bias": (d,),
            "chem_encoder.proj.weight": (d, d),
            "chem_encoder.proj.bias": (d,),
            "chem_encoder.norm.weight": (d,),
            "chem_encoder.norm.bias": (d,),
        }
    return keys


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if "norm" in key and key.endswith(".weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if key.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) * (1.0 / fan_in**0.5)


_COMPOSER_MODULES = ("composer", "composer.core", "composer.core.time")


def _foreign_object() -> Any:
    """An object of composer's ``Timestamp`` class, from a module that is gone after pickling."""
    mods = [types.ModuleType(name) for name in _COMPOSER_MODULES]

    class Timestamp:
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

    Timestamp.__module__ = mods[-1].__name__
    Timestamp.__qualname__ = "Timestamp"
    mods[-1].Timestamp = Timestamp  # type: ignore[attr-defined]
    for mod in mods:
        sys.modules.setdefault(mod.__name__, mod)
    return Timestamp(3)


def make_tiny_tahoe(
    path: str | Path,
    fmt: str = "hf",
    *,
    n_genes: int = 40,
    gene_ids: Iterable[str] | None = None,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    activation: str = "relu",
    max_length: int = 64,
    keep_first_n_tokens: int = 1,
    seed: int = 0,
    with_chem: bool = False,
    composer_extras: bool = False,
    drop_keys: Iterable[str] = (),
    reshape: Mapping[str, tuple[int, ...]] | None = None,
    extra_keys: Mapping[str, tuple[int, ...]] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a random tiny Tahoe-X1 checkpoint folder in an official format.

    Parameters
    ----------
    path
        Folder to create.
    fmt
        ``"hf"`` (``model.safetensors``) or ``"composer"`` (``best-model.pt`` with
        ``["state"]["model"]``).
    n_genes, gene_ids
        Vocabulary genes (default: ``n_genes`` fake Ensembl ids); ``<pad>``, ``<cls>``, ``<eoc>``
        are appended as upstream's ``prepare_for_inference``.
    d_model, n_layers, n_heads, activation, max_length, keep_first_n_tokens
        Architecture and collator settings.
    seed
        Seed of the random weights.
    with_chem
        Add ``chem_encoder.*`` weights (an allow-listed head).
    composer_extras
        For ``fmt="composer"``: also pickle a non-tensor object whose class cannot be imported
        at load time (as real Composer checkpoints hold composer objects).
    drop_keys, reshape, extra_keys
        Corrupt the checkpoint: remove keys, change shapes, add keys (names without prefix).
    model_overrides
        Extra/changed entries of ``model_config.yml``.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(gene_ids) if gene_ids is not None else make_gene_ids(n_genes)
    vocab = {g: i for i, g in enumerate(genes)}
    for tok in ("<pad>", "<cls>", "<eoc>"):
        vocab[tok] = len(vocab)
    model_cfg: dict[str, Any] = {
        "name": "tahoe_x1",
        "d_model": d_model,
        "n_layers": n_layers,
        "init_device": "cpu",
        "expansion_ratio": 4,
        "standard_scale_outputs": False,
        "transformer_activation": activation,
        "n_heads": n_heads,
        "norm_scheme": "pre",
        "use_generative_training": False,
        "use_cell_conditioned_generation": False,
        "use_glu": False,
        "cell_emb_style": "cls",
        "attn_config": {
            "attn_impl": "flash",
            "attn_type": "grouped_query_attention",
            "kv_nheads": n_heads,
            "attn_pdrop": 0.0,
            "use_attn_mask": False,
        },
        "norm_config": {"norm_type": "layernorm", "eps": 1.0e-5},
        "expression_encoder": {
            "input_emb_style": "continuous",
            "dropout": 0.1,
            "max_value": 512,
            "activation": "relu",
            "use_norm": True,
        },
        "gene_encoder": {"use_norm": True},
        "mvc": {"arch_style": "inner product", "query_activation": "sigmoid", "scaled_dot_product": True},
        "expression_decoder": {"n_outputs": 1, "n_layers": 1, "activation": "leaky_relu"},
        "vocab_size": len(vocab),
        "precision": "amp_bf16",
    }
    model_cfg |= dict(model_overrides or {})
    collator_cfg: dict[str, Any] = {
        "do_padding": True,
        "pad_value": -2,
        "do_mlm": True,
        "do_binning": True,
        "mlm_probability": 0.5,
        "mask_value": -1,
        "max_length": max_length,
        "sampling": True,
        "data_style": "both",
        "num_bins": 51,
        "right_binning": False,
        "use_junk_tokens": False,
        "keep_first_n_tokens": keep_first_n_tokens,
        "pad_token_id": vocab["<pad>"],
    }
    (folder / "model_config.yml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (folder / "collator_config.yml").write_text(yaml.safe_dump(collator_cfg, sort_keys=False))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1))

    shapes = tahoe_keys(vocab_size=len(vocab), d_model=d_model, n_layers=n_layers, with_chem=with_chem)
    for key in drop_keys:
        del shapes[key]
    shapes |= dict(reshape or {}) | dict(extra_keys or {})
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.{k}": _random_tensor(k, s, gen).contiguous() for k, s in shapes.items()}
    if fmt == "hf":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "composer":
        payload: dict[str, Any] = {"state": {"model": state, "optimizers": {}}, "rng": [{"torch": 0}]}
        if composer_extras:
            payload["state"]["timestamp"] = _foreign_object()
            try:
                torch.save(payload, folder / "best-model.pt")
            finally:
                for name in _COMPOSER_MODULES:
                    if getattr(sys.modules.get(name), "__file__", None) is None:
                        sys.modules.pop(name, None)
        else:
            torch.save(payload, folder / "best-model.pt")
    else:
        raise ValueError(f"fmt must be 'hf' or 'composer', got {fmt!r}")
    return folder


def make_random_counts(
    n_cells: int, n_genes: int, *, seed: int = 0, density: float = 0.4, scale: float = 3.0
) -> scipy.sparse.csr_matrix:
    """Random sparse integer counts with skewed magnitudes (some cells long, some short)."""
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.1, 1.0, size=(n_cells, 1)) * density * 2
    present = rng.random((n_cells, n_genes)) < np.clip(dens, 0.02, 1.0)
    values = rng.negative_binomial(1, 1.0 / (1.0 + rng.gamma(1.0, scale, size=(n_cells, n_genes)))) + 1
    return scipy.sparse.csr_matrix(np.where(present, values, 0).astype(np.float32))


@pytest.fixture(scope="session")
def tiny_tahoe_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``make(fmt="hf", **kwargs) -> folder`` writing into a fresh temporary folder."""
    counter = iter(range(10**6))

    def make(fmt: str = "hf", **kwargs: Any) -> Path:
        return make_tiny_tahoe(tmp_path_factory.mktemp(f"tahoe{next(counter)}"), fmt, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_tahoe_hf(tiny_tahoe_factory: Callable[..., Path]) -> Path:
    """A tiny random Tahoe-X1 in the HF layout (40 Ensembl genes, d=32, 2 blocks, max_length 64)."""
    return tiny_tahoe_factory("hf")


@pytest.fixture(scope="session")
def tiny_tahoe_composer(tiny_tahoe_factory: Callable[..., Path]) -> Path:
    """The same weights as :func:`tiny_tahoe_hf` as a Composer ``best-model.pt`` with foreign objects."""
    return tiny_tahoe_factory("composer", composer_extras=True)


@pytest.fixture(scope="session")
def write_tiny_tahoe() -> Callable[..., Path]:
    """The function :func:`make_tiny_tahoe` ``(path, fmt="hf"|"composer", **kwargs) -> folder``."""
    return make_tiny_tahoe


@pytest.fixture(scope="session")
def random_counts() -> Callable[..., scipy.sparse.csr_matrix]:
    """The function :func:`make_random_counts` ``(n_cells, n_genes, *, seed, density) -> csr``."""
    return make_random_counts


@pytest.fixture(scope="session")
def tiny_gene_ids() -> Callable[..., list[str]]:
    """The function :func:`make_gene_ids` ``(n_genes, *, kind="ensembl"|"symbol") -> ids``."""
    return make_gene_ids


# ---------------------------------------------------------------------------- sharded ingest (issue 13)
SHARD_KW: dict[str, Any] = {"chunk_cells": 32, "batch_size": 8, "pools": ("cls", "mean")}
"""Ingest parameters of the sharded-ingest tests (their oracle is a plain ingest with these)."""
SHARD_CELLS = 520
"""d_model 512 in float32 gives 256-cell array tiles: ``shard_cells=256`` makes shards [0,256) [256,512) [512,520)."""


@pytest.fixture(scope="session")
def shard_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small .h5ad and a tiny Tahoe-X1 (d 512, one block, 8 tokens: cheap forward passes, 256-cell tiles)."""
    import anndata as ad
    import pandas as pd

    tmp = tmp_path_factory.mktemp("shardworld")
    ckpt = make_tiny_tahoe(tmp / "ckpt", "hf", n_genes=60, d_model=512, n_layers=1, n_heads=4, max_length=8)
    counts = make_random_counts(SHARD_CELLS, 60, seed=4)
    obs = pd.DataFrame({"donor": np.random.default_rng(1).choice(["d1", "d2"], size=SHARD_CELLS)},
                       index=[f"c{i}" for i in range(SHARD_CELLS)])
    data = tmp / "d.h5ad"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=make_gene_ids(60))).write_h5ad(data)
    return {"data": data, "ckpt": ckpt, "tmp": tmp}


class OracleBytes(dict):  # type: ignore[type-arg]
    """Pool -> bytes, with a short repr (hypothesis and pytest print fixture values)."""

    def __repr__(self) -> str:
        return f"<oracle bytes of pools {sorted(self)}>"


@pytest.fixture(scope="session")
def shard_oracle(shard_world: dict[str, Path]) -> dict[str, bytes]:
    """The oracle of the sharded-ingest tests: one plain single-process ingest, every pool's bytes."""
    import sclstore

    with sclstore.open_store(shard_world["tmp"] / "oracle", create=True) as st:
        res = st.ingest(shard_world["data"], "tahoe-x1", str(shard_world["ckpt"]), progress=False, workers=0, **SHARD_KW)
        run = st.run(res.id)
        assert run.status == "complete" and run.n_cells == SHARD_CELLS
        with st.backend.open_reader(res.id) as rd:
            return OracleBytes({p: rd.read(list(range(len(run.layers))), None, p).tobytes() for p in run.pools})
