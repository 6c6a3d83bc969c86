"""The per-process layout cache of direct-readable arrays: hits skip the libtiledb open, any
change to the array's files is a miss. Oracle: the values written (numpy)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sclstore.store import arrays, layout_cache
from sclstore.store.config import ArraySpec


@pytest.fixture(autouse=True)
def _fresh_cache():
    layout_cache.clear()
    yield
    layout_cache.clear()


def _build(uri: str, *, n: int = 600, dim: int = 64, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).normal(size=(2, n, dim)).astype(np.float32)
    arrays.create_array(uri, ArraySpec(n_layers=2, n_cells=n, dim=dim, pools=("cls",)), layers=[0, 1], meta={})
    for lo in range(0, n, 200):
        arrays.write_block(uri, lo, {"cls": data[:, lo : lo + 200]}, dtype="float32", durable=False)
    arrays.consolidate(uri, full=True)
    return data


def test_second_reader_skips_the_libtiledb_open(tmp_path: Path) -> None:
    uri = str(tmp_path / "a")
    data = _build(uri)
    with arrays.ArrayReader(uri) as first:
        assert first.direct and first._arr_handle is not None  # validated through libtiledb
    with arrays.ArrayReader(uri) as again, arrays.ArrayReader(f"file://{uri}") as by_uri:
        assert again.direct and again._arr_handle is None and by_uri._arr_handle is None
        assert (again.n_slots, again.n_cells, again.dim, again.pools, again.dtype) == (2, 600, 64, ("cls",), "float32")
        cells = np.array([0, 5, 255, 256, 599])
        np.testing.assert_array_equal(again.read([1, 0], cells, "cls"), data[[1, 0]][:, cells])
        np.testing.assert_array_equal(by_uri.read([0], np.arange(100, 400), "cls"), data[[0], 100:400])
        again.close()  # closing one reader leaves the shared tile files to the other
        np.testing.assert_array_equal(by_uri.read([1], None, "cls"), data[[1]])
    with arrays.ArrayReader(uri, direct=False) as slow:  # libtiledb reads never use the cache
        assert not slow.direct
        np.testing.assert_array_equal(slow.read([1], None, "cls"), data[[1]])


def test_any_change_to_the_files_is_a_miss(tmp_path: Path) -> None:
    uri = str(tmp_path / "a")
    data = _build(uri)
    arrays.ArrayReader(uri).close()
    # rewrite cells 10..19 and consolidate again: new fragment folder, new values
    new = np.full((2, 10, 64), 7.0, dtype=np.float32)
    arrays.write_block(uri, 10, {"cls": new}, dtype="float32", durable=False)
    arrays.consolidate(uri, full=True)
    data[:, 10:20] = new
    with arrays.ArrayReader(uri) as rd:
        assert rd.direct and rd._arr_handle is not None  # validated again
        np.testing.assert_array_equal(rd.read([0, 1], np.arange(0, 30), "cls"), data[:, :30])
    # the same data file changed in place (same size): its mtime differs, so validate again
    (frag,) = (Path(uri) / "__fragments").iterdir()
    f = frag / "a0.tdb"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with arrays.ArrayReader(uri) as rd:
        assert rd._arr_handle is not None and rd.direct
    with arrays.ArrayReader(uri) as rd:
        assert rd._arr_handle is None  # cached again
    # new array metadata (e.g. a re-encoded array) is a miss too
    import tiledb

    with tiledb.open(uri, "w") as arr:
        arr.meta["note"] = "x"
    with arrays.ArrayReader(uri) as rd:
        assert rd._arr_handle is not None


def test_a_failed_direct_read_forgets_the_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sclstore.store.tilefile import LayoutError, TileFile

    uri = str(tmp_path / "a")
    data = _build(uri)
    arrays.ArrayReader(uri).close()
    assert layout_cache.get(uri) is not None

    def refuse(self: TileFile, *_args: object) -> None:
        raise LayoutError("tiles 0..1: unexpected chunk header")

    with arrays.ArrayReader(uri) as rd:
        monkeypatch.setattr(TileFile, "_check", refuse)
        np.testing.assert_array_equal(rd.read([1], np.arange(3, 300), "cls"), data[[1], 3:300])  # via libtiledb
        assert not rd.direct
    assert layout_cache.get(uri) is None


def test_least_recently_used_layouts_are_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout_cache, "MAX_ENTRIES", 2)
    uris = [str(tmp_path / name) for name in ("a", "b", "c")]
    for i, uri in enumerate(uris):
        _build(uri, n=300, dim=8, seed=i)
    arrays.ArrayReader(uris[0]).close()
    arrays.ArrayReader(uris[1]).close()
    assert layout_cache.get(uris[0]) is not None  # a is now the most recently used
    arrays.ArrayReader(uris[2]).close()
    assert layout_cache.get(uris[1]) is None and layout_cache.get(uris[0]) is not None and layout_cache.get(uris[2]) is not None


def test_mapped_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout_cache, "MAX_FILES", 2)  # each array below maps one file (one pool, one fragment)
    uris = [str(tmp_path / name) for name in ("a", "b", "c")]
    for i, uri in enumerate(uris):
        _build(uri, n=300, dim=8, seed=i)
        arrays.ArrayReader(uri).close()
    assert [layout_cache.get(u) is not None for u in uris] == [False, True, True]
