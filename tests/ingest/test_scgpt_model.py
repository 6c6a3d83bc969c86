"""scGPT adapter: tiny checkpoints in the official layout, against an independent torch reference.

The writer below produces a folder exactly like a released scGPT model (``args.json``,
``vocab.json`` and a flat ``best_model.pt`` with the key names of ``scgpt.model.TransformerModel``,
flash-attention ``Wqkv`` names by default, decoder heads included, ``research/models.md`` §2.5).
The reference is a ``torch.nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (the
official torch path of ``TransformerModel``) loaded with the same weights after the
``Wqkv -> in_proj`` rename, run in float64 with the fast path and nested tensors disabled.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
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
from sclstore.ingest.models import FAMILIES, load_adapter
from sclstore.ingest.models.scgpt import ScGPTAdapter
from sclstore.store.errors import CheckpointError, InvalidInputError

POOLS = ("cls", "mean", "max")
GENES = [f"GENE{i}" for i in range(1, 41)]


# ---------------------------------------------------------------- the official on-disk format
def scgpt_keys(*, vocab_size: int, d: int, d_hid: int, n_layers: int, attn: str = "fa1") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``TransformerModel.state_dict()`` (do_mvc=True, n_cls=1)."""
    qkv = {"fa1": "self_attn.Wqkv.", "compat": "self_attn._impl.Wqkv.", "torch": "self_attn.in_proj_"}[attn]
    out = "self_attn._impl.out_proj." if attn == "compat" else "self_attn.out_proj."
    keys: dict[str, tuple[int, ...]] = {
        "encoder.embedding.weight": (vocab_size, d),
        "encoder.enc_norm.weight": (d,),
        "encoder.enc_norm.bias": (d,),
        "flag_encoder.weight": (2, d),
        "value_encoder.linear1.weight": (d, 1),
        "value_encoder.linear1.bias": (d,),
        "value_encoder.linear2.weight": (d, d),
        "value_encoder.linear2.bias": (d,),
        "value_encoder.norm.weight": (d,),
        "value_encoder.norm.bias": (d,),
    }
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        keys |= {
            p + qkv + "weight": (3 * d, d),
            p + qkv + "bias": (3 * d,),
            p + out + "weight": (d, d),
            p + out + "bias": (d,),
            p + "linear1.weight": (d_hid, d),
            p + "linear1.bias": (d_hid,),
            p + "linear2.weight": (d, d_hid),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    keys |= {
        "decoder.fc.0.weight": (d, d),
        "decoder.fc.0.bias": (d,),
        "decoder.fc.2.weight": (d, d),
        "decoder.fc.2.bias": (d,),
        "decoder.fc.4.weight": (1, d),
        "decoder.fc.4.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d),
        "mvc_decoder.gene2query.bias": (d,),
        "mvc_decoder.W.weight": (d, d),
    }
    return keys


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if "norm" in key and key.endswith(".weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) / fan_in**0.5


def write_tiny_scgpt(
    folder: Path,
    *,
    genes: Iterable[str] = GENES,
    specials_in_vocab: Iterable[str] = ("<pad>", "<cls>", "<eoc>"),
    d: int = 32,
    n_heads: int = 4,
    d_hid: int = 48,
    n_layers: int = 2,
    attn: str = "fa1",
    seed: int = 0,
    drop_keys: Iterable[str] = (),
    reshape: Mapping[str, tuple[int, ...]] | None = None,
    extra_keys: Mapping[str, tuple[int, ...]] | None = None,
    args_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a random tiny scGPT model folder in the released layout.

    ``specials_in_vocab`` are stored in ``vocab.json`` after the genes; the loader appends the
    others (``<pad>``, ``<cls>``, ``<eoc>`` order), so the embedding always has genes + 3 rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {g: i for i, g in enumerate(genes)}
    n_genes = len(vocab)
    for tok in specials_in_vocab:
        vocab[tok] = len(vocab)
    args: dict[str, Any] = {
        "data_source": "/scratch/cellxgene/", "save_dir": "./save/tiny", "load_model": None, "n_hvg": None,
        "valid_size_or_ratio": 0.003, "dist_backend": "nccl", "grad_accu_steps": 1, "input_style": "binned",
        "input_emb_style": "continuous", "n_bins": 51, "max_seq_len": 64, "training_tasks": "both",
        "dist_url": "tcp://127.0.0.1:23456", "mask_ratio": [0.25, 0.5, 0.75], "trunc_by_sample": True,
        "vocab_path": "./vocab.json", "rank": 0, "batch_size": 32, "eval_batch_size": 64, "epochs": 6,
        "lr": 0.0001, "scheduler_interval": 100, "scheduler_factor": 0.99, "warmup_ratio_or_step": 10000.0,
        "no_cls": True, "no_cce": True, "fp16": True, "fast_transformer": True, "nlayers": n_layers,
        "nheads": n_heads, "embsize": d, "d_hid": d_hid, "dropout": 0.2, "n_layers_cls": 3, "log_interval": 9000,
        "save_interval": 27000, "mask_value": -1, "pad_value": -2, "USE_CLS": False, "USE_CCE": False,
        "MVC": True, "USE_GENERATIVE_TRAINING": True, "world_size": 16, "distributed": True, "local_rank": 0,
        "gpu": 0, "pad_token": "<pad>",
    }
    args |= dict(args_overrides or {})
    (folder / "args.json").write_text(json.dumps(args, indent=4))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
    shapes = scgpt_keys(vocab_size=n_genes + 3, d=d, d_hid=d_hid, n_layers=n_layers, attn=attn)
    for key in drop_keys:
        del shapes[key]
    shapes |= dict(reshape or {}) | dict(extra_keys or {})
    gen = torch.Generator().manual_seed(seed)
    torch.save({k: _random(k, s, gen) for k, s in shapes.items()}, folder / "best_model.pt")
    return folder


@pytest.fixture(scope="module")
def scgpt_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    counter = iter(range(10**6))

    def make(**kwargs: Any) -> Path:
        return write_tiny_scgpt(tmp_path_factory.mktemp(f"scgpt{next(counter)}"), **kwargs)

    return make


@pytest.fixture(scope="module")
def tiny_scgpt(scgpt_factory: Callable[..., Path]) -> Path:
    return scgpt_factory()


def counts(n_cells: int, n_genes: int = 40, *, seed: int = 0, density: float = 0.5) -> sp.csr_matrix:
    """Random integer counts with many ties and varied lengths."""
    rng = np.random.default_rng(seed)
    dens = rng.uniform(0.1, 1.0, size=(n_cells, 1)) * density * 2
    present = rng.random((n_cells, n_genes)) < np.clip(dens, 0.05, 1.0)
    values = rng.negative_binomial(1, 0.3, size=(n_cells, n_genes)) + 1
    return sp.csr_matrix(np.where(present, values, 0).astype(np.float32))


# ---------------------------------------------------------------- independent reference
class _no_fastpath:
    def __enter__(self) -> None:
        self.prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch.backends.mha.set_fastpath_enabled(self.prev)


def reference_model(
    folder: Path, dtype: torch.dtype = torch.float64
) -> tuple[dict[str, torch.Tensor], nn.TransformerEncoder]:
    """The official torch path: embeddings from the raw state dict + ``nn.TransformerEncoder``."""
    args = json.loads((folder / "args.json").read_text())
    raw = torch.load(folder / "best_model.pt", weights_only=True)
    sd = {}
    for k, v in raw.items():
        k = re.sub(r"self_attn\.(_impl\.)?Wqkv\.", "self_attn.in_proj_", k)
        k = k.replace("self_attn._impl.out_proj.", "self_attn.out_proj.")
        sd[k] = v.to(dtype)
    d, h, d_hid = args["embsize"], args["nheads"], args["d_hid"]
    layer = nn.TransformerEncoderLayer(d, h, d_hid, args["dropout"], batch_first=True)
    enc = nn.TransformerEncoder(layer, args["nlayers"], enable_nested_tensor=False).to(dtype).eval()
    enc.load_state_dict({k.removeprefix("transformer_encoder."): v for k, v in sd.items()
                         if k.startswith("transformer_encoder.")}, strict=True)
    return sd, enc


def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def reference_layers(sd: dict[str, torch.Tensor], enc: nn.TransformerEncoder, ids: torch.Tensor, values: torch.Tensor,
                     pad: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Hidden states of layers 0..L for ``(B, S)`` inputs (``pad`` True at padding, as upstream)."""
    dtype = sd["encoder.embedding.weight"].dtype
    tok = _ln(sd["encoder.embedding.weight"][ids], sd, "encoder.enc_norm")
    v = values.to(dtype).unsqueeze(-1).clamp(max=512)
    v = F.linear(F.relu(F.linear(v, sd["value_encoder.linear1.weight"], sd["value_encoder.linear1.bias"])),
                 sd["value_encoder.linear2.weight"], sd["value_encoder.linear2.bias"])
    x = tok + _ln(v, sd, "value_encoder.norm")
    seen: list[torch.Tensor] = [x]
    hooks = [blk.register_forward_hook(lambda _m, _a, out: seen.append(out)) for blk in enc.layers]
    try:
        with torch.no_grad(), _no_fastpath():
            final = enc(x, src_key_padding_mask=pad)
    finally:
        for h in hooks:
            h.remove()
    assert not final.is_nested and torch.equal(final, seen[-1])
    return seen


def _pools(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"cls": x[0], "mean": x[1:].mean(0), "max": x[1:].amax(0)}


def _setup(folder: Path, x: sp.csr_matrix, *, seed: int = 0, **kw: Any) -> tuple[ScGPTAdapter, list[TokenRecord]]:
    adapter = load_adapter("scgpt", folder, **kw)
    assert isinstance(adapter, ScGPTAdapter)
    adapter.map_genes(GENES[: x.shape[1]])
    adapter.load(torch.device("cpu"))
    return adapter, adapter.tokenizer.tokenize(x, np.arange(x.shape[0]), seed=seed)


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("attn", ["fa1", "compat", "torch"])
def test_hooked_pools_equal_torch_reference_per_layer(attn: str, scgpt_factory: Callable[..., Path]) -> None:
    folder = scgpt_factory(attn=attn, n_layers=3, seed=7)
    adapter, recs = _setup(folder, counts(6, seed=2), max_genes=24)
    layers = list(range(adapter.n_layers + 1))
    batch = adapter.collate(recs)
    assert len(set(batch.padding_mask.sum(1).tolist())) > 2  # really padded
    out = adapter.embed(batch, layers=layers, pools=POOLS)
    official = adapter.official_embedding(batch)
    sd, enc = reference_model(folder)
    for i, rec in enumerate(recs):  # each cell alone, float64
        ref = reference_layers(sd, enc, torch.from_numpy(rec.gene_ids)[None], torch.from_numpy(rec.values)[None])
        for layer in layers:
            expect = _pools(ref[layer][0])
            for pool in POOLS:
                torch.testing.assert_close(out[pool][layer, i].double(), expect[pool], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(official[i].double(), F.normalize(ref[-1][0, 0], dim=0), atol=1e-5, rtol=1e-5)
    # the official call on the padded batch: src_key_padding_mask = gene_ids.eq(pad_id)
    sd32, enc32 = reference_model(folder, torch.float32)
    ref = reference_layers(sd32, enc32, batch.gene_ids, batch.values, batch.gene_ids.eq(adapter.pad_token_id))
    torch.testing.assert_close(official, F.normalize(ref[-1][:, 0], dim=-1), atol=1e-5, rtol=0)


def test_padded_batch_equals_each_cell_alone(tiny_scgpt: Path) -> None:
    adapter, recs = _setup(tiny_scgpt, counts(9, seed=11))
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


def test_collate_pads_with_pad_token_and_value(tiny_scgpt: Path) -> None:
    adapter = load_adapter("scgpt", tiny_scgpt)
    adapter.map_genes(GENES)
    x = sp.csr_matrix(np.array([[1, 2, 3] + [0] * 37, [4] + [0] * 39], dtype=np.float32))
    batch = adapter.collate(adapter.tokenizer.tokenize(x, np.array([3, 9]), seed=0))
    pad, cls = adapter.vocab["<pad>"], adapter.vocab["<cls>"]
    assert (pad, cls) == (40, 41) and batch.cell_idx.tolist() == [3, 9]
    assert batch.gene_ids.tolist() == [[cls, 0, 1, 2], [cls, 0, pad, pad]]
    assert batch.values[0].tolist() == [-2.0, 1.0, 25.0, 50.0] and batch.values[1, 2:].tolist() == [-2.0, -2.0]
    assert batch.padding_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.gene_mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert batch.positions["cls"].tolist() == [0, 0]


def test_official_embedding_is_l2_normalised_last_cls(tiny_scgpt: Path) -> None:
    adapter, recs = _setup(tiny_scgpt, counts(7, seed=8))
    batch = adapter.collate(recs)
    last = adapter.embed(batch, layers=[adapter.n_layers], pools=["cls"])["cls"][0]
    official = adapter.official_embedding(batch)
    torch.testing.assert_close(adapter.final_transform(last), official, atol=1e-6, rtol=0)
    torch.testing.assert_close(official.norm(dim=1), torch.ones(7), atol=1e-6, rtol=0)
    with pytest.raises(InvalidInputError, match="size 32"):
        adapter.final_transform(torch.zeros(2, 5))


def test_flash_and_torch_names_load_identical_weights(scgpt_factory: Callable[..., Path]) -> None:
    x = counts(4, seed=9)
    outs = []
    for attn in ("fa1", "compat", "torch"):
        adapter, recs = _setup(scgpt_factory(attn=attn, seed=3), x)
        outs.append(adapter.embed(adapter.collate(recs), layers=[0, 2], pools=POOLS))
    for other in outs[1:]:
        for pool in POOLS:
            torch.testing.assert_close(other[pool], outs[0][pool], atol=0, rtol=0)


# ---------------------------------------------------------------- strict loading
def test_missing_encoder_weight_names_the_key(scgpt_factory: Callable[..., Path]) -> None:
    folder = scgpt_factory(drop_keys=["transformer_encoder.layers.1.norm2.bias"])
    adapter = load_adapter("scgpt", folder)  # configs only: fine
    with pytest.raises(CheckpointError, match=r"lacks encoder weight 'transformer_encoder\.layers\.1\.norm2\.bias'"):
        adapter.load("cpu")
    assert not adapter.is_loaded
    qkv = scgpt_factory(drop_keys=["transformer_encoder.layers.0.self_attn.Wqkv.weight"])
    pattern = r"'transformer_encoder\.layers\.0\.self_attn\.in_proj_weight' \(named '.*self_attn\.Wqkv\.weight'"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("scgpt", qkv).load("cpu")


def test_misshapen_and_unexpected_keys_are_named(scgpt_factory: Callable[..., Path]) -> None:
    bad = scgpt_factory(reshape={"transformer_encoder.layers.1.linear1.weight": (40, 32)})
    pattern = r"'transformer_encoder\.layers\.1\.linear1\.weight' has shape \[40, 32\].*\[48, 32\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("scgpt", bad).load("cpu")
    vocab = scgpt_factory(reshape={"encoder.embedding.weight": (50, 32)})
    with pytest.raises(CheckpointError, match=r"'encoder\.embedding\.weight' has shape \[50, 32\] but vocab\.json"):
        load_adapter("scgpt", vocab).load("cpu")
    extra = scgpt_factory(extra_keys={"transformer_encoder.layers.0.self_attn.q_proj.weight": (32, 32)})
    pattern = r"unexpected weights \['transformer_encoder\.layers\.0\.self_attn\.q_proj\.weight'\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("scgpt", extra).load("cpu")
    heads = scgpt_factory(extra_keys={
        "cls_decoder.out_layer.weight": (5, 32),
        "batch_encoder.embedding.weight": (3, 32),
        "dsbn.bns.0.weight": (32,),
        "transformer_encoder.layers.1.self_attn.cross_attn.in_proj_weight": (96, 32),
    })
    adapter = load_adapter("scgpt", heads)
    adapter.load("cpu")
    assert adapter.is_loaded


def test_missing_files_and_other_families_are_named(tiny_scgpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(tiny_scgpt, copy)
    (copy / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing vocab\.json; an scGPT checkpoint needs"):
        load_adapter("scgpt", copy)
    (copy / "best_model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing vocab\.json, best_model\.pt"):
        load_adapter("scgpt", copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter("scgpt", tmp_path / "nowhere")
    tahoe = tmp_path / "70m-model"
    tahoe.mkdir()
    for name in ("model_config.yml", "collator_config.yml", "vocab.json", "model.safetensors"):
        (tahoe / name).write_text("{}")
    with pytest.raises(CheckpointError, match=r"looks like a tahoe-x1 checkpoint.*use --model tahoe-x1") as err:
        load_adapter("scgpt", tahoe)
    assert "\n" not in str(err.value)
    gf = tmp_path / "gf"
    gf.mkdir()
    for name in ("config.json", "pytorch_model.bin", "token_dictionary_gc104M.pkl"):
        (gf / name).write_text("{}")
    with pytest.raises(CheckpointError, match=r"looks like a geneformer checkpoint.*--model geneformer"):
        load_adapter("scgpt", gf)
    sf = tmp_path / "models"
    sf.mkdir()
    (sf / "models.ckpt").write_text("{}")
    with pytest.raises(CheckpointError, match=r"looks like a scfoundation checkpoint.*--model scfoundation"):
        load_adapter("scgpt", sf)
    with pytest.raises(CheckpointError, match=r"is a file; pass --checkpoint DIR.*--model scfoundation"):
        load_adapter("scgpt", sf / "models.ckpt")
    with pytest.raises(InvalidInputError, match="needs --checkpoint"):
        load_adapter("scgpt", None)
    assert load_adapter("scgpt", tiny_scgpt / "best_model.pt").files.folder == tiny_scgpt


def test_vocab_specials_appended_as_upstream(scgpt_factory: Callable[..., Path]) -> None:
    none = load_adapter("scgpt", scgpt_factory(specials_in_vocab=()))
    assert [none.vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [40, 41, 42]
    assert none.describe()["specials_added"] == ["<pad>", "<cls>", "<eoc>"]
    some = load_adapter("scgpt", scgpt_factory(specials_in_vocab=("<cls>",)))
    assert [some.vocab[t] for t in ("<cls>", "<pad>", "<eoc>")] == [40, 41, 42]
    some.load("cpu")  # 43 embedding rows either way


def test_bad_args_and_vocab_fail_clearly(scgpt_factory: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="args.json lacks required key 'nlayers'"):
        load_adapter("scgpt", scgpt_factory(args_overrides={"nlayers": None}))
    with pytest.raises(CheckpointError, match="input_emb_style 'category' is not supported"):
        load_adapter("scgpt", scgpt_factory(args_overrides={"input_emb_style": "category"}))
    with pytest.raises(CheckpointError, match="pad_token '<blank>' is not in vocab.json"):
        load_adapter("scgpt", scgpt_factory(args_overrides={"pad_token": "<blank>"}))
    gappy = scgpt_factory()
    (gappy / "vocab.json").write_text(json.dumps({"A": 0, "B": 2}))
    with pytest.raises(CheckpointError, match="consecutive ids 0..1"):
        load_adapter("scgpt", gappy)


def test_constructing_the_adapter_loads_no_weights(tiny_scgpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def forbidden(*_a: object, **_k: object) -> None:
        calls.append("load")
        raise AssertionError("weights were read")

    monkeypatch.setattr(torch, "load", forbidden)
    adapter = load_adapter("scgpt", tiny_scgpt)
    info = json.loads(json.dumps(adapter.describe()))
    sizes = (info["n_layers"], info["d_model"], info["n_heads"], info["ffn_dim"], info["vocab_size"])
    assert sizes == (2, 32, 4, 48, 43)
    assert info["max_length"] == 1200 and info["gene_id_type"] == "symbol" and info["default_pools"] == list(POOLS)
    assert len(adapter.checkpoint_hash) == 64
    adapter.map_genes(GENES)
    adapter.collate(adapter.tokenizer.tokenize(counts(3), np.arange(3), seed=0))
    assert not adapter.is_loaded and adapter.model is None and calls == []
    with pytest.raises(CheckpointError, match="weights were read"):
        adapter.load("cpu")
    assert calls


# ---------------------------------------------------------------- bad input and the store
def test_ensembl_ids_for_a_symbol_model(tiny_scgpt: Path) -> None:
    adapter = load_adapter("scgpt", tiny_scgpt)
    ens = [f"ENSG{i:011d}" for i in range(1, 41)]
    with pytest.raises(InvalidInputError, match=r"look like Ensembl ids.*scgpt.*gene symbols.*--gene-column") as err:
        adapter.map_genes(ens)
    assert "\n" not in str(err.value)
    mapping = adapter.map_genes(GENES[::2] + ["NOTAGENE"] * 5)
    assert mapping.n_matched == 20 and mapping.token_ids[:3].tolist() == [0, 2, 4]


def _h5ad(path: Path, x: sp.csr_matrix, genes: list[str]) -> Path:
    obs = pd.DataFrame({"group": pd.Categorical(np.arange(x.shape[0]) % 3)}, index=[f"c{i}" for i in range(x.shape[0])])
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def test_ingest_end_to_end_reproduces_the_official_embedding(tiny_scgpt: Path, tmp_path: Path) -> None:
    assert "scgpt" in FAMILIES
    x = counts(40, seed=5)
    data = _h5ad(tmp_path / "d.h5ad", x, GENES)
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(data, "scgpt", str(tiny_scgpt), progress=False, workers=0, batch_size=8)
        run = st.run(res.id)
        assert run.layers == (0, 1, 2) and run.pools == POOLS
        with st.backend.open_reader(res.id) as rd:
            stored = {p: rd.read([0, 1, 2], None, p) for p in POOLS}
        src_idx = st.backend.read_obs(run.dataset_id)["src_idx"].to_numpy()
    assert all(np.isfinite(v).all() for v in stored.values())
    adapter = load_adapter("scgpt", tiny_scgpt)
    adapter.map_genes(GENES)
    adapter.load("cpu")
    for cell in range(40):
        row = int(src_idx[cell])
        rec = adapter.tokenizer.tokenize(x[row : row + 1], np.array([cell]), seed=0)
        official = adapter.official_embedding(adapter.collate(rec))[0]
        from_store = adapter.final_transform(torch.from_numpy(stored["cls"][-1, cell : cell + 1]))[0]
        np.testing.assert_allclose(from_store.numpy(), official.numpy(), atol=1e-5)


def test_bad_input_writes_nothing_to_the_store(tiny_scgpt: Path, tmp_path: Path) -> None:
    data = _h5ad(tmp_path / "e.h5ad", counts(5), [f"ENSG{i:011d}" for i in range(1, 41)])
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        with pytest.raises(InvalidInputError, match="look like Ensembl ids"):
            st.ingest(data, "scgpt", str(tiny_scgpt), progress=False, workers=0)
        with pytest.raises(CheckpointError, match="missing args.json"):
            st.ingest(data, "scgpt", str(tmp_path), progress=False, workers=0)
        assert st.datasets() == [] and st.models() == [] and st.runs() == []
