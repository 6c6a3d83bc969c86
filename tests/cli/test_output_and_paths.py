"""Unlucky command lines: -o onto a folder, onto an existing file, onto a full disk; a dangling
--store link; a query with bytes that are not UTF-8. Each is one line (or works), exit 1, and
leaves the store and the output folder as they were."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.testing import store_snapshot, toy_obs

runner = CliRunner()
SCLSTORE = str(Path(sys.executable).with_name("sclstore"))


def invoke(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _store(root: Path, *, n_cells: int = 40, dim: int = 6, n_layers: int = 3) -> np.ndarray:
    values = np.random.default_rng(1).normal(size=(n_layers, n_cells, dim)).astype(np.float32)
    with Backend.create(root) as b:
        ds = b.register_dataset(name="toy", content_hash=cache_key("toy", n_cells), obs=toy_obs(n_cells), n_vars=5, source_path=None)
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=n_layers - 1, d_model=dim, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r", n_cells), params={}, layers=list(range(n_layers)),
                           spec=ArraySpec(n_layers=n_layers, n_cells=n_cells, dim=dim, pools=("cls",)))
        lease = b.acquire(run.id, wait=False)
        assert lease is not None
        b.write_block(run, lease, 0, {"cls": values})
        b.complete(run, lease, {})
    return values


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("small") / "store"
    yield root, _store(root)


def test_output_naming_a_folder_is_refused(small: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root, _ = small
    folder = tmp_path / "result.npy"
    folder.mkdir()
    before = store_snapshot(root)
    code, _, err = invoke("query", "SELECT embedding FROM embeddings WHERE run = 1", "-o", str(folder), "--store", str(root))
    assert code == 1
    assert "is a folder" in _one_line(err)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["result.npy"]
    assert store_snapshot(root) == before


def test_existing_output_needs_force(small: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root, values = small
    out = tmp_path / "mine.npy"
    out.write_bytes(b"my precious results")
    sql = "SELECT embedding FROM embeddings WHERE run = 1 AND layer = 2"
    code, _, err = invoke("query", sql, "-o", str(out), "--store", str(root))
    assert code == 1
    assert "already exists" in _one_line(err) and "--force" in err
    assert out.read_bytes() == b"my precious results"
    code, _, err = invoke("query", sql, "-o", str(out), "--force", "--store", str(root))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out), values[2:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npy"]  # no partial file left


def test_dangling_store_link_is_one_line(tmp_path: Path) -> None:
    link = tmp_path / "store"
    link.symlink_to(tmp_path / "gone" / "store")
    for args in (["ls", "--store", str(link)], ["init", "--store", str(link)],
                 ["query", "SELECT * FROM embeddings WHERE run = 1", "--store", str(link)]):
        code, _, err = invoke(*args)
        assert code == 1
        line = _one_line(err)
        assert "symbolic link" in line and "does not exist" in line
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_query_with_invalid_utf8_bytes(small: tuple[Path, np.ndarray]) -> None:
    """Bytes from a Latin-1 terminal reach Python as lone surrogates; a real process is used."""
    root, _ = small
    before = store_snapshot(root)
    query = b"SELECT * FROM embeddings WHERE run = 1 AND donor = 'd\xe9'"
    res = subprocess.run([SCLSTORE.encode(), b"query", query, b"--store", str(root).encode()], capture_output=True, check=False)
    assert res.returncode == 1
    line = _one_line(res.stderr.decode("utf-8", "replace"))
    assert "not valid UTF-8 (at character 54)" in line
    assert store_snapshot(root) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to mount a small tmpfs (full disk)")
@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount")
@pytest.mark.parametrize("ext", [".npy", ".npz", ".csv", ".parquet", ".h5ad"])
def test_export_onto_a_full_disk(tmp_path: Path, ext: str) -> None:
    root = tmp_path / "store"
    _store(root, n_cells=3000, dim=64, n_layers=3)  # 2.3 MB of float32: larger than the 1 MiB disk
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        before = store_snapshot(root)
        # a real process: a memory-mapped write would die of SIGBUS (exit -7), killing pytest itself
        res = subprocess.run([SCLSTORE, "query", "SELECT embedding FROM embeddings WHERE run = 1", "-o", str(disk / f"out{ext}"),
                              "--store", str(root)], capture_output=True, text=True, check=False)
        assert res.returncode == 1, (res.returncode, res.stderr)
        line = _one_line(res.stderr)
        assert "No space left on device" in line and "nothing was written" in line
        assert os.listdir(disk) == []  # no partial file, hidden or not
        assert store_snapshot(root) == before
    finally:
        subprocess.run(["umount", str(disk)], check=False)
