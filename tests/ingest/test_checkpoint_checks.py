"""Issue 10 item 4: a broken checkpoint is found before the store is touched.

The user ingests with a checkpoint whose weight file is truncated, overwritten with garbage, or
whose config disagrees with the weights. ``sclstore ingest`` answers with one line naming the
problem, and every catalog table and the arrays folder are exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app

from .trust_helpers import load_test_module, snapshot, write_h5ad

runner = CliRunner()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _garbage(path: Path) -> None:
    import numpy as np

    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _garbage_block(path: Path) -> None:
    import numpy as np

    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = np.random.default_rng(1).bytes(4096)
    path.write_bytes(bytes(data))


def _d_model(folder: Path) -> None:
    cfg = yaml.safe_load((folder / "model_config.yml").read_text())
    cfg["d_model"] = 64
    (folder / "model_config.yml").write_text(yaml.safe_dump(cfg))


DAMAGED = r"cannot read best-model\.pt in .* as a torch checkpoint.*download it again"
TAHOE_CASES: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("hf", "truncated", lambda f: _truncate(f / "model.safetensors"), r"cannot read model\.safetensors"),
    ("hf", "garbage", lambda f: _garbage(f / "model.safetensors"), r"cannot read model\.safetensors"),
    ("hf", "d_model", _d_model, r"weight '.*' has shape \[.*32.*\] but model_config\.yml implies \[.*64.*\]"),
    ("composer", "truncated", lambda f: _truncate(f / "best-model.pt"), DAMAGED),
    ("composer", "garbage", lambda f: _garbage(f / "best-model.pt"), DAMAGED),
]


def _ingest_fails_cleanly(tmp_path: Path, data: Path, family: str, folder: Path, match: str) -> None:
    store = tmp_path / "s"
    sclstore.open_store(store, create=True).close()
    before = snapshot(store)
    res = runner.invoke(app, ["ingest", str(data), "--model", family, "--checkpoint", str(folder), "--workers", "0",
                              "--store", str(store)])
    assert res.exit_code == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(store) == before
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize(("fmt", "case", "damage", "match"), TAHOE_CASES, ids=[f"{c[0]}-{c[1]}" for c in TAHOE_CASES])
def test_broken_tahoe_checkpoint_leaves_store_unchanged(
    tmp_path: Path, write_tiny_tahoe: Callable[..., Path], random_counts: Callable[..., Any],
    tiny_gene_ids: Callable[..., list[str]], fmt: str, case: str, damage: Callable[[Path], None], match: str,
) -> None:
    folder = write_tiny_tahoe(tmp_path / "ckpt", fmt)
    damage(folder)
    data = write_h5ad(tmp_path / "d.h5ad", random_counts(30, 40), tiny_gene_ids(40))
    _ingest_fails_cleanly(tmp_path, data, "tahoe-x1", folder, match)


@pytest.mark.parametrize("case", ["truncated", "garbage", "block"])
def test_broken_scgpt_and_scfoundation_weights(tmp_path: Path, case: str) -> None:
    damage = {"truncated": _truncate, "garbage": _garbage, "block": _garbage_block}[case]
    sg = load_test_module("test_scgpt_model")
    folder = sg.write_tiny_scgpt(tmp_path / "scgpt")
    damage(folder / "best_model.pt")
    data = write_h5ad(tmp_path / "g.h5ad", sg.counts(20), list(sg.GENES))
    _ingest_fails_cleanly(tmp_path / "a", data, "scgpt", folder, r"best_model\.pt")
    sf = load_test_module("test_scfoundation_model")
    folder = sf.write_tiny_scfoundation(tmp_path / "sf" / "models", seed=3)
    damage(folder / "models.ckpt")
    genes = sf.dataset_genes()
    data = write_h5ad(tmp_path / "f.h5ad", sf.random_counts(20, len(genes)), genes)
    _ingest_fails_cleanly(tmp_path / "b", data, "scfoundation", folder, r"models\.ckpt")


def test_scgpt_args_mismatching_weights(tmp_path: Path) -> None:
    sg = load_test_module("test_scgpt_model")
    folder = sg.write_tiny_scgpt(tmp_path / "scgpt", args_overrides={"d_hid": 64})
    folder2 = sg.write_tiny_scgpt(tmp_path / "scgpt2")
    (folder / "best_model.pt").write_bytes((folder2 / "best_model.pt").read_bytes())
    data = write_h5ad(tmp_path / "g.h5ad", sg.counts(20), list(sg.GENES))
    _ingest_fails_cleanly(tmp_path, data, "scgpt", folder, r"has shape .* but args\.json implies")
