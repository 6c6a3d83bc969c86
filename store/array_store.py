"""The array side of a store: every TileDB operation on runs' arrays at one location.

:class:`ArrayStore` creates, writes, finalises (consolidates), opens and verifies run arrays with
the location's one TileDB context, and removes a failed run's array through the VFS. It knows
nothing of the catalog; :class:`sclstore.store.backend.Backend` ties the two together (array
first, catalog row second).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._lazy import lazy_module
from .config import ArraySpec
from .info import RunInfo
from .location import StoreLocation

if TYPE_CHECKING:
    import numpy as np

    from . import arrays
else:  # loaded on first use: listing runs needs neither numpy nor TileDB
    np = lazy_module("numpy")
    arrays = lazy_module("sclstore.store.arrays")

__all__ = ["ArrayStore"]

logger = logging.getLogger(__name__)


class ArrayStore:
    """Run arrays below ``<store>/arrays`` at one :class:`StoreLocation`."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location

    @property
    def settings(self) -> Any:
        return self.location.settings

    def new_array_uri(self) -> tuple[str, str]:
        """``(relative, absolute)`` URI for a new run's array (the catalog stores the relative one)."""
        rel = f"arrays/run-{uuid.uuid4().hex}"
        return rel, self.location.resolve(rel)

    def create(self, uri: str, spec: ArraySpec, *, layers: Sequence[int], meta: dict[str, Any]) -> None:
        arrays.create_array(uri, spec, layers=layers, meta=meta, ctx=self.location.ctx)

    def remove(self, uri: str) -> None:
        """Remove an array (a run whose catalog row was never written); missing is fine."""
        self.location.remove_dir(uri)

    def write(self, run: RunInfo, start: int, block: dict[str, np.ndarray]) -> None:
        arrays.write_block(run.array_uri, start, block, dtype=run.dtype, ctx=self.location.ctx)

    def full_consolidation(self, array_bytes: int) -> bool:
        """Whether a completed run's fragments are rewritten as one: always on a local store;
        on object storage only up to ``StoreSettings.remote_consolidate_max_bytes`` (beyond it
        rewriting costs a full download and upload, so only fragment metadata is consolidated
        and reads go through libtiledb over the disjoint fragments)."""
        return self.location.is_local or array_bytes <= self.settings.remote_consolidate_max_bytes

    def finalise(self, run: RunInfo) -> list[tuple[int, int]]:
        """Consolidate a complete run's array; its fragments' cell ranges (one, or disjoint and covering)."""
        itemsize = 2 if run.dtype == "float16" else 4
        nbytes = len(run.layers) * run.n_cells * run.dim * itemsize
        ranges = arrays.finalise(run.array_uri, n_cells=run.n_cells, full=self.full_consolidation(nbytes * len(run.pools)),
                                 array_bytes=nbytes, ctx=self.location.ctx)
        logger.info("run %s array finalised: %d fragment(s)", run.id, len(ranges))
        return ranges

    def reader(self, run: RunInfo) -> arrays.ArrayReader:
        return arrays.ArrayReader(run.array_uri, ctx=self.location.ctx, direct=self.settings.direct_reads)

    def verify(self, run: RunInfo) -> dict[str, Any]:
        from .verify import verify_run

        return verify_run(run, direct_reads=self.settings.direct_reads, ctx=self.location.ctx)
