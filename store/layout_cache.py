"""A per-process cache of direct-readable array layouts, so reopening a complete run costs a few
``stat`` calls (a local array) or one listing (a remote one) instead of a libtiledb open.

Opening a run's array through libtiledb (schema, metadata, non-empty domain) takes ~1-2 ms
locally and several requests on object storage, which dominates small reads. A complete run's
array never changes, so once an :class:`~sclstore.store.arrays.ArrayReader` has validated it
for direct reads, what it learnt (:class:`~sclstore.store.direct.DirectLayout`: shape, tile,
pools, dtype and the tile files) is kept here, together with a *stamp* of the files it came
from. A local array (keyed by its path) is stamped with the names in ``__fragments`` and
``__meta`` and the inode, size and modification time of every mapped data file; a remote array
(keyed by its URI and the TileDB context it is read with, so another store's credentials never
reuse it) with the names and sizes of every file below its folder (one recursive listing,
:func:`~sclstore.store.direct.list_array`). A later open takes the entry only if the stamp taken
again now is identical; any change (a consolidation, a vacuum, a rewritten or replaced file, new
metadata) makes it a miss, and the reader opens the array through libtiledb and validates it
again.

Tile headers are still checked on every read (:mod:`sclstore.store.tilefile`): the cache skips
only the open. Entries are dropped when a direct read finds an unexpected tile. At most
:data:`MAX_ENTRIES` arrays and :data:`MAX_FILES` tile files are held (least recently used
evicted first): each mapping holds a file descriptor.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from .direct import DirectLayout, is_local, list_array
from .tilefile import LayoutError, TileFile

__all__ = ["MAX_ENTRIES", "MAX_FILES", "DirectLayout", "Key", "clear", "drop", "get", "key", "put", "stamp"]

MAX_ENTRIES = 32
"""Arrays whose layouts are kept per process."""
MAX_FILES = 256
"""Mapped data files kept in all (each mapping holds a file descriptor)."""

Stamp = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int, int], ...]]
Key = str | tuple[str, int]
"""A local array's path, or a remote array's URI and ``id`` of the context it is read with."""


_lock = threading.Lock()
_entries: OrderedDict[Key, tuple[Any, DirectLayout]] = OrderedDict()


def key(uri: str, ctx: Any) -> Key:
    """The cache key of the array at ``uri`` read with context ``ctx``."""
    if is_local(uri):
        return uri.removeprefix("file://")
    return uri.rstrip("/"), id(ctx)


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


def _current(k: Key, layout: DirectLayout) -> Any:
    """The stamp of the array's files now (``None`` if one is missing or it cannot be listed)."""
    if isinstance(k, str):
        return stamp(k, layout.files)
    try:
        return list_array(layout.vfs, k[0])
    except LayoutError:
        return None


def get(k: Key) -> DirectLayout | None:
    """The cached layout of the array keyed ``k`` (:func:`key`) if its files are unchanged, else ``None``."""
    with _lock:
        entry = _entries.get(k)
    if entry is None:
        return None
    old, layout = entry
    if _current(k, layout) != old:
        drop(k)
        return None
    with _lock:
        if k in _entries:
            _entries.move_to_end(k)
    return layout


def put(k: Key, layout: DirectLayout) -> bool:
    """Cache a layout just validated through libtiledb. A local one only if the folder still
    holds exactly the fragments read and every data file is still the one mapped; a remote one
    with the listing taken while validating it. Returns whether it was kept."""
    if isinstance(k, str):
        now: Any = stamp(k, layout.files)
        if now is None or now[0] != tuple(sorted(layout.fragments)) or now[2] != tuple(tf.file_id for tf in layout.files):
            return False
    elif layout.listing is None:
        return False
    else:
        now = layout.listing
    with _lock:
        _entries[k] = (now, layout)
        _entries.move_to_end(k)
        while len(_entries) > 1 and (len(_entries) > MAX_ENTRIES or sum(len(e[1].files) for e in _entries.values()) > MAX_FILES):
            _entries.popitem(last=False)
    return True


def drop(k: Key) -> None:
    """Forget the layout of the array keyed ``k`` (its files changed, or a direct read found an
    unexpected tile)."""
    with _lock:
        _entries.pop(k, None)


def clear() -> None:
    """Forget every layout."""
    with _lock:
        _entries.clear()
