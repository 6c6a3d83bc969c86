"""A user who can read a store but not write it (another user's store, a read-only mount).

The CLI runs as the real unprivileged user ``nobody`` (``setpriv``) against a store owned by
root and made readable but not writable; skipped with the reason when the tests are not root.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sclstore.eval.simulate import simulate_layers, simulate_trajectory
from sclstore.ingest.source import CountsSource
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.testing import store_snapshot

NOBODY = 65534
SCLSTORE = str(Path(sys.executable).with_name("sclstore"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run the CLI as the user nobody"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to run as nobody"),
]


def _as_nobody(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sclstore ARGS`` as uid/gid 65534 with no supplementary groups."""
    scratch = base / "scratch"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(scratch),
        "MPLCONFIGDIR": str(scratch / "mpl"),
        "NUMBA_CACHE_DIR": str(scratch / "numba"),
        "SCLSTORE_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SCLSTORE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def _read_only_tree(root: Path) -> None:
    """root-owned, readable and traversable by everyone, writable by nobody else."""
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


@pytest.fixture(scope="module")
def shared_store() -> Iterator[tuple[Path, int, np.ndarray]]:
    """A root-owned store with one complete run whose layer values are known, plus a cached
    trajectory evaluation, at rest (no -wal/-shm) and not writable by other users."""
    base = Path(tempfile.mkdtemp(prefix="sclstore-ro-", dir="/tmp"))
    os.chmod(base, 0o755)
    scratch = base / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o777)
    adata = simulate_trajectory(n_cells=150, n_genes=120, seed=4)
    t = adata.obs["latent_time"].to_numpy()
    layers = simulate_layers(np.column_stack([t, t**2]), n_layers=4, best_layer=2, seed=4)
    data = base / "traj.h5ad"
    adata.write_h5ad(data)
    root = base / "store"
    with Backend.create(root) as b, CountsSource(data) as src:
        ds = b.register_dataset(name="traj", content_hash=src.scan(), obs=src.obs, n_vars=src.n_vars,
                                source_path=str(data), cluster_by=())
        m = b.register_model(family="synthetic", name="planted", checkpoint_hash=cache_key("m"), n_layers=3, d_model=layers.shape[2], config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("run"), params={}, layers=list(range(4)),
                           spec=ArraySpec(n_layers=4, n_cells=150, dim=layers.shape[2], pools=("cls",)))
        lease = b.acquire(run.id, wait=False)
        assert lease is not None
        b.write_block(run, lease, 0, {"cls": layers})
        b.complete(run, lease, {})
        run_id = run.id
    env = {**os.environ, "SCLSTORE_THREADS": "1"}
    res = subprocess.run([SCLSTORE, "eval", "trajectory", str(run_id), "--pseudotime-key", "latent_time", "--bootstrap", "3",
                          "--store", str(root), "--json"], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    (base / "cached.json").write_text(res.stdout)
    _read_only_tree(root)
    os.chmod(data, 0o644)
    yield root, run_id, layers.astype(np.float32)
    shutil.rmtree(base, ignore_errors=True)


def test_store_at_rest_read_by_another_user(shared_store: tuple[Path, int, np.ndarray]) -> None:
    root, run_id, layers = shared_store
    base = root.parent
    assert not list(root.glob("catalog.sqlite-*")), "the store must be at rest: no -wal/-shm files"
    before = store_snapshot(root)

    res = _as_nobody(base, "ls", "runs", "--store", str(root), "--json")
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)
    assert [(r["id"], r["status"], r["n_cells"]) for r in runs] == [(run_id, "complete", 150)]

    res = _as_nobody(base, "verify", "--store", str(root), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True

    out = base / "scratch" / "layer2.npy"
    res = _as_nobody(base, "query", f"SELECT embedding FROM embeddings WHERE run = {run_id} AND layer = 2",
                     "-o", str(out), "--store", str(root), "--json")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(out), layers[2:3])  # the values written, bit for bit

    res = _as_nobody(base, "eval", "trajectory", str(run_id), "--pseudotime-key", "latent_time", "--bootstrap", "3",
                     "--store", str(root), "--json")
    assert res.returncode == 0, res.stderr
    got, cached = json.loads(res.stdout), json.loads((base / "cached.json").read_text())
    assert got.pop("cached") is True and cached.pop("cached") is False
    got.pop("thread_policy"), cached.pop("thread_policy")  # describes the printing process, not the result
    assert got == cached

    # writing commands: one line naming the read-only store, nothing written
    for args in (["init", "--store", str(root)],
                 ["ingest", str(base / "traj.h5ad"), "--model", "sclstore-tiny", "--store", str(root)]):
        res = _as_nobody(base, *args)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "read-only for nobody" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert store_snapshot(root) == before
    assert not list(root.glob("catalog.sqlite-*"))


def test_uncached_eval_by_a_reader_computes_without_caching(shared_store: tuple[Path, int, np.ndarray]) -> None:
    root, run_id, _ = shared_store
    before = store_snapshot(root)
    res = _as_nobody(root.parent, "eval", "trajectory", str(run_id), "--pseudotime-key", "latent_time", "--bootstrap", "2",
                     "--store", str(root), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["cached"] is False and rep["table"]
    assert "result not cached" in res.stderr
    assert store_snapshot(root) == before


def test_store_in_use_by_its_owner_is_readable(shared_store: tuple[Path, int, np.ndarray]) -> None:
    """The owner has the catalog open (-wal and -shm exist, not writable by the reader)."""
    root, run_id, _ = shared_store
    owner = sqlite3.connect(root / "catalog.sqlite")
    try:
        owner.execute("SELECT count(*) FROM runs").fetchall()
        assert (root / "catalog.sqlite-wal").exists() and (root / "catalog.sqlite-shm").exists()
        os.chmod(root / "catalog.sqlite-shm", 0o644)
        os.chmod(root / "catalog.sqlite-wal", 0o644)
        res = _as_nobody(root.parent, "query", f"SELECT cell, embedding FROM embeddings WHERE run = {run_id} AND layer = 1",
                         "--store", str(root), "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["n_cells"] == 150 and summary["layers"] == [1]
    finally:
        owner.close()
