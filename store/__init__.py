"""Ground floor of sclstore: catalog (SQLAlchemy + Alembic), TileDB arrays, errors and configs.

Imports nothing from the other sclstore subpackages.
"""

from __future__ import annotations

from .arrays import ENCODING_TYPE, ENCODING_VERSION, ArrayReader, coalesce
from .backend import Backend, cache_key
from .config import ArraySpec, IngestConfig, StoreSettings, parse_csv, parse_layers, validate_name
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .info import DatasetInfo, ModelInfo, RunInfo
from .lease import Lease
from .obs import ObsColumn

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
