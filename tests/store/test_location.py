"""Store locations: URIs, TileDB settings from StoreSettings / sclstore.toml / the CLI, VFS file
operations, consolidation of out-of-order and sharded fragments, locally and on S3 (moto on loopback)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tiledb
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app
from sclstore.store import arrays
from sclstore.store.backend import Backend
from sclstore.store.config import ArraySpec, StoreSettings
from sclstore.store.errors import InvalidInputError, StoreExistsError
from sclstore.store.location import REMOTE_DEFAULTS, StoreLocation, parse_tiledb_options, redact_config

runner = CliRunner()


def test_uris_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert StoreLocation("lab").uri == str(tmp_path / "lab")
    assert StoreLocation(f"file://{tmp_path}/x/").uri == str(tmp_path / "x")
    loc = StoreLocation("s3://Bucket-1/some/prefix/")  # nothing is contacted until settings are used
    assert (loc.uri, loc.is_local, loc.path) == ("s3://Bucket-1/some/prefix", False, None)
    assert loc.join("arrays", "run-1") == "s3://Bucket-1/some/prefix/arrays/run-1"
    assert loc.resolve("arrays/run-1") == "s3://Bucket-1/some/prefix/arrays/run-1"
    assert loc.resolve("s3://other/a") == "s3://other/a"
    assert StoreLocation(tmp_path).settings.tiledb_config == {}  # local: nothing added
    with pytest.raises(InvalidInputError, match="no bucket"):
        StoreLocation("s3://")


def test_tiledb_settings_precedence(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    root.mkdir()
    beside = '[tiledb]\n"sm.tile_cache_size" = "111"\n"vfs.s3.region" = "beside"\n"sm.io_concurrency_level" = 3\n'
    (tmp_path / "sclstore.toml").write_text(beside)
    (root / "sclstore.toml").write_text('[tiledb]\n"vfs.s3.region" = "inside"\n"vfs.s3.scheme" = "http"\n')
    loc = StoreLocation(root, StoreSettings(tiledb_config={"vfs.s3.scheme": "https"}))
    cfg = loc.settings.tiledb_config
    assert cfg == {"sm.tile_cache_size": "111", "vfs.s3.region": "inside", "vfs.s3.scheme": "https", "sm.io_concurrency_level": "3"}
    assert loc.ctx.config()["sm.tile_cache_size"] == "111"
    (root / "sclstore.toml").write_text("[tiledb\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        _ = StoreLocation(root).settings


def test_option_parsing_and_redaction() -> None:
    assert parse_tiledb_options(["vfs.s3.region=eu-west-1", " sm.a = 2 "]) == {"vfs.s3.region": "eu-west-1", "sm.a": "2"}
    assert parse_tiledb_options(["vfs.s3.aws_secret_access_key=a=b"]) == {"vfs.s3.aws_secret_access_key": "a=b"}
    with pytest.raises(InvalidInputError, match="KEY=VALUE"):
        parse_tiledb_options(["vfs.s3.region"])
    with pytest.raises(InvalidInputError, match="not a TileDB config key"):
        parse_tiledb_options(["region=x"])
    red = redact_config({"vfs.s3.aws_secret_access_key": "s3cr3t", "vfs.s3.aws_session_token": "tok",
                         "vfs.s3.aws_access_key_id": "AKIA", "vfs.s3.region": "r"})
    assert red == {"vfs.s3.aws_secret_access_key": "***", "vfs.s3.aws_session_token": "***",
                   "vfs.s3.aws_access_key_id": "***", "vfs.s3.region": "r"}


def test_remote_store_without_catalog_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="remote and SQLite cannot live there: pass --catalog"):
        sclstore.open_store("s3://some-bucket/lab", create=True)
    res = runner.invoke(app, ["init", "--store", "s3://some-bucket/lab"])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "pass --catalog" in res.stderr
    res = runner.invoke(app, ["--tiledb-config", "nonsense", "ls", "--store", str(tmp_path / "s")])
    assert res.exit_code == 1 and "is not KEY=VALUE" in res.stderr and res.stderr.count("\n") == 1


def test_local_store_creation_through_vfs(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "store"
    with Backend.create(nested) as b:
        assert (nested / "sclstore.json").is_file() and (nested / "arrays").is_dir()
        assert json.loads((nested / "sclstore.json").read_text())["format"] == "sclstore"
        assert not list(nested.glob("*.tmp"))
        assert b.root == nested
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(StoreExistsError, match="non-empty folder"):
        Backend.create(tmp_path / "junk")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreExistsError, match="not a folder"):
        Backend.create(tmp_path / "file")
    # a folder holding only sclstore.toml may become a store
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "sclstore.toml").write_text('[tiledb]\n"sm.tile_cache_size" = "5"\n')
    with Backend.create(tmp_path / "cfg") as b:
        assert b.settings.tiledb_config == {"sm.tile_cache_size": "5"}


def _write_blocks(uri: str, order: list[int], data: np.ndarray, block: int, ctx: tiledb.Ctx | None = None) -> None:
    for k in order:
        arrays.write_block(uri, k * block, {"cls": data[:, k * block : (k + 1) * block]}, dtype="float32", ctx=ctx)


def _new_array(uri: str, n: int, dim: int, ctx: tiledb.Ctx | None = None) -> None:
    arrays.create_array(uri, ArraySpec(n_layers=2, n_cells=n, dim=dim, pools=("cls",)), layers=[0, 1], meta={}, ctx=ctx)


def test_out_of_order_fragments_consolidate_to_one(tmp_path: Path) -> None:
    n, dim = 4 * 256, 16  # 16-dim float32: 8192-cell tiles would be one tile; use dim 512 for 256-cell tiles
    dim = 512
    data = np.random.default_rng(0).normal(size=(2, n, dim)).astype(np.float32)
    uri = str(tmp_path / "a")
    _new_array(uri, n, dim)
    _write_blocks(uri, [0, 2, 1, 3], data, 256)
    assert len(tiledb.array_fragments(uri)) == 4
    # TileDB's own choice leaves blocks written 0, 2, 1, 3 as four fragments
    tiledb.consolidate(uri, config=tiledb.Config({"sm.consolidation.mode": "fragments"}))
    assert len(tiledb.array_fragments(uri)) == 4
    assert arrays.finalise(uri, n_cells=n, full=True) == [(0, n - 1)]
    assert len(tiledb.array_fragments(uri)) == 1
    with arrays.ArrayReader(uri) as rd:
        assert rd.direct
        np.testing.assert_array_equal(rd.read([0, 1], None, "cls"), data)


def test_disjoint_shard_fragments_are_read_directly(tmp_path: Path) -> None:
    n, dim = 1000, 512  # 256-cell tiles: shards 0..511 and 512..999 (the last tile partial)
    data = np.random.default_rng(1).normal(size=(2, n, dim)).astype(np.float32)
    uri = str(tmp_path / "a")
    _new_array(uri, n, dim)
    for lo, hi in ((512, 1000), (0, 512)):  # two shards, each in two blocks, consolidated separately
        before = set(tiledb.array_fragments(uri).uri)
        for a in range(lo, hi, 256):
            arrays.write_block(uri, a, {"cls": data[:, a : min(hi, a + 256)]}, dtype="float32")
        mine = [u.rsplit("/", 1)[-1] for u in tiledb.array_fragments(uri).uri if u not in before]
        tiledb.consolidate(uri, config=tiledb.Config({"sm.consolidation.mode": "fragments"}), fragment_uris=mine)
        tiledb.vacuum(uri, config=tiledb.Config({"sm.vacuum.mode": "fragments"}))
    assert arrays.finalise(uri, n_cells=n, full=False) == [(0, 511), (512, 999)]
    rng = np.random.default_rng(2)
    with arrays.ArrayReader(uri) as fast, arrays.ArrayReader(uri, direct=False) as slow:
        assert fast.direct
        for cells in (None, np.arange(300, 700), np.sort(rng.choice(n, 30, replace=False)), np.sort(rng.choice(n, 400, replace=False)),
                      np.array([511, 512])):
            want = data[[1, 0]] if cells is None else data[[1, 0]][:, cells]
            np.testing.assert_array_equal(fast.read([1, 0], cells, "cls"), want)
            np.testing.assert_array_equal(slow.read([1, 0], cells, "cls"), want)
        assert fast.direct


def test_unaligned_fragments_fall_back_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim = 600, 512
    data = np.random.default_rng(3).normal(size=(2, n, dim)).astype(np.float32)
    uri = str(tmp_path / "a")
    _new_array(uri, n, dim)
    for lo in (0, 300):  # not on 256-cell tile boundaries
        arrays.write_block(uri, lo, {"cls": data[:, lo : lo + 300]}, dtype="float32")
    arrays.consolidate(uri, full=False)
    monkeypatch.setattr(arrays, "_warned_fallback", False)
    with caplog.at_level(logging.DEBUG, logger="sclstore.store.arrays"):
        for _ in range(2):
            with arrays.ArrayReader(uri) as rd:
                assert not rd.direct
                np.testing.assert_array_equal(rd.read([0], np.arange(250, 350), "cls"), data[[0]][:, 250:350])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not aligned" in warnings[0].getMessage() and "libtiledb" in warnings[0].getMessage()


# ------------------------------------------------------------------------------ S3 (moto on loopback)
def test_s3_store_files_and_consolidation(s3, postgres_server) -> None:
    settings = StoreSettings(tiledb_config=s3.server.tiledb_config() | {"vfs.s3.max_parallel_ops": "4"})
    uri = s3.uri("lab")
    loc = StoreLocation(uri + "/", settings)
    cfg = loc.settings.tiledb_config  # tuned object-storage defaults, under the user's settings
    assert cfg["vfs.s3.max_parallel_ops"] == "4" and cfg["vfs.min_batch_gap"] == REMOTE_DEFAULTS["vfs.min_batch_gap"]
    assert loc.ctx.config()["vfs.s3.endpoint_override"] == s3.server.endpoint
    catalog = postgres_server.new_database()
    with Backend.create(uri, catalog, settings=settings) as b:
        loc = b.location
        assert not loc.is_local and loc.is_file(loc.join("sclstore.json"))
        keys = {o["Key"] for o in s3.server.client().list_objects_v2(Bucket=s3.name)["Contents"]}
        assert "lab/sclstore.json" in keys
        with pytest.raises(InvalidInputError, match="not a local folder"):
            _ = b.root
        n, dim = 1024, 512
        data = np.random.default_rng(4).normal(size=(2, n, dim)).astype(np.float32)
        arr = loc.join("arrays", "t")
        _new_array(arr, n, dim, ctx=loc.ctx)
        _write_blocks(arr, [3, 0, 2, 1], data, 256, ctx=loc.ctx)
        assert len(tiledb.array_fragments(arr, ctx=loc.ctx)) == 4
        # large arrays on object storage keep their disjoint fragments (metadata consolidated only)
        assert arrays.finalise(arr, n_cells=n, full=False, ctx=loc.ctx) == [(0, 255), (256, 511), (512, 767), (768, 1023)]
        with arrays.ArrayReader(arr, ctx=loc.ctx) as rd, arrays.ArrayReader(arr, ctx=loc.ctx, direct=False) as slow:
            assert rd.direct and not slow.direct  # disjoint tile-aligned fragments: ranged reads of their tile files
            np.testing.assert_array_equal(rd.read([1], np.arange(200, 900), "cls"), data[[1]][:, 200:900])
            np.testing.assert_array_equal(slow.read([1], np.arange(200, 900), "cls"), data[[1]][:, 200:900])
        assert arrays.finalise(arr, n_cells=n, full=True, ctx=loc.ctx) == [(0, n - 1)]
        with arrays.ArrayReader(arr, ctx=loc.ctx) as rd:
            np.testing.assert_array_equal(rd.read([0, 1], None, "cls"), data)
        assert b.array_store.full_consolidation(10) and not b.array_store.full_consolidation(b.settings.remote_consolidate_max_bytes + 1)
        loc.remove_dir(arr)
        assert not loc.is_dir(arr) and tiledb.object_type(arr, ctx=loc.ctx) is None
    # reopen: marker found through the VFS; without credentials in the config, the AWS
    # environment supplies them
    with pytest.raises(sclstore.StoreNotFoundError):
        Backend.open(s3.uri("other"), catalog, settings=settings)
