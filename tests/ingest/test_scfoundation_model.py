"""scFoundation adapter: tiny checkpoints in the official layout, against an independent reference.

The writer produces ``models.ckpt`` exactly as released (``research/models.md`` §3.5): a
``torch.save`` dict of sub-models ``gene``/``cell``/``rde``, each ``{"config": {"model":
"mae_autobin", "model_config": {"mae_autobin": ...}, "dataset_config": {"rnaseq": ...}},
"state_dict": {"model.<key>": tensor}}`` with the key names of the official ``MaeAutobin``
(performer decoder, ``decoder_embed``, ``norm``, ``to_final`` included), plus an
``OS_scRNA_gene_index.<n>.tsv`` gene list. The reference recomputes one unpadded cell in float64:
the soft-binning embedding written out by hand from the raw tensors, then a stack of
``torch.nn.TransformerEncoderLayer`` (the official encoder's own layer class, fast path disabled)
loaded from the same file, then the official pooling of ``get_embedding.py``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

import sclstore
from sclstore.ingest.adapter import TokenRecord
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.scfoundation import OFFICIAL_POOLS, ScFoundationAdapter, scfoundation_factory
from sclstore.ingest.source import CountsSource

GENES = [f"GENE{i}" for i in range(1, 41)]
POOLS = list(OFFICIAL_POOLS)


# ---------------------------------------------------------------- the official on-disk format
def mae_autobin_keys(
    *, n_genes: int, d: int, depth: int, bin_num: int = 100, dec: int = 16
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official ``MaeAutobin`` state dict (without ``model.``)."""
    keys: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (bin_num, 1),
        "token_emb.mlp.bias": (bin_num,),
        "token_emb.mlp2.weight": (bin_num, bin_num),
        "token_emb.mlp2.bias": (bin_num,),
        "token_emb.emb.weight": (bin_num, d),
        "token_emb.emb_mask.weight": (1, d),
        "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (n_genes + 3, d),
    }
    for i in range(depth):
        p = f"encoder.transformer_encoder.{i}."
        keys |= {
            p + "self_attn.in_proj_weight": (3 * d, d),
            p + "self_attn.in_proj_bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (4 * d, d),
            p + "linear1.bias": (4 * d,),
            p + "linear2.weight": (d, 4 * d),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    keys |= {
        "encoder.norm.weight": (d,),
        "encoder.norm.bias": (d,),
        "decoder.performer.net.layers.0.0.fn.to_q.weight": (dec, dec),
        "decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix": (8, 8),
        "decoder.performer.net.layers.0.1.fn.fn.w1.weight": (4 * dec, dec),
        "decoder.norm.weight": (dec,),
        "decoder_embed.weight": (dec, d),
        "decoder_embed.bias": (dec,),
        "norm.weight": (dec,),
        "norm.bias": (dec,),
        "to_final.weight": (1, dec),
        "to_final.bias": (1,),
    }
    return keys


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if "norm" in key and key.endswith("weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if key == "token_emb.mlp.weight":
        return torch.randn(shape, generator=gen)  # values reach ~10: keep the soft binning sharp but varied
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) / fan_in**0.5


def write_tiny_scfoundation(
    folder: Path,
    *,
    genes: Iterable[str] | None = GENES,
    n_genes: int | None = None,
    d: int = 32,
    depth: int = 2,
    heads: int = 4,
    seed: int = 0,
    sub_models: Iterable[str] = ("gene", "cell", "rde"),
    drop_keys: Iterable[str] = (),
    reshape: Mapping[str, tuple[int, ...]] | None = None,
    extra_keys: Mapping[str, tuple[int, ...]] | None = None,
    encoder_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``models.ckpt`` (+ gene-list TSV unless ``genes`` is None) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    gene_list = list(genes) if genes is not None else None
    g = len(gene_list) if gene_list is not None else int(n_genes)  # type: ignore[arg-type]
    if gene_list is not None:
        rows = "".join(f"{name}\t{i}\n" for i, name in enumerate(gene_list))
        (folder / f"OS_scRNA_gene_index.{g}.tsv").write_text("gene_name\tindex\n" + rows)
    payload = {}
    for k, name in enumerate(sub_models):
        encoder = {"hidden_dim": d, "depth": depth, "heads": heads, "dim_head": d // heads}
        encoder |= {"module_type": "transformer"} | dict(encoder_overrides or {})
        config = {
            "model": "mae_autobin",
            "model_config": {
                "mae_autobin": {
                    "model": "mae_autobin",
                    "encoder": encoder,
                    "decoder": {"hidden_dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "module_type": "performer"},
                    "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 100, "bin_alpha": 1.0,
                    "seq_len": g + 2, "mae_encoder_max_seq_len": 15000,
                }
            },
            "dataset_config": {"rnaseq": {}},
        }
        shapes = mae_autobin_keys(n_genes=g, d=d, depth=depth)
        for key in drop_keys:
            del shapes[key]
        shapes |= dict(reshape or {}) | dict(extra_keys or {})
        gen = torch.Generator().manual_seed(seed * 10 + k)
        state = {f"model.{key}": _random(key, shape, gen) for key, shape in shapes.items()}
        state["model.decoder.performer.calls_since_last_redraw"] = torch.tensor(0)
        payload[name] = {"config": config, "state_dict": state}
    torch.save(payload, folder / "models.ckpt")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_scfoundation(tmp_path_factory.mktemp("sf") / "models", seed=3)


def random_counts(n_cells: int, n_genes: int, *, seed: int = 0, density: float = 0.5) -> sp.csr_matrix:
    """Integer counts with varied depth per cell (so the batches are really padded)."""
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.1, 1.0, size=(n_cells, 1)) * density * 2
    present = rng.random((n_cells, n_genes)) < np.clip(dens, 0.05, 1.0)
    values = rng.negative_binomial(1, 0.2, size=(n_cells, n_genes)) + 1
    return sp.csr_matrix(np.where(present, values, 0).astype(np.float32))


def dataset_genes() -> list[str]:
    """30 known genes in another order than the gene list, plus 5 unknown ones."""
    rng = np.random.default_rng(1)
    known = [GENES[i] for i in rng.permutation(40)[:30]]
    return known[:12] + [f"NOTAGENE{i}" for i in range(5)] + known[12:]


def _setup(
    folder: Path, counts: sp.csr_matrix, genes: list[str], **kw: Any
) -> tuple[ScFoundationAdapter, list[TokenRecord]]:
    adapter = ScFoundationAdapter(folder, **kw)
    mapping = adapter.map_genes(genes)
    adapter.load(torch.device("cpu"))
    return adapter, adapter.tokenizer.tokenize(counts[:, mapping.var_index], np.arange(counts.shape[0]), seed=0)


# ---------------------------------------------------------------- independent reference
@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@torch.no_grad()
def reference_forward(folder: Path, sub_model: str, rec: TokenRecord) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Float64 layers 0..L (``(S, d)``, layer L after ``encoder.norm``) and the official embedding."""
    sub = torch.load(folder / "models.ckpt", weights_only=True)[sub_model]
    cfg = sub["config"]["model_config"]["mae_autobin"]
    sd = {k.removeprefix("model."): v.double() for k, v in sub["state_dict"].items()}
    d, heads, depth = cfg["encoder"]["hidden_dim"], cfg["encoder"]["heads"], cfg["encoder"]["depth"]
    v = torch.from_numpy(rec.values).double().unsqueeze(-1)
    h = F.leaky_relu(v @ sd["token_emb.mlp.weight"].T + sd["token_emb.mlp.bias"], 0.1)
    h = cfg["bin_alpha"] * h + (h @ sd["token_emb.mlp2.weight"].T + sd["token_emb.mlp2.bias"])
    x = torch.softmax(h, dim=-1) @ sd["token_emb.emb.weight"]
    x[v[:, 0] == cfg["mask_token_id"]] = sd["token_emb.emb_mask.weight"][0]
    x[v[:, 0] == cfg["pad_token_id"]] = sd["token_emb.emb_pad.weight"][0]
    x = x + sd["pos_emb.weight"][torch.from_numpy(rec.gene_ids)]
    layers = [x]
    with no_fastpath():
        for i in range(depth):
            layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, batch_first=True, dtype=torch.float64)
            prefix = f"encoder.transformer_encoder.{i}."
            layer.load_state_dict({k[len(prefix) :]: t for k, t in sd.items() if k.startswith(prefix)}, strict=True)
            x = layer.eval()(x.unsqueeze(0)).squeeze(0)
            layers.append(x)
    layers[-1] = F.layer_norm(x, (d,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], 1e-5)
    e = layers[-1]
    official = torch.cat([e[-1], e[-2], e[:-2].amax(0), e[:-2].mean(0)])
    return layers, official


def _pools(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"S": x[-1], "T": x[-2], "max": x[:-2].amax(0), "mean": x[:-2].mean(0)}


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize(("sub_model", "tgthighres"), [("cell", "t4"), ("rde", "a5"), ("gene", "f1")])
def test_hooked_pools_equal_reference_forward(tiny: Path, sub_model: str, tgthighres: str) -> None:
    counts = random_counts(7, 35, seed=2)
    adapter, recs = _setup(tiny, counts, dataset_genes(), sub_model=sub_model, tgthighres=tgthighres)
    layers = list(range(adapter.n_layers + 1))
    batch = adapter.collate(recs)
    assert len(set(batch.padding_mask.sum(1).tolist())) > 2  # really padded
    out = adapter.embed(batch, layers=layers, pools=POOLS)
    official = adapter.official_embedding(batch)
    for i, rec in enumerate(recs):
        ref_layers, ref_official = reference_forward(tiny, sub_model, rec)
        for layer in layers:
            ref = _pools(ref_layers[layer])
            for pool in POOLS:
                torch.testing.assert_close(out[pool][layer, i].double(), ref[pool], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(official[i].double(), ref_official, atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_each_cell_alone(tiny: Path) -> None:
    adapter, recs = _setup(tiny, random_counts(9, 35, seed=11), dataset_genes())
    layers = list(range(adapter.n_layers + 1))
    out = adapter.embed(adapter.collate(recs), layers=layers, pools=POOLS)
    for pool in POOLS:
        assert out[pool].shape == (3, 9, 32) and out[pool].dtype == torch.float32
    for i, rec in enumerate(recs):
        alone = adapter.embed(adapter.collate([rec]), layers=layers, pools=POOLS)
        for pool in POOLS:
            torch.testing.assert_close(out[pool][:, i], alone[pool][:, 0], atol=1e-5, rtol=0)
    order = [8, 3, 0, 5]
    other = adapter.embed(adapter.collate([recs[j] for j in order]), layers=layers, pools=POOLS)
    for pool in POOLS:
        torch.testing.assert_close(other[pool], out[pool][:, order], atol=1e-5, rtol=0)


def test_layer_subsets_and_hooks_removed(tiny: Path) -> None:
    adapter, recs = _setup(tiny, random_counts(4, 35, seed=5), dataset_genes())
    batch = adapter.collate(recs)
    full = adapter.embed(batch, layers=[0, 1, 2], pools=POOLS)
    part = adapter.embed(batch, layers=[1, 0], pools=["mean"])  # stops after block 1
    assert list(part) == ["mean"]
    torch.testing.assert_close(part["mean"], full["mean"][[1, 0]], atol=0, rtol=0)
    for stage in adapter.blocks():
        assert not stage._forward_hooks and not stage._forward_pre_hooks


def test_official_embedding_is_final_transform_of_stored_last_layer(tiny: Path) -> None:
    adapter, recs = _setup(tiny, random_counts(6, 35, seed=8), dataset_genes())
    batch = adapter.collate(recs)
    last = adapter.embed(batch, layers=[adapter.n_layers], pools=POOLS)
    official = adapter.official_embedding(batch)
    assert official.shape == (6, 4 * 32)
    from_dict = adapter.final_transform({p: last[p][0] for p in POOLS})
    from_stack = adapter.final_transform(torch.stack([last[p][0] for p in OFFICIAL_POOLS]))
    torch.testing.assert_close(from_dict, official, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_stack, official, atol=1e-6, rtol=0)
    with pytest.raises(sclstore.SclstoreError, match=r"needs the four last-layer pools"):
        adapter.final_transform(last["S"][0])
    with pytest.raises(sclstore.SclstoreError, match=r"missing \['max'\]"):
        adapter.final_transform({p: last[p][0] for p in ("S", "T", "mean")})


def test_cells_without_counts_and_with_one_count(tiny: Path) -> None:
    counts = sp.csr_matrix(np.vstack([np.zeros(35), np.eye(35)[3], np.arange(35) % 4]).astype(np.float32))
    adapter, recs = _setup(tiny, counts, dataset_genes(), tgthighres="f1")
    assert [len(r) for r in recs[:2]] == [0, 1]  # f1: T = S = log10(total), dropped when total <= 1
    batch = adapter.collate(recs)
    out = adapter.embed(batch, layers=[0, 1, 2], pools=POOLS)
    official = adapter.official_embedding(batch)
    assert all(torch.isfinite(t).all() for t in out.values()) and torch.isfinite(official).all()
    assert all(torch.all(out[p][:, 0] == 0) for p in POOLS) and torch.all(official[0] == 0)
    # one count: [gene] only; as upstream the last two tokens are read as T/S and no gene is pooled
    assert torch.all(out["mean"][:, 1] == 0) and out["S"][:, 1].abs().sum() > 0
    alone = adapter.embed(adapter.collate(recs[2:]), layers=[0, 1, 2], pools=POOLS)
    torch.testing.assert_close(out["mean"][:, 2], alone["mean"][:, 0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- end to end
def test_ingest_end_to_end_reproduces_official_embedding(tmp_path: Path, tiny: Path) -> None:
    genes = dataset_genes()
    counts = random_counts(60, len(genes), seed=4)
    obs = pd.DataFrame({"donor": np.repeat(["d1", "d2"], 30)}, index=[f"c{i}" for i in range(60)])
    path = tmp_path / "data.h5ad"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    with sclstore.open_store(tmp_path / "store", create=True) as store:
        res = store.ingest(path, "scfoundation", str(tiny), progress=False, workers=0, batch_size=8, chunk_cells=32)
        run = store.run(res.id)
        assert res.layers == (0, 1, 2) and tuple(run.pools) == OFFICIAL_POOLS
        with store.backend.open_reader(res.id) as reader:
            stored = {p: reader.read(list(range(len(run.layers))), None, p) for p in POOLS}
        obs_store = store.backend.read_obs(run.dataset_id)
        again = store.ingest(path, "scfoundation", str(tiny), progress=False, workers=0, chunk_cells=32)
        assert again.cache_hit and again.id == res.id
    adapter = load_adapter("scfoundation", tiny)
    with CountsSource(path) as src:
        mapping = adapter.map_genes(src.gene_ids)
        x = src.rows(0, src.n_obs)[:, mapping.var_index].tocsr()
    adapter.load(torch.device("cpu"))
    src_idx = obs_store["src_idx"].to_numpy()
    cells = list(range(0, 60, 5))
    recs = [adapter.tokenizer.tokenize(x[src_idx[c] : src_idx[c] + 1], np.array([c]), seed=0)[0] for c in cells]
    official = adapter.official_embedding(adapter.collate(recs))
    from_store = adapter.final_transform({p: torch.from_numpy(stored[p][-1, cells]) for p in POOLS})
    torch.testing.assert_close(from_store, official, atol=1e-5, rtol=0)
    alone = adapter.embed(adapter.collate(recs[:1]), layers=[0, 1, 2], pools=POOLS)
    for p in POOLS:
        np.testing.assert_allclose(stored[p][:, cells[0]], alone[p][:, 0].numpy(), atol=1e-5)


# ---------------------------------------------------------------- loading: strict, lazy, clear errors
def test_missing_misshapen_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    key = "encoder.transformer_encoder.1.norm2.bias"
    folder = write_tiny_scfoundation(tmp_path / "a", drop_keys=[key])
    adapter = ScFoundationAdapter(folder)  # configs only: fine
    with pytest.raises(sclstore.CheckpointError, match=rf"lacks encoder weight '{key}' of shape \[32\]"):
        adapter.load("cpu")
    assert not adapter.is_loaded
    folder = write_tiny_scfoundation(tmp_path / "b", reshape={"encoder.transformer_encoder.0.linear1.weight": (64, 32)})
    pattern = r"'encoder\.transformer_encoder\.0\.linear1\.weight' has shape \[64, 32\].*implies \[128, 32\]"
    with pytest.raises(sclstore.CheckpointError, match=pattern):
        ScFoundationAdapter(folder).load("cpu")
    folder = write_tiny_scfoundation(tmp_path / "c", extra_keys={"cls_head.weight": (3, 32)})
    with pytest.raises(sclstore.CheckpointError, match=r"unexpected weights \['cls_head\.weight'\]"):
        ScFoundationAdapter(folder).load("cpu")


def test_missing_files_and_other_families_are_named(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(sclstore.CheckpointError, match="does not exist"):
        ScFoundationAdapter(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(sclstore.CheckpointError, match=r"is missing models\.ckpt; pass the folder"):
        ScFoundationAdapter(empty)
    looks = {"tahoe-x1": ["model_config.yml", "collator_config.yml", "vocab.json", "model.safetensors"],
             "scgpt": ["args.json", "vocab.json", "best_model.pt"],
             "geneformer": ["config.json", "model.safetensors", "token_dictionary_gc104M.pkl"]}
    for family, names in looks.items():
        folder = tmp_path / family
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")
        pattern = rf"looks like a {family} checkpoint: use --model {family}"
        with pytest.raises(sclstore.CheckpointError, match=pattern) as err:
            load_adapter("scfoundation", folder)
        assert "\n" not in str(err.value)
    with pytest.raises(sclstore.CheckpointError, match="looks like a scgpt checkpoint"):
        ScFoundationAdapter(tmp_path / "scgpt" / "best_model.pt")
    # a torch file that is not a dict of sub-models
    other = tmp_path / "flat"
    other.mkdir()
    torch.save({"encoder.weight": torch.zeros(2)}, other / "models.ckpt")
    with pytest.raises(sclstore.CheckpointError, match=r"not an scFoundation checkpoint"):
        ScFoundationAdapter(other)


def test_sub_model_and_option_errors(tiny: Path, tmp_path: Path) -> None:
    pattern = r"sub-model 'celll' is not in models\.ckpt; available: cell, gene, rde"
    with pytest.raises(sclstore.InvalidInputError, match=pattern):
        ScFoundationAdapter(tiny, sub_model="celll")
    with pytest.raises(sclstore.InvalidInputError, match=r"tgthighres 'x4' is not valid"):
        ScFoundationAdapter(tiny, tgthighres="x4")
    with pytest.raises(sclstore.InvalidInputError, match=r"unknown scFoundation checkpoint option\(s\) \['sub'\]"):
        load_adapter("scfoundation", f"{tiny}#sub=rde")
    with pytest.raises(sclstore.InvalidInputError, match="needs --checkpoint"):
        load_adapter("scfoundation", None)
    with pytest.raises(sclstore.InvalidInputError, match="drop --max-genes"):
        scfoundation_factory(tiny, 512)
    rde = load_adapter("scfoundation", f"{tiny}#sub_model=rde,tgthighres=a5")
    assert isinstance(rde, ScFoundationAdapter) and (rde.sub_model, str(rde.resolution)) == ("rde", "a5")
    assert rde.name == "models-rde-a5" and rde.describe()["available_sub_models"] == ["cell", "gene", "rde"]
    # the same options through --model-option (IngestConfig.model_options): the same model and cache identity
    via_options = load_adapter("scfoundation", tiny, options={"sub_model": "rde", "tgthighres": "a5"})
    assert (via_options.name, via_options.checkpoint_hash) == (rde.name, rde.checkpoint_hash)
    mixed = load_adapter("scfoundation", f"{tiny}#sub_model=rde", options={"tgthighres": "a5"})
    assert mixed.checkpoint_hash == rde.checkpoint_hash != load_adapter("scfoundation", tiny).checkpoint_hash
    with pytest.raises(sclstore.InvalidInputError, match=r"differ between the checkpoint path .* and --model-option"):
        load_adapter("scfoundation", f"{tiny}#sub_model=rde", options={"sub_model": "gene"})
    with pytest.raises(sclstore.InvalidInputError, match=r"unknown scFoundation model option\(s\) \['depth'\]"):
        load_adapter("scfoundation", tiny, options={"depth": "3"})
    with pytest.raises(sclstore.InvalidInputError, match="option sub_model=rde is not one of 'tahoe-x1'"):
        load_adapter("tahoe-x1", tiny, options={"sub_model": "rde"})
    perf = write_tiny_scfoundation(tmp_path / "p", encoder_overrides={"module_type": "performer"})
    with pytest.raises(sclstore.CheckpointError, match=r"encoder module_type 'performer' is not supported"):
        ScFoundationAdapter(perf)
    short = write_tiny_scfoundation(tmp_path / "g", genes=None, n_genes=40)  # no TSV: packaged 19,264 genes
    pattern = r"seq_len 42 means 40 genes but the packaged genes\.txt has 19264"
    with pytest.raises(sclstore.CheckpointError, match=pattern):
        ScFoundationAdapter(short)


def test_construction_reads_no_tensor_data(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sclstore.ingest.models.scfoundation.adapter as sf

    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(sf, "read_state_dict", forbidden)
    adapter = load_adapter("scfoundation", tiny)
    assert [c.get("mmap") for c in calls] == [True]  # memory-mapped: tensor data stay on disk
    info = adapter.describe()
    assert (info["n_layers"], info["d_model"], info["n_heads"], info["seq_len"]) == (2, 32, 4, 42)
    assert len(adapter.checkpoint_hash) == 64 and adapter.default_pools == OFFICIAL_POOLS
    mapping = adapter.map_genes(dataset_genes())
    adapter.collate(adapter.tokenizer.tokenize(random_counts(3, 35)[:, mapping.var_index], np.arange(3), seed=0))
    assert adapter.model is None and not adapter.is_loaded
    with pytest.raises(AssertionError, match="weights were read"):
        adapter.load("cpu")


def test_checkpoint_pickling_other_objects_is_still_memory_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_scfoundation(tmp_path / "models")
    payload = torch.load(folder / "models.ckpt", weights_only=True)
    payload["cell"]["config"]["args"] = argparse.Namespace(lr=1e-4)  # not allowed by weights_only=True
    torch.save(payload, folder / "models.ckpt")
    calls: list[tuple[object, object]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("mmap"), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adapter = ScFoundationAdapter(folder)
    assert calls == [(True, True)]  # never weights_only=False
    adapter.load("cpu")
    assert adapter.is_loaded


def test_checkpoint_hash_covers_weights_gene_list_and_options(tmp_path: Path) -> None:
    a = write_tiny_scfoundation(tmp_path / "a", seed=1)
    b = write_tiny_scfoundation(tmp_path / "b", seed=1)
    h = ScFoundationAdapter(a).checkpoint_hash
    assert ScFoundationAdapter(b).checkpoint_hash == h
    assert ScFoundationAdapter(a, sub_model="rde").checkpoint_hash != h
    assert ScFoundationAdapter(a, tgthighres="f1").checkpoint_hash != h
    tsv = next(b.glob("*.tsv"))
    tsv.write_text(tsv.read_text().replace("GENE1\t", "GENEX\t"))
    assert ScFoundationAdapter(b).checkpoint_hash != h


def test_gene_id_type_and_duplicate_symbols(tiny: Path) -> None:
    adapter = ScFoundationAdapter(tiny)
    with pytest.raises(sclstore.InvalidInputError, match=r"look like Ensembl ids.*--gene-column gene_symbols") as err:
        adapter.map_genes([f"ENSG{i:011d}" for i in range(1, 41)])
    assert "\n" not in str(err.value)
    mapping = adapter.map_genes(["GENE3", "GENE1", "GENE3", "GENE2"] * 3)
    assert mapping.n_matched == 12
    counts = sp.csr_matrix(np.array([[1, 2, 4, 0] * 3], dtype=np.float32))
    (rec,) = adapter.tokenizer.tokenize(counts[:, mapping.var_index], np.array([0]), seed=0)
    summed = sp.csr_matrix(np.array([[6, 0, 15]], dtype=np.float32))  # GENE1 = 6, GENE3 = 15 (summed)
    adapter.map_genes(["GENE1", "GENE2", "GENE3"])
    (ref,) = adapter.tokenizer.tokenize(summed, np.array([0]), seed=0)
    np.testing.assert_array_equal(rec.gene_ids, ref.gene_ids)
    np.testing.assert_array_equal(rec.values, ref.values)


def test_packaged_gene_list_drives_positions_of_real_symbols(tmp_path: Path) -> None:
    folder = write_tiny_scfoundation(tmp_path / "models", genes=None, n_genes=19264, depth=1, sub_models=("cell",))
    adapter = ScFoundationAdapter(folder)
    assert adapter.describe()["gene_list"] == "packaged genes.txt" and adapter.n_layers == 1
    symbols = ["LYZ", "CD3E", "MS4A1", "NKG7", "GNLY", "CD14", "FCGR3A", "PPBP", "CD8A", "IL7R", "S100A8", "HBB"]
    mapping = adapter.map_genes([*symbols, "NOT-A-GENE"])
    assert mapping.n_matched == 12
    counts = sp.csr_matrix(np.arange(1, 14, dtype=np.float32)[None, :])
    (rec,) = adapter.tokenizer.tokenize(counts[:, mapping.var_index], np.array([0]), seed=0)
    expected = sorted(adapter.vocab[s] for s in symbols)
    assert rec.gene_ids.tolist() == [*expected, 19264, 19265]
    adapter.load("cpu")
    out = adapter.embed(adapter.collate([rec]), layers=[0, 1], pools=POOLS)
    official = adapter.official_embedding(adapter.collate([rec]))
    torch.testing.assert_close(adapter.final_transform({p: out[p][1] for p in POOLS}), official, atol=1e-6, rtol=0)
