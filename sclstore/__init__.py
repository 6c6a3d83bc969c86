"""sclstore: a layer-wise embedding store for single-cell foundation models.

Run a model once, keep the pooled embedding of every layer for every cell, and slice any
layer x cell subset later without re-inference::

    import sclstore
    store = sclstore.open_store("lab-store")
    run = store.ingest("pbmc.h5ad", model="sclstore-tiny")
    res = store.query(f"SELECT * FROM embeddings WHERE run = {run.id} AND layer = 3")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sclstore.api import Store, open_store
from sclstore.store.config import ArraySpec, IngestConfig, StoreSettings
from sclstore.store.errors import *  # noqa: F403
from sclstore.store.errors import __all__ as _errors_all
from sclstore.store.runtime import ThreadPolicy

if TYPE_CHECKING:
    from sclstore.store.info import DatasetInfo, ModelInfo, RunInfo

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The info records import SQLAlchemy's ORM: loaded on first use, so `import sclstore` stays light.
    if name in ("DatasetInfo", "ModelInfo", "RunInfo"):
        from sclstore.store import info

        return getattr(info, name)
    raise AttributeError(f"module 'sclstore' has no attribute {name!r}")


__all__ = [
    "Store",
    "open_store",
    "IngestConfig",
    "ArraySpec",
    "StoreSettings",
    "DatasetInfo",
    "ModelInfo",
    "RunInfo",
    "ThreadPolicy",
    "__version__",
    *_errors_all,
]
