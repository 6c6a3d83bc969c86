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
