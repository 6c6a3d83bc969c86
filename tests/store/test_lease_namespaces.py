"""A live lease holder in another pid namespace on the same host keeps its lease.

Containers and ``hostNetwork`` pods share the host name but not pids: a holder's pid says
nothing here unless boot id and pid namespace match, so its heartbeat decides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store.lease import BOOT_ID, HOSTNAME, PID_NAMESPACE, owner_alive, try_acquire
from sclstore.store.models import Run
from sclstore.testing import toy_obs


def _store_with_running_run(root: Path) -> tuple[Backend, int]:
    b = Backend.create(root)
    ds = b.register_dataset(name="toy", content_hash="n" * 64, obs=toy_obs(8), n_vars=5, source_path=None)
    m = b.register_model(family="synthetic", name="syn", checkpoint_hash="m" * 64, n_layers=1, d_model=4, config={})
    run = b.create_run(dataset=ds, model=m, key=cache_key("ns"), params={}, layers=[0, 1],
                       spec=ArraySpec(n_layers=2, n_cells=8, dim=4, pools=("cls",)))
    return b, run.id


def _unused_pid() -> int:
    """A pid no process in this namespace has (the holder's pid as seen from here)."""
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def _set_holder(b: Backend, run_id: int, *, pid: int, boot_id: str | None, pidns: str | None, age_s: float) -> None:
    with b.engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id).values(
            lease_owner=f"{HOSTNAME}:{pid}:x", lease_host=HOSTNAME, lease_pid=pid, lease_boot_id=boot_id,
            lease_pidns=pidns, heartbeat_at=time.time() - age_s, status="running"))


@pytest.mark.skipif(BOOT_ID is None or PID_NAMESPACE is None, reason="needs Linux /proc boot id and pid namespaces")
def test_pid_judged_only_in_the_same_boot_and_namespace(tmp_path: Path) -> None:
    b, run_id = _store_with_running_run(tmp_path / "s")
    gone = _unused_pid()
    with b:
        assert owner_alive(HOSTNAME, gone, BOOT_ID, PID_NAMESPACE) is False
        assert owner_alive(HOSTNAME, os.getpid(), BOOT_ID, PID_NAMESPACE) is True
        assert owner_alive(HOSTNAME, gone, BOOT_ID, "pid:[1]") is None  # another namespace: unknowable
        assert owner_alive(HOSTNAME, gone, "another-boot", PID_NAMESPACE) is None  # before a reboot
        assert owner_alive(HOSTNAME, gone, None, None) is None  # recorded by an older sclstore
        assert owner_alive("elsewhere", gone, BOOT_ID, PID_NAMESPACE) is None

        # fresh heartbeat, holder in another namespace: kept
        _set_holder(b, run_id, pid=gone, boot_id=BOOT_ID, pidns="pid:[4026000000]", age_s=1)
        assert try_acquire(b.engine, run_id, ttl_s=60, heartbeat_s=30) is None
        # same boot and namespace, pid gone: taken at once
        _set_holder(b, run_id, pid=gone, boot_id=BOOT_ID, pidns=PID_NAMESPACE, age_s=1)
        lease = try_acquire(b.engine, run_id, ttl_s=60, heartbeat_s=30)
        assert lease is not None
        lease.release()
        # another namespace but the heartbeat is older than the TTL: taken
        _set_holder(b, run_id, pid=gone, boot_id=BOOT_ID, pidns="pid:[4026000000]", age_s=120)
        lease = try_acquire(b.engine, run_id, ttl_s=60, heartbeat_s=30)
        assert lease is not None
        with b.engine.connect() as conn:
            row = conn.execute(sa.select(Run.lease_pid, Run.lease_boot_id, Run.lease_pidns).where(Run.id == run_id)).one()
        assert tuple(row) == (os.getpid(), BOOT_ID, PID_NAMESPACE)
        lease.release()


HOLDER = textwrap.dedent("""
    import os, sys, time
    # become a pid that no process has in the parent's namespace (/proc here is the parent's)
    while os.path.exists(f"/proc/{os.getpid()}"):
        child = os.fork()
        if child:
            os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    from sclstore.store import Backend
    b = Backend.open(sys.argv[1])
    lease = b.acquire(int(sys.argv[2]), wait=False)
    print("held", os.getpid(), flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to create a pid namespace (unshare)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_live_holder_in_another_pid_namespace_keeps_its_lease(tmp_path: Path) -> None:
    b, run_id = _store_with_running_run(tmp_path / "s")
    b.close()
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, str(script), str(tmp_path / "s"), str(run_id)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("held"), proc.stderr.read() if proc.stderr else ""
        holder_pid = int(line.split()[1])
        assert not Path(f"/proc/{holder_pid}").exists()  # its pid means nothing here
        with Backend.open(tmp_path / "s") as b2:
            with b2.engine.connect() as conn:
                ns = conn.execute(sa.select(Run.lease_pidns, Run.lease_pid).where(Run.id == run_id)).one()
            assert ns.lease_pid == holder_pid and ns.lease_pidns != PID_NAMESPACE
            assert try_acquire(b2.engine, run_id, ttl_s=60, heartbeat_s=30) is None  # the live lease is kept
            from sclstore.store.errors import LeaseHeldError

            with pytest.raises(LeaseHeldError, match=f"pid {holder_pid}"):
                b2.acquire(run_id, wait=False)
            proc.kill()
            proc.wait(timeout=30)
            time.sleep(1.5)
            # holder gone: its heartbeat goes stale and the run is taken after the TTL
            lease = try_acquire(b2.engine, run_id, ttl_s=1.0, heartbeat_s=30)
            assert lease is not None
            lease.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
