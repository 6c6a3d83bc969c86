"""sclstore: a layer-wise embedding store for single-cell foundation models.

Run a model once, keep the pooled embedding of every layer for every cell, and slice any
layer x cell subset later without re-inference::

    import sclstore
    store = sclstore.open_store("lab-store")
    run = store.ingest("pbmc.h5ad", model="sclstore-tiny")
    res = store.query(f"SELECT * FROM embeddings WHERE run = {run.id} AND layer = 3")
"""

from __future__ import annotations

from sclstore.api import Store, open_store
from sclstore.store.config import ArraySpec, IngestConfig, StoreSettings
from sclstore.store.errors import *  # noqa: F403
from sclstore.store.errors import __all__ as _errors_all
from sclstore.store.info import DatasetInfo, ModelInfo, RunInfo

__version__ = "0.1.0"

__all__ = [
    "Store",
    "open_store",
    "IngestConfig",
    "ArraySpec",
    "StoreSettings",
    "DatasetInfo",
    "ModelInfo",
    "RunInfo",
    "__version__",
    *_errors_all,
]
