"""The run writer: leases, durable block writes with their watermark, completion and failure.

Every catalog write of a writer is conditioned on still owning the run's lease (see
:mod:`sclstore.store.lease`); losing it stops the writer with ``LeaseHeldError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import catalog as catalogdb
from ._translate import translate_errors
from .array_store import ArrayStore
from .config import StoreSettings
from .errors import LeaseHeldError
from .info import RunInfo
from .lease import Lease, try_acquire
from .models import Run, utcnow
from .runs import RunRepository

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RunWriter"]

logger = logging.getLogger(__name__)


@translate_errors
class RunWriter:
    """Writes runs' arrays and advances their catalog rows, under a lease.

    Parameters
    ----------
    engine
        The catalog engine (private to the store layer).
    array_store
        Where the runs' arrays live.
    runs
        The run repository (lease holders and completion are looked up there).
    settings
        Lease TTL and heartbeat period (default: the array store location's settings).
    """

    def __init__(self, engine: Engine, array_store: ArrayStore, runs: RunRepository, settings: StoreSettings | None = None) -> None:
        self.engine = engine
        self.array_store = array_store
        self.runs = runs
        self.settings: StoreSettings = settings if settings is not None else array_store.settings

    def acquire(self, run_id: int, *, wait: bool, poll_s: float = 1.0) -> Lease | None:
        """Lease a run for writing. ``None`` means the run is (or became) complete.

        Raises
        ------
        LeaseHeldError
            If another live process holds it and ``wait`` is false.
        """
        st = self.settings
        while True:
            lease = try_acquire(self.engine, run_id, ttl_s=st.lease_ttl_s, heartbeat_s=st.heartbeat_s)
            if lease is not None:
                return lease
            info = self.runs.get(run_id)
            if info.status == "complete":
                return None
            if not wait:
                age = time.time() - (info.heartbeat_at or 0)
                msg = (
                    f"run {run_id} is being written by {info.lease_host} pid {info.lease_pid} "
                    f"(heartbeat {age:.0f} s ago): wait for it, or rerun once its lease expires ({st.lease_ttl_s:.0f} s)"
                )
                raise LeaseHeldError(msg)
            time.sleep(poll_s)

    def _owned_update(self, lease: Lease, **values: Any) -> None:
        """Update the run's row (and its heartbeat) only while ``lease`` still owns it.

        Raises
        ------
        LeaseHeldError
            If another process took the lease over (``lease.lost`` is set).
        """
        with catalogdb.write_tx(self.engine) as conn:
            res = conn.execute(
                sa.update(Run).where(Run.id == lease.run_id, Run.lease_owner == lease.owner).values(heartbeat_at=time.time(), **values)
            )
        if res.rowcount != 1:
            lease.lost.set()
            raise LeaseHeldError(f"lost the lease on run {lease.run_id} to another process; it will finish the run")

    def write_block(
        self, run: RunInfo, lease: Lease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None,
    ) -> None:
        """Write cells ``start..`` of every slot, durably, then advance the watermark.

        ``unembeddable`` is the run's full list of cells so far that the model could not embed
        (their rows are NaN); it is recorded with the watermark when given.
        """
        if lease.lost.is_set():
            raise LeaseHeldError(f"lost the lease on run {run.id} to another process; it will finish the run")
        n = next(iter(block.values())).shape[1]
        self.array_store.write(run, start, block)
        extra = {} if unembeddable is None else {"unembeddable": [int(c) for c in unembeddable]}
        self._owned_update(lease, watermark=start + n, **extra)

    def complete(self, run: RunInfo, lease: Lease, stats: dict[str, Any]) -> RunInfo:
        """Consolidate the array (see :meth:`ArrayStore.full_consolidation`), then mark the run complete."""
        self.array_store.finalise(run)
        self._owned_update(lease, status="complete", stats=stats, finished_at=utcnow(),
                          lease_owner=None, lease_host=None, lease_pid=None)
        lease.release()
        return self.runs.get(run.id)

    def fail(self, run: RunInfo, lease: Lease, error: str) -> None:
        """Mark a run failed (its written prefix stays; an identical ingest resumes it)."""
        try:
            self._owned_update(lease, status="failed", error=error[:2000], lease_owner=None, lease_host=None, lease_pid=None)
        except (LeaseHeldError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("could not mark run %s failed: %s", run.id, catalogdb.first_line(exc))
        lease.release()
