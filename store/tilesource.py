"""Where a tile file's bytes come from: a memory-mapped local file, or ranged reads through
TileDB's VFS (object storage and any other non-local scheme).

:class:`~sclstore.store.tilefile.TileFile` decodes tiles from a :class:`Fetched` set of bytes. A
local file is mapped once and is its own fetched set (every read is a view of the mapping). A
remote file is read on demand: the byte ranges a read needs are sorted, ranges closer than
``max_gap`` bytes are merged (one ranged request then reads through the gap, as TileDB's own
``vfs.min_batch_gap`` does), and each merged range is one VFS read, through the store's
``tiledb.Ctx`` (credentials, endpoint, parallel-request settings) -- a full layer of a complete
run is a single read. Several merged ranges (scattered rows) are read together by a few threads
(up to the context's ``sm.io_concurrency_level``), as libtiledb would.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["ByteSource", "Fetched", "MappedFile", "VfsFile", "fetch_ranges"]

_ALIGN = 8
"""Pieces of a fetched set start in its buffer at the residue of their file offset modulo this
(so values keep their alignment, and a value's buffer offset divides by its size exactly when
its file offset does)."""


class LayoutError(Exception):
    """The file is not laid out as the direct reader expects: read it through libtiledb instead."""


class ByteSource(Protocol):
    """The bytes of one attribute file."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str | os.PathLike[str]:
        """A local ``Path`` or a VFS URI."""
        ...

    @property
    def size(self) -> int: ...

    @property
    def file_id(self) -> tuple[int, int, int]: ...

    @property
    def mapped(self) -> np.ndarray | None:
        """The whole file as ``uint8`` when it is memory-mapped, else ``None``."""
        ...

    @property
    def max_gap(self) -> int:
        """Needed byte ranges closer than this are read as one (with the bytes between)."""
        ...

    @property
    def parallel(self) -> int:
        """How many reads of this file may be in flight together."""
        ...

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes from ``offset`` as a ``uint8`` array (may be read-only)."""
        ...

    def close(self) -> None:
        """Release the mapping or handles."""
        ...


class MappedFile:
    """A local file, memory-mapped once.

    Raises
    ------
    LayoutError
        If the file is missing or cannot be mapped.
    """

    max_gap = 0
    parallel = 1

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:  # stat and map the same file
                st = os.fstat(fh.fileno())
                if st.st_size == 0:
                    raise LayoutError(f"{path.name} is empty")
                raw = np.memmap(fh, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise LayoutError(f"missing data file {path.name}") from exc
        self.path = path
        self.name = path.name
        self.size = int(st.st_size)
        self.file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
        """``(inode, size, mtime_ns)`` of the mapped file (see :mod:`sclstore.store.layout_cache`)."""
        self.mapped: np.ndarray | None = raw

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        assert self.mapped is not None
        return self.mapped[offset : offset + nbytes]

    def close(self) -> None:
        self.mapped = None  # the mapping closes when the last view is garbage collected


class VfsFile:
    """A file read by ranges through TileDB's VFS (its size known from a listing).

    Each thread keeps one open handle per file (opening a handle costs a request on object
    storage; reads at explicit offsets are independent).
    """

    mapped = None

    def __init__(self, vfs: Any, uri: str, size: int, *, max_gap: int, parallel: int = 1) -> None:
        self.vfs = vfs
        self.path = uri
        self.name = uri.rstrip("/").rsplit("/", 1)[-1]
        self.size = int(size)
        self.file_id = (0, self.size, 0)
        self.max_gap = int(max_gap)
        self.parallel = int(parallel)
        self._local = threading.local()

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """Raises :class:`LayoutError` when the read fails or comes back short."""
        import tiledb

        try:
            fh = getattr(self._local, "fh", None)
            if fh is None:
                fh = self._local.fh = self.vfs.open(self.path, "rb")
            fh.seek(offset)
            data = fh.read(nbytes)
        except (tiledb.TileDBError, OSError) as exc:
            self._local.fh = None
            raise LayoutError(f"reading {nbytes} bytes at {offset} of {self.name} failed: {exc}") from exc
        if len(data) != nbytes:
            raise LayoutError(f"{self.name}: read {len(data)} of {nbytes} bytes at {offset}")
        return np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        self._local = threading.local()


class Fetched:
    """Bytes of a file held in memory: the whole mapped file, or merged pieces of a remote file.

    Parameters
    ----------
    buf
        ``uint8`` buffer.
    starts, ends, bases
        File offsets ``[starts[k], ends[k])`` held at ``buf[bases[k]:]``; ``None`` for a whole
        file held at its own offsets.
    """

    __slots__ = ("bases", "buf", "ends", "starts")

    def __init__(self, buf: np.ndarray, starts: np.ndarray | None = None, ends: np.ndarray | None = None,
                 bases: np.ndarray | None = None) -> None:
        self.buf, self.starts, self.ends, self.bases = buf, starts, ends, bases

    def locate(self, offset: int, nbytes: int) -> int | None:
        """Buffer offset of file bytes ``[offset, offset + nbytes)``, ``None`` unless one piece holds them."""
        if self.starts is None:
            return offset if offset + nbytes <= self.buf.size else None
        assert self.ends is not None and self.bases is not None
        k = int(np.searchsorted(self.starts, offset, side="right")) - 1
        if k < 0 or offset + nbytes > int(self.ends[k]):
            return None
        return int(self.bases[k]) + offset - int(self.starts[k])

    def locate_many(self, offsets: np.ndarray, nbytes: int) -> np.ndarray:
        """Buffer offsets of ``nbytes`` bytes at each of ``offsets``.

        Raises
        ------
        ValueError
            If some are not held (a caller fetched the wrong ranges: never read around them).
        """
        if self.starts is None:
            if offsets.size and int(offsets.max()) + nbytes > self.buf.size:
                raise ValueError("offsets past the end of the file")
            return offsets
        assert self.ends is not None and self.bases is not None
        k = np.searchsorted(self.starts, offsets, side="right") - 1
        if np.any(k < 0) or np.any(offsets + nbytes > self.ends[np.maximum(k, 0)]):
            raise ValueError("internal: bytes read outside the fetched ranges")
        return self.bases[k] + (offsets - self.starts[k])

    def take(self, offsets: np.ndarray, nbytes: int) -> np.ndarray:
        """``(len(offsets), nbytes)`` copies of the bytes at file ``offsets``."""
        pos = self.locate_many(offsets, nbytes)
        return self.buf[pos[:, None] + np.arange(nbytes)]


def fetch_ranges(source: ByteSource, starts: np.ndarray, ends: np.ndarray) -> Fetched:
    """Read file ranges ``[starts[i], ends[i])`` of a remote ``source``, merging ranges less than
    ``source.max_gap`` bytes apart into one read each; up to ``source.parallel`` reads (at most
    :data:`MAX_READ_THREADS`) are in flight together.

    Raises
    ------
    LayoutError
        If a read fails.
    """
    order = np.argsort(starts, kind="stable")
    s, e = starts[order].astype(np.int64), ends[order].astype(np.int64)
    reach = np.maximum.accumulate(e)
    new = np.concatenate(([True], s[1:] > reach[:-1] + source.max_gap))
    first = np.flatnonzero(new)
    p_start = s[first]
    p_end = reach[np.concatenate((first[1:] - 1, [s.size - 1]))]
    if p_start.size == 1 and int(p_start[0]) % _ALIGN == 0:  # one read, used as it comes
        buf = source.read(int(p_start[0]), int(p_end[0] - p_start[0]))
        return Fetched(buf, p_start, p_end, np.zeros(1, dtype=np.int64))
    lengths = p_end - p_start
    bases = np.empty_like(p_start)
    pos = 0
    for k in range(p_start.size):
        pos += (int(p_start[k]) - pos) % _ALIGN
        bases[k] = pos
        pos += int(lengths[k])
    buf = np.empty(pos, dtype=np.uint8)

    def some(first: int, step: int) -> None:
        for k in range(first, p_start.size, step):
            buf[bases[k] : bases[k] + lengths[k]] = source.read(int(p_start[k]), int(lengths[k]))

    width = min(source.parallel, MAX_READ_THREADS, p_start.size)
    if width > 1:  # scattered pieces: in flight together (VFS reads release the GIL)
        list(_executor().map(some, range(width), [width] * width))
    else:
        some(0, 1)
    return Fetched(buf, p_start, p_end, bases)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
MAX_READ_THREADS = 16
"""Threads shared by all fetches (a source's ``parallel`` is capped at this)."""


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_READ_THREADS, thread_name_prefix="sclstore-vfs-read")
        return _pool
