"""Translation of backend exceptions (SQLAlchemy, TileDB) into ``SclstoreError``s, in one place."""

from __future__ import annotations

import functools
import sys
from typing import Any

import sqlalchemy as sa

from .errors import ArrayError, CatalogBusyError, CatalogConnectionError, CatalogDamagedError, SclstoreError

__all__ = ["catalog_errors", "translate_catalog_error", "translate_errors"]


def translate_catalog_error(exc: sa.exc.SQLAlchemyError) -> SclstoreError:
    """One line for a catalog (SQLAlchemy) failure: the driver's first line, never the SQL or its
    parameters (they may hold users' obs values)."""
    from .catalog import busy_timeout_s, first_line, is_locked, locked_message
    from .readonly import refuse_write

    reason = first_line(exc)
    if is_locked(exc):
        return CatalogBusyError(locked_message("sqlite catalog", busy_timeout_s()))
    if "readonly database" in reason or "read-only transaction" in reason:
        return refuse_write("the catalog is read-only for this user")
    low = reason.lower()
    if "no such table" in low or "no such column" in low or ("does not exist" in low and ("relation" in low or "column" in low)):
        msg = f"the catalog is damaged ({reason}): restore it from a backup, or re-ingest the dataset into a new store"
        return CatalogDamagedError(msg)
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        msg = f"catalog database error: {reason}; check that the catalog database is up and reachable, then retry"
        return CatalogConnectionError(msg)
    msg = f"the catalog database refused an operation: {reason}; run `sclstore verify`, and report it if it persists"
    return SclstoreError(msg)


def catalog_errors(fn: Any) -> Any:
    """Decorator: SQLAlchemy errors escaping ``fn`` become one-line ``SclstoreError``s."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise translate_catalog_error(exc) from exc

    return inner


def translate_errors(cls: type) -> type:
    """Translate backend exceptions escaping any public method into ``SclstoreError``s, once, here."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except sa.exc.SQLAlchemyError as exc:
                raise translate_catalog_error(exc) from exc
            except Exception as exc:
                tiledb = sys.modules.get("tiledb")  # not imported yet: no TileDB error can have happened
                if tiledb is None or not isinstance(exc, tiledb.TileDBError):
                    raise
                msg = f"array storage error: {exc}; run `sclstore verify` to check the store"
                raise ArrayError(msg) from exc

        return inner

    for name, attr in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, classmethod):
            setattr(cls, name, classmethod(wrap(attr.__func__)))
        elif callable(attr) and not isinstance(attr, staticmethod):
            setattr(cls, name, wrap(attr))
    return cls
