"""The Ray executor: GPU-requesting worker actors on a Ray cluster run the same claim loop.

A local Ray cluster with fake GPU resources (two worker "nodes", one GPU each) runs a sharded ingest
with two ``num_gpus=1`` actors that embed on CPU; one node is removed mid-shard and the other actor
takes its shard over. The oracle of every test is a plain single-process ``Store.ingest`` of the same
data and parameters: the bytes of every layer and pool must be identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import sclstore
from sclstore.store.errors import IngestError

ray = pytest.importorskip("ray", reason="the Ray executor needs sclstore[ray]")

from sclstore.ingest.ray_executor import ACTOR_NAMESPACE, run_ray_workers  # noqa: E402

from .shard_helpers import layer_bytes, write_shard_data  # noqa: E402

# one Ray cluster and one oracle per module: keep the module on one xdist worker (with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")

KW: dict[str, Any] = {"chunk_cells": 32, "batch_size": 8, "pools": ("cls", "mean")}
N_CELLS = 600
# d_model 512 in float32 gives 256-cell array tiles: shards of 200 cells round up to 256 (8 chunks of 32)
SHARDS = [(0, 256), (256, 512), (512, 600)]
OBJECT_STORE = 80 * 2**20


def _ray_processes(marker: str) -> list[str]:
    """Live processes whose command line names ``marker`` (a Ray temp dir)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or ())
        except (psutil.Error, TypeError):
            continue
        if marker in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:120]}")
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory, random_counts, tiny_gene_ids, tiny_tahoe_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ray")
    ckpt = tiny_tahoe_factory("hf", n_genes=60, d_model=512, n_layers=2, n_heads=4, max_length=32)
    data = write_shard_data(tmp / "d.h5ad", random_counts(N_CELLS, 60, seed=4), tiny_gene_ids(60))
    return {"data": data, "ckpt": ckpt, "tmp": tmp}


@pytest.fixture(scope="module")
def reference(shared: dict[str, Path]) -> dict[str, bytes]:
    """The oracle: one plain single-process ingest, at the actors' one thread.

    On CPU the thread count is a parameter of the numbers (torch splits reductions by thread:
    measured, 296 of 600 cells differ in the last bits between 1 and 2 threads).
    """
    with sclstore.open_store(shared["tmp"] / "ref", create=True) as st:
        res = st.ingest(shared["data"], "tahoe-x1", str(shared["ckpt"]), progress=False, workers=0, device="cpu", threads=1, **KW)
        return layer_bytes(st, res.id)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, list[Any]]]:
    """A head without GPUs and two worker nodes with one (fake) GPU each; torn down with every process."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="sclray")  # short: Ray's unix socket paths must stay under 107 bytes
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cwd = os.getcwd()
    os.chdir(tmp)  # Ray puts the driver's cwd on its workers' sys.path: the repository root would shadow the package
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": OBJECT_STORE,
                                                          "include_dashboard": False})
        nodes = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        ray.init(address=c.address, namespace=ACTOR_NAMESPACE, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        os.chdir(cwd)
        if c is not None:
            c.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        left = _no_ray_left(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert left == [], "Ray processes outlived the test cluster"


class _Bar:
    """A progress sink: what the parent reported, from the catalog's run watermark."""

    def __init__(self) -> None:
        self.total = 0

    def advance(self, n: int) -> None:
        self.total += n


def _start(backend: Any, run_id: int, n_workers: int, bar: _Bar) -> tuple[threading.Thread, dict[str, Any]]:
    """The parent, in a thread (the test thread plays the failure)."""
    out: dict[str, Any] = {}

    def parent() -> None:
        try:
            out["fates"] = run_ray_workers(backend, run_id, n_workers=n_workers, gpu=True, device="cpu", threads=1, workers=0,
                                           progress=bar, poll_s=0.2)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=parent, daemon=True)
    t.start()
    return t, out


def _wait_mid_shard(st: sclstore.Store, run_id: int, out: dict[str, Any], timeout: float = 300) -> Any:
    """The first shard with at least one chunk durably written and more to come."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert "error" not in out, out.get("error")
        for s in st.backend.shards.shards(run_id):
            if s.status == "claimed" and s.lo < s.watermark < s.hi - KW["chunk_cells"]:
                return s
        time.sleep(0.05)
    raise AssertionError("no shard got under way")


def _actors(run_id: int, n: int) -> dict[int, tuple[Any, dict[str, Any]]]:
    """The parent's actors by pid (they are named after the run, their index and the parent's pid)."""
    handles = [ray.get_actor(f"run{run_id}-worker{i}-{os.getpid()}", namespace=ACTOR_NAMESPACE) for i in range(n)]
    infos = ray.get([h.whoami.remote() for h in handles], timeout=120)
    return {info["pid"]: (h, info) for h, info in zip(handles, infos, strict=True)}


def test_a_lost_node_mid_shard_is_taken_over_and_the_bytes_equal_one_ingest(cluster, shared, reference, tmp_path) -> None:
    c, nodes = cluster
    assert ray.cluster_resources().get("GPU") == 2
    with sclstore.open_store(tmp_path / "s", create=True) as st, sclstore.open_store(tmp_path / "s") as watcher:
        sub = st.submit(shared["data"], "tahoe-x1", str(shared["ckpt"]), shard_cells=200, device="cpu", **KW)
        assert [(s.lo, s.hi) for s in st.backend.shards.shards(sub.id)] == SHARDS
        bar = _Bar()
        t, out = _start(st.backend, sub.id, 2, bar)
        victim = _wait_mid_shard(watcher, sub.id, out)
        actors = _actors(sub.id, 2)
        assert set(actors) >= {victim.lease_pid}
        node = next(n for n in nodes if n.node_id == actors[victim.lease_pid][1]["node_id"])
        c.remove_node(node)  # the node is lost with the actor on it, mid-shard
        t.join(timeout=600)
        assert not t.is_alive()
        assert "error" not in out, out.get("error")
        fates = sorted(f.state for f in out["fates"])
        assert fates == ["died", "ended"]
        run = st.run(sub.id)
        assert run.status == "complete" and run.watermark == N_CELLS
        assert bar.total == N_CELLS  # one bar, fed from the catalog
        taken = next(s for s in st.backend.shards.shards(sub.id) if s.idx == victim.idx)
        survivor = next(pid for pid in actors if pid != victim.lease_pid)
        assert (taken.status, taken.attempts, taken.lease_pid) == ("done", 2, survivor)
        assert layer_bytes(st, sub.id) == reference


def test_every_actor_dead_is_a_clear_error_and_a_rerun_resumes(cluster, shared, reference, tmp_path) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st, sclstore.open_store(tmp_path / "s") as watcher:
        sub = st.submit(shared["data"], "tahoe-x1", str(shared["ckpt"]), shard_cells=200, device="cpu", **KW)
        t, out = _start(st.backend, sub.id, 1, _Bar())
        victim = _wait_mid_shard(watcher, sub.id, out)
        (handle, _), = _actors(sub.id, 1).values()
        ray.kill(handle)
        t.join(timeout=300)
        err = out.get("error")
        assert isinstance(err, IngestError), err
        assert f"run {sub.id} is running" in str(err) and "actor 0 died" in str(err) and "rerun" in str(err)
        left = next(s for s in st.backend.shards.shards(sub.id) if s.idx == victim.idx)
        assert left.status == "claimed" and left.watermark >= victim.watermark  # kept every chunk it wrote
        # the rerun takes over the dead actor's shard at its watermark (same host: the pid is gone)
        t, out = _start(st.backend, sub.id, 1, _Bar())
        t.join(timeout=600)
        assert "error" not in out, out.get("error")
        assert st.run(sub.id).status == "complete"
        assert layer_bytes(st, sub.id) == reference


def _mid_shard_of(store: Path, proc: subprocess.Popen[str], timeout: float = 400) -> Any:
    """Wait for the CLI's store, its run, and a shard with a chunk written and more to come."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (store / "catalog.sqlite").exists():
            try:
                with sclstore.open_store(store) as st:
                    for run in st.runs():
                        for s in st.backend.shards.shards(run.id):
                            if s.status == "claimed" and s.lo < s.watermark < s.hi - KW["chunk_cells"]:
                                return s
            except sclstore.SclstoreError:
                pass  # the store is being created
        time.sleep(0.1)
    raise AssertionError("the CLI's actors never got under way")


def test_cli_ingest_with_the_ray_executor_drains_on_sigterm_and_resumes(shared, reference, tmp_path) -> None:
    """``sclstore ingest --devices cpu,cpu --executor ray`` on a local Ray instance, end to end."""
    ray_tmp = tempfile.mkdtemp(prefix="sclray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    store = tmp_path / "cli"
    argv = [sys.executable, "-m", "sclstore.cli", "ingest", str(shared["data"]), "--model", "tahoe-x1", "--checkpoint",
            str(shared["ckpt"]), "--store", str(store), "--devices", "cpu,cpu", "--executor", "ray", "--ray-cpus", "0.5",
            "--chunk-cells", "32", "--batch-size", "8", "--pool", "cls,mean", "--workers", "0", "--shard-cells", "200",
            "--threads", "1", "--json"]
    # SIGTERM mid-shard: the actors release their shards at the next chunk boundary, the local Ray instance stops
    proc = subprocess.Popen(argv, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mid = _mid_shard_of(store, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr
    with sclstore.open_store(store) as st:
        shards = st.backend.shards.shards(mid.run_id)
        assert not [s for s in shards if s.status == "claimed"]  # released, not left to a lease TTL
        kept = next(s for s in shards if s.idx == mid.idx)
        assert kept.status in ("queued", "done") and kept.watermark >= mid.watermark
        assert st.run(mid.run_id).status != "complete"
    assert _no_ray_left(ray_tmp) == [], "the local Ray instance outlived the interrupted command"

    proc2 = subprocess.run(argv, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    res = json.loads(proc2.stdout)  # exactly one JSON document: Ray prints nothing on stdout
    assert res["run_id"] == mid.run_id and res["cells"] == N_CELLS and not res["cache_hit"]
    assert 0 < res["cells_embedded"] < N_CELLS and res["device"] == "cpu,cpu"
    with sclstore.open_store(store) as st:
        assert st.run(res["run_id"]).status == "complete"
        counts = st.backend.shards.counts(res["run_id"])
        assert counts["done"] == len(SHARDS) and sum(counts.values()) == len(SHARDS)
        assert {s.device for s in st.backend.shards.shards(res["run_id"])} == {"cpu"}
        assert layer_bytes(st, res["run_id"]) == reference
    assert _no_ray_left(ray_tmp) == [], "the local Ray instance outlived the command"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _no_ray_left(marker: str, wait_s: float = 30) -> list[str]:
    deadline = time.time() + wait_s
    while _ray_processes(marker) and time.time() < deadline:
        time.sleep(0.5)
    return _ray_processes(marker)


def test_without_ray_installed_the_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(sclstore.InvalidInputError, match=r"pip install 'sclstore\[ray\]'"):
        run_ray_workers(None, 1, n_workers=1, gpu=False, threads=1)  # type: ignore[arg-type]


def test_bad_actor_counts_are_refused_before_ray_starts(monkeypatch) -> None:
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not run"))
    with pytest.raises(sclstore.InvalidInputError, match="--ray-cpus -1"):
        run_ray_workers(None, 1, n_workers=1, gpu=False, threads=1, num_cpus=-1)  # type: ignore[arg-type]
    with pytest.raises(sclstore.InvalidInputError, match="n_workers=0"):
        run_ray_workers(None, 1, n_workers=0, gpu=False, threads=1)  # type: ignore[arg-type]


def test_a_local_instance_is_sized_to_the_cpu_allowance(monkeypatch) -> None:
    from sclstore.ingest import ray_executor
    from sclstore.store import runtime

    allowance = runtime.CpuAllowance(cpus=6, bound_by="affinity", host=64, affinity=6)
    policy = runtime.decide(None, allowance=allowance, env={})
    monkeypatch.setattr(runtime, "active_policy", lambda: policy)
    # 6 CPUs allowed: Ray gets 6; actors reserving more than that raise Ray's CPU count to what they need
    assert ray_executor._local_init_args(2, 1.0, gpu=True) == {"num_cpus": 6, "object_store_memory": 128 * 2**20,
                                                                 "include_dashboard": False}
    assert ray_executor._local_init_args(4, 2.0, gpu=False)["num_cpus"] == 8
    assert ray_executor._local_init_args(1, 1.0, gpu=False)["num_gpus"] == 0

