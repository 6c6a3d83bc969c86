"""The thread policy: allowance from affinity / cgroup / Slurm, the override order, applying it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sclstore.store import runtime
from sclstore.store.errors import InvalidInputError


def cgroup_v2(tmp_path: Path, cpu_max: str | None, *, sub: str = "", parent_max: str | None = None) -> tuple[Path, Path]:
    """A fake cgroup v2 tree: the process in ``/sub`` with ``cpu.max``; optionally a parent quota."""
    root = tmp_path / "cg"
    leaf = root / sub.strip("/") if sub else root
    leaf.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (leaf / "cpu.max").write_text(cpu_max + "\n")
    if parent_max is not None and sub:
        (root / "cpu.max").write_text(parent_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::/{sub.strip('/')}\n")
    return root, proc


def allowance(tmp_path: Path, cpu_max: str | None = None, *, affinity: int | None = 8, host: int = 16, env: dict[str, str] | None = None,
              **kw: str) -> runtime.CpuAllowance:
    root, proc = cgroup_v2(tmp_path, cpu_max, **kw)
    return runtime.detect_allowance(env=env or {}, affinity=affinity, cgroup_root=root, proc_cgroup=proc, host=host)


# ------------------------------------------------------------------------------ allowance
@pytest.mark.parametrize(("cpu_max", "cpus", "bound", "quota"), [
    ("max 100000", 8, "affinity", None),        # no quota: the affinity mask binds
    ("150000 100000", 2, "cgroup", 1.5),        # 1.5 CPUs rounds up to 2
    ("50000 100000", 1, "cgroup", 0.5),         # half a CPU is still one thread
    ("400000 100000", 4, "cgroup", 4.0),
    ("1600000 100000", 8, "affinity", 16.0),    # quota above the mask: the mask binds
])
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, cpus: int, bound: str, quota: float | None) -> None:
    a = allowance(tmp_path, cpu_max)
    assert (a.cpus, a.bound_by, a.cgroup) == (cpus, bound, quota)
    assert a.warnings == ()


def test_no_affinity_no_quota_is_the_host(tmp_path: Path) -> None:
    a = allowance(tmp_path, None, affinity=None, host=6)
    assert (a.cpus, a.bound_by, a.host) == (6, "host", 6)


def test_parent_cgroup_quota_binds_the_child(tmp_path: Path) -> None:
    a = allowance(tmp_path, "max 100000", sub="user.slice/job", parent_max="300000 100000")
    assert (a.cpus, a.bound_by, a.cgroup) == (3, "cgroup", 3.0)
    assert a.cgroup_source == str(tmp_path / "cg" / "cpu.max")


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    d = root / "cpu,cpuacct" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("250000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    a = runtime.detect_allowance(env={}, affinity=16, cgroup_root=root, proc_cgroup=proc, host=16)
    assert (a.cpus, a.bound_by, a.cgroup) == (3, "cgroup", 2.5)
    (d / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    a = runtime.detect_allowance(env={}, affinity=16, cgroup_root=root, proc_cgroup=proc, host=16)
    assert (a.cpus, a.bound_by, a.cgroup) == (16, "affinity", None)


@pytest.mark.parametrize("garbage", ["", "lots 100000", "0 100000", "-5 100000", "1 2 3", "\x00\x01"])
def test_garbage_cgroup_file_is_ignored_with_a_warning(tmp_path: Path, garbage: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sclstore.store.runtime"):
        a = allowance(tmp_path, garbage)
    assert (a.cpus, a.bound_by, a.cgroup) == (8, "affinity", None)
    assert len(a.warnings) == 1 and "cpu.max" in a.warnings[0]
    assert any("ignoring unreadable cgroup CPU quota" in r.message for r in caplog.records)


def test_unreadable_cgroup_file_is_ignored(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, None)
    (root / "cpu.max").mkdir()  # reading a folder raises IsADirectoryError
    a = runtime.detect_allowance(env={}, affinity=4, cgroup_root=root, proc_cgroup=proc, host=8)
    assert (a.cpus, a.bound_by) == (4, "affinity") and a.warnings


def test_missing_cgroup_files_are_no_limit(tmp_path: Path) -> None:
    a = runtime.detect_allowance(env={}, affinity=4, cgroup_root=tmp_path / "nope", proc_cgroup=tmp_path / "nope2", host=8)
    assert (a.cpus, a.bound_by, a.warnings) == (4, "affinity", ())


@pytest.mark.parametrize(("env", "cpus", "bound", "n_warn"), [
    ({"SLURM_CPUS_PER_TASK": "4"}, 4, "slurm", 0),
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_CPUS_ON_NODE": "2"}, 4, "slurm", 0),  # per task wins over per node
    ({"SLURM_CPUS_ON_NODE": "3"}, 3, "slurm", 0),
    ({"SLURM_CPUS_PER_TASK": "many", "SLURM_CPUS_ON_NODE": "5"}, 5, "slurm", 1),
    ({"SLURM_CPUS_PER_TASK": "0"}, 8, "affinity", 1),
    ({"SLURM_CPUS_PER_TASK": "32"}, 8, "affinity", 0),
])
def test_slurm_allocation(tmp_path: Path, env: dict[str, str], cpus: int, bound: str, n_warn: int) -> None:
    a = allowance(tmp_path, None, env=env)
    assert (a.cpus, a.bound_by, len(a.warnings)) == (cpus, bound, n_warn)


def test_all_three_limits_take_the_smallest(tmp_path: Path) -> None:
    a = allowance(tmp_path, "300000 100000", affinity=6, env={"SLURM_CPUS_PER_TASK": "4"})
    assert (a.cpus, a.bound_by) == (3, "cgroup")
    assert (a.affinity, a.cgroup, a.slurm) == (6, 3.0, 4)
    assert "cgroup quota 3 CPUs" in a.describe()


def test_real_machine_allowance_is_sane() -> None:
    a = runtime.detect_allowance()
    assert 1 <= a.cpus <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert a.affinity == len(os.sched_getaffinity(0))
        assert a.cpus <= a.affinity


# ------------------------------------------------------------------------------ decide
def fixed(cpus: int) -> runtime.CpuAllowance:
    return runtime.CpuAllowance(cpus=cpus, bound_by="affinity", host=16, affinity=cpus)


def test_two_local_workers_on_two_cpus_get_one_thread_each() -> None:
    p = runtime.decide(workers=2, env={}, allowance=fixed(2))
    assert (p.threads, p.workers, p.source) == (1, 2, "allowance")
    assert p.threads * p.workers <= 2
    assert "shared by 2 local workers" in p.reason


@pytest.mark.parametrize(("cpus", "workers", "threads"), [(8, 1, 8), (8, 3, 2), (3, 4, 1), (1, 1, 1)])
def test_allowance_divided_among_workers(cpus: int, workers: int, threads: int) -> None:
    assert runtime.decide(workers=workers, env={}, allowance=fixed(cpus)).threads == threads


def test_override_order() -> None:
    a = fixed(8)
    env = {"SCLSTORE_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert (runtime.decide(2, env=env, allowance=a).threads, runtime.decide(2, env=env, allowance=a).source) == (2, "--threads")
    p = runtime.decide(None, env=env, allowance=a)
    assert (p.threads, p.source) == (3, "SCLSTORE_THREADS")
    env.pop("SCLSTORE_THREADS")
    p = runtime.decide(None, env=env, allowance=a)
    assert (p.threads, p.source, p.user_vars) == (5, "OMP_NUM_THREADS", {"OMP_NUM_THREADS": "5"})
    p = runtime.decide(None, env={"MKL_NUM_THREADS": "6"}, allowance=a)
    assert (p.threads, p.source) == (6, "MKL_NUM_THREADS")
    p = runtime.decide(None, env={"OMP_NUM_THREADS": "4,2"}, allowance=a)  # libgomp nested list: the outer count
    assert (p.threads, p.source) == (4, "OMP_NUM_THREADS")
    p = runtime.decide(None, env={"OMP_NUM_THREADS": "lots"}, allowance=a)  # unparseable: the allowance decides
    assert (p.threads, p.source) == (8, "allowance")


def test_more_threads_than_allowed_is_honoured_and_said() -> None:
    p = runtime.decide("12", env={}, allowance=fixed(2))
    assert p.threads == 12 and "more than the allowance of 2" in p.reason


@pytest.mark.parametrize("bad", [0, -1, "0", "-3", "abc", "2.5", "1e3", True])
def test_bad_threads_is_one_line_error(bad: object) -> None:
    with pytest.raises(InvalidInputError) as exc:
        runtime.decide(bad, env={}, allowance=fixed(2))  # type: ignore[arg-type]
    msg = str(exc.value)
    assert "\n" not in msg and "--threads" in msg and "whole number >= 1" in msg


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "1.5"])
def test_bad_sclstore_threads_is_one_line_error(bad: str) -> None:
    with pytest.raises(InvalidInputError, match=r"^SCLSTORE_THREADS=.* whole number >= 1"):
        runtime.decide(None, env={"SCLSTORE_THREADS": bad}, allowance=fixed(2))
    # an explicit --threads wins without reading the bad variable
    assert runtime.decide(2, env={"SCLSTORE_THREADS": bad}, allowance=fixed(2)).threads == 2


def test_auto_and_off() -> None:
    assert runtime.decide("auto", env={"SCLSTORE_THREADS": "auto"}, allowance=fixed(4)).source == "allowance"
    p = runtime.decide(None, env={"SCLSTORE_THREADS": "off"}, allowance=fixed(4))
    assert not p.enabled and p.wait_policy is None and "disabled" in p.reason


def test_bad_workers() -> None:
    with pytest.raises(InvalidInputError):
        runtime.decide(workers=0, env={}, allowance=fixed(2))


def test_split_and_cap_jobs_never_exceed_the_threads() -> None:
    for threads in range(1, 9):
        p = runtime.decide(threads, env={}, allowance=fixed(threads))
        for jobs in range(1, 12):
            capped = p.cap_jobs(jobs)
            assert capped == min(jobs, threads)
            assert capped * p.split(capped) <= threads
            assert p.split(capped) >= 1
    p = runtime.decide(8, env={}, allowance=fixed(8))
    assert (p.split(1), p.split(2), p.split(3), p.split(8)) == (8, 4, 2, 1)
    with pytest.raises(InvalidInputError):
        p.split(0)


def test_to_json_names_the_reason() -> None:
    a = runtime.CpuAllowance(cpus=2, bound_by="cgroup", host=16, affinity=16, cgroup=1.5, cgroup_source="/x/cpu.max")
    d = runtime.decide(None, env={}, allowance=a).to_json()
    assert d["threads"] == 2 and d["source"] == "allowance" and d["omp_wait_policy"] == "PASSIVE"
    assert d["allowance"]["bound_by"] == "cgroup" and d["allowance"]["cgroup"] == 1.5
    assert "cgroup quota 1.5 CPUs in /x/cpu.max" in d["reason"]


# ------------------------------------------------------------------------------ apply
def test_apply_sets_unset_variables_and_keeps_the_users() -> None:
    env = {"MKL_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    p = runtime.decide(3, env=env, allowance=fixed(8))
    assert p.wait_policy == "ACTIVE" and p.user_vars == {"MKL_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    runtime.apply(p, environ=env)
    assert env["MKL_NUM_THREADS"] == "7" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS"):
        assert env[var] == "3"
    # a second call may change what sclstore set, never what the user set
    p2 = runtime.decide(2, env=env, allowance=fixed(8))
    assert "OMP_NUM_THREADS" not in p2.user_vars
    runtime.apply(p2, environ=env)
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "7"


def test_apply_sets_passive_waiting() -> None:
    env: dict[str, str] = {}
    runtime.apply(runtime.decide(None, env=env, allowance=fixed(2)), environ=env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "2"


def test_passive_waiting_covers_the_openblas_pool() -> None:
    """numpy's and scipy's OpenBLAS (pthreads) ignores OMP_WAIT_POLICY; its idle threads sleep at
    once only with OPENBLAS_THREAD_TIMEOUT=4 (2**4 cycles, OpenBLAS's minimum)."""
    env: dict[str, str] = {}
    p = runtime.decide(None, env=env, allowance=fixed(2))
    runtime.apply(p, environ=env)
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4" and p.to_json()["openblas_thread_timeout"] == "4"
    assert "OPENBLAS_THREAD_TIMEOUT" in env["_SCLSTORE_SET_VARS"].split(",")
    env = {"OPENBLAS_THREAD_TIMEOUT": "20"}  # the user's value wins
    p = runtime.decide(None, env=env, allowance=fixed(2))
    runtime.apply(p, environ=env)
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "20" and p.blas_wait == "20" and p.user_vars["OPENBLAS_THREAD_TIMEOUT"] == "20"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user asked for spinning: OpenBLAS keeps its default
    p = runtime.decide(None, env=env, allowance=fixed(2))
    runtime.apply(p, environ=env)
    assert "OPENBLAS_THREAD_TIMEOUT" not in env and p.blas_wait is None
    env = {"SCLSTORE_THREADS": "off"}
    assert runtime.decide(None, env=env, allowance=fixed(2)).blas_wait is None


def test_off_sets_nothing() -> None:
    env = {"SCLSTORE_THREADS": "off"}
    runtime.apply(runtime.decide(None, env=env, allowance=fixed(2)), environ=env)
    assert env == {"SCLSTORE_THREADS": "off"}


CHILD = """
import json, os, sys
from sclstore.store import runtime
p = runtime.configure({threads!r})
import torch, threadpoolctl
runtime.apply(p)
info = threadpoolctl.threadpool_info()
print(json.dumps({{"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "env": {{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}},
                  "pools": sorted({{i["num_threads"] for i in info}}), "policy": p.to_json()}}))
"""


def _child(threads: object, env_extra: dict[str, str]) -> dict:
    import json

    drop = (*runtime.THREAD_VARS, "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "SCLSTORE_THREADS", "_SCLSTORE_SET_VARS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    cmd = [sys.executable, "-c", CHILD.format(threads=threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True,
                         cwd=tempfile.gettempdir())  # outside the repo: its folders must not shadow the package
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_and_blas_pools_follow_the_policy_in_a_fresh_process() -> None:
    got = _child(1, {})
    assert got["torch"] == 1 and got["interop"] == 1 and got["pools"] == [1]
    assert got["env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    got = _child(None, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"})
    assert got["torch"] == 2 and got["policy"]["source"] == "OMP_NUM_THREADS"
    assert got["env"] == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
