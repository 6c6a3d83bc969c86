"""Run leases: one live writer per run, a heartbeat thread, takeover of stale leases.

A lease is taken with one conditional UPDATE (atomic on SQLite and PostgreSQL): it succeeds
only if the run has no owner, its heartbeat is older than the TTL, or its owner is a dead
process on this host. A pid is only meaningful under the boot and in the pid namespace it
was recorded in: a holder in a container or pod on the same host (another pid namespace), or
from before a reboot, is judged by its heartbeat alone. Every later write of the owner is
conditioned on still owning it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .catalog import first_line, write_tx
from .models import Run

__all__ = ["BOOT_ID", "HOSTNAME", "PID_NAMESPACE", "Lease", "owner_alive", "try_acquire"]

logger = logging.getLogger(__name__)
HOSTNAME = socket.gethostname()


def _read_boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:64] or None
    except OSError:
        return None


def _read_pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")[:64]
    except OSError:
        return None


BOOT_ID = _read_boot_id()
"""This machine's boot id (``None`` where the kernel does not expose one)."""
PID_NAMESPACE = _read_pid_namespace()
"""This process's pid namespace, e.g. ``pid:[4026531836]`` (``None`` if unknown)."""


def owner_alive(
    host: str | None, pid: int | None, boot_id: str | None = None, pidns: str | None = None
) -> bool | None:
    """Whether a lease owner is alive: True/False only for an owner on this host, under this
    boot and in this pid namespace; None (unknowable: use the heartbeat) otherwise."""
    if host != HOSTNAME or pid is None:
        return None
    if boot_id is None or pidns is None or boot_id != BOOT_ID or pidns != PID_NAMESPACE:
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
        failing = False
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
                if failing:
                    logger.warning("heartbeat of run %s works again", self.run_id)
                failing = False
            except sa.exc.SQLAlchemyError as exc:  # transient: try again next beat, say so once
                if not failing:
                    logger.warning("heartbeat of run %s failed: %s; retrying", self.run_id, first_line(exc))
                failing = True

    def release(self) -> None:
        """Stop the heartbeat and clear the owner (if still ours)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with write_tx(self.engine) as conn:
                conn.execute(
                    sa.update(Run)
                    .where(Run.id == self.run_id, Run.lease_owner == self.owner)
                    .values(lease_owner=None, lease_host=None, lease_pid=None, lease_boot_id=None, lease_pidns=None)
                )
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("releasing lease of run %s failed: %s (it expires by itself)", self.run_id, first_line(exc))


def try_acquire(engine: Engine, run_id: int, *, ttl_s: float, heartbeat_s: float) -> Lease | None:
    """Take the lease of a non-complete run if free, stale or held by a dead local process."""
    owner = f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    now = time.time()
    with write_tx(engine) as conn:
        row = conn.execute(
            sa.select(Run.lease_owner, Run.lease_host, Run.lease_pid, Run.lease_boot_id, Run.lease_pidns, Run.status).where(Run.id == run_id)
        ).one()
        if row.status in ("complete", "cancelled"):  # a cancelled run is never finalised nor written
            return None
        cond = sa.or_(Run.lease_owner.is_(None), Run.heartbeat_at < now - ttl_s)
        if row.lease_owner is not None and owner_alive(row.lease_host, row.lease_pid, row.lease_boot_id, row.lease_pidns) is False:
            cond = Run.lease_owner == row.lease_owner
        res = conn.execute(
            sa.update(Run)
            .where(Run.id == run_id, Run.status.not_in(("complete", "cancelled")), cond)
            .values(lease_owner=owner, lease_host=HOSTNAME, lease_pid=os.getpid(), lease_boot_id=BOOT_ID,
                    lease_pidns=PID_NAMESPACE, heartbeat_at=now, status="running", error=None)
        )
        if res.rowcount != 1:
            return None
    logger.info("acquired lease on run %s as %s", run_id, owner)
    return Lease(engine, run_id, owner, heartbeat_s)
