"""Run leases: one live writer per run, a heartbeat thread, takeover of stale leases.

A lease is taken with one conditional UPDATE (atomic on SQLite and PostgreSQL): it succeeds
only if the run has no owner, its heartbeat is older than the TTL, or its owner is a dead
process on this host. Every later write of the owner is conditioned on still owning it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .catalog import write_tx
from .models import Run

__all__ = ["Lease", "try_acquire", "owner_alive", "HOSTNAME"]

logger = logging.getLogger(__name__)
HOSTNAME = socket.gethostname()


def owner_alive(host: str | None, pid: int | None) -> bool | None:
    """True/False for an owner on this host; None when it runs elsewhere (unknowable)."""
    if host != HOSTNAME or pid is None:
        return None
    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Lease:
    """An acquired lease on a run, kept alive by a daemon heartbeat thread."""

    def __init__(self, engine: Engine, run_id: int, owner: str, heartbeat_s: float) -> None:
        self.engine = engine
        self.run_id = run_id
        self.owner = owner
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"sclstore-lease-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                with write_tx(self.engine) as conn:
                    res = conn.execute(
                        sa.update(Run)
                        .where(Run.id == self.run_id, Run.lease_owner == self.owner)
                        .values(heartbeat_at=time.time())
                    )
                if res.rowcount != 1:
                    logger.warning("lease on run %s was taken over by another process", self.run_id)
                    self.lost.set()
                    return
            except sa.exc.SQLAlchemyError as exc:  # transient: try again next beat
                logger.warning("heartbeat of run %s failed: %s", self.run_id, exc)

    def release(self) -> None:
        """Stop the heartbeat and clear the owner (if still ours)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with write_tx(self.engine) as conn:
                conn.execute(
                    sa.update(Run)
                    .where(Run.id == self.run_id, Run.lease_owner == self.owner)
                    .values(lease_owner=None, lease_host=None, lease_pid=None)
                )
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("releasing lease of run %s failed: %s (it expires by itself)", self.run_id, exc)


def try_acquire(engine: Engine, run_id: int, *, ttl_s: float, heartbeat_s: float) -> Lease | None:
    """Take the lease of a non-complete run if free, stale or held by a dead local process."""
    owner = f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    now = time.time()
    with write_tx(engine) as conn:
        row = conn.execute(sa.select(Run.lease_owner, Run.lease_host, Run.lease_pid, Run.status).where(Run.id == run_id)).one()
        if row.status == "complete":
            return None
        cond = sa.or_(Run.lease_owner.is_(None), Run.heartbeat_at < now - ttl_s)
        if row.lease_owner is not None and owner_alive(row.lease_host, row.lease_pid) is False:
            cond = Run.lease_owner == row.lease_owner
        res = conn.execute(
            sa.update(Run)
            .where(Run.id == run_id, Run.status != "complete", cond)
            .values(lease_owner=owner, lease_host=HOSTNAME, lease_pid=os.getpid(), heartbeat_at=now, status="running", error=None)
        )
        if res.rowcount != 1:
            return None
    logger.info("acquired lease on run %s as %s", run_id, owner)
    return Lease(engine, run_id, owner, heartbeat_s)
