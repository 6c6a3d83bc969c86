"""A persistent cache of content digests of local files, so a repeated ingest does not re-read them.

Hashing a 20 GB checkpoint or a 10 GB dataset takes minutes; the digest of a file that has not
changed is looked up instead. The key is everything about the file that changes when its bytes
could have: real path, device, inode, size, ``mtime_ns`` and ``ctime_ns`` (``ctime`` changes on
every write and cannot be set back by ``touch``/``rsync -t``), plus ``what`` — the caller's name
for the digest scheme (e.g. which counts matrix of the file, and the hash format version). A
changed file therefore misses; ``rehash=True`` (``--rehash``) ignores the cache and refreshes it.

The cache is an SQLite file in ``$SCLSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sclstore``, else
``~/.cache/sclstore``. It only ever speeds things up: if the folder is not writable, or the file
is unreadable, digests are computed as if there were no cache (one DEBUG line).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from contextvars import ContextVar
from pathlib import Path

__all__ = ["cache_dir", "cached_digest", "file_identity", "rehashing"]

logger = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS digests (
    path TEXT NOT NULL, what TEXT NOT NULL, identity TEXT NOT NULL, digest TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (path, what))"""


_REHASH: ContextVar[bool] = ContextVar("sclstore_rehash", default=False)


@contextmanager
def rehashing(enabled: bool = True) -> Iterator[None]:
    """Within this block every :func:`cached_digest` recomputes (``--rehash``)."""
    token = _REHASH.set(enabled)
    try:
        yield
    finally:
        _REHASH.reset(token)


def cache_dir() -> Path:
    """Where the digest cache lives (see the module docstring)."""
    explicit = os.environ.get("SCLSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sclstore"


def file_identity(path: Path) -> tuple[str, str]:
    """(real path, identity string) of a local file; the identity changes whenever its bytes may have."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _connect() -> sqlite3.Connection | None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(folder / "digests.sqlite", timeout=10.0, isolation_level=None)
        conn.execute(_SCHEMA)
        return conn
    except (OSError, sqlite3.Error) as exc:
        logger.debug("digest cache unavailable in %s (%s): hashing without it", folder, exc)
        return None


def cached_digest(path: Path, what: str, compute: Callable[[], str], *, rehash: bool = False) -> str:
    """The digest ``compute()`` returns for ``path``, looked up when the file is unchanged.

    Parameters
    ----------
    path
        A local file whose bytes ``compute`` reads.
    what
        The digest scheme: everything besides the file's bytes that changes the result (e.g.
        ``"counts:X:v1"``), so two schemes over the same file never share an entry.
    compute
        Computes the digest (and may validate the file: only a successful result is stored).
    rehash
        Ignore a cached entry and store the fresh digest (also inside :func:`rehashing`).
    """
    rehash = rehash or _REHASH.get()
    try:
        real, before = file_identity(path)
    except OSError:
        return compute()
    conn = _connect()
    if conn is None:
        return compute()
    with closing(conn):
        try:
            if not rehash:
                row = conn.execute("SELECT identity, digest FROM digests WHERE path = ? AND what = ?", (real, what)).fetchone()
                if row is not None and row[0] == before:
                    logger.debug("digest of %s (%s) from the cache", real, what)
                    return str(row[1])
        except sqlite3.Error as exc:
            logger.debug("digest cache read failed (%s)", exc)
        digest = compute()
        try:
            _, after = file_identity(path)
        except OSError:
            return digest
        if after != before:  # changed while we read it: the digest describes no single version
            logger.debug("%s changed while it was hashed; not caching its digest", real)
            return digest
        try:
            conn.execute("INSERT OR REPLACE INTO digests (path, what, identity, digest, created) VALUES (?, ?, ?, ?, ?)",
                         (real, what, before, digest, time.time()))
        except sqlite3.Error as exc:
            logger.debug("digest cache write failed (%s)", exc)
        return digest
