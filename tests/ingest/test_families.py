"""The model-family seam: discovery through entry points, and every family's declared official
embedding checked against its own independent ``official_embedding`` forward (one generic test)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sclstore
from sclstore.ingest.adapter import ModelAdapter, official_from_stored
from sclstore.ingest.family import ENTRY_POINT_GROUP, ModelFamily, discover_families
from sclstore.ingest.models import FAMILIES, families, load_adapter

HERE = Path(__file__).resolve().parent


def _test_module(name: str) -> ModuleType:
    """A sibling test module (for its tiny-checkpoint writer), imported by path."""
    key = f"_sclstore_family_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _tahoe(tmp: Path, write_tiny_tahoe: Callable[..., Path]) -> tuple[ModelAdapter, list[str]]:
    folder = write_tiny_tahoe(tmp / "tahoe", n_layers=3)
    return load_adapter("tahoe-x1", folder), _test_module("conftest").make_gene_ids(40)


def _scgpt(tmp: Path, _w: object) -> tuple[ModelAdapter, list[str]]:
    mod = _test_module("test_scgpt_model")
    folder = tmp / "scgpt"
    folder.mkdir()
    mod.write_tiny_scgpt(folder)
    return load_adapter("scgpt", folder), list(mod.GENES)


def _scfoundation(tmp: Path, _w: object) -> tuple[ModelAdapter, list[str]]:
    mod = _test_module("test_scfoundation_model")
    folder = tmp / "scf"
    folder.mkdir()
    mod.write_tiny_scfoundation(folder)
    return load_adapter("scfoundation", folder), list(mod.GENES)


def _geneformer(version: str) -> Callable[[Path, object], tuple[ModelAdapter, list[str]]]:
    def make(tmp: Path, _w: object) -> tuple[ModelAdapter, list[str]]:
        mod = _test_module("test_geneformer_adapter")
        folder = tmp / f"gf{version}"
        folder.mkdir()
        mod.make_tiny_geneformer(folder, version=version)
        return load_adapter("geneformer", folder), mod.ens(mod.N_GENES)
    return make


def _toy(tmp: Path, _w: object) -> tuple[ModelAdapter, list[str]]:
    pytest.importorskip("sclstore_toy_model", reason="the test plugin is installed by .ci/run")
    return load_adapter("toy", None), [f"TOY{i}" for i in range(30)]


MAKERS = {"tahoe-x1": _tahoe, "scgpt": _scgpt, "scfoundation": _scfoundation, "geneformer-V1": _geneformer("V1"),
          "geneformer-V2": _geneformer("V2"), "toy": _toy}


@pytest.mark.parametrize("which", sorted(MAKERS))
def test_declared_official_embedding_matches_the_familys_own_forward(
    which: str, tmp_path: Path, write_tiny_tahoe: Callable[..., Path]
) -> None:
    adapter, genes = MAKERS[which](tmp_path, write_tiny_tahoe)
    assert isinstance(adapter, ModelFamily)
    spec = adapter.official
    rng = np.random.default_rng(1)
    n = len(genes)
    counts = sp.csr_matrix(((rng.random((7, n)) < 0.4) * rng.integers(1, 30, size=(7, n))).astype(np.float32))
    mapping = adapter.map_genes(genes)
    adapter.load("cpu")
    tok = adapter.tokenizer
    kw = {"totals": np.asarray(counts.sum(1)).ravel() + 5.0} if getattr(tok, "needs_cell_totals", False) else {}
    records = tok.tokenize(counts[:, mapping.var_index], np.arange(7), seed=0, **kw)
    batch = adapter.collate(records)
    stored = adapter.embed(batch, layers=[spec.layer], pools=list(spec.pools))
    declared = official_from_stored(spec, {p: v[0] for p, v in stored.items()}, adapter.apply_final_norm)
    own = adapter.official_embedding(batch)
    assert declared.shape == own.shape
    torch.testing.assert_close(declared, own.float(), atol=1e-5, rtol=1e-5)
    assert 0 <= spec.layer <= adapter.n_layers and set(spec.pools) <= set(adapter.supported_pools)


def test_builtin_families_are_registered_as_entry_points() -> None:
    found = discover_families()
    for name, factory in FAMILIES.items():
        assert found.get(name) is factory, f"{name} is not registered under {ENTRY_POINT_GROUP}"
    assert set(FAMILIES) <= set(families())


def test_a_plugin_package_is_discovered_and_ingests(tmp_path: Path) -> None:
    toy = pytest.importorskip("sclstore_toy_model", reason="the test plugin is installed by .ci/run")
    assert "toy" in discover_families() and families()["toy"] is toy.factory
    rng = np.random.default_rng(2)
    counts = sp.csr_matrix(((rng.random((25, 30)) < 0.5) * rng.integers(1, 9, size=(25, 30))).astype(np.float32))
    counts[4] = 0  # a cell with no gene: stored as NaN and recorded
    counts.eliminate_zeros()
    import anndata as ad
    import pandas as pd

    path = tmp_path / "toy.h5ad"
    ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(25)]),
               var=pd.DataFrame(index=[f"TOY{i}" for i in range(30)])).write_h5ad(path)
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(path, "toy", pools=("cls", "mean"), progress=False, workers=0)
        run = st.run(res.id)
        assert run.family == "toy" and res.layers == (0, 1, 2) and len(run.unembeddable) == 1
        with st.backend.open_reader(res.id) as rd:
            cls = rd.read([0, 1, 2], None, "cls")
        src_idx = st.backend.read_obs(run.dataset_id)["src_idx"].to_numpy()
    adapter = toy.factory(None, None, {})
    mapping = adapter.map_genes([f"TOY{i}" for i in range(30)])
    adapter.load("cpu")
    for cell in range(25):
        row = int(src_idx[cell])
        (rec,) = adapter.tokenizer.tokenize(counts[row][:, mapping.var_index], np.array([cell]), seed=0)
        if not rec.embeddable:
            assert np.isnan(cls[:, cell]).all() and list(run.unembeddable) == [cell]
            continue
        alone = adapter.embed(adapter.collate([rec]), layers=[0, 1, 2], pools=["cls"])["cls"][:, 0].numpy()
        np.testing.assert_allclose(cls[:, cell], alone, atol=1e-5, rtol=0)
