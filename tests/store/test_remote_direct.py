"""Direct reads of complete runs on object storage (moto's S3 on loopback): ranged reads of the
tile files through TileDB's VFS, against two oracles -- the values written (numpy) and libtiledb's
reader -- plus the requests they make, the per-process layout cache, corrupted tiles, fallbacks,
``direct_reads=False`` and ``verify``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tiledb
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.store import ArraySpec, Backend, StoreSettings, arrays, cache_key, direct, layout_cache
from sclstore.store.errors import SclstoreError
from sclstore.store.location import REMOTE_DEFAULTS
from sclstore.store.tilesource import VfsFile
from sclstore.testing import toy_obs

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_cache():
    layout_cache.clear()
    yield
    layout_cache.clear()


def _ctx(s3, **extra: str) -> tiledb.Ctx:
    """The settings a remote store reads with (its object-storage defaults), plus ``extra``."""
    return tiledb.Ctx(tiledb.Config(REMOTE_DEFAULTS | s3.server.tiledb_config() | extra))


def _build(uri: str, ctx: tiledb.Ctx, *, n: int, dim: int, dtype: str = "float32", slots: int = 3,
           blocks: tuple[int, ...] = (), seed: int = 0) -> np.ndarray:
    """A complete array written in blocks starting at ``blocks`` (each its own fragment, kept
    apart by a metadata-only consolidation); one fragment when ``blocks`` is empty."""
    data = np.random.default_rng(seed).normal(size=(slots, n, dim)).astype(np.float32)
    spec = ArraySpec(n_layers=slots, n_cells=n, dim=dim, pools=("cls",), dtype=dtype)
    arrays.create_array(uri, spec, layers=list(range(slots)), meta={}, ctx=ctx)
    starts = list(blocks) or [0]
    for lo, hi in zip(starts, [*starts[1:], n], strict=True):
        arrays.write_block(uri, lo, {"cls": data[:, lo:hi]}, dtype=dtype, ctx=ctx)
    ranges = arrays.finalise(uri, n_cells=n, full=not blocks, ctx=ctx)
    assert len(ranges) == len(starts)
    return data.astype(np.float16).astype(np.float32) if dtype == "float16" else data


def _selections(n: int, tile: int, rng: np.random.Generator) -> list[tuple[list[int], np.ndarray | None]]:
    """(slots, cells): full layers, contiguous ranges (aligned or not), scattered cells (few
    ranges, many ranges), all layers x a few cells."""
    picks = [
        ([1], None),
        ([2, 0], None),
        ([0], np.arange(0, min(n, 2 * tile))),
        ([1], np.arange(tile // 2, min(n, 3 * tile + 5))),
        ([2], np.arange(n // 2, n // 2 + n // 10)),
        ([0], np.arange(max(0, n - tile - 3), n)),
        ([1, 2], np.sort(rng.choice(n, size=40, replace=False))),
        ([1], np.sort(rng.choice(n, size=n // 3, replace=False))),
        ([0, 1, 2], np.sort(rng.choice(n, size=12, replace=False))),
        ([2, 2, 0], np.array([n - 1])),
    ]
    return [(s, c if c is None else np.unique(c[c < n])) for s, c in picks]


@pytest.mark.parametrize(
    ("n", "dim", "dtype", "blocks"),
    [
        (700, 512, "float32", ()),  # one fragment, 256-cell tiles of 8 chunks, the last tile partial
        (1000, 512, "float32", (0, 512, 768)),  # three disjoint fragments of 2, 1 and 1 (partial) tiles
        (1200, 512, "float16", (0, 512)),  # 512-cell tiles of 2-byte values
        (1500, 100, "float32", ()),  # 1024-cell tiles whose last chunk is short: rows may straddle chunks
    ],
)
def test_remote_direct_reads_equal_numpy_and_libtiledb(s3, n: int, dim: int, dtype: str, blocks: tuple[int, ...]) -> None:
    ctx = _ctx(s3)
    uri = s3.uri("a")
    truth = _build(uri, ctx, n=n, dim=dim, dtype=dtype, blocks=blocks)
    rng = np.random.default_rng(5)
    with arrays.ArrayReader(uri, ctx=ctx) as fast, arrays.ArrayReader(uri, ctx=ctx, direct=False) as slow:
        assert fast.direct and not slow.direct
        assert len(fast._direct.fragments) == max(1, len(blocks))
        assert all(isinstance(tf.source, VfsFile) for tf in fast._direct.files)  # byte ranges, not mapped files
        for slots, cells in _selections(n, fast.cell_tile, rng):
            got = fast.read(slots, cells, "cls")
            want = truth[slots] if cells is None else truth[slots][:, cells]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got, slow.read(slots, cells, "cls"))
        assert fast.direct  # no read fell back


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    reads: list[tuple[str, int, int]] = []
    real = VfsFile.read

    def spy(self: VfsFile, offset: int, nbytes: int) -> np.ndarray:
        reads.append((self.path, offset, nbytes))
        return real(self, offset, nbytes)

    monkeypatch.setattr(VfsFile, "read", spy)
    return reads


def test_one_ranged_read_per_run_of_tiles(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Oracle: the byte offsets of the layout (8-byte chunk count, 8 chunk headers of 12 bytes,
    then the tile's 256 x 512 float32 values, per tile; tiles slot-major)."""
    n, dim, c = 1280, 512, 256  # 5 tiles per layer
    stride = 8 + 8 * 12 + c * dim * 4
    ctx = _ctx(s3, **{"vfs.min_batch_gap": "0"})
    uri = s3.uri("a")
    truth = _build(uri, ctx, n=n, dim=dim)
    reads = _spy_reads(monkeypatch)
    with arrays.ArrayReader(uri, ctx=ctx) as rd:
        assert rd.direct and rd.cell_tile == c
        (f,) = rd._direct.files
        reads.clear()
        np.testing.assert_array_equal(rd.read([2], None, "cls"), truth[[2]])
        assert reads == [(f.path, 10 * stride, 5 * stride)]  # a full layer: one read
        reads.clear()
        np.testing.assert_array_equal(rd.read([1], np.arange(300, 900), "cls"), truth[[1], 300:900])
        assert reads == [(f.path, 6 * stride, 3 * stride)]  # tiles 1..3 of slot 1, partial ends included
        reads.clear()
        cells = np.array([5, 6, 1100])  # two ranges in tiles 0 and 4: two runs of tiles, no gap read through
        np.testing.assert_array_equal(rd.read([0], cells, "cls"), truth[[0]][:, cells])
        assert reads == [(f.path, 0, stride), (f.path, 4 * stride, stride)]
        reads.clear()
        many = np.arange(0, 200, 2)  # > 64 ranges: rows gathered from the chunks holding them
        np.testing.assert_array_equal(rd.read([0], many, "cls"), truth[[0]][:, many])
        # rows 0..199 lie in chunks 0..6 of tile 0 (32 rows of 2 KiB per 64 KiB chunk): the chunk
        # count and chunks 0..6 with their headers, adjacent, so one read
        assert reads == [(f.path, 0, 8 + 7 * (12 + 65536))]
    # with the store's default gap (1 MiB) the two tile runs above are one read through the gap
    ctx2 = _ctx(s3)
    with arrays.ArrayReader(uri, ctx=ctx2) as rd:
        reads.clear()
        np.testing.assert_array_equal(rd.read([0], np.array([5, 6, 700]), "cls"), truth[[0]][:, [5, 6, 700]])
        assert [(o, b) for _p, o, b in reads] == [(0, 3 * stride)]


def test_reopening_lists_the_array_once_and_sees_changes(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(s3)
    uri = s3.uri("a")
    truth = _build(uri, ctx, n=600, dim=64)
    listings: list[str] = []
    real = direct.list_array

    def counting(vfs: tiledb.VFS, u: str) -> direct.Listing:
        listings.append(u)
        return real(vfs, u)

    monkeypatch.setattr(direct, "list_array", counting)
    monkeypatch.setattr(layout_cache, "list_array", counting)
    with arrays.ArrayReader(uri, ctx=ctx) as first:
        assert first.direct and first._arr_handle is not None  # validated through libtiledb
    assert len(listings) == 1
    with arrays.ArrayReader(uri, ctx=ctx) as again:
        assert again.direct and again._arr_handle is None  # from the cache: no libtiledb open
        np.testing.assert_array_equal(again.read([1, 0], np.array([0, 5, 599]), "cls"), truth[[1, 0]][:, [0, 5, 599]])
    assert len(listings) == 2
    other = _ctx(s3)  # another context (other credentials, say) never reuses the entry
    with arrays.ArrayReader(uri, ctx=other) as rd:
        assert rd.direct and rd._arr_handle is not None
    # a rewrite + consolidation: new fragment files, so the next open validates again
    new = np.full((3, 10, 64), 7.0, dtype=np.float32)
    arrays.write_block(uri, 10, {"cls": new}, dtype="float32", ctx=ctx)
    arrays.consolidate(uri, full=True, ctx=ctx)
    truth[:, 10:20] = new
    with arrays.ArrayReader(uri, ctx=ctx) as rd:
        assert rd.direct and rd._arr_handle is not None
        np.testing.assert_array_equal(rd.read([0, 1, 2], np.arange(0, 30), "cls"), truth[:, :30])
    with arrays.ArrayReader(uri, ctx=ctx) as rd:
        assert rd._arr_handle is None  # cached again


def _object(s3, uri: str, name: str) -> str:
    prefix = uri.split(f"s3://{s3.name}/", 1)[1]
    keys = [o["Key"] for o in s3.server.client().list_objects_v2(Bucket=s3.name, Prefix=prefix)["Contents"]]
    (key,) = [k for k in keys if k.startswith(f"{prefix}/__fragments/") and k.endswith("/" + name)]
    return key


def test_a_corrupted_tile_header_on_s3_is_detected(s3, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim, c = 768, 512, 256
    stride = 8 + 8 * 12 + c * dim * 4
    ctx = _ctx(s3)
    uri = s3.uri("a")
    truth = _build(uri, ctx, n=n, dim=dim, slots=2)
    with arrays.ArrayReader(uri, ctx=ctx) as rd:
        np.testing.assert_array_equal(rd.read([1], None, "cls"), truth[[1]])  # cached and read once
    key = _object(s3, uri, "a0.tdb")
    client = s3.server.client()
    raw = bytearray(client.get_object(Bucket=s3.name, Key=key)["Body"].read())
    # tile 4 (slot 1, cells 256..511), chunk 3: metadata size 1 -- a filtered tile, not our layout
    raw[4 * stride + 8 + 3 * (65536 + 12) + 8] = 1
    client.put_object(Bucket=s3.name, Key=key, Body=bytes(raw))  # same size: the cached layout is reused
    monkeypatch.setattr(arrays, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger="sclstore.store.arrays"), arrays.ArrayReader(uri, ctx=ctx) as rd:
        assert rd.direct and rd._arr_handle is None
        np.testing.assert_array_equal(rd.read([0, 1], np.arange(0, 256), "cls"), truth[:, :256])  # intact tiles
        # the direct read refuses the tile and hands over to libtiledb, which refuses it too: an
        # error, never other values
        with pytest.raises((SclstoreError, tiledb.TileDBError)):
            rd.read([1], np.arange(200, 400), "cls")  # touches tile 4
        assert not rd.direct  # this reader went to libtiledb
        for slots, cells in (([1], np.arange(0, n, 3)), ([1], None)):  # the row gather and a full layer
            with arrays.ArrayReader(uri, ctx=ctx) as again:
                assert again._arr_handle is not None and again.direct  # forgotten, validated again (tile 0 is intact)
                with pytest.raises((SclstoreError, tiledb.TileDBError)):
                    again.read(slots, cells, "cls")
                assert not again.direct
                np.testing.assert_array_equal(again.read([0], None, "cls"), truth[[0]])  # libtiledb, intact tiles
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "chunk header" in warnings[0] and "libtiledb" in warnings[0]


def test_unaligned_fragments_on_s3_fall_back_with_one_warning(s3, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(s3)
    uri = s3.uri("a")
    truth = _build(uri, ctx, n=600, dim=512, slots=2, blocks=(0, 300))  # not on 256-cell tile boundaries
    monkeypatch.setattr(arrays, "_warned_fallback", False)
    with caplog.at_level(logging.DEBUG, logger="sclstore.store.arrays"):
        for _ in range(2):
            with arrays.ArrayReader(uri, ctx=ctx) as rd:
                assert not rd.direct
                np.testing.assert_array_equal(rd.read([0], np.arange(250, 350), "cls"), truth[[0]][:, 250:350])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not aligned" in warnings[0] and uri in warnings[0]


def _complete_run(b: Backend, values: np.ndarray):
    ds = b.register_dataset(name="toy", content_hash="a" * 64, obs=toy_obs(values.shape[1]), n_vars=7, source_path=None,
                            cluster_by=())
    model = b.register_model(family="fake", name="fake-m", checkpoint_hash="c" * 64, n_layers=2, d_model=values.shape[2], config={})
    spec = ArraySpec(n_layers=values.shape[0], n_cells=values.shape[1], dim=values.shape[2], pools=("cls", "mean"))
    run = b.create_run(dataset=ds, model=model, key=cache_key("k1"), params={"p": 1}, layers=list(range(values.shape[0])), spec=spec)
    lease = b.acquire(run.id, wait=False)
    b.write_block(run, lease, 0, {"cls": values, "mean": -values})
    return b.complete(run, lease, {})


def test_store_settings_and_verify_on_s3(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, catalog = s3.uri("lab"), f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    cfg = s3.server.tiledb_config()
    values = np.random.default_rng(0).normal(size=(3, 40, 8)).astype(np.float32)
    with Backend.create(uri, catalog, settings=StoreSettings(tiledb_config=cfg)) as b:
        run = _complete_run(b, values)
        with b.open_reader(run.id) as rd:
            assert rd.direct
            np.testing.assert_array_equal(rd.read([2, 0], None, "mean"), -values[[2, 0]])
        (report,) = b.verify()
        assert report["ok"] and report["direct_reads"]
    layout_cache.clear()
    with Backend.open(uri, catalog, settings=StoreSettings(tiledb_config=cfg, direct_reads=False)) as off:
        with off.open_reader(run.id) as rd:
            assert not rd.direct
            np.testing.assert_array_equal(rd.read([1], np.array([3, 4, 39]), "cls"), values[[1]][:, [3, 4, 39]])
        (report,) = off.verify()
        assert report["ok"] and not report["direct_reads"]
    # the CLI's verify compares the direct ranged reads with libtiledb's for the remote run
    options = [x for k, v in cfg.items() for x in ("--tiledb-config", f"{k}={v}")]
    res = runner.invoke(app, [*options, "verify", "--store", uri, "--catalog", catalog, "--json"])
    assert res.exit_code == 0, res.stderr
    (out,) = json.loads(res.stdout)["runs"]
    assert out["ok"] and out["direct_reads"]
    from sclstore.store.tilefile import TileFile

    real = TileFile.decode

    def flip(self: TileFile, t0: int, t1: int, dest: np.ndarray, *rest: object) -> None:  # a decoder bug
        real(self, t0, t1, dest, *rest)  # type: ignore[arg-type]
        dest[0, 0] += 1

    monkeypatch.setattr(TileFile, "decode", flip)
    with Backend.open(uri, catalog, settings=StoreSettings(tiledb_config=cfg)) as b:
        (report,) = b.verify()
        assert not report["ok"] and "differ from libtiledb" in report["problems"][0]
