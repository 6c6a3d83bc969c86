"""Issue 10 item 1: no checkpoint runs code; ``convert-checkpoint --trust-pickle`` is the way out.

A user is handed a checkpoint folder. If its pickle would run ``os.system`` (here: create a
marker file), every family refuses it with one line naming the file and the fix, and the marker
never appears. A benign training checkpoint that still pickles objects sclstore does not load
(a ``datetime``, a ``Fraction``) is refused the same way, and ``sclstore convert-checkpoint SRC DST
--trust-pickle`` turns it into a checkpoint that gives bit-identical embeddings.
"""

from __future__ import annotations

import datetime
import fractions
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app
from sclstore.ingest.convert import convert_checkpoint
from sclstore.ingest.models import load_adapter
from sclstore.store.errors import CheckpointError

from .trust_helpers import Evil, load_test_module, snapshot, write_h5ad

runner = CliRunner()


def _scgpt(tmp: Path) -> Path:
    return load_test_module("test_scgpt_model").write_tiny_scgpt(tmp)


def _scfoundation(tmp: Path) -> Path:
    return load_test_module("test_scfoundation_model").write_tiny_scfoundation(tmp, seed=3)


def _poison(family: str, folder: Path, extra: Any) -> Path:
    """Put ``extra`` into the weight file of a benign checkpoint folder, as a real file would hold it."""
    if family == "tahoe-x1":
        path = folder / "best-model.pt"
        payload = torch.load(path, weights_only=False)  # the test's own file
        payload["state"]["extra"] = extra
    elif family == "scgpt":
        path = folder / "best_model.pt"
        payload = {"model_state_dict": torch.load(path, weights_only=True), "extra": extra}
    else:
        path = folder / "models.ckpt"
        payload = torch.load(path, weights_only=True)
        payload["trainer"] = extra
    torch.save(payload, path)
    return path


@pytest.fixture
def make_folder(tmp_path: Path, write_tiny_tahoe: Callable[..., Path]) -> Callable[[str, str], Path]:
    def make(family: str, name: str) -> Path:
        if family == "tahoe-x1":
            return write_tiny_tahoe(tmp_path / name, "composer")
        if family == "scgpt":
            return _scgpt(tmp_path / name)
        return _scfoundation(tmp_path / name / "models")

    return make


FAMILIES = ["tahoe-x1", "scgpt", "scfoundation"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hostile_checkpoint_is_refused_and_never_runs(tmp_path: Path, make_folder: Callable[[str, str], Path], family: str) -> None:
    folder = make_folder(family, "evil")
    marker = tmp_path / "PWNED"
    weights = _poison(family, folder, Evil(marker))
    with pytest.raises(CheckpointError) as info:
        load_adapter(family, folder).load("cpu")
    msg = str(info.value)
    assert "\n" not in msg and weights.name in msg and "posix.system" in msg
    assert "sclstore convert-checkpoint" in msg and "--trust-pickle" in msg
    assert not marker.exists()


def test_hostile_checkpoint_in_cli_ingest_leaves_store_unchanged(
    tmp_path: Path, write_tiny_tahoe: Callable[..., Path], random_counts: Callable[..., Any], tiny_gene_ids: Callable[..., list[str]]
) -> None:
    folder = write_tiny_tahoe(tmp_path / "evil", "composer")
    marker = tmp_path / "PWNED"
    _poison("tahoe-x1", folder, Evil(marker))
    data = write_h5ad(tmp_path / "d.h5ad", random_counts(30, 40), tiny_gene_ids(40))
    store = tmp_path / "s"
    sclstore.open_store(store, create=True).close()
    before = snapshot(store)
    res = runner.invoke(app, ["ingest", str(data), "--model", "tahoe-x1", "--checkpoint", str(folder), "--workers", "0",
                              "--store", str(store)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load best-model.pt"), res.stderr
    assert not marker.exists() and snapshot(store) == before


def test_composer_bookkeeping_objects_are_inert_placeholders(tmp_path: Path, write_tiny_tahoe: Callable[..., Path]) -> None:
    """Composer's own classes (not installed here) load as placeholders: nothing is imported or called."""
    folder = write_tiny_tahoe(tmp_path / "c", "composer", composer_extras=True)
    adapter = load_adapter("tahoe-x1", folder)
    adapter.load("cpu")
    assert adapter.is_loaded
    # a training checkpoint's RNG states (numpy arrays and dtypes) and timestamps load too, zip or legacy format
    plain = write_tiny_tahoe(tmp_path / "p", "composer")
    payload = torch.load(plain / "best-model.pt", weights_only=True)
    payload["rng"] = [{"numpy": np.random.RandomState(5).get_state(), "python": (3, (1, 2), None)}]
    payload["state"]["saved_at"] = datetime.datetime(2025, 1, 2)
    for zipped in (True, False):
        torch.save(payload, plain / "best-model.pt", _use_new_zipfile_serialization=zipped)
        fresh = load_adapter("tahoe-x1", plain)
        fresh.load("cpu")
        for key, value in fresh.model.state_dict().items():
            torch.testing.assert_close(value, adapter.model.state_dict()[key], rtol=0, atol=0)


def _embeddings(family: str, folder: Path) -> dict[str, np.ndarray]:
    """Every layer and pool of 12 cells, embedded by the adapter of ``folder``."""
    if family == "tahoe-x1":
        genes = [f"ENSG{i:011d}" for i in range(1, 41)]
    elif family == "scgpt":
        genes = list(load_test_module("test_scgpt_model").GENES)
    else:
        genes = load_test_module("test_scfoundation_model").dataset_genes()
    rng = np.random.default_rng(4)
    counts = np.where(rng.random((12, len(genes))) < 0.5, rng.integers(1, 9, (12, len(genes))), 0).astype(np.float32)
    import scipy.sparse as sp

    adapter = load_adapter(family, folder)
    mapping = adapter.map_genes(genes)
    adapter.load("cpu")
    recs = adapter.tokenizer.tokenize(sp.csr_matrix(counts)[:, mapping.var_index], np.arange(12), seed=0)
    out = adapter.embed(adapter.collate(recs), layers=range(adapter.n_layers + 1), pools=adapter.default_pools)
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_checkpoint_needs_trust_and_gives_identical_embeddings(
    tmp_path: Path, make_folder: Callable[[str, str], Path], family: str
) -> None:
    clean = make_folder(family, "clean")
    expected = _embeddings(family, clean)
    src = make_folder(family, "src")
    extra = {"saved": datetime.date(2024, 5, 1), "ratio": fractions.Fraction(1, 3)}
    weights = _poison(family, src, extra)
    with pytest.raises(CheckpointError, match=r"refusing to load .*(datetime\.date|fractions\.Fraction).*--trust-pickle"):
        load_adapter(family, src).load("cpu")
    dst = tmp_path / "converted"
    refused = runner.invoke(app, ["convert-checkpoint", str(src), str(dst)])
    assert refused.exit_code == 1 and not dst.exists()
    assert len(refused.stderr.strip().splitlines()) == 1 and "--trust-pickle" in refused.stderr
    res = runner.invoke(app, ["convert-checkpoint", str(src), str(dst), "--trust-pickle", "--json"])
    assert res.exit_code == 0, res.stderr
    assert weights.stat().st_size > 0 and dst.is_dir()
    # the converted folder loads with weights_only=True only (no placeholders, no pickle code)
    got = _embeddings(family, dst)
    assert got.keys() == expected.keys()
    for pool in expected:
        np.testing.assert_array_equal(got[pool], expected[pool])
    again = runner.invoke(app, ["convert-checkpoint", str(src), str(dst), "--trust-pickle"])
    assert again.exit_code == 1 and "not an empty folder" in again.stderr


def test_converted_tahoe_is_the_hf_layout(tmp_path: Path, write_tiny_tahoe: Callable[..., Path]) -> None:
    src = write_tiny_tahoe(tmp_path / "src", "composer")
    _poison("tahoe-x1", src, fractions.Fraction(2, 3))
    dst = tmp_path / "hf"
    convert_checkpoint(src, dst, trust_pickle=True)
    assert sorted(p.name for p in dst.iterdir()) == ["collator_config.yml", "model.safetensors", "model_config.yml", "vocab.json"]
    assert load_adapter("tahoe-x1", dst).describe()["checkpoint_format"] == "hf"
    shutil.rmtree(dst)
