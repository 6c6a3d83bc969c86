"""TileDB arrays: one dense array per run, dims (layer slot, cell, feature), one attribute per pool.

Tiles are ``(1, C, D)`` with ``C`` a power of two giving ~256 KB-1 MB tiles, so one layer is
physically separate from the others and a contiguous cell range touches few tiles
(research/storage.md). float32 is stored as is; float16 is stored as its uint16 bit pattern
(TileDB has no float16 type). The encoding is recorded in the array metadata and the catalog.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import tiledb

from . import layout_cache
from .config import ArraySpec
from .direct import DirectLayout, coalesce, open_direct
from .errors import ArrayError, EncodingVersionError
from .tilefile import LayoutError

__all__ = [
    "ENCODING_TYPE",
    "ENCODING_VERSION",
    "SUPPORTED_ENCODING_VERSIONS",
    "ArrayReader",
    "array_info",
    "cell_tile",
    "coalesce",
    "consolidate",
    "create_array",
    "finalise",
    "fragment_ranges",
    "write_block",
]

logger = logging.getLogger(__name__)

ENCODING_TYPE = "sclstore-layer-embeddings"
ENCODING_VERSION = "1"
SUPPORTED_ENCODING_VERSIONS = frozenset({"1"})
_TARGET_TILE_BYTES = 512 * 1024
_MAX_RANGES = 64
"""More cell ranges than this are read through libtiledb as one bounding read plus a take."""
_CELL_DOMAIN_MAX = 2**40 - 1
_warned_fallback = False


def _fallback(uri: str, reason: object) -> None:
    """Log why a complete run is read through libtiledb: the first time per process at
    WARNING (direct reads are several times faster), later ones at DEBUG."""
    global _warned_fallback
    if _warned_fallback:
        logger.debug("array %s is read through libtiledb: %s", uri, reason)
        return
    _warned_fallback = True
    logger.warning("array %s is read through libtiledb, not directly from its tile files (slower): %s", uri, reason)


def _storage_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "float16" else np.dtype(np.float32)


def cell_tile(dim: int, dtype: str) -> int:
    """Cells per tile: a power of two with ``C * dim * itemsize`` near 512 KB, within [32, 8192]."""
    itemsize = _storage_dtype(dtype).itemsize
    c = max(1, _TARGET_TILE_BYTES // (dim * itemsize))
    c = 1 << (c.bit_length() - 1)
    return int(min(8192, max(32, c)))


def create_array(uri: str, spec: ArraySpec, *, layers: Sequence[int], meta: dict[str, Any], ctx: tiledb.Ctx | None = None) -> None:
    """Create the dense array of one run and write its self-description into the metadata.

    Raises
    ------
    ArrayError
        If the array cannot be created (e.g. the folder exists or is not writable).
    """
    if len(layers) != spec.n_layers:
        raise ArrayError(f"internal: {len(layers)} layer numbers for {spec.n_layers} slots")
    c = cell_tile(spec.dim, spec.dtype)
    dom = tiledb.Domain(
        tiledb.Dim(name="layer", domain=(0, spec.n_layers - 1), tile=1, dtype=np.int64),
        tiledb.Dim(name="cell", domain=(0, max(spec.n_cells - 1, 0)), tile=min(c, max(spec.n_cells, 1)), dtype=np.int64),
        tiledb.Dim(name="feature", domain=(0, spec.dim - 1), tile=spec.dim, dtype=np.int64),
    )
    sdt = _storage_dtype(spec.dtype)
    attrs = [tiledb.Attr(name=p, dtype=sdt, fill=np.nan if sdt == np.float32 else 0xFFFF) for p in spec.pools]
    schema = tiledb.ArraySchema(domain=dom, attrs=attrs, sparse=False, cell_order="row-major", tile_order="row-major")
    try:
        tiledb.Array.create(uri, schema, ctx=ctx)
        with tiledb.open(uri, "w", ctx=ctx) as arr:
            arr.meta["sclstore_encoding_type"] = ENCODING_TYPE
            arr.meta["sclstore_encoding_version"] = ENCODING_VERSION
            arr.meta["dtype"] = spec.dtype
            arr.meta["layers"] = json.dumps([int(x) for x in layers])
            arr.meta["pools"] = json.dumps(list(spec.pools))
            arr.meta["info"] = json.dumps(meta, sort_keys=True)
    except tiledb.TileDBError as exc:
        msg = f"cannot create array at {uri}: {exc}; check the store folder is writable and has free space"
        raise ArrayError(msg) from exc


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_written(root: Path, fragments: Sequence[str]) -> None:
    """fsync what one write added: its fragment folders, their commit files and the two parent folders.

    Constant work per write, however many fragments the array already holds (fsyncing the whole
    ``__fragments`` tree after every chunk made a run's writes quadratic in its chunk count). If
    the layout is not the expected one (another TileDB format), every fragment and commit is
    fsynced as before.
    """
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in fragments]
    frags, commits = root / "__fragments", root / "__commits"
    mine = [(frags / n, commits / f"{n}.wrt") for n in names]
    if not names or not all(f.is_dir() and c.is_file() for f, c in mine):
        for sub in (frags, commits):
            if sub.exists():
                _fsync_tree(sub)
        return
    for frag, commit in mine:
        _fsync_tree(frag)
        _fsync_path(commit)
    _fsync_path(frags)
    _fsync_path(commits)


def write_block(
    uri: str, start: int, block: dict[str, np.ndarray], *, dtype: str, durable: bool = True, ctx: tiledb.Ctx | None = None
) -> None:
    """Write cells ``start .. start+n-1`` of every slot: ``block[pool]`` has shape (slots, n, dim).

    With ``durable`` the new fragment and commit files are fsynced before returning, so a
    watermark advanced afterwards never points past data a power cut could lose.
    """
    first = next(iter(block.values()))
    n_slots, n, dim = first.shape
    data = {}
    for pool, arr in block.items():
        if arr.shape != first.shape:
            raise ArrayError(f"internal: pool {pool} has shape {arr.shape}, expected {first.shape}")
        if dtype == "float16":
            data[pool] = np.ascontiguousarray(arr, dtype=np.float16).view(np.uint16)
        else:
            data[pool] = np.ascontiguousarray(arr, dtype=np.float32)
    try:
        with tiledb.open(uri, "w", ctx=ctx) as arr:
            arr[0:n_slots, start : start + n, 0:dim] = data
            written = list(getattr(arr, "last_write_info", None) or ())
        if durable and ("://" not in uri or uri.startswith("file://")):
            _fsync_written(Path(uri.removeprefix("file://")), written)
    except tiledb.TileDBError as exc:
        msg = f"writing cells {start}:{start + n} to {uri} failed: {exc}; check free disk space and rerun the same ingest to resume"
        raise ArrayError(msg) from exc


def _config(ctx: tiledb.Ctx | None, **values: str) -> tiledb.Config:
    """The context's settings (credentials, endpoint) with ``values`` on top."""
    base = dict(ctx.config().items()) if ctx is not None else {}
    base.update(values)
    return tiledb.Config(base)


def consolidate(uri: str, *, full: bool, array_bytes: int | None = None, ctx: tiledb.Ctx | None = None) -> None:
    """Consolidate fragment metadata and commits (cheap), or everything plus vacuum (``full``).

    A full consolidation lists the array's fragments explicitly (``fragment_uris``), so they
    become one fragment whatever order they were written in: TileDB's own choice merges only
    fragments adjacent in time whose union has no gaps, and leaves e.g. cell blocks written
    0, 2, 1, 3 as four fragments. ``array_bytes`` (per attribute) sizes TileDB's consolidation
    buffers: its 50 MB default costs about a second of allocation even for a tiny array.
    """
    buffer = 50 * 2**20 if array_bytes is None else int(min(16 * 2**20, max(2**20, array_bytes)))
    try:
        if full:
            names = [u.rstrip("/").rsplit("/", 1)[-1] for u in tiledb.array_fragments(uri, ctx=ctx).uri]
            if len(names) > 1:
                cfg = _config(ctx, **{"sm.consolidation.mode": "fragments", "sm.consolidation.buffer_size": str(buffer)})
                tiledb.consolidate(uri, config=cfg, ctx=ctx, fragment_uris=names)
            tiledb.vacuum(uri, config=_config(ctx, **{"sm.vacuum.mode": "fragments"}), ctx=ctx)
        for mode in ("fragment_meta", "commits") + (("array_meta",) if full else ()):
            cfg = _config(ctx, **{"sm.consolidation.mode": mode, "sm.vacuum.mode": mode, "sm.consolidation.buffer_size": str(buffer)})
            tiledb.consolidate(uri, config=cfg, ctx=ctx)
            if full or mode == "commits":
                tiledb.vacuum(uri, config=cfg, ctx=ctx)
    except tiledb.TileDBError as exc:
        raise ArrayError(f"consolidating {uri} failed: {exc}") from exc


def fragment_ranges(uri: str, ctx: tiledb.Ctx | None = None) -> list[tuple[int, int]]:
    """Sorted ``(first, last)`` cell ranges of the array's live fragments."""
    frags = tiledb.array_fragments(uri, ctx=ctx)
    return sorted((int(ned[1][0]), int(ned[1][1])) for ned in frags.nonempty_domain)


def finalise(uri: str, *, n_cells: int, full: bool, array_bytes: int | None = None, ctx: tiledb.Ctx | None = None) -> list[tuple[int, int]]:
    """Consolidate a complete run's array and check its fragments: one, or disjoint cell ranges
    covering ``0..n_cells-1`` (without ``full``, e.g. a large array on object storage, after
    consolidating fragment metadata only).

    Returns
    -------
    list of (int, int)
        The fragments' cell ranges after consolidation.

    Raises
    ------
    ArrayError
        If the fragments overlap or leave cells unwritten.
    """
    consolidate(uri, full=full, array_bytes=array_bytes, ctx=ctx)
    ranges = fragment_ranges(uri, ctx)
    expect = 0
    for lo, hi in ranges:
        if lo != expect and not full:
            # overlapping fragments (a block rewritten after a crash): merge them after all
            consolidate(uri, full=True, array_bytes=array_bytes, ctx=ctx)
            return finalise(uri, n_cells=n_cells, full=True, array_bytes=array_bytes, ctx=ctx)
        if lo != expect:
            raise ArrayError(f"array {uri} fragments {ranges} do not cover cells 0..{n_cells - 1} once: run `sclstore verify`")
        expect = hi + 1
    if expect != n_cells:
        raise ArrayError(f"array {uri} holds cells 0..{expect - 1} of 0..{n_cells - 1}: rerun the same ingest to finish it")
    return ranges


def array_info(uri: str, ctx: tiledb.Ctx | None = None) -> dict[str, Any]:
    """Shape, pools, encoding and written cell extent of an array (for ``verify``).

    Raises
    ------
    ArrayError
        If no array exists at ``uri``.
    """
    if tiledb.object_type(uri, ctx=ctx) != "array":
        raise ArrayError(f"no TileDB array at {uri}")
    with tiledb.open(uri, "r", ctx=ctx) as arr:
        dom = arr.schema.domain
        ned = arr.nonempty_domain()
        return {
            "shape": tuple(int(dom.dim(i).domain[1]) + 1 for i in range(3)),
            "pools": tuple(arr.schema.attr(i).name for i in range(arr.schema.nattr)),
            "encoding_type": arr.meta.get("sclstore_encoding_type"),
            "encoding_version": arr.meta.get("sclstore_encoding_version"),
            "dtype": arr.meta.get("dtype"),
            "layers": tuple(json.loads(arr.meta.get("layers", "[]"))),
            "written_cells": None if ned is None else (int(ned[1][0]), int(ned[1][1])),
            "fragments": len(tiledb.array_fragments(uri, ctx=ctx)),
            "fragment_cells": fragment_ranges(uri, ctx),
        }


class ArrayReader:
    """Reads slices of one run's array; open once, read many times.

    A complete run's array is read straight from its tile files (:mod:`sclstore.store.direct`:
    memory-mapped locally, by ranged VFS reads on object storage) when ``direct`` and its layout
    checks pass; any other array (or ``direct=False``) is read through libtiledb. Both give
    identical values. What a direct reader validated is kept per process
    (:mod:`sclstore.store.layout_cache`): reopening an unchanged run opens nothing in libtiledb.

    Not thread-safe: use one reader per thread.
    """

    def __init__(self, uri: str, *, ctx: tiledb.Ctx | None = None, direct: bool = True) -> None:
        self.uri = uri
        self.dtype: str
        self._ctx = ctx
        self._arr_handle: tiledb.Array | None = None
        self._direct: DirectLayout | None = None
        self._shared = False  # the layout belongs to the layout cache: never close its files here
        self._key = layout_cache.key(uri, ctx)
        cached = layout_cache.get(self._key) if direct else None
        if cached is not None:  # a complete run validated before, its files unchanged: no libtiledb open
            self.dtype = cached.dtype
            self.n_slots, self.n_cells, self.dim, self.cell_tile = cached.n_slots, cached.n_cells, cached.dim, cached.cell_tile
            self.pools = cached.pools
            self._direct, self._shared = cached, True
            return
        arr = self._arr
        version = arr.meta.get("sclstore_encoding_version")
        if version not in SUPPORTED_ENCODING_VERSIONS:
            self.close()
            msg = f"array {uri} has encoding version {version!r}, this sclstore reads {sorted(SUPPORTED_ENCODING_VERSIONS)}: upgrade sclstore"
            raise EncodingVersionError(msg)
        self.dtype = str(arr.meta["dtype"])
        dom = arr.schema.domain
        self.n_slots = int(dom.dim(0).domain[1]) + 1
        self.n_cells = int(dom.dim(1).domain[1]) + 1
        self.dim = int(dom.dim(2).domain[1]) + 1
        self.cell_tile = int(dom.dim(1).tile)
        self.pools = tuple(arr.schema.attr(i).name for i in range(arr.schema.nattr))
        if direct:
            try:
                self._direct = open_direct(uri, arr, dtype=self.dtype, ctx=ctx)
            except LayoutError as exc:
                _fallback(uri, exc)
            else:
                self._shared = layout_cache.put(self._key, self._direct)

    @property
    def _arr(self) -> tiledb.Array:
        """The array opened through libtiledb (on first use: a reader from the layout cache has none)."""
        if self._arr_handle is None:
            try:
                self._arr_handle = tiledb.open(self.uri, "r", ctx=self._ctx)
            except tiledb.TileDBError as exc:
                msg = f"cannot open array {self.uri}: {exc}; run `sclstore verify` to check the store"
                raise ArrayError(msg) from exc
        return self._arr_handle

    @property
    def direct(self) -> bool:
        """Whether reads bypass libtiledb (see :mod:`sclstore.store.tilefile`)."""
        return self._direct is not None

    def __enter__(self) -> ArrayReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._release_direct()
        if self._arr_handle is not None:
            self._arr_handle.close()
            self._arr_handle = None

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        if self.dtype == "float16":
            return raw.view(np.float16).astype(np.float32)
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)

    def _check_pool(self, pool: str) -> None:
        if pool not in self.pools:
            from .errors import NotFoundError

            raise NotFoundError(f"pool {pool!r} not stored in this run; stored pools: {', '.join(self.pools)}")

    def read(self, slots: Sequence[int], cells: np.ndarray | None, pool: str) -> np.ndarray:
        """Read ``(len(slots), n_cells, dim)`` float32 for sorted unique ``cells`` (None = all).

        Selected cells are coalesced into contiguous ranges. Direct reads copy up to 64 ranges
        tile by tile and gather the rows of more scattered selections straight from the file;
        through libtiledb, ranges that touch most tiles of their span become one bounding read
        plus a numpy take. A direct read that finds a tile not laid out as expected is redone
        through libtiledb (and the reader stays on libtiledb).
        """
        self._check_pool(pool)
        slots = [int(s) for s in slots]
        if not slots:
            return np.empty((0, 0 if cells is None else len(cells), self.dim), dtype=np.float32)
        if any(s < 0 or s >= self.n_slots for s in slots):
            raise ArrayError(f"layer slot out of range 0..{self.n_slots - 1}: {slots}")
        if cells is not None:
            cells = np.asarray(cells, dtype=np.int64)
            if cells.size == 0:
                return np.empty((len(slots), 0, self.dim), dtype=np.float32)
        uniq = np.unique(np.asarray(slots))
        out = None
        if self._direct is not None:
            try:
                out = self._direct.read(pool, uniq, cells)  # float32 already
            except LayoutError as exc:
                _fallback(self.uri, f"a direct read failed ({exc})")
                self.close_direct()
        if out is None:
            out = self._decode(self._read_tiledb(uniq, cells, pool))
        if len(uniq) != len(slots) or not np.array_equal(uniq, np.asarray(slots)):
            out = out[np.searchsorted(uniq, np.asarray(slots))]
        return np.ascontiguousarray(out, dtype=np.float32)

    def close_direct(self) -> None:
        """Stop reading tile files directly (later reads go through libtiledb, and later readers
        of this array validate it again)."""
        layout_cache.drop(self._key)
        self._release_direct()

    def _release_direct(self) -> None:
        if not self._shared and self._direct is not None:  # a layout held by the cache stays open for other readers
            self._direct.close()
        self._direct, self._shared = None, False

    def _read_tiledb(self, slots: np.ndarray, cells: np.ndarray | None, pool: str) -> np.ndarray:
        slot_ranges = coalesce(slots)
        if cells is None:
            return self._arr.multi_index[slot_ranges, [(0, self.n_cells - 1)], :][pool]
        ranges = coalesce(cells)
        lo, hi = int(cells[0]), int(cells[-1])
        span_tiles = (hi // self.cell_tile) - (lo // self.cell_tile) + 1
        touched = len(np.unique(cells // self.cell_tile))
        if len(ranges) > _MAX_RANGES and touched >= 0.5 * span_tiles:
            block = self._arr.multi_index[slot_ranges, [(lo, hi)], :][pool]
            return block[:, cells - lo, :]
        return self._arr.multi_index[slot_ranges, ranges, :][pool]

    def iter_chunks(
        self, slots: Sequence[int], cells: np.ndarray | None, pool: str, *, chunk_cells: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(cell_idx, block)`` chunks of at most ``chunk_cells`` cells, in cell order."""
        all_cells = np.arange(self.n_cells, dtype=np.int64) if cells is None else np.asarray(cells, dtype=np.int64)
        for lo in range(0, len(all_cells), chunk_cells):
            part = all_cells[lo : lo + chunk_cells]
            yield part, self.read(slots, part, pool)
