"""Ground floor of sclstore: catalog (SQLAlchemy + Alembic), TileDB arrays, errors and configs.

Imports nothing from the other sclstore subpackages. Names are loaded on first use (PEP 562),
so ``import sclstore.store.errors`` or ``.config`` costs no SQLAlchemy, TileDB or pandas import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ArraySpec, IngestConfig, StoreSettings, parse_csv, parse_layers, validate_name
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

if TYPE_CHECKING:
    from .arrays import ENCODING_TYPE, ENCODING_VERSION, ArrayReader, coalesce
    from .backend import Backend, cache_key
    from .info import DatasetInfo, ModelInfo, RunInfo
    from .lease import Lease
    from .obs import ObsColumn

# name -> submodule it lives in (imported on first access)
_LAZY = {
    "ENCODING_TYPE": "arrays",
    "ENCODING_VERSION": "arrays",
    "ArrayReader": "arrays",
    "coalesce": "arrays",
    "Backend": "backend",
    "cache_key": "backend",
    "DatasetInfo": "info",
    "ModelInfo": "info",
    "RunInfo": "info",
    "Lease": "lease",
    "ObsColumn": "obs",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ENCODING_TYPE",
    "ENCODING_VERSION",
    "ArrayReader",
    "ArraySpec",
    "Backend",
    "DatasetInfo",
    "IngestConfig",
    "Lease",
    "ModelInfo",
    "ObsColumn",
    "RunInfo",
    "StoreSettings",
    "cache_key",
    "coalesce",
    "parse_csv",
    "parse_layers",
    "validate_name",
    *_errors_all,
]
