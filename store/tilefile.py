"""Direct reads of a complete run's tiles, without libtiledb's three copies.

A complete run's array is fully consolidated and vacuumed: one fragment covering the whole
domain, whose attribute files hold every tile in global (row-major) tile order. Our attributes
have an empty filter pipeline, and TileDB stores each tile as a *filtered buffer* (TileDB format
specification, version 22, ``format_spec/tile.md`` in TileDB's repository): a ``uint64`` chunk count, then per chunk a ``uint32`` unfiltered size, a
``uint32`` filtered size, a ``uint32`` metadata size, the metadata and the chunk's bytes. With no
filters a chunk's bytes are the tile's own values, so a tile is a few strided numpy views of the
memory-mapped file and a layer is copied out of the page cache in one pass -- where libtiledb's
dense reader reads each tile into a buffer, "unfilters" it into a second one and copies it into
the result (``BENCHMARKS.md``).

The direct path is used only when every condition holds (otherwise libtiledb reads):

* a local array, dense, row-major, tiles ``(1, C, dim)``, attributes without filters;
* one fragment, or several whose non-empty domains cover every layer and feature and disjoint,
  tile-aligned cell ranges that together are every cell (what a consolidated run, or a sharded
  run whose shards were consolidated separately, holds), each of a TileDB format version this
  module was tested against;
* each attribute file's size equals the layout computed from the schema and its first tile
  header;
* before anything is copied, the chunk count of every tile read and the header of every chunk
  read from are checked (all chunks of a tile copied whole; the chunks holding the rows of a
  scattered selection).

Neither path checks a checksum (the attributes carry no checksum filter, and libtiledb returns
a flipped data byte as it is). ``sclstore verify`` compares direct and libtiledb reads of every
complete run, and ``StoreSettings(direct_reads=False)`` turns the path off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["KNOWN_FORMAT_VERSIONS", "FragmentTiles", "LayoutError", "TileFile", "disjoint_fragments", "single_fragment"]

logger = logging.getLogger(__name__)

KNOWN_FORMAT_VERSIONS = frozenset({22})
"""TileDB fragment format versions whose data files this module decodes (TileDB 2.30 writes 22)."""

_COUNT_BYTES = 8
_CHUNK_HEADER_BYTES = 12


class LayoutError(Exception):
    """The file is not laid out as this module expects: read it through libtiledb instead."""


def single_fragment(uri: str) -> Path:
    """The only fragment folder of a fully consolidated local array.

    Raises
    ------
    LayoutError
        If the array is remote, has no or several fragments, or an unknown format version.
    """
    if "://" in uri:
        raise LayoutError("not a local array")
    frag_dir = Path(uri) / "__fragments"
    try:
        names = [e.name for e in os.scandir(frag_dir) if e.is_dir()]
    except OSError as exc:
        raise LayoutError(f"no fragments folder: {exc}") from exc
    if len(names) != 1:
        raise LayoutError(f"{len(names)} fragments (not fully consolidated)")
    version = names[0].rsplit("_", 1)[-1]
    if not version.isdigit() or int(version) not in KNOWN_FORMAT_VERSIONS:
        raise LayoutError(f"fragment format version {version!r} not in {sorted(KNOWN_FORMAT_VERSIONS)}")
    return frag_dir / names[0]


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        raise LayoutError("not a local array")
    return Path(uri)


def disjoint_fragments(
    fragments: list[tuple[str, int, tuple[tuple[int, int], ...]]], *, n_slots: int, n_cells: int, dim: int, cell_tile: int
) -> list[tuple[int, int, Path]]:
    """Check that fragments tile the array's cells disjointly; give ``(first_tile, end_tile, folder)``.

    Parameters
    ----------
    fragments
        ``(uri, format_version, non_empty_domain)`` of every live fragment.

    Raises
    ------
    LayoutError
        If a fragment is remote or of an unknown format version, does not cover every layer
        and feature, starts or ends inside a cell tile (except at the last cell), or the cell
        ranges overlap or leave a gap.
    """
    if not fragments:
        raise LayoutError("no fragments")
    parts = []
    for uri, version, ned in fragments:
        path = _local_path(uri)
        if int(version) not in KNOWN_FORMAT_VERSIONS:
            raise LayoutError(f"fragment format version {version!r} not in {sorted(KNOWN_FORMAT_VERSIONS)}")
        (l0, l1), (c0, c1), (f0, f1) = ((int(a), int(b)) for a, b in ned)
        if (l0, l1) != (0, n_slots - 1) or (f0, f1) != (0, dim - 1):
            raise LayoutError(f"fragment {path.name} covers layers {l0}..{l1} and features {f0}..{f1}, not all")
        if c0 % cell_tile or ((c1 + 1) % cell_tile and c1 != n_cells - 1):
            raise LayoutError(f"fragment {path.name} cells {c0}..{c1} are not aligned to {cell_tile}-cell tiles")
        parts.append((c0, c1, path))
    parts.sort(key=lambda p: p[0])
    expect = 0
    for c0, c1, path in parts:
        if c0 != expect:
            what = "overlap" if c0 < expect else "have a gap"
            raise LayoutError(f"{len(parts)} fragments: cells {expect}.. {what} at fragment {path.name}")
        expect = c1 + 1
    if expect != n_cells:
        raise LayoutError(f"fragments cover cells 0..{expect - 1} of 0..{n_cells - 1}")
    return [(c0 // cell_tile, -(-(c1 + 1) // cell_tile), path) for c0, c1, path in parts]


class FragmentTiles:
    """One attribute's tiles over fragments that cover disjoint cell-tile ranges, addressed by
    global tile number ``slot * n_cell_tiles + cell_tile`` (a single fragment is the simple case).

    Parameters
    ----------
    parts
        ``(first_tile, end_tile, TileFile)`` per fragment, sorted, covering ``0..n_cell_tiles``;
        each file holds its ``n_slots * (end_tile - first_tile)`` tiles in slot-major order.
    """

    def __init__(self, parts: list[tuple[int, int, TileFile]], n_cell_tiles: int) -> None:
        self.parts = parts
        self.n_ct = int(n_cell_tiles)
        self._starts = np.array([p[0] for p in parts], dtype=np.int64)

    def decode(self, g0: int, g1: int, dest: np.ndarray) -> None:
        """Tiles ``g0 .. g1-1`` (within one slot) into ``dest`` (see :meth:`TileFile.decode`)."""
        slot, t0 = divmod(int(g0), self.n_ct)
        t1 = int(g1) - slot * self.n_ct
        if not 0 <= t0 < t1 <= self.n_ct:
            raise ValueError(f"decode({g0}, {g1}): tiles span two layer slots")
        for lo, hi, tf in self.parts:
            a, b = max(t0, lo), min(t1, hi)
            if a < b:
                base = slot * (hi - lo) - lo
                tf.decode(base + a, base + b, dest[a - t0 : b - t0])

    def gather(self, tiles: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray | None:
        """Rows of global tiles (see :meth:`TileFile.gather`); ``None`` when a fragment cannot gather."""
        if len(self.parts) == 1:
            return self.parts[0][2].gather(tiles, rows, dim)
        slot, t = np.divmod(tiles, self.n_ct)
        which = np.searchsorted(self._starts, t, side="right") - 1
        out: np.ndarray | None = None
        for k in np.unique(which):
            lo, hi, tf = self.parts[int(k)]
            sel = which == k
            got = tf.gather(slot[sel] * (hi - lo) + t[sel] - lo, rows[sel], dim)
            if got is None:
                return None
            if out is None:
                out = np.empty((tiles.size, dim), dtype=got.dtype)
            out[sel] = got
        return out

    def close(self) -> None:
        for _lo, _hi, tf in self.parts:
            tf.close()


class TileFile:
    """The tiles of one attribute of a single-fragment dense array, as views of the file.

    Parameters
    ----------
    path
        The attribute's data file (``a<i>.tdb`` in the fragment folder).
    n_tiles
        Tiles in the fragment (layer slots x cell tiles).
    tile_elems
        Values per tile (cells per tile x dim).
    dtype
        The dtype to view the stored values as (its itemsize must be the attribute's: e.g.
        ``float16`` for float16 values stored as ``uint16`` bits).

    Raises
    ------
    LayoutError
        If the file's size or first tile header does not match an unfiltered tile layout.
    """

    def __init__(self, path: Path, *, n_tiles: int, tile_elems: int, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.n_tiles = int(n_tiles)
        self.tile_elems = int(tile_elems)
        item = self.dtype.itemsize
        tile_bytes = self.tile_elems * item
        try:
            with open(path, "rb") as fh:  # stat and map the same file
                st = os.fstat(fh.fileno())
                size = st.st_size
                if size < _COUNT_BYTES + _CHUNK_HEADER_BYTES:
                    raise LayoutError(f"{path.name} is too small")
                raw = np.memmap(fh, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise LayoutError(f"missing data file {path.name}") from exc
        self.path = path
        self.file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
        """``(inode, size, mtime_ns)`` of the mapped file (see :mod:`sclstore.store.layout_cache`)."""
        n_chunks = int(raw[:_COUNT_BYTES].view("<u8")[0])
        chunk_bytes = int(raw[_COUNT_BYTES : _COUNT_BYTES + 4].view("<u4")[0])
        if n_chunks < 1 or chunk_bytes < item or chunk_bytes % item or -(-tile_bytes // chunk_bytes) != n_chunks:
            raise LayoutError(f"{path.name}: first tile has {n_chunks} chunks of {chunk_bytes} bytes for a {tile_bytes}-byte tile")
        stride = _COUNT_BYTES + n_chunks * _CHUNK_HEADER_BYTES + tile_bytes
        if size != self.n_tiles * stride:
            raise LayoutError(f"{path.name} has {size} bytes, an unfiltered layout of {self.n_tiles} tiles has {self.n_tiles * stride}")
        last = tile_bytes - (n_chunks - 1) * chunk_bytes
        sizes = np.full(n_chunks, chunk_bytes, dtype=np.uint32)
        sizes[-1] = last
        # every chunk header must read (size, size, 0): unfiltered size, filtered size, metadata size
        self._expected = np.stack([sizes, sizes, np.zeros_like(sizes)], axis=1)
        step = chunk_bytes + _CHUNK_HEADER_BYTES
        self._counts = np.ndarray((self.n_tiles, 2), "<u4", raw, 0, (stride, 4))
        self._headers = np.ndarray((self.n_tiles, n_chunks, 3), "<u4", raw, _COUNT_BYTES, (stride, step, 4))
        self._n_full = n_chunks if last == chunk_bytes else n_chunks - 1
        self._chunk_elems = chunk_bytes // item
        first_data = _COUNT_BYTES + _CHUNK_HEADER_BYTES
        self._full = np.ndarray((self.n_tiles, self._n_full, self._chunk_elems), self.dtype, raw, first_data, (stride, step, item))
        self._tail: np.ndarray | None = None
        if self._n_full < n_chunks:
            tail_offset = first_data + self._n_full * step
            self._tail = np.ndarray((self.n_tiles, last // item), self.dtype, raw, tail_offset, (stride, item))
        self._n_chunks = n_chunks
        self._raw = raw
        # the whole file as values (an unfiltered layout's size is a multiple of the value size)
        self._flat = np.ndarray((size // item,), self.dtype, raw, 0)
        self._aligned = (_COUNT_BYTES + _CHUNK_HEADER_BYTES) % item == 0 and stride % item == 0 and step % item == 0
        self.check(0, 1)

    def check(self, t0: int, t1: int) -> None:
        """Check the headers of tiles ``t0 .. t1-1``.

        Raises
        ------
        LayoutError
            If any chunk count or chunk header differs from the unfiltered layout.
        """
        self._check(slice(t0, t1), f"tiles {t0}..{t1 - 1}")

    def _check(self, which: slice | np.ndarray, label: str, *, chunks: np.ndarray | None = None) -> None:
        """Check the chunk counts of tiles ``which`` and all their chunk headers, or with
        ``chunks`` (same length as ``which``) only the header of chunk ``chunks[i]`` of tile ``which[i]``."""
        counts = self._counts[which]
        if not (np.all(counts[:, 0] == self._n_chunks) and np.all(counts[:, 1] == 0)):
            raise LayoutError(f"{label}: unexpected chunk count")
        if chunks is None:
            headers = self._headers[which]
            ok = np.array_equal(headers, np.broadcast_to(self._expected, headers.shape))
        else:
            ok = np.array_equal(self._headers[which, chunks], self._expected[chunks])
        if not ok:
            raise LayoutError(f"{label}: unexpected chunk header")

    def decode(self, t0: int, t1: int, dest: np.ndarray) -> None:
        """Copy tiles ``t0 .. t1-1`` into ``dest``, a C-contiguous ``(t1 - t0, tile_elems)`` array
        of this file's dtype or one it casts to safely.

        Raises
        ------
        LayoutError
            If their headers do not match (nothing is copied then).
        """
        if not (0 <= t0 < t1 <= self.n_tiles) or dest.shape != (t1 - t0, self.tile_elems) or not dest.flags.c_contiguous:
            raise ValueError(f"decode({t0}, {t1}) into {dest.shape}: bad tile range or destination")
        self.check(t0, t1)
        k, item = t1 - t0, dest.itemsize
        body = as_strided(dest, shape=(k, self._n_full, self._chunk_elems), strides=(self.tile_elems * item, self._chunk_elems * item, item))
        np.copyto(body, self._full[t0:t1])  # converts to dest's dtype in the same pass (e.g. float16 -> float32)
        if self._tail is not None:
            np.copyto(dest[:, self._n_full * self._chunk_elems :], self._tail[t0:t1])

    def gather(self, tiles: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray | None:
        """Rows ``rows[i]`` (of ``dim`` values) of tiles ``tiles[i]``, copied straight from the file.

        Reads only the selected rows (a scattered selection costs its own bytes, not its
        tiles'). Returns ``None`` when a row can straddle two chunks, i.e. unless every chunk
        holds whole rows, or when values do not sit at multiples of their size in the file
        (then decode the tiles instead).

        Raises
        ------
        LayoutError
            If the headers of a touched tile do not match.
        """
        if self._tail is not None or self._chunk_elems % dim or not self._aligned:
            return None
        item = self.dtype.itemsize
        per_chunk = self._chunk_elems // dim
        chunk, row = np.divmod(rows, per_chunk)
        # check every touched tile's chunk count and the header of every chunk read from (not
        # all chunks of the tile: each header is another page to fault in for a few rows)
        key = tiles * self._n_chunks + chunk
        in_order = key.size > 1 and bool(np.all(key[1:] >= key[:-1]))  # the reader's case: unique in one pass
        key = key[np.concatenate(([True], key[1:] != key[:-1]))] if in_order else np.unique(key)
        t, c = np.divmod(key, self._n_chunks)
        self._check(t, f"{t.size} chunks of tiles {int(t[0])}..{int(t[-1])}", chunks=c)
        # each row is ``dim`` contiguous values at a known offset: one take over a view whose
        # row i starts at value i (faster than indexing the 4-d tile view with three arrays)
        stride, step = self._counts.strides[0], self._headers.strides[1]
        first = _COUNT_BYTES + _CHUNK_HEADER_BYTES
        offsets = (tiles * stride + (first + chunk * step + row * (dim * item))) // item
        return self._row_view(dim)[offsets]

    def _row_view(self, dim: int) -> np.ndarray:
        """The file as values, viewed as overlapping rows of ``dim``: row ``i`` starts at value ``i``."""
        flat = self._flat
        item = self.dtype.itemsize
        return as_strided(flat, shape=(flat.size - dim + 1, dim), strides=(item, item), writeable=False)

    def close(self) -> None:
        """Drop the views (the mapping closes when the last one is garbage collected)."""
        for name in ("_counts", "_headers", "_full", "_tail", "_flat", "_raw"):
            setattr(self, name, None)
