"""Read-only stores: a user who may read a store but not write it (another user's store, a
read-only mount, a store at rest shared on a cluster file system).

Such a store is opened with its SQLite catalog in read-only mode (``mode=ro``), or immutable
(``immutable=1``) when SQLite could not even create its ``-shm`` file next to it (folder not
writable and no ``-wal`` file: nobody is writing it now). No ``PRAGMA journal_mode`` is written
on such a connection, and every write transaction is refused with one line
(:class:`~sclstore.store.errors.ReadOnlyStoreError`).
"""

from __future__ import annotations

import getpass
import os
import urllib.parse
from pathlib import Path

from sqlalchemy.engine import URL

from .errors import ReadOnlyStoreError

__all__ = ["READ_ONLY_OPTION", "read_only_reason", "refuse_write", "sqlite_read_only_url"]

READ_ONLY_OPTION = "sclstore_read_only"
"""Engine execution option holding the reason a store is read-only (absent: writable)."""


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid {os.getuid()}"


def _writable(path: Path) -> bool:
    # access(2) also answers EROFS for a read-only mount, even for root
    return os.access(path, os.W_OK)


def read_only_reason(root: Path, sqlite_file: Path | None) -> str | None:
    """Why this process cannot write the store at ``root`` (``None``: it can).

    Parameters
    ----------
    root
        The store folder.
    sqlite_file
        The SQLite catalog file, when the catalog is SQLite (``None`` for PostgreSQL).
    """
    arrays = root / "arrays"
    blocked = [p for p in (root, arrays) if p.exists() and not _writable(p)]
    if sqlite_file is not None:
        if sqlite_file.exists() and not _writable(sqlite_file):
            blocked.append(sqlite_file)
        elif not _writable(sqlite_file.parent):
            blocked.append(sqlite_file.parent)
    if not blocked:
        return None
    where = ", ".join(dict.fromkeys(str(p) for p in blocked))
    return f"store {root} is read-only for {_user()} ({where} not writable)"


def sqlite_read_only_url(url: URL) -> URL:
    """The read-only form of an SQLite file URL (``mode=ro``, plus ``immutable=1`` when no
    ``-wal`` file exists and its folder is not writable, so SQLite could not create ``-shm``)."""
    path = Path(str(url.database)).resolve()
    query = {"uri": "true", "mode": "ro"}
    wal = path.with_name(path.name + "-wal")
    if not wal.exists() and not _writable(path.parent):
        query["immutable"] = "1"
    return url.set(database="file:" + urllib.parse.quote(str(path)), query=query)


def refuse_write(reason: str) -> ReadOnlyStoreError:
    """The one-line error of a writing command on a read-only store."""
    msg = (
        f"{reason}: this command writes to the store; reading commands (query, ls, verify, cached eval) "
        "work, for anything else ask the store's owner or use a store you can write (--store)"
    )
    return ReadOnlyStoreError(msg)
