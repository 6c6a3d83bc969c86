"""Geneformer adapter: checkpoints, strict loading and per-layer pools against transformers' BertModel."""

from __future__ import annotations

import functools
import json
import pickle
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
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

import sclstore
import sclstore.ingest.models.geneformer.adapter as geneformer
import sclstore.ingest.models.geneformer.checkpoint as gf_checkpoint
from sclstore.ingest.adapter import TokenRecord
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.geneformer import GeneformerAdapter
from sclstore.ingest.source import CountsSource
from sclstore.store.errors import CheckpointError, InvalidInputError

Counts = Callable[..., sp.csr_matrix]
N_GENES = 40


def ens(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def make_tiny_geneformer(
    folder: Path,
    *,
    version: str = "V2",
    arch: str = "mlm",
    fmt: str = "safetensors",
    n_layers: int = 3,
    act: str = "relu",
    max_pos: int = 64,
    seed: int = 0,
    drop_keys: Iterable[str] = (),
    reshape: Mapping[str, tuple[int, ...]] | None = None,
    extra_keys: Mapping[str, tuple[int, ...]] | None = None,
) -> Path:
    """Write a random tiny Geneformer release folder: HF model files + token/median pickles.

    ``arch`` ``"mlm"`` saves a ``BertForMaskedLM`` (``bert.``-prefixed keys + ``cls.predictions.*``),
    ``"base"`` a ``BertModel`` (no prefix, with pooler). V1 dictionaries have ``<pad>``/``<mask>``
    only, V2 ones also ``<cls>``/``<eos>`` (ids as in the official pickles: specials first).
    Corruptions (names as saved, prefix included) are applied to the written safetensors.
    """
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
    tokens = {t: i for i, t in enumerate(specials)} | {g: len(specials) + i for i, g in enumerate(ens(N_GENES))}
    rng = np.random.default_rng(seed)
    medians = {g: float(m) for g, m in zip(ens(N_GENES), rng.uniform(0.3, 3.0, size=N_GENES), strict=False)}
    cfg = BertConfig(
        vocab_size=len(tokens), hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
        intermediate_size=64, hidden_act=act, max_position_embeddings=max_pos, pad_token_id=0,
        type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
    )
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(cfg)
    with torch.no_grad():  # make LayerNorms and biases non-trivial
        for name, p in mlm.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model: BertModel | BertForMaskedLM = mlm
    if arch == "base":  # the same encoder weights, saved as a BertModel (+ a random pooler)
        model = BertModel(cfg)
        missing, unexpected = model.load_state_dict(mlm.bert.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("pooler.") for k in missing)
    model.save_pretrained(folder)
    if fmt == "bin":  # the 2021-era layout: torch.save of the full state dict, tied decoder and buffers included
        state = dict(model.state_dict()) | {"bert.embeddings.position_ids": torch.arange(max_pos).unsqueeze(0)}
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if drop_keys or reshape or extra_keys:
        path = folder / "model.safetensors"
        state = load_file(str(path))
        for k in drop_keys:
            del state[k]
        for k, shape in {**(reshape or {}), **(extra_keys or {})}.items():
            state[k] = torch.randn(shape)
        save_file(state, str(path), metadata={"format": "pt"})
    tag = "gc104M" if version == "V2" else "gc30M"
    (folder / f"token_dictionary_{tag}.pkl").write_bytes(pickle.dumps(tokens))
    (folder / f"gene_median_dictionary_{tag}.pkl").write_bytes(pickle.dumps(medians))
    return folder


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    counter = iter(range(10**6))

    def make(**kwargs: Any) -> Path:
        return make_tiny_geneformer(tmp_path_factory.mktemp(f"gf{next(counter)}"), **kwargs)

    return make


@pytest.fixture(scope="module")
def v2(factory: Callable[..., Path]) -> Path:
    return factory(version="V2")


@pytest.fixture(scope="module")
def v1(factory: Callable[..., Path]) -> Path:
    return factory(version="V1")


def _setup(folder: Path, counts: sp.csr_matrix, **kw: Any) -> tuple[GeneformerAdapter, list[TokenRecord]]:
    adapter = load_adapter("geneformer", folder, **kw)
    assert isinstance(adapter, GeneformerAdapter)
    adapter.map_genes(ens(counts.shape[1]))
    adapter.load(torch.device("cpu"))
    tok = adapter.tokenizer
    return adapter, tok.tokenize(counts, np.arange(counts.shape[0]), seed=0, totals=tok.cell_totals(counts))


@functools.cache
def _reference_model(folder: Path) -> BertModel:
    return BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).eval()


def _reference_hidden_states(folder: Path, rec: TokenRecord) -> tuple[torch.Tensor, ...]:
    """transformers' own BertModel (eager attention) on one unpadded cell: hidden_states[0..L]."""
    ref = _reference_model(folder)
    with torch.no_grad():
        ids = torch.from_numpy(rec.gene_ids).unsqueeze(0)
        out = ref(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def _ref_pools(x: torch.Tensor, version: str) -> dict[str, torch.Tensor]:
    if version == "V2":
        genes = x[1:-1]
        return {"cls": x[0], "mean": genes.mean(0), "max": genes.amax(0)}
    return {"mean": x.mean(0), "max": x.amax(0)}


# ---------------------------------------------------------------- equivalence with transformers
@pytest.mark.parametrize(("version", "act"), [("V2", "relu"), ("V1", "gelu")])
def test_every_layer_and_pool_equals_transformers_bert(
    version: str, act: str, factory: Callable[..., Path], random_counts: Counts
) -> None:
    folder = factory(version=version, act=act, seed=3)
    adapter, recs = _setup(folder, random_counts(6, N_GENES, seed=2))
    pools = adapter.supported_pools
    layers = list(range(adapter.n_layers + 1))
    batch = adapter.collate(recs)
    assert len(set(batch.padding_mask.sum(1).tolist())) > 2  # really padded
    out = adapter.embed(batch, layers=layers, pools=pools)
    official = adapter.official_embedding(batch)
    for i, rec in enumerate(recs):
        hidden = _reference_hidden_states(folder, rec)
        assert len(hidden) == adapter.n_layers + 1
        for layer in layers:  # stored layer l == hidden_states[l]
            ref = _ref_pools(hidden[layer], version)
            for pool in pools:
                torch.testing.assert_close(out[pool][layer, i], ref[pool], atol=1e-5, rtol=1e-5)
        # official embedding: hidden_states[L-1] (emb_layer=-1), cls (V2) / mean over genes (V1)
        want = _ref_pools(hidden[adapter.n_layers - 1], version)[adapter.official_pool]
        torch.testing.assert_close(official[i], want, atol=1e-5, rtol=1e-5)


def test_official_embedding_is_the_stored_second_to_last_layer(v1: Path, v2: Path, random_counts: Counts) -> None:
    for folder, pool in ((v2, "cls"), (v1, "mean")):
        adapter, recs = _setup(folder, random_counts(5, N_GENES, seed=8))
        assert (adapter.official_layer, adapter.official_pool) == (adapter.n_layers - 1, pool)
        batch = adapter.collate(recs)
        stored = adapter.embed(batch, layers=range(adapter.n_layers + 1), pools=[pool])[pool]
        official = adapter.official_embedding(batch)
        torch.testing.assert_close(adapter.final_transform(stored[adapter.official_layer]), official, atol=0, rtol=0)
        last = adapter.official_embedding(batch, layer=adapter.n_layers)
        torch.testing.assert_close(last, stored[-1], atol=0, rtol=0)
        assert (stored[-1] - official).abs().max() > 1e-3  # not the last layer


def test_padded_batch_equals_each_cell_alone(v2: Path, random_counts: Counts) -> None:
    adapter, recs = _setup(v2, random_counts(8, N_GENES, seed=11))
    layers = list(range(adapter.n_layers + 1))
    out = adapter.embed(adapter.collate(recs), layers=layers, pools=("cls", "mean", "max"))
    for i, rec in enumerate(recs):
        alone = adapter.embed(adapter.collate([rec]), layers=layers, pools=("cls", "mean", "max"))
        for pool in out:
            torch.testing.assert_close(out[pool][:, i], alone[pool][:, 0], atol=1e-5, rtol=0)
    order = [7, 2, 0, 5]
    other = adapter.embed(adapter.collate([recs[j] for j in order]), layers=[0, 3, 1], pools=["mean"])
    torch.testing.assert_close(other["mean"], out["mean"][[0, 3, 1]][:, order], atol=1e-5, rtol=0)
    for block in adapter.blocks():
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_save_formats_give_identical_embeddings(factory: Callable[..., Path], random_counts: Counts) -> None:
    counts = random_counts(4, N_GENES, seed=9)
    folders = [factory(seed=5), factory(seed=5, fmt="bin"), factory(seed=5, arch="base")]
    assert (folders[1] / "pytorch_model.bin").is_file()
    outs = []
    for folder in folders:
        adapter, recs = _setup(folder, counts)
        outs.append(adapter.embed(adapter.collate(recs), layers=[0, 2, 3], pools=["cls", "max"]))
    assert load_adapter("geneformer", folders[1]).describe()["checkpoint_format"] == "bin"
    for other in outs[1:]:
        for pool in ("cls", "max"):
            torch.testing.assert_close(other[pool], outs[0][pool], atol=0, rtol=0)


def test_v1_refuses_cls_and_empty_cells_get_zero_pools(v1: Path) -> None:
    counts = sp.csr_matrix(np.vstack([np.zeros(N_GENES), np.arange(N_GENES) % 3]).astype(np.float32))
    adapter, recs = _setup(v1, counts)
    assert adapter.version == "V1" and adapter.supported_pools == ("mean", "max") and adapter.default_pools == ("mean",)
    assert len(recs[0]) == 0
    batch = adapter.collate(recs)
    with pytest.raises(InvalidInputError, match=r"'cls' is not available for Geneformer V1.*--pool mean,max"):
        adapter.embed(batch, layers=[0], pools=["cls"])
    out = adapter.embed(batch, layers=[0, 1, 2, 3], pools=["mean", "max"])
    assert torch.all(out["mean"][:, 0] == 0) and torch.all(out["max"][:, 0] == 0)
    assert torch.isfinite(out["mean"]).all() and out["mean"][:, 1].abs().sum() > 0


def test_max_genes_truncates_and_is_capped(v2: Path, random_counts: Counts) -> None:
    adapter, recs = _setup(v2, random_counts(4, N_GENES, seed=1, density=0.9), max_genes=8)
    assert max(len(r) for r in recs) == 8 and adapter.describe()["max_length"] == 8
    assert load_adapter("geneformer", v2).max_length == 64  # default: max_position_embeddings
    with pytest.raises(InvalidInputError, match="exceeds the model's input size 64"):
        load_adapter("geneformer", v2, max_genes=65)


# ---------------------------------------------------------------- checkpoints and strict loading
P = "bert.encoder.layer.1."


def test_missing_misshapen_unexpected_keys_are_named(factory: Callable[..., Path]) -> None:
    missing = factory(drop_keys=[P + "output.LayerNorm.bias"])
    adapter = load_adapter("geneformer", missing)  # config and dictionaries only: fine
    with pytest.raises(CheckpointError, match=r"lacks encoder weight 'encoder\.layer\.1\.output\.LayerNorm\.bias'"):
        adapter.load("cpu")
    assert not adapter.is_loaded
    shaped = factory(reshape={P + "intermediate.dense.weight": (48, 32)})
    pattern = r"'encoder\.layer\.1\.intermediate\.dense\.weight' has shape \[48, 32\].*implies \[64, 32\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("geneformer", shaped).load("cpu")
    extra = factory(extra_keys={"bert.encoder.layer.1.attention.self.rotary.weight": (4,)})
    pattern = r"unexpected weights \['encoder\.layer\.1\.attention\.self\.rotary\.weight'\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_adapter("geneformer", extra).load("cpu")
    # allow-listed: the MLM head, an old position_ids buffer, a classifier head
    ok = factory(extra_keys={"bert.embeddings.position_ids": (1, 64), "classifier.weight": (3, 32)})
    adapter = load_adapter("geneformer", ok)
    adapter.load("cpu")
    assert adapter.is_loaded


def test_missing_files_are_named(v2: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(v2, copy)
    next(copy.glob("*gene_median*.pkl")).unlink()
    with pytest.raises(CheckpointError, match=r"missing the gene median dictionary \(\*gene_median\*\.pkl\);"):
        load_adapter("geneformer", copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors or pytorch_model\.bin, the gene median"):
        load_adapter("geneformer", copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter("geneformer", tmp_path / "nowhere")
    with pytest.raises(InvalidInputError, match="needs --checkpoint"):
        load_adapter("geneformer", None)


def test_bad_dictionaries_fail_clearly(v2: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(v2, copy)
    (copy / "token_dictionary_other.pkl").write_bytes(pickle.dumps({"<pad>": 0}))
    with pytest.raises(CheckpointError, match="several token dictionary files"):
        load_adapter("geneformer", copy)
    (copy / "token_dictionary_other.pkl").unlink()
    tokens = copy / "token_dictionary_gc104M.pkl"
    vocab = pickle.loads(tokens.read_bytes())
    tokens.write_bytes(pickle.dumps(vocab | {"ENSG99999999999": 500}))
    with pytest.raises(CheckpointError, match="token ids up to 500 but config.json vocab_size is 44"):
        load_adapter("geneformer", copy)
    tokens.write_bytes(pickle.dumps({k: v for k, v in vocab.items() if k != "<eos>"}))
    with pytest.raises(CheckpointError, match="has <cls> but not <eos>"):
        load_adapter("geneformer", copy)

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    tokens.write_bytes(pickle.dumps({"<pad>": Evil()}))
    with pytest.raises(CheckpointError, match=r"refusing to load builtins\.print"):
        load_adapter("geneformer", copy)


def test_dictionaries_with_numpy_scalars_load(v2: Path, tmp_path: Path) -> None:
    """Released pickles may hold numpy ints/floats; the restricted unpickler accepts them."""
    copy = tmp_path / "np"
    shutil.copytree(v2, copy)
    tokens = copy / "token_dictionary_gc104M.pkl"
    medians = copy / "gene_median_dictionary_gc104M.pkl"
    tokens.write_bytes(pickle.dumps({k: np.int64(v) for k, v in pickle.loads(tokens.read_bytes()).items()}))
    medians.write_bytes(pickle.dumps({k: np.float32(v) for k, v in pickle.loads(medians.read_bytes()).items()}))
    adapter = load_adapter("geneformer", copy)
    assert adapter.version == "V2" and adapter.map_genes(ens(N_GENES)).n_matched == N_GENES
    assert load_adapter("geneformer", copy).checkpoint_hash != load_adapter("geneformer", v2).checkpoint_hash


def test_another_family_or_model_type_is_recognised(tiny_tahoe_hf: Path, v2: Path, tmp_path: Path) -> None:
    pattern = r"not a Geneformer checkpoint: it looks like tahoe-x1.*--model tahoe-x1"
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_adapter("geneformer", tiny_tahoe_hf)
    assert "\n" not in str(err.value)
    scgpt = tmp_path / "scgpt"
    scgpt.mkdir()
    (scgpt / "args.json").write_text("{}")
    (scgpt / "best_model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="looks like scGPT.*--model scgpt"):
        load_adapter("geneformer", scgpt)
    copy = tmp_path / "roberta"
    shutil.copytree(v2, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg | {"model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="model_type 'roberta'"):
        load_adapter("geneformer", copy)
    (copy / "config.json").write_text(json.dumps(cfg | {"position_embedding_type": "relative_key"}))
    with pytest.raises(CheckpointError, match="position_embedding_type 'relative_key'"):
        load_adapter("geneformer", copy)


def test_symbols_instead_of_ensembl_ids(v2: Path) -> None:
    adapter = load_adapter("geneformer", v2)
    with pytest.raises(InvalidInputError, match=r"look like gene symbols.*--gene-column ensembl_id") as err:
        adapter.map_genes(["CD3E", "MS4A1", "LYZ", "NKG7"] * 10)
    assert "\n" not in str(err.value)
    mapping = adapter.map_genes([g + ".3" for g in ens(N_GENES)] + ["ENSG99999999999"])
    assert mapping.n_matched == N_GENES


def test_constructing_the_adapter_loads_no_weights(v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(gf_checkpoint, "read_state_dict", forbidden)
    monkeypatch.setattr(geneformer, "read_state_dict", forbidden)
    monkeypatch.setattr("safetensors.torch.load_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    adapter = load_adapter("geneformer", v1)
    info = json.loads(json.dumps(adapter.describe()))
    assert (info["version"], info["n_layers"], info["d_model"], info["vocab_size"]) == ("V1", 3, 32, 42)
    assert info["official_layer"] == 2 and info["official_pool"] == "mean" and len(adapter.checkpoint_hash) == 64
    adapter.map_genes(ens(N_GENES))
    eye = sp.csr_matrix(np.eye(3, N_GENES, dtype=np.float32))
    adapter.collate(adapter.tokenizer.tokenize(eye, np.arange(3), seed=0))
    assert not adapter.is_loaded and adapter.model is None
    with pytest.raises(AssertionError, match="weights were read"):
        adapter.load("cpu")


# ---------------------------------------------------------------- end to end through the store
def test_ingest_end_to_end(tmp_path: Path, v2: Path, random_counts: Counts) -> None:
    """Stored layers equal each cell embedded alone with totals from obs['n_counts'] over all genes."""
    counts = sp.hstack([random_counts(60, N_GENES, seed=4), random_counts(60, 10, seed=5)]).tocsr()
    genes = ens(N_GENES) + [f"ENSG{9 * 10**9 + i:011d}" for i in range(10)]  # 10 genes the model lacks
    obs = pd.DataFrame({"n_counts": np.asarray(counts.sum(1)).ravel() + 7.0}, index=[f"c{i}" for i in range(60)])
    path = tmp_path / "d.h5ad"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    pools = ("cls", "mean", "max")
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(path, "geneformer", str(v2), pools=pools, batch_size=16, chunk_cells=32,
                        progress=False, workers=0)
        assert res.layers == (0, 1, 2, 3) and res.gene_mapping["n_matched"] == N_GENES
        run = st.run(res.id)
        with st.backend.open_reader(res.id) as rd:
            stored = {p: rd.read(list(range(len(run.layers))), None, p) for p in pools}
        src_idx = st.backend.read_obs(run.dataset_id)["src_idx"].to_numpy()
    adapter = load_adapter("geneformer", v2)
    with CountsSource(path) as src:
        mapping = adapter.map_genes(src.gene_ids)
        full = src.rows(0, src.n_obs)
        adapter.check_obs(src.obs)
        totals = adapter.tokenizer.cell_totals(full, src.obs)
    adapter.load("cpu")
    sub = full[:, mapping.var_index].tocsr()
    for cell in range(0, 60, 5):
        row = src_idx[cell]
        rec = adapter.tokenizer.tokenize(sub[row : row + 1], np.array([cell]), seed=0, totals=totals[row : row + 1])
        batch = adapter.collate(rec)
        alone = adapter.embed(batch, layers=[0, 1, 2, 3], pools=pools)
        for pool in pools:
            np.testing.assert_allclose(stored[pool][:, cell], alone[pool][:, 0].numpy(), atol=1e-5, rtol=0)
        official = adapter.official_embedding(batch)[0].numpy()
        np.testing.assert_allclose(stored["cls"][adapter.official_layer, cell], official, atol=1e-5)


def test_ensembl_mapping_dictionary_next_to_the_checkpoint_is_applied(v2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gf"
    shutil.copytree(v2, folder)
    genes = ens(N_GENES)
    # the release's collapse dictionary: identity over its genes plus an alias of gene 0
    ens_map = {g: g for g in genes} | {"ENSG00000999999": genes[0]}
    (folder / "ensembl_mapping_dict_gc104M.pkl").write_bytes(pickle.dumps(ens_map))
    adapter = load_adapter("geneformer", folder)
    assert adapter.files.ensembl_mapping is not None
    assert adapter.checkpoint_hash != load_adapter("geneformer", v2).checkpoint_hash
    ids = [*genes, "ENSG00000999999", "ENSG00000888888"]   # an alias of gene 0 and an unknown id
    mapping = adapter.map_genes(ids)
    assert mapping.var_index.tolist() == [*range(N_GENES), N_GENES]  # alias kept, unknown dropped
    tok = adapter.tokenizer
    # alias and gene 0 collapse into one summed slot placed after the other genes, as upstream
    assert tok.token_ids is not None and tok.token_ids[-1] == adapter.dicts.tokens[genes[0]]
    assert len(tok.token_ids) == N_GENES
    counts = sp.csr_matrix(np.concatenate([[3.0], np.zeros(N_GENES - 1), [4.0]])[None, :].astype(np.float32))
    (rec,) = tok.tokenize(counts, np.array([0]), seed=0, totals=np.array([100.0]))
    # one gene token (3 + 4 counts summed) between <cls> and <eos>
    assert rec.gene_ids.tolist()[1:-1] == [adapter.dicts.tokens[genes[0]]]
    med = adapter.dicts.medians[genes[0]]
    assert rec.values[1] == np.float32(7 * (1 / 100.0) * 10_000 * (1 / med))  # reciprocals, as scipy
    # without the mapping file the alias is unknown and exact duplicate ids stay separate tokens
    plain = load_adapter("geneformer", v2)
    assert plain.map_genes([*genes, genes[0]]).n_matched == N_GENES + 1


def test_dense_and_sparse_files_are_tokenized_as_upstream_and_keyed_apart(
    tmp_path: Path, v2: Path, random_counts: Counts
) -> None:
    counts = random_counts(12, N_GENES, seed=9)
    obs = pd.DataFrame({"n_counts": (np.asarray(counts.sum(1)).ravel() + 3).astype(np.float32)},
                       index=[f"c{i}" for i in range(12)])
    paths = {}
    for kind, X in (("sparse", counts), ("dense", counts.toarray())):
        paths[kind] = tmp_path / f"{kind}.h5ad"
        ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=ens(N_GENES))).write_h5ad(paths[kind])
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        runs = {k: st.run(st.ingest(p, "geneformer", str(v2), progress=False, workers=0).id) for k, p in paths.items()}
    assert runs["sparse"].params["counts_storage"] == "sparse:float32"
    assert runs["dense"].params["counts_storage"] == "dense:float32"
    assert runs["sparse"].cache_key != runs["dense"].cache_key
