"""A per-process cache of direct-readable array layouts, so reopening a complete run costs a few
``stat`` calls instead of a libtiledb open.

Opening a run's array through libtiledb (schema, metadata, non-empty domain) takes ~1-2 ms,
which dominates small reads (100 cells of every layer take a few ms). A complete run's array
never changes, so once an :class:`~sclstore.store.arrays.ArrayReader` has validated it for
direct reads, what it learnt (shape, tile, pools, dtype and the memory-mapped tile files) is
kept here, keyed by the array's path, together with a *stamp* of the files it came from: the
names in ``__fragments`` and ``__meta``, and the inode, size and modification time of every
mapped data file. A later open takes the entry only if the stamp taken again now is identical;
any change (a consolidation, a vacuum, a rewritten or replaced file, new metadata) makes it a
miss, and the reader opens the array through libtiledb and validates it again.

Tile headers are still checked on every read (:mod:`sclstore.store.tilefile`): the cache skips
only the open. Entries are dropped when a direct read finds an unexpected tile. At most
:data:`MAX_ENTRIES` arrays and :data:`MAX_FILES` mapped files are held (least recently used
evicted first): each mapping holds a file descriptor.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .tilefile import FragmentTiles, TileFile

__all__ = ["MAX_ENTRIES", "MAX_FILES", "DirectLayout", "clear", "drop", "get", "put", "stamp"]

MAX_ENTRIES = 32
"""Arrays whose layouts are kept per process."""
MAX_FILES = 256
"""Mapped data files kept in all (each mapping holds a file descriptor)."""

Stamp = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int, int], ...]]


@dataclass(frozen=True)
class DirectLayout:
    """What an :class:`~sclstore.store.arrays.ArrayReader` needs to read an array directly."""

    dtype: str
    n_slots: int
    n_cells: int
    dim: int
    cell_tile: int
    pools: tuple[str, ...]
    tiles: dict[str, FragmentTiles]
    fragments: tuple[str, ...]
    """Names of the fragment folders read (every folder in ``__fragments``)."""

    @property
    def files(self) -> list[TileFile]:
        return [tf for ft in self.tiles.values() for _lo, _hi, tf in ft.parts]


_lock = threading.Lock()
_entries: OrderedDict[str, tuple[Stamp, DirectLayout]] = OrderedDict()


def _names(folder: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(e.name for e in os.scandir(folder)))
    except FileNotFoundError:
        return ()


def stamp(path: str, files: list[TileFile]) -> Stamp | None:
    """The current stamp of the local array at ``path`` whose data files are ``files``
    (``None`` if a file is missing)."""
    stats = []
    for tf in files:
        try:
            st = os.stat(tf.path)
        except OSError:
            return None
        stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return _names(os.path.join(path, "__fragments")), _names(os.path.join(path, "__meta")), tuple(stats)


def get(path: str) -> DirectLayout | None:
    """The cached layout of the array at ``path`` if its files are unchanged, else ``None``."""
    with _lock:
        entry = _entries.get(path)
    if entry is None:
        return None
    old, layout = entry
    if stamp(path, layout.files) != old:
        drop(path)
        return None
    with _lock:
        if path in _entries:
            _entries.move_to_end(path)
    return layout


def put(path: str, layout: DirectLayout) -> bool:
    """Cache a layout just validated through libtiledb; only if the folder still holds exactly
    the fragments read and every data file is still the one mapped. Returns whether it was kept."""
    now = stamp(path, layout.files)
    if now is None or now[0] != tuple(sorted(layout.fragments)) or now[2] != tuple(tf.file_id for tf in layout.files):
        return False
    with _lock:
        _entries[path] = (now, layout)
        _entries.move_to_end(path)
        while len(_entries) > 1 and (len(_entries) > MAX_ENTRIES or sum(len(e[1].files) for e in _entries.values()) > MAX_FILES):
            _entries.popitem(last=False)
    return True


def drop(path: str) -> None:
    """Forget the layout of the array at ``path`` (its files changed, or a direct read found an
    unexpected tile)."""
    with _lock:
        _entries.pop(path, None)


def clear() -> None:
    """Forget every layout."""
    with _lock:
        _entries.clear()
