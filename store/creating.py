"""Creating a store safely when several processes do it at once (a job array whose tasks all
``ingest`` into one new store): a lock file serialises creators on one host, PostgreSQL
migrations take an advisory lock (creators on several hosts), and the marker file is created
with exclusive-create semantics, so exactly one process writes it and nobody sees half a store.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import StoreExistsError, StoreNotFoundError

__all__ = ["LOCK_NAME", "MIGRATION_LOCK_KEY", "check_empty_or_store", "check_store_path", "creation_lock", "migration_lock", "write_marker"]

LOCK_NAME = ".sclstore.lock"
"""Lock file inside the store folder (taken while creating or upgrading the store)."""
MIGRATION_LOCK_KEY = 0x5C15_70E0
"""PostgreSQL advisory lock key held while migrating a catalog."""

# files a half-made or concurrently made store may already hold; anything else is the user's
_OWN = {LOCK_NAME, "sclstore.toml", "arrays", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite-journal"}


@contextlib.contextmanager
def creation_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``root/.sclstore.lock`` (a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_store_path(root: Path) -> None:
    """Refuse a ``--store`` that is a symbolic link to nothing (a dangling link)."""
    if root.is_symlink() and not root.exists():
        msg = (
            f"--store {root} is a symbolic link to {os.readlink(root)!r}, which does not exist: "
            "create the folder it points to, fix the link, or pass another --store"
        )
        raise StoreNotFoundError(msg)


def check_empty_or_store(root: Path, marker: Path) -> None:
    """Refuse a folder that holds other things and is not a store (call under the lock)."""
    if marker.exists():
        return
    if any(p.name not in _OWN and not p.name.startswith(f".{marker.name}.") for p in root.iterdir()):
        raise StoreExistsError(f"{root} is a non-empty folder that is not an sclstore store: choose an empty or new --store path")


def write_marker(marker: Path, payload: dict[str, Any]) -> bool:
    """Create ``marker`` with ``payload`` unless it exists (atomic: a hard link of a complete
    temporary file). Returns whether this call created it."""
    if marker.exists():
        return False
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload))
    try:
        os.link(tmp, marker)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links: exclusive create, then fill
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def migration_lock(conn: Connection) -> None:
    """On PostgreSQL, take a transaction-scoped advisory lock before migrating (released at commit)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
