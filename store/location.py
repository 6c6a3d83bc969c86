"""Where a store lives: a URI (a local folder, ``s3://bucket/prefix``, any TileDB VFS scheme) plus
the one TileDB context built from :class:`~sclstore.store.config.StoreSettings`.

Every file operation on a store (its marker file, creating folders, removing a failed run's
array, listing) goes through TileDB's VFS with that context, so a local folder and an object
store behave the same. Credentials are never put in messages or logs: TileDB reads them from its
configuration (``vfs.s3.aws_access_key_id`` ...) or, when unset, from the usual AWS environment
variables and profile files.

TileDB settings come from, highest priority first: ``StoreSettings.tiledb_config`` (the CLI's
``--tiledb-config KEY=VALUE``), the ``[tiledb]`` table of ``sclstore.toml`` inside the store,
the ``[tiledb]`` table of ``sclstore.toml`` beside it (the folder holding a local store; the
working folder for a remote one), and the tuned defaults below for object storage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from ._lazy import lazy_module
from .config import StoreSettings
from .errors import InvalidInputError, StoreExistsError

if TYPE_CHECKING:
    import tiledb
else:
    tiledb = lazy_module("tiledb")  # loaded on first use: a local store lists its runs without TileDB

__all__ = ["CONFIG_FILE", "MARKER", "REMOTE_DEFAULTS", "StoreLocation", "parse_tiledb_options", "redact_config"]

MARKER = "sclstore.json"
"""The file that makes a folder (or prefix) an sclstore store."""

logger = logging.getLogger(__name__)

CONFIG_FILE = "sclstore.toml"

REMOTE_DEFAULTS: dict[str, str] = {
    # object storage: many requests in flight, large coalesced reads (a gap of up to 1 MB between
    # two needed byte ranges is read through rather than paid as another round trip)
    "vfs.s3.max_parallel_ops": "16",
    "sm.io_concurrency_level": "16",
    "vfs.min_batch_gap": str(1024**2),
    "vfs.min_batch_size": str(64 * 1024**2),
    "vfs.s3.multipart_part_size": str(16 * 1024**2),
    "vfs.s3.connect_timeout_ms": "10000",
    "vfs.s3.request_timeout_ms": "60000",
    "sm.mem.total_budget": str(4 * 1024**3),
}
"""TileDB settings applied to remote stores unless the user sets them."""

_SECRET_WORDS = ("secret", "key_id", "token", "password", "credential", "sas", "account_key")


def redact_config(config: Mapping[str, str]) -> dict[str, str]:
    """A copy of a TileDB config with every credential value replaced by ``***``."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in config.items()}


def parse_tiledb_options(items: Any) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the CLI's repeatable ``--tiledb-config``) or a mapping -> dict.

    Raises
    ------
    InvalidInputError
        For an item that is not ``KEY=VALUE`` with a dotted TileDB key.
    """
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items or ():
            key, sep, value = str(item).partition("=")
            if not sep:
                msg = f"--tiledb-config {item.split('=')[0]!r} is not KEY=VALUE, e.g. --tiledb-config vfs.s3.region=eu-west-1"
                raise InvalidInputError(msg)
            pairs.append((key, value))
    out: dict[str, str] = {}
    for key, value in pairs:
        key = str(key).strip()
        if not key or "." not in key or any(ch.isspace() for ch in key):
            raise InvalidInputError(f"TileDB setting {key!r} is not a TileDB config key such as vfs.s3.region")
        out[key] = str(value).strip() if not isinstance(value, bool) else str(value).lower()
    return out


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _normalise(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if _is_remote(text):
        scheme, rest = text.split("://", 1)
        rest = rest.strip("/")
        if not rest:
            raise InvalidInputError(f"store URI {text!r} has no bucket: use e.g. s3://bucket/prefix")
        return f"{scheme.lower()}://{rest}"
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).expanduser().absolute())


def _local_path(uri: str) -> str | None:
    """The file-system path of a local URI (None for object storage)."""
    if _is_remote(uri):
        return None
    return uri[len("file://") :] if uri.startswith("file://") else uri


class StoreLocation:
    """A store's URI and the TileDB context and VFS that reach it.

    Parameters
    ----------
    path
        ``./lab-store``, ``/abs/path``, ``s3://bucket/prefix`` or another TileDB VFS URI.
    settings
        Its ``tiledb_config`` is merged over ``sclstore.toml`` files (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], settings: StoreSettings | None = None) -> None:
        self.uri = _normalise(path)
        self.is_local = not _is_remote(self.uri)
        base = settings or StoreSettings()
        self._explicit = dict(base.tiledb_config)
        self._settings = base
        self._resolved = False
        self._ctx: tiledb.Ctx | None = None
        self._vfs: tiledb.VFS | None = None

    @property
    def settings(self) -> StoreSettings:
        """The store settings with the merged TileDB configuration (read on first use: for a
        remote store that is a request to the store)."""
        if not self._resolved:
            self._resolved = True
            self._resolve_settings()
        return self._settings

    # ------------------------------------------------------------------ settings
    def _config_files(self) -> list[str]:
        """``sclstore.toml`` beside, then inside the store (later ones win)."""
        beside = str(Path(self.uri).parent / CONFIG_FILE) if self.is_local else str(Path.cwd() / CONFIG_FILE)
        return [beside, self.join(CONFIG_FILE)]

    def _read_toml(self, uri: str) -> dict[str, str]:
        try:
            text = self.read_text_uri(uri)
        except FileNotFoundError:
            return {}
        try:
            table = tomllib.loads(text).get("tiledb", {})
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"{uri} is not valid TOML ({exc}): fix or remove it") from None
        if not isinstance(table, dict):
            raise InvalidInputError(f"{uri}: [tiledb] must be a table of KEY = VALUE settings")
        return parse_tiledb_options({k: v for k, v in table.items()})

    def _resolve_settings(self) -> None:
        merged: dict[str, str] = dict(REMOTE_DEFAULTS) if not self.is_local else {}
        files = self._config_files()
        merged.update(self._read_toml(files[0]))
        self._set_config({**merged, **self._explicit})  # so the store itself can be reached
        merged.update(self._read_toml(files[1]))
        self._set_config({**merged, **self._explicit})

    def _set_config(self, config: dict[str, str]) -> None:
        self._settings = dataclasses.replace(self._settings, tiledb_config=config)
        self._ctx = None
        self._vfs = None

    @property
    def ctx(self) -> tiledb.Ctx:
        """The TileDB context of every array operation on this store (built once)."""
        if self._ctx is None:
            try:
                self._ctx = tiledb.Ctx(tiledb.Config(dict(self.settings.tiledb_config)))
            except tiledb.TileDBError as exc:
                raise InvalidInputError(f"TileDB settings rejected: {exc}; check --tiledb-config and sclstore.toml") from None
        return self._ctx

    @property
    def vfs(self) -> tiledb.VFS:
        if self._vfs is None:
            self._vfs = tiledb.VFS(ctx=self.ctx)
        return self._vfs

    # ------------------------------------------------------------------ paths
    @property
    def path(self) -> Path | None:
        """The local folder (``None`` for a remote store)."""
        return Path(self.uri) if self.is_local else None

    def join(self, *parts: str) -> str:
        """The URI of ``parts`` below the store root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri}/{rel}" if rel else self.uri

    def resolve(self, uri: str) -> str:
        """An absolute array URI from a catalog ``array_uri`` (stored relative to the store)."""
        return uri if "://" in uri or os.path.isabs(uri) else self.join(uri)

    def __repr__(self) -> str:
        return f"StoreLocation({self.uri!r})"

    # ------------------------------------------------------------------ VFS operations
    # Local paths are checked and read with the OS (same answer, and opening a local store needs
    # no TileDB import: `sclstore ls runs` stays fast); everything else goes through the VFS.
    def is_dir(self, uri: str) -> bool:
        if (local := _local_path(uri)) is not None:
            return os.path.isdir(local)
        return bool(self.vfs.is_dir(uri))

    def is_file(self, uri: str) -> bool:
        if (local := _local_path(uri)) is not None:
            return os.path.isfile(local)
        return bool(self.vfs.is_file(uri))

    def exists(self, uri: str) -> bool:
        return self.is_file(uri) or self.is_dir(uri)

    def listdir(self, uri: str) -> list[str]:
        """Entries (full URIs) directly below ``uri``; empty when it does not exist."""
        if not self.is_dir(uri):
            return []
        return [str(u).rstrip("/") for u in self.vfs.ls(uri)]

    def read_text_uri(self, uri: str) -> str:
        """Text of a file.

        Raises
        ------
        FileNotFoundError
            If there is no file at ``uri``.
        """
        if not self.is_file(uri):
            raise FileNotFoundError(uri)
        if (local := _local_path(uri)) is not None:
            return Path(local).read_bytes().decode()
        with self.vfs.open(uri, "rb") as f:
            return bytes(f.read()).decode()

    def write_text(self, uri: str, text: str) -> None:
        """Write a small file atomically: a temporary file moved over it (locally), one PUT (object storage)."""
        target = f"{uri}.{uuid.uuid4().hex[:8]}.tmp" if self.is_local else uri
        with self.vfs.open(target, "wb") as f:
            f.write(text.encode())
        if target != uri:
            self.vfs.move_file(target, uri)

    def mkdir(self, uri: str) -> None:
        if not self.vfs.is_dir(uri):
            self.vfs.create_dir(uri)  # a no-op prefix on object storage

    def remove_dir(self, uri: str) -> None:
        """Remove a folder and everything below it; missing is fine (a failed run's array)."""
        try:
            if self.is_dir(uri):
                self.vfs.remove_dir(uri)
        except tiledb.TileDBError as exc:
            logger.warning("could not remove %s: %s", uri, exc)

    def check_creatable(self, marker: str) -> None:
        """Refuse to create a store over something that is not one.

        Raises
        ------
        StoreExistsError
            If the URI is a file, or a non-empty folder without the store marker.
        """
        if self.is_file(self.uri):
            raise StoreExistsError(f"{self.uri} exists and is not a folder: choose another --store path")
        if self.is_dir(self.uri) and not self.is_file(self.join(marker)):
            entries = [e for e in self.listdir(self.uri) if e.rsplit("/", 1)[-1] != CONFIG_FILE]
            if entries:
                msg = f"{self.uri} is a non-empty folder that is not an sclstore store: choose an empty or new --store path"
                raise StoreExistsError(msg)
