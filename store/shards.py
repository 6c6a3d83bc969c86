"""The shard queue: a run's cells split into chunk-aligned ranges that workers claim from the catalog.

The catalog is the queue. A run is planned once (``sclstore submit``) into shards, contiguous cell
ranges ``[lo, hi)`` whose boundaries are multiples of the run's chunk size and of the array's cell
tile; any number of workers, anywhere the catalog and the store are reachable, then claim them:

* a **claim** is atomic: one write transaction (``BEGIN IMMEDIATE`` on SQLite) that picks a
  claimable shard with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL: concurrent claimers skip
  each other's rows instead of waiting) and updates it conditioned on its previous owner;
* a shard is claimable when it is queued, or claimed by an owner whose heartbeat is older than the
  lease TTL, or by a process on this host (same boot, same pid namespace) that no longer exists;
* the owner's heartbeat comes from a thread (:class:`ShardLease`), so a chunk slower than the TTL
  keeps its shard; every write of the owner is conditioned on still owning the shard, so a worker
  whose shard was taken over or cancelled stops at its next chunk boundary;
* a shard's watermark advances only after its chunk is durably in the array, so a takeover resumes
  where the dead worker's last committed chunk ended.

Finalisation (consolidation, the run's status) is done by exactly one process: the one that wins the
run's lease (:func:`sclstore.store.lease.try_acquire`) once every shard is done.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .catalog import first_line, write_tx
from .errors import InvalidInputError, LeaseHeldError
from .lease import BOOT_ID, HOSTNAME, PID_NAMESPACE, owner_alive
from .models import Run, RunShard

__all__ = ["ACTIVE_RUN", "ShardInfo", "ShardLease", "ShardQueue", "split_cells"]

logger = logging.getLogger(__name__)

ACTIVE_RUN = ("queued", "running")
"""Run statuses whose shards may be claimed."""


def split_cells(n_cells: int, shard_cells: int, align: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``0..n_cells`` of ``shard_cells`` rounded up to a multiple of ``align``.

    >>> split_cells(10, 4, 3)
    [(0, 6), (6, 10)]
    """
    if shard_cells < 1:
        raise InvalidInputError(f"--shard-cells must be >= 1, got {shard_cells}")
    size = -(-shard_cells // align) * align
    return [(lo, min(lo + size, n_cells)) for lo in range(0, n_cells, size)]


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the catalog holds it."""

    id: int
    run_id: int
    idx: int
    lo: int
    hi: int
    status: str
    watermark: int
    lease_owner: str | None = None
    lease_host: str | None = None
    lease_pid: int | None = None
    heartbeat_at: float | None = None
    device: str | None = None
    batch_size: int | None = None
    chunk_cells: int | None = None
    precision: str | None = None
    cpu_threads: int | None = None
    attempts: int = 0
    cells_per_s: float | None = None
    peak_rss: int | None = None
    unembeddable: tuple[int, ...] = ()
    error: str | None = None
    claimed_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row: Any) -> ShardInfo:
        m = row._mapping
        return cls(**{k: m[k] for k in _COLUMNS if k != "unembeddable"},
                   unembeddable=tuple(int(c) for c in (m["unembeddable"] or ())))

    @property
    def cells_done(self) -> int:
        return int(self.watermark - self.lo)


_COLUMNS = tuple(f.name for f in ShardInfo.__dataclass_fields__.values())


def _select_shards() -> sa.Select[Any]:
    return sa.select(*(getattr(RunShard, c) for c in _COLUMNS))


@dataclass
class ShardLease:
    """A claimed shard, kept alive by a daemon heartbeat thread until :meth:`stop`."""

    engine: Engine
    shard: ShardInfo
    owner: str
    heartbeat_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ShardLease:
        _LIVE_OWNERS.add(self.owner)
        self._thread = threading.Thread(target=self._beat, name=f"sclstore-shard-{self.shard.id}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                with write_tx(self.engine, durable=False) as conn:
                    res = conn.execute(sa.update(RunShard).where(*self.owned()).values(heartbeat_at=time.time()))
                if res.rowcount != 1:
                    logger.warning("shard %d of run %d was taken over or cancelled", self.shard.idx, self.shard.run_id)
                    self.lost.set()
                    return
                if failing:
                    logger.warning("heartbeat of shard %d of run %d works again", self.shard.idx, self.shard.run_id)
                failing = False
            except sa.exc.SQLAlchemyError as exc:  # transient: try again next beat, say so once
                if not failing:
                    logger.warning("heartbeat of shard %d of run %d failed: %s; retrying", self.shard.idx, self.shard.run_id,
                                   first_line(exc))
                failing = True

    def owned(self) -> tuple[Any, ...]:
        """WHERE clauses that hold only while this process still owns the shard."""
        return (RunShard.id == self.shard.id, RunShard.lease_owner == self.owner, RunShard.status == "claimed")

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseHeldError(f"shard {self.shard.idx} of run {self.shard.run_id} was taken over or cancelled; "
                                 "this worker stops at the chunk boundary")

    def stop(self) -> None:
        self.halt()
        _LIVE_OWNERS.discard(self.owner)

    def halt(self) -> None:
        """Stop the heartbeat; the shard still counts as this process's own until :meth:`stop`."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


_CLEAR_LEASE = {"lease_owner": None, "lease_boot_id": None, "lease_pidns": None}
_LIVE_OWNERS: set[str] = set()
"""Owners of this process's running leases: a shard still marked as this process's but not among
them (its release failed, e.g. in a catalog outage) is claimable again at once."""


# what a claim writes; every value is bound at execution (the statements are built once per scope;
# bound names carry a b_ prefix: SQLAlchemy reserves column names in an UPDATE's SET)
_LEASE_VALUES: dict[str, Any] = {
    "status": "claimed", "lease_owner": sa.bindparam("b_owner"), "lease_host": sa.bindparam("b_host"),
    "lease_pid": sa.bindparam("b_pid"), "lease_boot_id": sa.bindparam("b_boot_id"), "lease_pidns": sa.bindparam("b_pidns"),
    "heartbeat_at": sa.bindparam("b_now"), "claimed_at": sa.bindparam("b_now"), "device": sa.bindparam("b_device"),
    "error": None, "attempts": RunShard.attempts + 1,
}
_RUN_STARTS = sa.update(Run).where(Run.id == sa.bindparam("run"), Run.status == "queued").values(status="running")


@dataclass(frozen=True)
class _ClaimStatements:
    """A claim's statements for one scope (runs, excluded runs, shuffled or not)."""

    queued: Any  # sa.Select of the shard columns the claim reads
    abandoned: Any
    take_first: sa.Update
    take_queued: sa.Update
    take_over: sa.Update

    @classmethod
    def build(cls, runs: tuple[int, ...] | None, exclude: tuple[int, ...], *, shuffled: bool, postgresql: bool) -> _ClaimStatements:
        cols = (RunShard.id, RunShard.status, RunShard.lease_owner, RunShard.lease_host, RunShard.lease_pid,
                RunShard.lease_boot_id, RunShard.lease_pidns, RunShard.heartbeat_at)
        base = sa.select(*cols).join(Run, Run.id == RunShard.run_id).where(Run.status.in_(ACTIVE_RUN))
        base = base.where(RunShard.run_id.in_(runs)) if runs is not None else base.where(Run.shared.is_(True))
        if exclude:
            base = base.where(RunShard.run_id.not_in(exclude))
        base = base.order_by(RunShard.run_id, RunShard.idx).limit(16 if shuffled else 1)
        # a stale lease, or one of a dead process on this host, is claimable like a queued shard
        stale = sa.and_(RunShard.status == "claimed", sa.or_(RunShard.heartbeat_at < sa.bindparam("b_stale_before"),
                                                             RunShard.lease_host == sa.bindparam("b_host")))
        queued, abandoned = base.where(RunShard.status == "queued"), base.where(stale).limit(64)
        if postgresql:  # lock only the rows picked; other claimers skip them
            queued = queued.with_for_update(skip_locked=True, of=RunShard)
            abandoned = abandoned.with_for_update(skip_locked=True, of=RunShard)
        returning = [getattr(RunShard, c) for c in _COLUMNS]
        take = sa.update(RunShard).values(**_LEASE_VALUES).returning(*returning)
        first = queued.with_only_columns(RunShard.id).scalar_subquery()
        return cls(queued=queued, abandoned=abandoned, take_first=take.where(RunShard.id == first),
                   take_queued=take.where(RunShard.id == sa.bindparam("b_pick_id"), RunShard.status == "queued"),
                   take_over=take.where(RunShard.id == sa.bindparam("b_pick_id"), RunShard.lease_owner == sa.bindparam("b_prior_owner")))


class ShardQueue:
    """The shards of every run in one catalog."""

    def __init__(self, engine: Engine, *, ttl_s: float, heartbeat_s: float) -> None:
        self.engine = engine
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self._statements: dict[tuple[Any, ...], _ClaimStatements] = {}

    # ------------------------------------------------------------------ planning
    def create(self, run_id: int, ranges: Sequence[tuple[int, int]], pinned: dict[str, Any] | None = None) -> None:
        """Insert a run's shards with its pinned numerics, unless it has them already (a repeated submit)."""
        pin = {k: (pinned or {}).get(k) for k in ("batch_size", "chunk_cells", "precision", "cpu_threads")}
        with write_tx(self.engine) as conn:
            if conn.execute(sa.select(sa.func.count()).where(RunShard.run_id == run_id)).scalar_one():
                return
            conn.execute(sa.insert(RunShard), [{"run_id": run_id, "idx": i, "lo": lo, "hi": hi, "status": "queued",
                                                "watermark": lo, "attempts": 0, "unembeddable": [], **pin}
                                               for i, (lo, hi) in enumerate(ranges)])

    def requeue(self, run_id: int) -> int:
        """Put a failed or cancelled run's unfinished shards back in the queue; returns how many."""
        with write_tx(self.engine) as conn:
            res = conn.execute(sa.update(RunShard)
                               .where(RunShard.run_id == run_id, RunShard.status.in_(("failed", "cancelled")))
                               .values(status="queued", attempts=0, error=None, **_CLEAR_LEASE))
            conn.execute(sa.update(Run).where(Run.id == run_id, Run.status.in_(("failed", "cancelled")))
                         .values(status="queued", error=None))
        return int(res.rowcount)

    # ------------------------------------------------------------------ claiming
    def claim(self, *, runs: Sequence[int] | None, device: str, shuffle: random.Random | None = None,
              exclude: Sequence[int] = ()) -> ShardLease | None:
        """Claim one shard of ``runs`` (None: of any shared run, except those in ``exclude``), or ``None`` if nothing is claimable.

        ``shuffle`` picks among the claimable shards at random (tests of arbitrary shard orders);
        by default the lowest run id and shard index first.
        """
        now = time.time()
        owner = f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        stmts = self._claim_statements(runs, exclude, shuffled=shuffle is not None)
        lease = {"b_owner": owner, "b_host": HOSTNAME, "b_pid": os.getpid(), "b_boot_id": BOOT_ID, "b_pidns": PID_NAMESPACE,
                 "b_now": now, "b_device": device, "b_stale_before": now - self.ttl_s}
        _LIVE_OWNERS.add(owner)  # before the claim commits: no other thread of this process may take the shard as abandoned
        took_over_from: str | None = None
        with write_tx(self.engine, durable=False) as conn:  # a lost claim is re-claimed; the owner's writes check ownership
            row = None
            if shuffle is None:  # the common case in one statement: pick (row-locked, others skip it) and take
                row = conn.execute(stmts.take_first, lease).first()
            else:
                candidates = list(conn.execute(stmts.queued, lease).all())
                if candidates:
                    row = self._take(conn, stmts, shuffle.choice(candidates), lease)
            if row is None:  # no queued shard: an abandoned one (stale lease, or a dead process on this host)?
                abandoned = [r for r in conn.execute(stmts.abandoned, lease).all() if self._claimable(r, now)]
                if abandoned:
                    pick = shuffle.choice(abandoned) if shuffle is not None else abandoned[0]
                    row = self._take(conn, stmts, pick, lease)
                    took_over_from = pick.lease_owner
            if row is None:  # nothing claimable, or (without row locks) another claimer was first: claim again
                _LIVE_OWNERS.discard(owner)
                return None
            conn.execute(_RUN_STARTS, {"run": row.run_id})
        shard = ShardInfo.from_row(row)
        if took_over_from is not None:
            logger.info("took over shard %d of run %d from %s (resuming at cell %d)", shard.idx, shard.run_id, took_over_from,
                        shard.watermark)
        return ShardLease(self.engine, shard, owner, self.heartbeat_s).start()

    @staticmethod
    def _take(conn: sa.Connection, stmts: _ClaimStatements, pick: Any, lease: dict[str, Any]) -> Any:
        """Take the picked shard if it is still as read (queued, or held by the same stale owner)."""
        if pick.status == "queued":
            return conn.execute(stmts.take_queued, {**lease, "b_pick_id": pick.id}).first()
        return conn.execute(stmts.take_over, {**lease, "b_pick_id": pick.id, "b_prior_owner": pick.lease_owner}).first()

    def _claim_statements(self, runs: Sequence[int] | None, exclude: Sequence[int], *, shuffled: bool) -> _ClaimStatements:
        """The claim's statements for this scope, built once (values are bound at execution)."""
        key = (None if runs is None else tuple(int(r) for r in runs), tuple(int(r) for r in exclude), shuffled)
        stmts = self._statements.get(key)
        if stmts is None:
            if len(self._statements) > 64:
                self._statements.clear()
            stmts = self._statements[key] = _ClaimStatements.build(key[0], key[1], shuffled=shuffled,
                                                                   postgresql=self.engine.dialect.name == "postgresql")
        return stmts

    def _claimable(self, row: Any, now: float) -> bool:
        if row.status == "queued":
            return True
        if row.heartbeat_at is not None and row.heartbeat_at < now - self.ttl_s:
            return True
        if (row.lease_host, row.lease_pid, row.lease_boot_id, row.lease_pidns) == (HOSTNAME, os.getpid(), BOOT_ID, PID_NAMESPACE):
            return row.lease_owner not in _LIVE_OWNERS  # this process's: claimable unless it still works on it
        return owner_alive(row.lease_host, row.lease_pid, row.lease_boot_id, row.lease_pidns) is False

    # ------------------------------------------------------------------ owner's writes
    def advance(self, lease: ShardLease, watermark: int, *, cells: int, unembeddable: Sequence[int] | None,
                cells_per_s: float | None, peak_rss: int | None) -> None:
        """Record cells ``..watermark`` of the shard as durably written (the array write came first).

        Raises
        ------
        LeaseHeldError
            If the shard was taken over or cancelled; nothing is recorded.
        """
        lease.check()
        values: dict[str, Any] = {"watermark": watermark, "heartbeat_at": time.time(), "cells_per_s": cells_per_s,
                                  "peak_rss": peak_rss}
        if unembeddable is not None:
            values["unembeddable"] = [int(c) for c in unembeddable]
        with write_tx(self.engine) as conn:
            res = conn.execute(sa.update(RunShard).where(*lease.owned()).values(**values))
            if res.rowcount == 1:
                conn.execute(sa.update(Run).where(Run.id == lease.shard.run_id).values(watermark=Run.watermark + cells))
        if res.rowcount != 1:
            lease.lost.set()
            lease.check()

    def done(self, lease: ShardLease) -> bool:
        """Mark the owner's shard done; False if it was lost before (another worker redoes its rest)."""
        lease.halt()  # still this process's own until written: no other thread of it takes the shard as abandoned
        try:  # a lost "done" only lets the lease expire: the next owner resumes at the durable watermark, the end
            with write_tx(self.engine, durable=False) as conn:
                res = conn.execute(sa.update(RunShard).where(*lease.owned())
                                   .values(status="done", finished_at=time.time(), **_CLEAR_LEASE))
        finally:
            lease.stop()
        return res.rowcount == 1

    def release(self, lease: ShardLease, *, error: str | None = None, max_attempts: int = 3, fail: bool = False) -> str:
        """Give a shard back (interrupted, or failed with ``error``); returns its new status.

        A shard whose claims ended in errors ``max_attempts`` times, or one released with
        ``fail`` (an error no other worker can get past, such as bad input), becomes ``failed``
        and fails its run; otherwise it is queued again for any worker.
        """
        lease.halt()
        failed = error is not None and (fail or lease.shard.attempts >= max_attempts)
        status = "failed" if failed else "queued"
        try:
            with write_tx(self.engine) as conn:
                res = conn.execute(sa.update(RunShard).where(*lease.owned())
                                   .values(status=status, error=None if error is None else error[:2000], **_CLEAR_LEASE))
                if failed and res.rowcount == 1:
                    conn.execute(sa.update(Run).where(Run.id == lease.shard.run_id, Run.status.in_(ACTIVE_RUN))
                                 .values(status="failed", error=(error or "")[:2000]))
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("could not release shard %d of run %d: %s (this process may claim it again; others once its lease expires)",
                           lease.shard.idx, lease.shard.run_id, first_line(exc))
            return "claimed"
        finally:
            lease.stop()
        return status

    # ------------------------------------------------------------------ reading, cancelling
    def shards(self, run_id: int) -> list[ShardInfo]:
        with self.engine.connect() as conn:
            return [ShardInfo.from_row(r) for r in conn.execute(_select_shards().where(RunShard.run_id == run_id).order_by(RunShard.idx))]

    def counts(self, run_id: int) -> dict[str, int]:
        """Shards per status (every status present, zeros included)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(RunShard.status, sa.func.count()).where(RunShard.run_id == run_id).group_by(RunShard.status))
            got = {s: int(n) for s, n in rows}
        return {s: got.get(s, 0) for s in ("queued", "claimed", "done", "failed", "cancelled")}

    def pending_runs(self, runs: Sequence[int] | None) -> list[int]:
        """Active runs in scope that still have shards not done (work left for someone)."""
        stmt = (sa.select(RunShard.run_id).join(Run, Run.id == RunShard.run_id)
                .where(Run.status.in_(ACTIVE_RUN), RunShard.status.in_(("queued", "claimed"))).distinct())
        stmt = stmt.where(RunShard.run_id.in_([int(r) for r in runs])) if runs is not None else stmt.where(Run.shared.is_(True))
        with self.engine.connect() as conn:
            return sorted(int(r[0]) for r in conn.execute(stmt))

    def finishable_runs(self, runs: Sequence[int] | None) -> list[int]:
        """Active runs in scope whose shards are all done (waiting for their finaliser)."""
        not_done = sa.select(RunShard.id).where(RunShard.run_id == Run.id, RunShard.status != "done").exists()
        any_shard = sa.select(RunShard.id).where(RunShard.run_id == Run.id).exists()
        stmt = sa.select(Run.id).where(Run.status.in_(ACTIVE_RUN), any_shard, ~not_done)
        stmt = stmt.where(Run.id.in_([int(r) for r in runs])) if runs is not None else stmt.where(Run.shared.is_(True))
        with self.engine.connect() as conn:
            return sorted(int(r[0]) for r in conn.execute(stmt))

    def cancel(self, run_id: int) -> int:
        """Cancel a run: its unfinished shards stop at their next chunk boundary; returns how many."""
        with write_tx(self.engine) as conn:
            res = conn.execute(sa.update(RunShard)
                               .where(RunShard.run_id == run_id, RunShard.status.in_(("queued", "claimed", "failed")))
                               .values(status="cancelled", **_CLEAR_LEASE))
            conn.execute(sa.update(Run).where(Run.id == run_id, Run.status != "complete").values(status="cancelled"))
        return int(res.rowcount)

    def status(self, run: Any) -> dict[str, Any]:
        """A run's progress from its shards: counts, cells done, per-worker cells/s, ETA, stale leases.

        ``run`` is a :class:`~sclstore.store.info.RunInfo`.
        """
        now = time.time()
        shards = self.shards(run.id)
        counts = {s: 0 for s in ("queued", "claimed", "done", "failed", "cancelled")}
        for s in shards:
            counts[s.status] = counts.get(s.status, 0) + 1
        done = run.n_cells if run.status == "complete" else sum(s.cells_done for s in shards)
        workers: list[dict[str, Any]] = []
        stale: list[dict[str, Any]] = []
        for s in shards:
            if s.status != "claimed":
                continue
            age = now - (s.heartbeat_at or 0)
            is_stale = age > self.ttl_s
            entry = {"shard": s.idx, "host": s.lease_host, "pid": s.lease_pid, "device": s.device, "cells_per_s": s.cells_per_s,
                     "cell": s.watermark, "of": [s.lo, s.hi], "heartbeat_age_s": round(age, 1), "stale": is_stale}
            (stale if is_stale else workers).append(entry)
        rate = float(sum(float(w["cells_per_s"] or 0.0) for w in workers))
        left = run.n_cells - done
        return {"run": run.id, "label": run.label, "status": run.status, "cells": run.n_cells, "cells_done": done,
                "shards": counts, "workers": workers, "stale_leases": stale, "cells_per_s": round(rate, 2),
                "eta_s": round(left / rate, 1) if rate > 0 and left > 0 else (0.0 if left == 0 else None),
                "error": run.error}
