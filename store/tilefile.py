"""Direct reads of a complete run's tiles, without libtiledb's three copies.

A complete run's array is fully consolidated and vacuumed: one fragment covering the whole
domain, whose attribute files hold every tile in global (row-major) tile order. Our attributes
have an empty filter pipeline, and TileDB stores each tile as a *filtered buffer* (TileDB format
specification, version 22, ``format_spec/tile.md`` in TileDB's repository): a ``uint64`` chunk
count, then per chunk a ``uint32`` unfiltered size, a ``uint32`` filtered size, a ``uint32``
metadata size, the metadata and the chunk's bytes. With no filters a chunk's bytes are the
tile's own values, so a tile is a few strided numpy views of the file's bytes and a layer is
copied out in one pass -- where libtiledb's dense reader reads each tile into a buffer,
"unfilters" it into a second one and copies it into the result (``BENCHMARKS.md``).

The bytes come from a :mod:`~sclstore.store.tilesource`: a local file is memory-mapped (a read
copies out of the page cache); a remote file (``s3://`` or any other non-local VFS scheme) is
read by byte ranges through TileDB's VFS with the store's context -- one ranged read per run of
adjacent tiles (a full layer is one read), and for scattered rows the chunks they touch, ranges
closer than the context's ``vfs.min_batch_gap`` merged into one read. The decoding is the same.

The direct path is used only when every condition holds (otherwise libtiledb reads):

* a dense, row-major array, tiles ``(1, C, dim)``, attributes without filters;
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

import os
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .tilesource import ByteSource, Fetched, LayoutError, MappedFile, fetch_ranges

__all__ = ["KNOWN_FORMAT_VERSIONS", "FragmentTiles", "LayoutError", "TileFile", "disjoint_fragments", "single_fragment"]

KNOWN_FORMAT_VERSIONS = frozenset({22})
"""TileDB fragment format versions whose data files this module decodes (TileDB 2.30 writes 22)."""

_COUNT_BYTES = 8
_CHUNK_HEADER_BYTES = 12


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


def disjoint_fragments(
    fragments: list[tuple[str, int, tuple[tuple[int, int], ...]]], *, n_slots: int, n_cells: int, dim: int, cell_tile: int
) -> list[tuple[int, int, str]]:
    """Check that fragments tile the array's cells disjointly; give ``(first_tile, end_tile, folder)``.

    Parameters
    ----------
    fragments
        ``(uri, format_version, non_empty_domain)`` of every live fragment.

    Returns
    -------
    list of (int, int, str)
        Sorted by cells; ``folder`` is the fragment's URI (a local path without ``file://``).

    Raises
    ------
    LayoutError
        If a fragment is of an unknown format version, does not cover every layer and feature,
        starts or ends inside a cell tile (except at the last cell), or the cell ranges overlap
        or leave a gap.
    """
    if not fragments:
        raise LayoutError("no fragments")
    parts = []
    for uri, version, ned in fragments:
        folder = str(uri).rstrip("/").removeprefix("file://")
        name = folder.rsplit("/", 1)[-1]
        if int(version) not in KNOWN_FORMAT_VERSIONS:
            raise LayoutError(f"fragment format version {version!r} not in {sorted(KNOWN_FORMAT_VERSIONS)}")
        (l0, l1), (c0, c1), (f0, f1) = ((int(a), int(b)) for a, b in ned)
        if (l0, l1) != (0, n_slots - 1) or (f0, f1) != (0, dim - 1):
            raise LayoutError(f"fragment {name} covers layers {l0}..{l1} and features {f0}..{f1}, not all")
        if c0 % cell_tile or ((c1 + 1) % cell_tile and c1 != n_cells - 1):
            raise LayoutError(f"fragment {name} cells {c0}..{c1} are not aligned to {cell_tile}-cell tiles")
        parts.append((c0, c1, folder))
    parts.sort(key=lambda p: p[0])
    expect = 0
    for c0, c1, folder in parts:
        if c0 != expect:
            what = "overlap" if c0 < expect else "have a gap"
            raise LayoutError(f"{len(parts)} fragments: cells {expect}.. {what} at fragment {folder.rsplit('/', 1)[-1]}")
        expect = c1 + 1
    if expect != n_cells:
        raise LayoutError(f"fragments cover cells 0..{expect - 1} of 0..{n_cells - 1}")
    return [(c0 // cell_tile, -(-(c1 + 1) // cell_tile), folder) for c0, c1, folder in parts]


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
        self.remote = any(tf.remote for _lo, _hi, tf in parts)
        """Whether reads fetch byte ranges (remote files) rather than view mapped files."""

    def fetch(self, tiles: np.ndarray) -> list[Fetched | None]:
        """The bytes of global tiles ``tiles`` (sorted, unique), per fragment (``None`` where a
        fragment holds none of them): one read per run of tiles of each fragment's file."""
        slot, t = np.divmod(np.asarray(tiles, dtype=np.int64), self.n_ct)
        which = np.searchsorted(self._starts, t, side="right") - 1
        out: list[Fetched | None] = [None] * len(self.parts)
        for k in np.unique(which):
            lo, hi, tf = self.parts[int(k)]
            sel = which == k
            out[int(k)] = tf.fetch_tiles(slot[sel] * (hi - lo) + t[sel] - lo)
        return out

    def decode(self, g0: int, g1: int, dest: np.ndarray, fetched: list[Fetched | None] | None = None) -> None:
        """Tiles ``g0 .. g1-1`` (within one slot) into ``dest`` (see :meth:`TileFile.decode`),
        from ``fetched`` (:meth:`fetch`) where it holds them."""
        slot, t0 = divmod(int(g0), self.n_ct)
        t1 = int(g1) - slot * self.n_ct
        if not 0 <= t0 < t1 <= self.n_ct:
            raise ValueError(f"decode({g0}, {g1}): tiles span two layer slots")
        for k, (lo, hi, tf) in enumerate(self.parts):
            a, b = max(t0, lo), min(t1, hi)
            if a < b:
                base = slot * (hi - lo) - lo
                tf.decode(base + a, base + b, dest[a - t0 : b - t0], None if fetched is None else fetched[k])

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
    """The tiles of one attribute file of a dense fragment, decoded from its bytes.

    The bytes come from a :class:`~sclstore.store.tilesource.ByteSource`: a local file is
    memory-mapped (every read is a view of the mapping), a remote one is read by ranges through
    TileDB's VFS (:meth:`fetch_tiles` reads a set of tiles, merged into as few requests as its
    gap allows; :meth:`decode` and :meth:`gather` fetch what they need when not given it).

    Parameters
    ----------
    source
        The attribute's data file (``a<i>.tdb`` in the fragment folder): a byte source, or a
        local path (mapped).
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

    def __init__(self, source: ByteSource | str | os.PathLike[str], *, n_tiles: int, tile_elems: int, dtype: np.dtype) -> None:
        self.source: ByteSource = MappedFile(Path(source)) if isinstance(source, (str, os.PathLike)) else source
        src = self.source
        self.dtype = np.dtype(dtype)
        self.n_tiles = int(n_tiles)
        self.tile_elems = int(tile_elems)
        item = self.dtype.itemsize
        tile_bytes = self.tile_elems * item
        size, name = src.size, src.name
        if size < _COUNT_BYTES + _CHUNK_HEADER_BYTES:
            raise LayoutError(f"{name} is too small")
        head = np.ascontiguousarray(src.read(0, _COUNT_BYTES + _CHUNK_HEADER_BYTES))
        n_chunks = int(head[:_COUNT_BYTES].view("<u8")[0])
        chunk_bytes = int(head[_COUNT_BYTES : _COUNT_BYTES + 4].view("<u4")[0])
        if n_chunks < 1 or chunk_bytes < item or chunk_bytes % item or -(-tile_bytes // chunk_bytes) != n_chunks:
            raise LayoutError(f"{name}: first tile has {n_chunks} chunks of {chunk_bytes} bytes for a {tile_bytes}-byte tile")
        self._stride = stride = _COUNT_BYTES + n_chunks * _CHUNK_HEADER_BYTES + tile_bytes
        if size != self.n_tiles * stride:
            raise LayoutError(f"{name} has {size} bytes, an unfiltered layout of {self.n_tiles} tiles has {self.n_tiles * stride}")
        last = tile_bytes - (n_chunks - 1) * chunk_bytes
        sizes = np.full(n_chunks, chunk_bytes, dtype=np.uint32)
        sizes[-1] = last
        # every chunk header must read (size, size, 0): unfiltered size, filtered size, metadata size
        self._expected = np.stack([sizes, sizes, np.zeros_like(sizes)], axis=1)
        self._step = step = chunk_bytes + _CHUNK_HEADER_BYTES
        self._n_chunks = n_chunks
        self._n_full = n_chunks if last == chunk_bytes else n_chunks - 1
        self._chunk_elems = chunk_bytes // item
        self._tail_elems = 0 if last == chunk_bytes else last // item
        self._aligned = (_COUNT_BYTES + _CHUNK_HEADER_BYTES) % item == 0 and stride % item == 0 and step % item == 0
        self._whole = None if src.mapped is None else Fetched(src.mapped)
        if self._whole is not None:
            self.check(0, 1)
        else:  # a remote file: the first chunk's header, read above (every read checks the headers it uses)
            self._check(head[:_COUNT_BYTES].view("<u4")[None], head[_COUNT_BYTES:].view("<u4")[None], self._expected[:1], "tile 0")

    @property
    def path(self) -> str | os.PathLike[str]:
        """The file's path (local) or URI (remote)."""
        return self.source.path

    @property
    def file_id(self) -> tuple[int, int, int]:
        """``(inode, size, mtime_ns)`` of a mapped file (see :mod:`sclstore.store.layout_cache`)."""
        return self.source.file_id

    @property
    def remote(self) -> bool:
        """Whether reads fetch byte ranges (``False``: the file is mapped)."""
        return self._whole is None

    def fetch_tiles(self, tiles: np.ndarray) -> Fetched:
        """The bytes of tiles ``tiles`` (the whole mapping for a local file)."""
        if self._whole is not None:
            return self._whole
        starts = np.asarray(tiles, dtype=np.int64) * self._stride
        return fetch_ranges(self.source, starts, starts + self._stride)

    def _fetch_chunks(self, t: np.ndarray, c: np.ndarray) -> Fetched:
        """The chunk count of tiles ``t`` and the header and values of their chunks ``c``."""
        if self._whole is not None:
            return self._whole
        first = t * self._stride
        head = first + _COUNT_BYTES + c * self._step
        end = np.minimum(head + self._step, first + self._stride)
        return fetch_ranges(self.source, np.concatenate((first, head)), np.concatenate((first + _COUNT_BYTES, end)))

    def _views(self, got: Fetched, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
        """``(counts, headers, full chunks, short last chunk or None)`` views of tiles ``t0 .. t1-1``
        held in ``got`` (``None`` if it does not hold them)."""
        stride, step, item, k = self._stride, self._step, self.dtype.itemsize, t1 - t0
        o = got.locate(t0 * stride, k * stride)
        if o is None:
            return None
        buf, first = got.buf, o + _COUNT_BYTES + _CHUNK_HEADER_BYTES
        counts = np.ndarray((k, 2), "<u4", buf, o, (stride, 4))
        headers = np.ndarray((k, self._n_chunks, 3), "<u4", buf, o + _COUNT_BYTES, (stride, step, 4))
        full = np.ndarray((k, self._n_full, self._chunk_elems), self.dtype, buf, first, (stride, step, item))
        tail = None
        if self._tail_elems:
            tail = np.ndarray((k, self._tail_elems), self.dtype, buf, first + self._n_full * step, (stride, item))
        return counts, headers, full, tail

    def check(self, t0: int, t1: int) -> None:
        """Check the headers of tiles ``t0 .. t1-1``.

        Raises
        ------
        LayoutError
            If any chunk count or chunk header differs from the unfiltered layout.
        """
        views = self._views(self.fetch_tiles(np.arange(t0, t1)), t0, t1)
        assert views is not None
        self._check(views[0], views[1], self._expected, f"tiles {t0}..{t1 - 1}")

    def _check(self, counts: np.ndarray, headers: np.ndarray, expected: np.ndarray, label: str) -> None:
        """Check chunk counts ``(k, 2)`` (count, 0) and chunk headers ``(k, ..., 3)`` against ``expected``."""
        if not (np.all(counts[:, 0] == self._n_chunks) and np.all(counts[:, 1] == 0)):
            raise LayoutError(f"{label}: unexpected chunk count")
        if not np.array_equal(headers, np.broadcast_to(expected, headers.shape)):
            raise LayoutError(f"{label}: unexpected chunk header")

    def decode(self, t0: int, t1: int, dest: np.ndarray, fetched: Fetched | None = None) -> None:
        """Copy tiles ``t0 .. t1-1`` into ``dest``, a C-contiguous ``(t1 - t0, tile_elems)`` array
        of this file's dtype or one it casts to safely; from ``fetched`` when it holds them.

        Raises
        ------
        LayoutError
            If their headers do not match (nothing is copied then).
        """
        if not (0 <= t0 < t1 <= self.n_tiles) or dest.shape != (t1 - t0, self.tile_elems) or not dest.flags.c_contiguous:
            raise ValueError(f"decode({t0}, {t1}) into {dest.shape}: bad tile range or destination")
        views = None if fetched is None else self._views(fetched, t0, t1)
        if views is None:
            views = self._views(self.fetch_tiles(np.arange(t0, t1)), t0, t1)
            assert views is not None
        counts, headers, full, tail = views
        self._check(counts, headers, self._expected, f"tiles {t0}..{t1 - 1}")
        k, item = t1 - t0, dest.itemsize
        body = as_strided(dest, shape=(k, self._n_full, self._chunk_elems), strides=(self.tile_elems * item, self._chunk_elems * item, item))
        np.copyto(body, full)  # converts to dest's dtype in the same pass (e.g. float16 -> float32)
        if tail is not None:
            np.copyto(dest[:, self._n_full * self._chunk_elems :], tail)

    def gather(self, tiles: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray | None:
        """Rows ``rows[i]`` (of ``dim`` values) of tiles ``tiles[i]``, copied straight from the file.

        Reads only the chunks holding the selected rows (a scattered selection costs its own
        chunks, not its tiles'). Returns ``None`` when a row can straddle two chunks, i.e. unless
        every chunk holds whole rows, or when values do not sit at multiples of their size in the
        file (then decode the tiles instead).

        Raises
        ------
        LayoutError
            If the headers of a touched tile do not match.
        """
        if self._tail_elems or self._chunk_elems % dim or not self._aligned:
            return None
        item, stride, step = self.dtype.itemsize, self._stride, self._step
        chunk, row = np.divmod(rows, self._chunk_elems // dim)
        # check every touched tile's chunk count and the header of every chunk read from (not
        # all chunks of the tile: each header is another page to fault in for a few rows)
        key = tiles * self._n_chunks + chunk
        in_order = key.size > 1 and bool(np.all(key[1:] >= key[:-1]))  # the reader's case: unique in one pass
        key = key[np.concatenate(([True], key[1:] != key[:-1]))] if in_order else np.unique(key)
        t, c = np.divmod(key, self._n_chunks)
        got = self._fetch_chunks(t, c)
        counts = got.take(t * stride, _COUNT_BYTES).view("<u4")
        headers = got.take(t * stride + _COUNT_BYTES + c * step, _CHUNK_HEADER_BYTES).view("<u4")
        self._check(counts, headers, self._expected[c], f"{t.size} chunks of tiles {int(t[0])}..{int(t[-1])}")
        # each row is ``dim`` contiguous values at a known offset: one take over a view whose
        # row i starts at value i (faster than indexing a 4-d tile view with three arrays)
        first = _COUNT_BYTES + _CHUNK_HEADER_BYTES
        pos = got.locate_many(tiles * stride + (first + chunk * step + row * (dim * item)), dim * item)
        flat = np.ndarray((got.buf.size // item,), self.dtype, got.buf, 0)
        rowview = as_strided(flat, shape=(flat.size - dim + 1, dim), strides=(item, item), writeable=False)
        return rowview[pos // item]

    def close(self) -> None:
        """Drop the mapping or handles (a mapping closes when its last view is garbage collected)."""
        self._whole = None
        self.source.close()
