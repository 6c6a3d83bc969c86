"""Translation of backend exceptions (SQLAlchemy, TileDB) into ``SclstoreError``s, in one place."""

from __future__ import annotations

import functools
import sys
from typing import Any

import sqlalchemy as sa

from .errors import ArrayError, CatalogConnectionError, CatalogDamagedError

__all__ = ["translate_errors"]


def translate_errors(cls: type) -> type:
    """Translate backend exceptions escaping any public method into ``SclstoreError``s, once, here."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                low = reason.lower()
                missing = "no such table" in low or "no such column" in low
                if missing or ("does not exist" in low and ("relation" in low or "column" in low)):
                    msg = f"the catalog is damaged ({reason}): restore it from a backup, or re-ingest the dataset into a new store"
                    raise CatalogDamagedError(msg) from exc
                if isinstance(exc, sa.exc.ProgrammingError):
                    raise
                msg = f"catalog database error: {reason}; check that the catalog database is up and reachable, then retry"
                raise CatalogConnectionError(msg) from exc
            except sa.exc.InterfaceError as exc:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                msg = f"catalog database error: {reason}; check that the catalog database is up and reachable, then retry"
                raise CatalogConnectionError(msg) from exc
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
