"""Direct tile-file reads against two oracles: the values written (numpy) and libtiledb's reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sclstore.store import arrays
from sclstore.store.config import ArraySpec
from sclstore.store.tilefile import KNOWN_FORMAT_VERSIONS, LayoutError, TileFile, single_fragment


def _build(root: Path, *, n: int, dim: int, dtype: str, slots: int = 3, pools: tuple[str, ...] = ("cls", "mean"),
           step: int = 37, consolidate: bool = True, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = {p: rng.normal(size=(slots, n, dim)).astype(np.float32) for p in pools}
    uri = str(root / "a")
    arrays.create_array(uri, ArraySpec(n_layers=slots, n_cells=n, dim=dim, pools=pools, dtype=dtype), layers=list(range(slots)), meta={})
    for lo in range(0, n, step):
        arrays.write_block(uri, lo, {p: v[:, lo : lo + step] for p, v in data.items()}, dtype=dtype, durable=False)
    if consolidate:
        arrays.consolidate(uri, full=True)
    truth = {p: v.astype(np.float16).astype(np.float32) if dtype == "float16" else v for p, v in data.items()}
    return uri, truth


def _selections(n: int, tile: int, rng: np.random.Generator) -> list[np.ndarray | None]:
    """All cells; ranges aligned and not to tiles; one cell; the last (partial) tile; scattered."""
    picks: list[np.ndarray | None] = [
        None,
        np.arange(n),
        np.arange(0, min(n, 2 * tile)),  # whole tiles
        np.arange(tile // 2, min(n, 3 * tile + 5)),  # partial tiles at both ends
        np.arange(tile + 1, tile + 3),  # inside one tile
        np.array([n - 1]),
        np.arange(max(0, n - tile - 3), n),  # ends in the last, partial tile
        np.sort(rng.choice(n, size=min(n, 40), replace=False)),  # <= 64 ranges
        np.sort(rng.choice(n, size=n // 3, replace=False)),  # many ranges: row gather
    ]
    clipped = [c if c is None else np.unique(c[c < n]) for c in picks]  # small arrays have one tile
    return [c for c in clipped if c is None or c.size]


@pytest.mark.parametrize(
    ("n", "dim", "dtype"),
    [
        (1000, 16, "float32"),  # one chunk per tile
        (700, 512, "float32"),  # 256-cell tiles of 8 chunks, last tile partial
        (900, 512, "float16"),
        (1500, 100, "float32"),  # 1024-cell tiles whose last chunk is short: rows may straddle chunks
        (333, 6, "float16"),
    ],
)
def test_direct_reads_equal_numpy_and_libtiledb(tmp_path: Path, n: int, dim: int, dtype: str) -> None:
    uri, truth = _build(tmp_path, n=n, dim=dim, dtype=dtype)
    rng = np.random.default_rng(3)
    with arrays.ArrayReader(uri) as fast, arrays.ArrayReader(uri, direct=False) as slow:
        # a fresh, fully consolidated array must qualify: if a TileDB upgrade changes its fragment
        # format version, review sclstore/store/tilefile.py and extend KNOWN_FORMAT_VERSIONS
        assert fast.direct, f"direct reads unavailable; known format versions {sorted(KNOWN_FORMAT_VERSIONS)}"
        assert not slow.direct
        for cells in _selections(n, fast.cell_tile, rng):
            for slots in ([1], [0, 2], [2, 2, 0]):
                for pool in ("cls", "mean"):
                    got = fast.read(slots, cells, pool)
                    want = truth[pool][slots] if cells is None else truth[pool][slots][:, cells]
                    np.testing.assert_array_equal(got, want)
                    np.testing.assert_array_equal(got, slow.read(slots, cells, pool))
        assert fast.direct  # no read fell back


def test_unconsolidated_and_partial_arrays_use_libtiledb(tmp_path: Path) -> None:
    uri, truth = _build(tmp_path, n=300, dim=8, dtype="float32", consolidate=False)
    with arrays.ArrayReader(uri) as rd:
        assert not rd.direct  # several fragments
        np.testing.assert_array_equal(rd.read([0, 2], None, "cls"), truth["cls"][[0, 2]])
    half = str(tmp_path / "half")
    arrays.create_array(half, ArraySpec(n_layers=1, n_cells=100, dim=8, pools=("cls",), dtype="float32"), layers=[0], meta={})
    arrays.write_block(half, 0, {"cls": truth["cls"][:1, :50]}, dtype="float32")
    arrays.consolidate(half, full=True)
    with arrays.ArrayReader(half) as rd:
        assert not rd.direct  # one fragment, but cells 50..99 never written
        np.testing.assert_array_equal(rd.read([0], np.arange(50), "cls"), truth["cls"][:1, :50])


def test_layout_checks_refuse_foreign_files(tmp_path: Path) -> None:
    uri, truth = _build(tmp_path, n=700, dim=512, dtype="float32", slots=2, pools=("cls",))
    frag = single_fragment(uri)
    n_tiles, tile_elems = 2 * 3, 256 * 512
    tf = TileFile(frag / "a0.tdb", n_tiles=n_tiles, tile_elems=tile_elems, dtype=np.dtype(np.float32))
    dest = np.empty((2, tile_elems), dtype=np.float32)
    tf.decode(3, 5, dest)  # slot 1, tiles 0-1
    np.testing.assert_array_equal(dest.reshape(512, 512), truth["cls"][1, :512])
    tf.close()

    bad = tmp_path / "bad.tdb"
    shutil.copy(frag / "a0.tdb", bad)
    with pytest.raises(LayoutError, match="bytes"):
        TileFile(bad, n_tiles=n_tiles + 1, tile_elems=tile_elems, dtype=np.dtype(np.float32))
    raw = bytearray(bad.read_bytes())
    stride = 8 + 8 * 12 + tile_elems * 4
    raw[4 * stride + 8 + 3 * (65536 + 12) + 8] = 1  # tile 4, chunk 3: metadata size 1 (a filtered tile)
    bad.write_bytes(bytes(raw))
    tf = TileFile(bad, n_tiles=n_tiles, tile_elems=tile_elems, dtype=np.dtype(np.float32))
    tf.decode(0, 4, np.empty((4, tile_elems), dtype=np.float32))
    with pytest.raises(LayoutError, match="chunk header"):
        tf.decode(3, 5, np.empty((2, tile_elems), dtype=np.float32))
    rows = tf.gather(np.array([4, 4]), np.array([0, 31]), 512)  # chunk 0 of tile 4 is intact (32 rows/chunk)
    assert rows is not None
    np.testing.assert_array_equal(rows, truth["cls"][1, [256, 287]])
    with pytest.raises(LayoutError, match="chunk header"):
        tf.gather(np.array([4]), np.array([3 * 32 + 1]), 512)  # a row of chunk 3
    with pytest.raises(LayoutError, match="chunks"):
        TileFile(bad, n_tiles=n_tiles, tile_elems=tile_elems * 2, dtype=np.dtype(np.float32))

    fake = tmp_path / "fake"
    (fake / "__fragments" / "__1_2_0123abcd_99").mkdir(parents=True)
    with pytest.raises(LayoutError, match="format version"):
        single_fragment(str(fake))
    (fake / "__fragments" / f"__3_4_0123abcd_{max(KNOWN_FORMAT_VERSIONS)}").mkdir()
    with pytest.raises(LayoutError, match="2 fragments"):
        single_fragment(str(fake))
    with pytest.raises(LayoutError, match="local"):
        single_fragment("s3://bucket/array")


def test_reader_falls_back_to_libtiledb_on_a_bad_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, truth = _build(tmp_path, n=600, dim=512, dtype="float32", slots=2, pools=("cls",))

    def refuse(self: TileFile, *_args: object) -> None:
        raise LayoutError("tiles 0..1: unexpected chunk header")

    with arrays.ArrayReader(uri) as rd:
        assert rd.direct
        monkeypatch.setattr(TileFile, "_check", refuse)
        np.testing.assert_array_equal(rd.read([1], np.arange(10, 400), "cls"), truth["cls"][[1]][:, 10:400])
        assert not rd.direct  # later reads go through libtiledb
        np.testing.assert_array_equal(rd.read([0], None, "cls"), truth["cls"][[0]])
    monkeypatch.undo()
    with arrays.ArrayReader(uri) as rd:  # the row-gather path falls back too
        assert rd.direct
        monkeypatch.setattr(TileFile, "_check", refuse)
        scattered = np.arange(0, 600, 3)
        np.testing.assert_array_equal(rd.read([0, 1], scattered, "cls"), truth["cls"][:, scattered])
        assert not rd.direct


class _Ranges:
    """A local file read by byte ranges, as a remote one is (the VFS path without a server)."""

    mapped = None

    def __init__(self, path: Path, max_gap: int, parallel: int = 1) -> None:
        self.path, self.name, self.max_gap, self.parallel = path, path.name, max_gap, parallel
        self.size = path.stat().st_size
        self.file_id = (0, self.size, 0)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        self.reads.append((offset, nbytes))
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return np.frombuffer(fh.read(nbytes), dtype=np.uint8)

    def close(self) -> None:
        pass


def test_fetched_ranges_merge_within_the_gap_and_keep_alignment(tmp_path: Path) -> None:
    from sclstore.store.tilesource import fetch_ranges

    f = tmp_path / "bytes"
    content = np.arange(1000, dtype=np.uint32).view(np.uint8)  # byte i of the file: known
    f.write_bytes(content.tobytes())
    src = _Ranges(f, max_gap=10)
    got = fetch_ranges(src, np.array([100, 4, 30, 112]), np.array([108, 20, 38, 120]))
    # [4, 20) and [30, 38) are 10 apart: one read; [100, 108) and [112, 120): one read
    assert src.reads == [(4, 34), (100, 20)]
    assert got.bases is not None and [int(b) % 8 for b in got.bases] == [4, 4]  # same residue as the file offsets
    np.testing.assert_array_equal(got.take(np.array([4, 33, 116]), 4), content[[[4, 5, 6, 7], [33, 34, 35, 36], [116, 117, 118, 119]]])
    assert got.locate(30, 8) is not None and got.locate(36, 8) is None  # [36, 44) runs past the first piece
    with pytest.raises(ValueError, match="outside"):
        got.locate_many(np.array([50]), 4)
    one = fetch_ranges(src, np.array([16]), np.array([24]))  # a single aligned range is used as read
    assert one.bases is not None and one.buf.size == 8 and src.reads[-1] == (16, 8)
    # many scattered pieces, read by up to 3 threads: the same reads and bytes
    par = _Ranges(f, max_gap=0, parallel=3)
    starts = np.arange(0, 4000, 100) + np.arange(40) % 7
    got = fetch_ranges(par, starts, starts + 13)
    assert sorted(par.reads) == [(int(a), 13) for a in starts]
    np.testing.assert_array_equal(got.take(starts, 13), content[starts[:, None] + np.arange(13)])


@pytest.mark.parametrize(("n", "dim", "dtype"), [(700, 512, "float32"), (900, 512, "float16"), (1500, 100, "float32")])
def test_ranged_tile_reads_equal_mapped_ones(tmp_path: Path, n: int, dim: int, dtype: str) -> None:
    """The remote code path (fetch the byte ranges, decode from them) on a local file: equal to
    the mapped path and the values written, reading only the tiles or chunks needed."""
    uri, truth = _build(tmp_path, n=n, dim=dim, dtype=dtype, slots=2, pools=("cls",))
    frag = single_fragment(uri)
    c = arrays.cell_tile(dim, dtype)
    n_ct = -(-n // c)
    view = np.dtype(np.float16 if dtype == "float16" else np.float32)
    mapped = TileFile(frag / "a0.tdb", n_tiles=2 * n_ct, tile_elems=c * dim, dtype=view)
    src = _Ranges(frag / "a0.tdb", max_gap=0)
    ranged = TileFile(src, n_tiles=2 * n_ct, tile_elems=c * dim, dtype=view)
    assert ranged.remote and not mapped.remote and src.reads == [(0, 20)]  # the first tile's header
    a, b = np.empty((n_ct, c * dim), np.float32), np.empty((n_ct, c * dim), np.float32)
    mapped.decode(n_ct, 2 * n_ct, a)
    ranged.decode(n_ct, 2 * n_ct, b)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.reshape(-1, dim)[:n], truth["cls"][1])
    assert src.reads[-1] == (n_ct * mapped._stride, n_ct * mapped._stride)  # the layer in one read
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(n, size=n // 4, replace=False))
    tiles, rows = np.divmod(cells, c)
    got = ranged.gather(tiles + n_ct, rows, dim)
    want = mapped.gather(tiles + n_ct, rows, dim)
    assert (got is None) == (want is None) == (dim == 100)  # 100-value rows straddle 64 KiB chunks
    if got is not None:
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.astype(np.float32), truth["cls"][1][cells])
    fetched = ranged.fetch_tiles(np.array([0, 2]))  # two runs: two reads, decodable from what was fetched
    before = len(src.reads)
    one = np.empty((1, c * dim), np.float32)
    ranged.decode(2, 3, one, fetched)
    assert len(src.reads) == before
    slot, t = divmod(2, n_ct)
    want_cells = truth["cls"][slot][t * c : (t + 1) * c]
    np.testing.assert_array_equal(one.reshape(c, dim)[: len(want_cells)], want_cells)
