"""The run writer: leases, durable block writes with their watermark, completion and failure.

Every catalog write of a writer is conditioned on still owning the run's lease (see
:mod:`sclstore.store.lease`); losing it stops the writer with ``LeaseHeldError``.
"""

from __future__ import annotations

import contextlib
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
from .shards import ShardLease, ShardQueue

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
    shards
        The runs' shard queue (sharded runs: :meth:`write_shard_block`, :meth:`finalise_run`).
    """

    def __init__(
        self, engine: Engine, array_store: ArrayStore, runs: RunRepository, settings: StoreSettings | None = None, *,
        shards: ShardQueue | None = None,
    ) -> None:
        self.engine = engine
        self.array_store = array_store
        self.runs = runs
        self.settings: StoreSettings = settings if settings is not None else array_store.settings
        self.shards = shards if shards is not None else ShardQueue(engine, ttl_s=self.settings.lease_ttl_s,
                                                                   heartbeat_s=self.settings.heartbeat_s)

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

    def write_shard_block(
        self, run: RunInfo, lease: ShardLease, start: int, block: dict[str, np.ndarray], *,
        unembeddable: Sequence[int] | None = None, cells_per_s: float | None = None, peak_rss: int | None = None,
    ) -> None:
        """Write cells ``start..`` of a claimed shard durably, then advance the shard's watermark."""
        lease.check()
        n = next(iter(block.values())).shape[1]
        self.array_store.write(run, start, block)
        self.shards.advance(lease, start + n, cells=n, unembeddable=unembeddable, cells_per_s=cells_per_s, peak_rss=peak_rss)

    def finalise_run(self, run_id: int, stats: dict[str, Any] | None = None) -> RunInfo | None:
        """Finalise a run whose shards are all done; exactly one process does it.

        The finaliser is whoever wins the run's lease; it consolidates the array (or checks its
        disjoint fragments), gathers the shards' unembeddable cells and marks the run complete.
        Returns the run this call completed, or ``None`` when it is complete already, another
        process is finalising it, or shards are left.
        """
        st = self.settings
        lease = try_acquire(self.engine, run_id, ttl_s=st.lease_ttl_s, heartbeat_s=st.heartbeat_s)
        if lease is None:
            return None
        try:
            shards = self.shards.shards(run_id)
            if not shards or any(s.status != "done" for s in shards):
                lease.release()
                return None
            run = self.runs.get(run_id)
            unembeddable = sorted({c for s in shards for c in s.unembeddable})
            t0 = min((s.claimed_at for s in shards if s.claimed_at), default=None)
            t1 = max((s.finished_at for s in shards if s.finished_at), default=None)
            seconds = round(t1 - t0, 3) if t0 and t1 else None
            workers = sorted({f"{s.lease_host}:{s.lease_pid}" for s in shards if s.lease_host})
            summary = {"shards": len(shards), "workers": len(workers), "devices": sorted({s.device for s in shards if s.device}),
                       "peak_rss_bytes": max((s.peak_rss or 0 for s in shards), default=0), "unembeddable_cells": len(unembeddable),
                       "wall_seconds": seconds, "cells_per_s": round(run.n_cells / seconds, 2) if seconds else None}
            self.array_store.finalise(run)
            self._owned_update(lease, status="complete", stats={**summary, **(stats or {})}, finished_at=utcnow(),
                               unembeddable=unembeddable, watermark=run.n_cells, lease_owner=None, lease_host=None, lease_pid=None)
        except BaseException:
            lease.release()
            raise
        lease.release()
        logger.info("run %s complete: %d shard(s), %s cells/s", run_id, len(shards), summary["cells_per_s"])
        return self.runs.get(run_id)

    def mark_failed(self, run_id: int, error: str) -> None:
        """Mark an active run failed (an ingest that stopped; an identical ingest resumes it)."""
        with contextlib.suppress(sa.exc.SQLAlchemyError), catalogdb.write_tx(self.engine) as conn:
            conn.execute(sa.update(Run).where(Run.id == run_id, Run.status.in_(("queued", "running")))
                         .values(status="failed", error=error[:2000]))

    def fail(self, run: RunInfo, lease: Lease, error: str) -> None:
        """Mark a run failed (its written prefix stays; an identical ingest resumes it)."""
        try:
            self._owned_update(lease, status="failed", error=error[:2000], lease_owner=None, lease_host=None, lease_pid=None)
        except (LeaseHeldError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("could not mark run %s failed: %s", run.id, catalogdb.first_line(exc))
        lease.release()
