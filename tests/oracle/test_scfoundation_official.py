"""scFoundation against the official code of ``biomap-research/scFoundation`` (no package on the registry).

Runs only where ``SCLSTORE_SCFOUNDATION_REPO`` names a checkout of that repository (its ``model/``
folder holds ``load.py`` and ``pretrainmodels/``); nothing of it is copied here. Its imports need
``einops`` and ``local-attention`` (1.8.6; later releases import ``hyper-connections``).

The model is built by the official ``pretrainmodels.select_model`` from a tiny ``mae_autobin``
config (``transformer`` encoder, ``performer`` decoder, as released), given random weights and
saved as the released ``models.ckpt`` (sub-models ``gene``/``cell``/``rde``, each ``{"config":
..., "state_dict": {"model.<key>": ...}}``); the official side reads it back with
``load.convertconfig`` + ``select_model`` + ``load_state_dict`` (``load_model_frommmf`` without
its ``.cuda()``). The official inputs and cell embedding follow ``model/get_embedding.py``
(``--input_type singlecell --output_type cell --pool_type all --pre_normalized F``): the per-cell
pandas arithmetic (written here, as that file is a script that parses arguments at import, with
the tiny gene list in place of the 19,264 genes), then the official ``load.gatherData``,
``token_emb``, ``pos_emb`` and ``encoder``, one cell at a time as the script runs. Hidden states:
the encoder's input (layer 0), each ``transformer_encoder`` layer's output, and the output of
``encoder.norm`` as the last layer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclstore.ingest.models.scfoundation import OFFICIAL_POOLS, ScFoundationAdapter

from .official import forget

ENV = "SCLSTORE_SCFOUNDATION_REPO"
GENES = [f"GENE{i}" for i in range(1, 41)]
POOLS = list(OFFICIAL_POOLS)


@pytest.fixture(scope="module")
def official() -> Iterator[SimpleNamespace]:
    repo = os.environ.get(ENV)
    if not repo:
        pytest.skip(f"scFoundation has no registry package; set {ENV} to a checkout of biomap-research/scFoundation")
    folder = Path(repo) / "model"
    if not (folder / "load.py").is_file():
        pytest.fail(f"{ENV}={repo!r} is not a scFoundation checkout (no model/load.py)")
    pytest.importorskip("einops")
    pytest.importorskip("local_attention")
    sys.path.insert(0, str(folder))
    try:
        import load  # the official model/load.py (imports pretrainmodels)

        mods: dict[str, ModuleType] = {"load": load, "pretrainmodels": sys.modules["pretrainmodels"]}
    finally:
        sys.path.remove(str(folder))
    yield SimpleNamespace(load=mods["load"], select_model=mods["pretrainmodels"].select_model)
    forget("load")
    forget("pretrainmodels")


def _config(n_genes: int) -> dict[str, object]:
    return {
        "model": "mae_autobin",
        "encoder": {"hidden_dim": 32, "depth": 3, "heads": 4, "dim_head": 8, "module_type": "transformer"},
        "decoder": {"hidden_dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "module_type": "performer"},
        "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 100, "bin_alpha": 1.0,
        "seq_len": n_genes + 2,
    }


def write_release(official: SimpleNamespace, folder: Path, *, seed: int) -> Path:
    """``models.ckpt`` with three official ``MaeAutobin`` sub-models + the gene-list TSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{name}\t{i}\n" for i, name in enumerate(GENES))
    (folder / f"OS_scRNA_gene_index.{len(GENES)}.tsv").write_text("gene_name\tindex\n" + rows)
    payload = {}
    for k, name in enumerate(("gene", "cell", "rde")):
        torch.manual_seed(seed * 10 + k)
        cfg = _config(len(GENES))
        model = official.select_model(dict(cfg))
        with torch.no_grad():  # default init leaves LayerNorms at 1/0 and attention biases at 0
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(0.2 * torch.randn_like(p))
            model.token_emb.mlp.weight.mul_(3.0)  # values reach ~10: varied soft bins
        payload[name] = {
            "config": {"model": "mae_autobin", "model_config": {"mae_autobin": cfg}, "dataset_config": {"rnaseq": {}}},
            "state_dict": {f"model.{key}": v for key, v in model.state_dict().items()},
        }
    torch.save(payload, folder / "models.ckpt")
    return folder


def load_official(official: SimpleNamespace, folder: Path, key: str) -> tuple[torch.nn.Module, dict[str, object]]:
    """``load_model_frommmf(models.ckpt, key)`` on the CPU: ``convertconfig``, ``select_model``, strict load."""
    data = official.load.convertconfig(torch.load(folder / "models.ckpt", map_location="cpu", weights_only=True)[key])
    config = data["config"]
    model = official.select_model(config)
    model.load_state_dict(data["model_state_dict"])
    return model.eval(), config


def dataset(n_cells: int, *, seed: int) -> tuple[sp.csr_matrix, list[str]]:
    """Counts over 36 of the genes in another order (4 list genes absent: zero-filled upstream)."""
    rng = np.random.default_rng(seed)
    names = [GENES[i] for i in rng.permutation(len(GENES))[:36]]
    dens = rng.uniform(0.1, 0.9, size=(n_cells, 1))
    present = rng.random((n_cells, len(names))) < dens
    present[:, 0] = True
    values = rng.negative_binomial(1, 0.2, size=present.shape) + 1
    return sp.csr_matrix(np.where(present, values, 0).astype(np.float32)), names


def official_cell(
    official: SimpleNamespace, model: torch.nn.Module, config: dict[str, object], row: pd.Series, tgthighres: str
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """get_embedding.py for one cell: ``(x, position ids, layers 0..L, official embedding)``."""
    tmpdata = (np.log1p(row / (row.sum()) * 1e4)).tolist()
    totalcount = row.sum()
    kind, amount = tgthighres[0], float(tgthighres[1:])
    high = {"f": np.log10(totalcount * amount), "a": np.log10(totalcount) + amount, "t": amount}[kind]
    pretrain_gene_x = torch.tensor([*tmpdata, high, np.log10(totalcount)]).unsqueeze(0)
    data_gene_ids = torch.arange(len(GENES) + 2).repeat(pretrain_gene_x.shape[0], 1)
    value_labels = pretrain_gene_x > 0
    x, x_padding = official.load.gatherData(pretrain_gene_x, value_labels, config["pad_token_id"])
    position_gene_ids, _ = official.load.gatherData(data_gene_ids, value_labels, config["pad_token_id"])
    seen: list[torch.Tensor] = []
    enc = model.encoder
    hooks = [enc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))]
    hooks += [layer.register_forward_hook(lambda _m, _a, out: seen.append(out)) for layer in enc.transformer_encoder]
    try:
        with torch.no_grad():
            h = model.token_emb(torch.unsqueeze(x, 2).float(), output_weight=0)
            h += model.pos_emb(position_gene_ids)
            geneemb = enc(h, x_padding)
    finally:
        for hook in hooks:
            hook.remove()
    seen[-1] = geneemb  # the last stored layer is the encoder output (encoder.norm included)
    emb = torch.concat(
        [geneemb[:, -1, :], geneemb[:, -2, :], torch.max(geneemb[:, :-2, :], dim=1)[0], torch.mean(geneemb[:, :-2, :], dim=1)],
        axis=1,
    )
    return x[0].float(), position_gene_ids[0], [s[0] for s in seen], emb[0]  # float64 until token_emb(...float())


def upstream_frame(x: sp.csr_matrix, names: list[str]) -> pd.DataFrame:
    """get_embedding.py's ``gexpr_feature`` after ``main_gene_selection`` (missing genes zero-filled)."""
    frame = pd.DataFrame(x.toarray(), columns=names)
    fill = list(set(GENES) - set(frame.columns))
    padding = pd.DataFrame(np.zeros((frame.shape[0], len(fill))), columns=fill, index=frame.index)
    frame = pd.DataFrame(np.concatenate([df.values for df in [frame, padding]], axis=1), index=frame.index,
                         columns=list(frame.columns) + list(padding.columns))
    return frame[GENES]


def _pools(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"S": x[-1], "T": x[-2], "max": x[:-2].amax(0), "mean": x[:-2].mean(0)}


@pytest.mark.parametrize(("sub_model", "tgthighres"), [("cell", "t4"), ("rde", "a5"), ("gene", "f1")])
def test_every_layer_pool_and_official_embedding_equal_official_code(
    official: SimpleNamespace, tmp_path: Path, sub_model: str, tgthighres: str
) -> None:
    folder = write_release(official, tmp_path / "models", seed=4)
    model, config = load_official(official, folder, sub_model)
    x, names = dataset(8, seed=6)
    adapter = ScFoundationAdapter(folder, sub_model=sub_model, tgthighres=tgthighres)
    mapping = adapter.map_genes(names)
    adapter.load(torch.device("cpu"))
    recs = adapter.tokenizer.tokenize(x[:, mapping.var_index], np.arange(x.shape[0]), seed=0)
    batch = adapter.collate(recs)
    assert len(set(batch.padding_mask.sum(1).tolist())) > 2  # really padded
    layers = list(range(adapter.n_layers + 1))
    out = adapter.embed(batch, layers=layers, pools=POOLS)
    emb = adapter.official_embedding(batch)
    frame = upstream_frame(x, names)
    for i, rec in enumerate(recs):
        values, positions, hidden, want_emb = official_cell(official, model, config, frame.iloc[i, :], tgthighres)
        np.testing.assert_array_equal(rec.gene_ids, positions.numpy())  # same genes, same order, S/T last
        np.testing.assert_array_equal(rec.values, values.numpy())  # bit-identical model inputs
        assert len(hidden) == adapter.n_layers + 1
        for layer in layers:
            want = _pools(hidden[layer])
            for pool in POOLS:
                torch.testing.assert_close(out[pool][layer, i], want[pool], atol=5e-6, rtol=0)
        torch.testing.assert_close(emb[i], want_emb, atol=5e-6, rtol=0)
