"""scGPT against the official package ``scgpt`` (0.2.4, ``pip install --no-deps scgpt==0.2.4``).

The model is the official ``scgpt.model.model.TransformerModel`` built as ``scgpt.tasks.embed_data``
builds it (random weights, LayerNorms and biases made non-trivial), saved with ``torch.save(
model.state_dict())`` as ``best_model.pt`` (in the released flash-attention ``Wqkv`` key layout or
in the torch layout) beside ``args.json`` / ``vocab.json``, and loaded through sclstore's adapter.
The official inputs come from the official ``scgpt.data_collator.DataCollator`` configured as
``get_batch_cell_embeddings`` configures it; the official hidden states are the input of
``model.transformer_encoder`` (layer 0) and the output of each of its layers, in ``model._encode``
run exactly as ``get_batch_cell_embeddings`` runs it (eval, no grad, padded batch with
``src_key_padding_mask = gene_ids.eq(pad_id)``: torch's fast path on the CPU).

``scgpt/__init__.py`` imports ``torchtext`` (whose last release, 0.18, does not load with torch
2.13: ``OSError: Could not load this library: .../libtorchtext.so``), ``scvi-tools`` and ``scib``;
the modules used here need none of them, so they are imported from the installed files without
running the package ``__init__`` (:mod:`official`). ``flash_attn`` is absent: ``model.py``
catches that itself and builds torch layers, as ``embed_data`` does on a machine without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sclstore
from sclstore.ingest.adapter import TokenBatch, TokenRecord, cell_generator
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.scgpt import ScGPTAdapter

from .official import forget, import_modules

INSTALL = "pip install --no-deps -r tests/oracle/requirements.txt (scgpt==0.2.4)"
GENES = [f"GENE{i}" for i in range(1, 41)]
SPECIALS = ("<pad>", "<cls>", "<eoc>")
POOLS = ("cls", "mean", "max")
ARGS: dict[str, Any] = {  # the keys embed_data reads, as in a released args.json
    "embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 3, "n_layers_cls": 3, "dropout": 0.2,
    "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51, "input_emb_style": "continuous",
    "max_seq_len": 64, "fast_transformer": True,
}


@pytest.fixture(scope="module")
def official() -> Iterator[SimpleNamespace]:
    mods = import_modules(
        "scgpt", ["scgpt.model.model", "scgpt.data_collator", "scgpt.preprocess"], install=INSTALL,
        package_attrs={"logger": logging.getLogger("scGPT")},  # what scgpt/__init__.py defines; preprocess imports it
    )
    yield SimpleNamespace(
        TransformerModel=mods["scgpt.model.model"].TransformerModel,
        DataCollator=mods["scgpt.data_collator"].DataCollator,
        binning=mods["scgpt.preprocess"].binning,
    )
    forget("scgpt")


def build_official(official: SimpleNamespace, vocab: dict[str, int], seed: int) -> torch.nn.Module:
    """``TransformerModel`` with ``embed_data``'s arguments, random weights, eval mode."""
    torch.manual_seed(seed)
    a = ARGS
    model = official.TransformerModel(
        ntoken=len(vocab), d_model=a["embsize"], nhead=a["nheads"], d_hid=a["d_hid"], nlayers=a["nlayers"],
        nlayers_cls=a["n_layers_cls"], n_cls=1, vocab=vocab, dropout=a["dropout"], pad_token=a["pad_token"],
        pad_value=a["pad_value"], do_mvc=True, do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False,
        explicit_zero_prob=False, use_fast_transformer=False, fast_transformer_backend="flash", pre_norm=False,
    )
    with torch.no_grad():  # the default init leaves LayerNorms at 1/0 and attention biases at 0
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(folder: Path, model: torch.nn.Module, vocab: dict[str, int], *, layout: str) -> Path:
    """The released folder: ``args.json``, ``vocab.json`` and ``torch.save(state_dict)`` as ``best_model.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(ARGS, indent=4))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
    state = model.state_dict()
    if layout == "flash":  # released models were trained with flash-attn: Wqkv names
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    torch.save(state, folder / "best_model.pt")
    return folder


def make_counts(n_cells: int, *, seed: int, distinct: bool = False) -> sp.csr_matrix:
    """Counts with varied lengths (some cells above the 24-token cap); ``distinct`` values per cell or many ties."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n_cells, len(GENES)), dtype=np.float32)
    for i in range(n_cells):
        k = int(rng.integers(3, 23 if distinct else len(GENES) + 1))
        cols = np.sort(rng.choice(len(GENES), size=k, replace=False))
        vals = rng.choice(1000, size=k, replace=False) + 1 if distinct else rng.negative_binomial(1, 0.3, size=k) + 1
        x[i, cols] = vals
    return sp.csr_matrix(x)


def sclstore_tokens(folder: Path, x: sp.csr_matrix, *, seed: int, max_genes: int) -> tuple[ScGPTAdapter, list[TokenRecord]]:
    adapter = load_adapter("scgpt", folder, max_genes=max_genes)
    assert isinstance(adapter, ScGPTAdapter)
    adapter.map_genes(GENES)
    adapter.load(torch.device("cpu"))
    return adapter, adapter.tokenizer.tokenize(x, np.arange(x.shape[0]), seed=seed)


def official_batch(official: SimpleNamespace, x: sp.csr_matrix, vocab: dict[str, int], max_length: int) -> dict[str, torch.Tensor]:
    """``get_batch_cell_embeddings``'s ``Dataset.__getitem__`` items through its ``DataCollator``."""
    dense = x.toarray()
    gene_ids = np.array([vocab[g] for g in GENES])
    items = []
    for idx, row in enumerate(dense):
        nz = np.nonzero(row)[0]
        genes = np.insert(gene_ids[nz], 0, vocab["<cls>"])
        values = np.insert(row[nz], 0, ARGS["pad_value"])
        items.append({"id": idx, "genes": torch.from_numpy(genes).long(), "expressions": torch.from_numpy(values).float()})
    collator = official.DataCollator(
        do_padding=True, pad_token_id=vocab[ARGS["pad_token"]], pad_value=ARGS["pad_value"], do_mlm=False,
        do_binning=True, max_length=max_length, sampling=True, keep_first_n_tokens=1,
    )
    return collator(items)


class Replay:
    """The official code's random draws, replayed from sclstore's documented per-cell stream.

    ``scgpt.preprocess._digitize`` draws ``np.random.rand(n)`` once per cell (in cell order), then
    ``DataCollator._sample`` draws ``torch.randperm(n - 1)`` if the cell is over the cap; sclstore
    draws the same numbers from ``cell_generator(seed, cell)`` in the same order.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.cell, self.gen = seed, -1, torch.Generator()
        self.randperm = torch.randperm

    def rand(self, n: int) -> np.ndarray:
        self.cell += 1
        self.gen = cell_generator(self.seed, self.cell)
        return torch.rand(n, generator=self.gen, dtype=torch.float64).numpy()

    def perm(self, n: int, device: Any = None) -> torch.Tensor:
        return self.randperm(n, generator=self.gen)


def official_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> list[torch.Tensor]:
    """Layers 0..L of ``model._encode`` as ``get_batch_cell_embeddings`` calls it (padded to the batch width)."""
    seen: list[torch.Tensor] = []
    enc = model.transformer_encoder
    width = batch["gene"].shape

    def keep(out: torch.Tensor) -> None:
        seen.append(out.to_padded_tensor(0.0, (*width, out.size(-1))) if out.is_nested else out)

    hooks = [enc.register_forward_pre_hook(lambda _m, args: keep(args[0]))]
    hooks += [layer.register_forward_hook(lambda _m, _a, out: keep(out)) for layer in enc.layers]
    try:
        with torch.no_grad():
            ids = batch["gene"]
            final = model._encode(ids, batch["expr"], src_key_padding_mask=ids.eq(pad_id))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(enc.layers) + 1
    torch.testing.assert_close(final, seen[-1], atol=0, rtol=0)
    return seen


def _pools(x: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    return {"cls": x[0], "mean": x[1:n].mean(0), "max": x[1:n].amax(0)}


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return {g: i for i, g in enumerate(GENES)} | {s: len(GENES) + i for i, s in enumerate(SPECIALS)}


@pytest.mark.parametrize("layout", ["flash", "torch"])
def test_every_layer_pool_and_official_embedding_equal_official_model(
    layout: str, official: SimpleNamespace, vocab: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_official(official, vocab, seed=5)
    folder = write_checkpoint(tmp_path / "scgpt", model, vocab, layout=layout)
    x, seed, cap = make_counts(10, seed=3), 11, 24
    adapter, recs = sclstore_tokens(folder, x, seed=seed, max_genes=cap)
    batch = adapter.collate(recs)
    replay = Replay(seed)
    with monkeypatch.context() as m:
        m.setattr(np.random, "rand", replay.rand)
        m.setattr(torch, "randperm", replay.perm)
        ref = official_batch(official, x, vocab, cap)
    assert replay.cell == x.shape[0] - 1
    # the same tokens, values, order and padding as the official collator
    torch.testing.assert_close(batch.gene_ids, ref["gene"], atol=0, rtol=0)
    torch.testing.assert_close(batch.values, ref["expr"], atol=0, rtol=0)
    lengths = batch.padding_mask.sum(1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.max()) == cap  # padded, and some cells subsampled
    assert np.diff(x.indptr).max() + 1 > cap

    hidden = official_hidden_states(model, ref, vocab["<pad>"])
    layers = list(range(adapter.n_layers + 1))
    out = adapter.embed(batch, layers=layers, pools=POOLS)
    for i, n in enumerate(lengths.tolist()):
        for layer in layers:
            want = _pools(hidden[layer][i], n)
            for pool in POOLS:
                torch.testing.assert_close(out[pool][layer, i], want[pool], atol=5e-6, rtol=0)
    # the official cell embedding: <cls> of the last layer, L2-normalised (numpy, float32)
    emb = hidden[-1][:, 0, :].numpy()
    want_emb = torch.from_numpy(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    torch.testing.assert_close(adapter.official_embedding(batch), want_emb, atol=2e-6, rtol=0)
    torch.testing.assert_close(adapter.final_transform(out["cls"][-1]), want_emb, atol=2e-6, rtol=0)


def test_cells_without_ties_tokenize_as_official_without_replay(
    official: SimpleNamespace, vocab: dict[str, int], tmp_path: Path
) -> None:
    """Distinct values give distinct quantile boundaries: no random tie-breaking, any generator state."""
    model = build_official(official, vocab, seed=1)
    folder = write_checkpoint(tmp_path / "scgpt", model, vocab, layout="flash")
    x = make_counts(12, seed=8, distinct=True)
    adapter, recs = sclstore_tokens(folder, x, seed=123, max_genes=1200)
    batch = adapter.collate(recs)
    for np_seed in (0, 1):
        np.random.seed(np_seed)
        ref = official_batch(official, x, vocab, 1200)
        torch.testing.assert_close(batch.gene_ids, ref["gene"], atol=0, rtol=0)
        torch.testing.assert_close(batch.values, ref["expr"], atol=0, rtol=0)


def test_tie_cells_are_random_upstream_and_replayed_exactly(official: SimpleNamespace) -> None:
    """Upstream ``binning`` is random on ties; with sclstore's per-cell draws it gives sclstore's bins."""
    from sclstore.ingest.models.scgpt.data import binning as sclstore_binning

    row = np.array([1, 1, 1, 2, 2, 5, 1, 3, 1, 1, 2], dtype=np.float32)
    draws = {tuple(_official_bins(official, row, s)) for s in range(20)}
    assert len(draws) > 1  # really random upstream
    for cell in range(5):
        gen = cell_generator(7, cell)
        mine = sclstore_binning(row, generator=gen)
        replay = Replay(7)
        replay.cell = cell - 1
        with pytest.MonkeyPatch.context() as m:
            m.setattr(np.random, "rand", replay.rand)
            theirs = official.binning(row.copy(), n_bins=51)
        np.testing.assert_array_equal(mine, theirs)


def _official_bins(official: SimpleNamespace, row: np.ndarray, seed: int) -> np.ndarray:
    np.random.seed(seed)
    out: np.ndarray = official.binning(row.copy(), n_bins=51)
    return out


def test_padded_official_batch_is_what_sclstore_embeds(official: SimpleNamespace, vocab: dict[str, int], tmp_path: Path) -> None:
    """The official fast path zeroes padded rows; sclstore's pools ignore them: pools equal on any batch split."""
    model = build_official(official, vocab, seed=9)
    folder = write_checkpoint(tmp_path / "scgpt", model, vocab, layout="flash")
    x = make_counts(6, seed=21, distinct=True)
    adapter, recs = sclstore_tokens(folder, x, seed=0, max_genes=1200)
    layers = list(range(adapter.n_layers + 1))
    full = adapter.embed(adapter.collate(recs), layers=layers, pools=POOLS)
    for i, rec in enumerate(recs):
        alone: TokenBatch = adapter.collate([rec])
        hidden = official_hidden_states(model, {"gene": alone.gene_ids, "expr": alone.values}, vocab["<pad>"])
        for layer in layers:
            want = _pools(hidden[layer][0], rec.gene_ids.shape[0])
            for pool in POOLS:
                torch.testing.assert_close(full[pool][layer, i], want[pool], atol=5e-6, rtol=0)



def test_ingest_stores_the_official_layers_and_embedding(official: SimpleNamespace, vocab: dict[str, int], tmp_path: Path) -> None:
    """The whole pipeline (h5ad -> Store.ingest -> stored tiles) against the official model and collator."""
    model = build_official(official, vocab, seed=13)
    folder = write_checkpoint(tmp_path / "scgpt", model, vocab, layout="flash")
    x = make_counts(20, seed=17, distinct=True)  # no ties: the official tokens do not depend on any generator
    path = tmp_path / "data.h5ad"
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]), var=pd.DataFrame(index=GENES)).write_h5ad(path)
    with sclstore.open_store(tmp_path / "store", create=True) as store:
        res = store.ingest(path, "scgpt", str(folder), progress=False, workers=0, batch_size=6, chunk_cells=8)
        run = store.run(res.id)
        with store.backend.open_reader(res.id) as reader:
            stored = {p: reader.read(list(range(len(run.layers))), None, p) for p in POOLS}
        src_idx = store.backend.read_obs(run.dataset_id)["src_idx"].to_numpy()
    assert tuple(res.layers) == (0, 1, 2, 3)
    ref = official_batch(official, x, vocab, 1200)
    hidden = official_hidden_states(model, ref, vocab["<pad>"])
    lengths = (~ref["gene"].eq(vocab["<pad>"])).sum(1).tolist()
    for row, cell in enumerate(src_idx):
        for layer in range(4):
            want = _pools(hidden[layer][cell], lengths[cell])
            for pool in POOLS:
                np.testing.assert_allclose(stored[pool][layer, row], want[pool].numpy(), atol=5e-6, rtol=0)
    emb = hidden[-1][:, 0, :].numpy()[src_idx]
    want_emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    last_cls = stored["cls"][-1]
    np.testing.assert_allclose(last_cls / np.linalg.norm(last_cls, axis=1, keepdims=True), want_emb, atol=2e-6, rtol=0)
