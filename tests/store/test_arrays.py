"""TileDB array layer against a numpy oracle: every read path, both encodings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sclstore.store import arrays
from sclstore.store.config import ArraySpec


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reads_match_numpy(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    n, dim = 1000, 16
    data = {p: rng.normal(size=(4, n, dim)).astype(np.float32) for p in ("cls", "max")}
    uri = str(tmp_path / "a")
    arrays.create_array(uri, ArraySpec(n_layers=4, n_cells=n, dim=dim, pools=("cls", "max"), dtype=dtype), layers=[0, 2, 4, 6], meta={})
    for lo in range(0, n, 300):  # uneven batches, several fragments
        arrays.write_block(uri, lo, {p: v[:, lo : lo + 300] for p, v in data.items()}, dtype=dtype)
    expect = {p: (v.astype(np.float16).astype(np.float32) if dtype == "float16" else v) for p, v in data.items()}
    info = arrays.array_info(uri)
    assert info["written_cells"] == (0, n - 1) and info["layers"] == (0, 2, 4, 6) and info["fragments"] == 4
    arrays.consolidate(uri, full=True)
    assert arrays.array_info(uri)["fragments"] == 1
    with arrays.ArrayReader(uri) as rd:
        np.testing.assert_array_equal(rd.read([0, 1, 2, 3], None, "cls"), expect["cls"])
        contiguous = np.arange(200, 300)
        np.testing.assert_array_equal(rd.read([2], contiguous, "max"), expect["max"][[2]][:, contiguous])
        sparse = np.sort(rng.choice(n, size=100, replace=False))  # few ranges: range reads
        np.testing.assert_array_equal(rd.read([3, 1], sparse, "cls"), expect["cls"][[3, 1]][:, sparse])
        dense = np.sort(rng.choice(n, size=600, replace=False))  # many ranges, most tiles: bounding read
        np.testing.assert_array_equal(rd.read([1], dense, "cls"), expect["cls"][[1]][:, dense])
        chunks = list(rd.iter_chunks([0], dense, "max", chunk_cells=128))
        np.testing.assert_array_equal(np.concatenate([c for _i, c in chunks], axis=1), expect["max"][[0]][:, dense])
        np.testing.assert_array_equal(np.concatenate([i for i, _c in chunks]), dense)


def test_coalesce() -> None:
    assert arrays.coalesce(np.array([1, 2, 3, 7, 9, 10])) == [(1, 3), (7, 7), (9, 10)]
    assert arrays.coalesce(np.array([], dtype=np.int64)) == []


@pytest.mark.parametrize(("dim", "dtype", "expected"), [(512, "float32", 256), (512, "float16", 512), (2560, "float16", 64), (4, "float32", 8192)])
def test_cell_tile_sizes(dim: int, dtype: str, expected: int) -> None:
    assert arrays.cell_tile(dim, dtype) == expected


def test_a_durable_write_fsyncs_what_it_added_and_nothing_older(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: each write fsyncs exactly the files and folders it created (oracle: the
    directory listing before and after the write) plus the two parent folders, so the work per
    chunk stays constant however many fragments the array already holds."""
    n, dim, step = 240, 4, 20
    uri = tmp_path / "a"
    arrays.create_array(str(uri), ArraySpec(n_layers=1, n_cells=n, dim=dim, pools=("cls",), dtype="float32"), layers=[0], meta={})
    synced: list[str] = []
    real_open = arrays.os.open

    def spy_open(path: str, flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        names[fd] = str(Path(path).resolve())
        return fd

    names: dict[int, str] = {}
    monkeypatch.setattr(arrays.os, "open", spy_open)
    monkeypatch.setattr(arrays.os, "fsync", lambda fd: synced.append(names[fd]))
    data = np.arange(n * dim, dtype=np.float32).reshape(1, n, dim)
    per_write = []
    for lo in range(0, n, step):
        before = {str(p.resolve()) for p in uri.rglob("*")}
        synced.clear()
        arrays.write_block(str(uri), lo, {"cls": data[:, lo : lo + step]}, dtype="float32")
        added = {str(p.resolve()) for p in uri.rglob("*")} - before
        assert added and set(synced) == added | {str((uri / "__fragments").resolve()), str((uri / "__commits").resolve())}
        per_write.append(len(synced))
    assert len(set(per_write)) == 1  # the 12th write fsyncs no more than the 1st
    monkeypatch.undo()
    with arrays.ArrayReader(str(uri)) as rd:
        np.testing.assert_array_equal(rd.read([0], None, "cls"), data)
