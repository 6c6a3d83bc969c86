"""Direct reads of a complete run's array: validate its layout once, then read slices straight
from its tile files (:mod:`sclstore.store.tilefile`), locally from memory-mapped files and on
object storage by ranged reads through TileDB's VFS.

:func:`open_direct` checks what libtiledb reported (schema, non-empty domain, fragments) and the
data files' sizes, and gives a :class:`DirectLayout`; :meth:`DirectLayout.read` reads slices.
:mod:`sclstore.store.layout_cache` keeps layouts per process; :class:`~sclstore.store.arrays.ArrayReader`
ties it together and falls back to libtiledb on any :class:`LayoutError`.

A remote array is listed once per open (one recursive listing of the array's folder: names and
sizes of every file, one request on object storage for up to 1,000 files); the listing names
the fragments, gives the data files' sizes (so no file is opened to size it) and is the cache's
stamp: a changed array (new fragments, consolidation, vacuum, a resized file) is validated again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiledb

from .tilefile import FragmentTiles, LayoutError, TileFile, disjoint_fragments
from .tilesource import MappedFile, VfsFile

__all__ = ["MAX_RANGES", "DirectLayout", "coalesce", "count_ranges", "is_local", "list_array", "open_direct"]

MAX_RANGES = 64
"""More cell ranges than this are read as the tiles they touch plus a take."""
_DEFAULT_GAP = 500 * 1024
"""Bytes between two needed ranges of a remote file that are read through rather than paid as
another request, when the context does not set ``vfs.min_batch_gap``."""

Listing = tuple[tuple[str, int], ...]


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a local path (no scheme, or ``file://``)."""
    return "://" not in uri or uri.startswith("file://")


def coalesce(cells: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique cell indices -> inclusive ``(start, stop)`` ranges."""
    if cells.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(cells) != 1)
    starts = np.concatenate(([cells[0]], cells[breaks + 1]))
    stops = np.concatenate((cells[breaks], [cells[-1]]))
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def count_ranges(cells: np.ndarray) -> int:
    """How many ranges :func:`coalesce` would give, without building them."""
    return 0 if cells.size == 0 else int(np.count_nonzero(np.diff(cells) != 1)) + 1


def list_array(vfs: tiledb.VFS, uri: str) -> Listing:
    """Every file below a remote array's folder, as sorted ``(path relative to it, size)``.

    Raises
    ------
    LayoutError
        If the VFS cannot list it recursively (a scheme without recursive listings).
    """
    root = uri.rstrip("/") + "/"
    found: list[tuple[str, int]] = []

    def add(path: str, size: int) -> bool:
        found.append((path[len(root) :] if path.startswith(root) else path, int(size)))
        return True

    try:
        vfs.ls_recursive(root, add)
    except (tiledb.TileDBError, RuntimeError) as exc:
        raise LayoutError(f"cannot list the array's files: {exc}") from exc
    return tuple(sorted(found))


@dataclass(frozen=True, eq=False)
class DirectLayout:
    """A complete run's array validated for direct reads: its shape and each pool's tiles."""

    dtype: str
    n_slots: int
    n_cells: int
    dim: int
    cell_tile: int
    pools: tuple[str, ...]
    tiles: dict[str, FragmentTiles]
    fragments: tuple[str, ...]
    """Names of the fragment folders read (every folder in ``__fragments``)."""
    listing: Listing | None = None
    """A remote array's files and sizes when it was validated (``None`` for a local array)."""
    vfs: Any = field(default=None, repr=False)
    """The VFS a remote array is read through (it holds the store's context)."""

    @property
    def files(self) -> list[TileFile]:
        return [tf for ft in self.tiles.values() for _lo, _hi, tf in ft.parts]

    @property
    def n_cell_tiles(self) -> int:
        return -(-self.n_cells // self.cell_tile)

    def close(self) -> None:
        for ft in self.tiles.values():
            ft.close()

    def read(self, pool: str, slots: np.ndarray, cells: np.ndarray | None) -> np.ndarray:
        """float32 ``(len(slots), n, dim)`` for sorted unique ``slots`` and ``cells`` (``None`` = all);
        float16 storage is converted while it is copied.

        Up to :data:`MAX_RANGES` cell ranges are copied tile by tile (a remote file: the tiles of
        all ranges of a slot fetched first, adjacent tiles in one read); more scattered
        selections gather their rows straight from the chunks holding them.

        Raises
        ------
        LayoutError
            If a tile or chunk header read does not match the layout (nothing is returned).
        """
        tf = self.tiles[pool]
        c, d, n_ct = self.cell_tile, self.dim, self.n_cell_tiles
        if cells is None or count_ranges(cells) <= MAX_RANGES:
            ranges = [(0, self.n_cells - 1)] if cells is None else coalesce(cells)
            out = np.empty((len(slots), self.n_cells if cells is None else cells.size, d), dtype=np.float32)
            need = np.unique(np.concatenate([np.arange(lo // c, hi // c + 1) for lo, hi in ranges])) if tf.remote else None
            for i, slot in enumerate(slots):
                base, pos = int(slot) * n_ct, 0
                fetched = None if need is None else tf.fetch(base + need)
                for lo, hi in ranges:
                    self._copy_range(tf, base, lo, hi, out[i, pos : pos + hi - lo + 1], fetched)
                    pos += hi - lo + 1
            return out
        tile_of, row_of = np.divmod(cells, c)
        # many ranges: copy the selected rows of every slot straight from the file, in one gather
        tiles = (np.asarray(slots, dtype=np.int64)[:, None] * n_ct + tile_of[None, :]).ravel()
        rows = tf.gather(tiles, np.tile(row_of, len(slots)), d)
        if rows is not None:
            return rows.reshape(len(slots), cells.size, d).astype(np.float32, copy=False)
        touched = np.unique(tile_of)  # rows may straddle chunks: decode the tiles touched, then take
        rank = np.zeros(n_ct, dtype=np.int64)
        rank[touched] = np.arange(touched.size)
        take = rank[tile_of] * c + row_of
        out = np.empty((len(slots), cells.size, d), dtype=np.float32)
        buf = np.empty((touched.size, c * d), dtype=np.float32)
        runs = coalesce(touched)
        for i, slot in enumerate(slots):
            base, k = int(slot) * n_ct, 0
            fetched = tf.fetch(base + touched) if tf.remote else None
            for a, b in runs:
                tf.decode(base + a, base + b + 1, buf[k : k + b - a + 1], fetched)
                k += b - a + 1
            np.take(buf.reshape(-1, d), take, axis=0, out=out[i])
        return out

    def _copy_range(self, tf: FragmentTiles, base: int, lo: int, hi: int, dest: np.ndarray, fetched: Any) -> None:
        """Cells ``lo..hi`` of the slot whose first tile is ``base`` into ``dest`` (hi-lo+1, dim).

        Whole tiles are decoded straight into ``dest``; the partial tiles at either end go
        through a one-tile buffer.
        """
        c, d = self.cell_tile, self.dim
        t_first, t_last = lo // c, hi // c
        a = t_first if lo % c == 0 else t_first + 1
        b = t_last if (hi + 1) % c == 0 else t_last - 1
        if a <= b:
            r0 = a * c - lo
            tf.decode(base + a, base + b + 1, dest[r0 : r0 + (b - a + 1) * c].reshape(b - a + 1, c * d), fetched)
        for t in dict.fromkeys(t for t in (t_first, t_last) if not a <= t <= b):
            tmp = np.empty((1, c * d), dtype=np.float32)
            tf.decode(base + t, base + t + 1, tmp, fetched)
            c0, c1 = max(lo, t * c), min(hi, t * c + c - 1)
            dest[c0 - lo : c1 - lo + 1] = tmp.reshape(c, d)[c0 - t * c : c1 - t * c + 1]


def _local_single_fragment(uri: str, full: tuple[tuple[int, int], ...]) -> list[tuple[str, int, Any]] | None:
    """The common case without a fragment-info load: one fragment folder in a local array whose
    non-empty domain is the full domain (the caller checked), so the fragment covers it all."""
    path = uri.removeprefix("file://")
    try:
        names = [e.name for e in os.scandir(os.path.join(path, "__fragments")) if e.is_dir()]
    except OSError:
        return None
    version = names[0].rsplit("_", 1)[-1] if len(names) == 1 else ""
    if not version.isdigit():
        return None
    return [(os.path.join(path, "__fragments", names[0]), int(version), full)]


def _remote_single_fragment(uri: str, listing: Listing, full: tuple[tuple[int, int], ...]) -> list[tuple[str, int, Any]] | None:
    """The same for a remote array, from its listing."""
    names = {rel.split("/")[1] for rel, _size in listing if rel.startswith("__fragments/") and rel.count("/") >= 2}
    version = next(iter(names)).rsplit("_", 1)[-1] if len(names) == 1 else ""
    if not version.isdigit():
        return None
    return [(f"{uri.rstrip('/')}/__fragments/{next(iter(names))}", int(version), full)]


def _setting(ctx: tiledb.Ctx | None, key: str, default: int) -> int:
    try:
        return int((ctx or tiledb.default_ctx()).config()[key])
    except (KeyError, ValueError, tiledb.TileDBError):
        return default


def open_direct(uri: str, arr: tiledb.Array, *, dtype: str, ctx: tiledb.Ctx | None = None) -> DirectLayout:
    """Validate the open array ``arr`` (at ``uri``) for direct reads.

    Raises
    ------
    LayoutError
        If anything differs from the layout the direct reader decodes (the reason says what).
    """
    schema = arr.schema
    dom = schema.domain
    n_slots, n_cells, dim = (int(dom.dim(i).domain[1]) + 1 for i in range(3))
    cell_tile = int(dom.dim(1).tile)
    if schema.sparse or schema.cell_order != "row-major" or schema.tile_order != "row-major":
        raise LayoutError("not a dense row-major array")
    if int(dom.dim(0).tile) != 1 or int(dom.dim(2).tile) != dim:
        raise LayoutError("tiles are not (1, C, dim)")
    full = ((0, n_slots - 1), (0, n_cells - 1), (0, dim - 1))
    ned = arr.nonempty_domain()
    if ned is None or tuple((int(a), int(b)) for a, b in ned) != full:
        raise LayoutError(f"written domain {ned} is not the full domain {full}")
    local = is_local(uri)
    vfs, listing, sizes = None, None, {}
    if local:
        frags = _local_single_fragment(uri, full)
    else:
        vfs = tiledb.VFS(ctx=ctx)
        listing = list_array(vfs, uri)
        sizes = dict(listing)
        frags = _remote_single_fragment(uri, listing, full)
    if frags is None:  # several fragments (or unknown): ask TileDB for each one's domain (~1 ms locally)
        info = tiledb.array_fragments(uri, ctx=ctx)
        frags = list(zip(info.uri, info.version, info.nonempty_domain, strict=True))
    parts = disjoint_fragments(frags, n_slots=n_slots, n_cells=n_cells, dim=dim, cell_tile=cell_tile)
    gap = 0 if local else _setting(ctx, "vfs.min_batch_gap", _DEFAULT_GAP)
    parallel = 1 if local else _setting(ctx, "sm.io_concurrency_level", 1)
    tiles = {}
    for i in range(schema.nattr):
        attr = schema.attr(i)
        if len(attr.filters):
            raise LayoutError(f"attribute {attr.name} has filters")
        view = np.dtype(np.float16) if dtype == "float16" else np.dtype(attr.dtype)  # uint16 bits are float16
        if view.itemsize != np.dtype(attr.dtype).itemsize:
            raise LayoutError(f"attribute {attr.name} stores {attr.dtype}, not {dtype}")
        files = []
        for lo, hi, folder in parts:
            name = folder.rsplit("/", 1)[-1]
            if local:
                source: Any = MappedFile(Path(folder) / f"a{i}.tdb")
            else:
                size = sizes.get(f"__fragments/{name}/a{i}.tdb")
                if size is None:
                    raise LayoutError(f"missing data file a{i}.tdb of fragment {name}")
                source = VfsFile(vfs, f"{folder}/a{i}.tdb", size, max_gap=gap, parallel=parallel)
            files.append((lo, hi, TileFile(source, n_tiles=n_slots * (hi - lo), tile_elems=cell_tile * dim, dtype=view)))
        tiles[attr.name] = FragmentTiles(files, -(-n_cells // cell_tile))
    pools = tuple(schema.attr(i).name for i in range(schema.nattr))
    return DirectLayout(dtype, n_slots, n_cells, dim, cell_tile, pools, tiles,
                        tuple(folder.rsplit("/", 1)[-1] for _lo, _hi, folder in parts), listing, vfs)
