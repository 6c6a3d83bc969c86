"""Datasets, runs, leases and verify on both catalog backends."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import sclstore
from sclstore.store import ArraySpec, cache_key
from sclstore.store.errors import DatasetError, DuplicateObsNamesError, LeaseHeldError, NotFoundError, RunNotFoundError
from sclstore.store.lease import try_acquire
from sclstore.testing import toy_obs


def _catalog_dump(st: sclstore.Store) -> dict[str, list[tuple]]:
    """Every row of every table: the oracle for 'the store is unchanged'."""
    insp = sa.inspect(st.backend.engine)
    out = {}
    with st.backend.engine.connect() as conn:
        for t in sorted(insp.get_table_names()):
            out[t] = sorted(map(tuple, conn.execute(sa.text(f'SELECT * FROM "{t}"')).all()), key=repr)
    return out


def _register(st: sclstore.Store, obs: pd.DataFrame, *, name: str = "toy", h: str = "a" * 64, cluster_by=()):
    return st.backend.register_dataset(name=name, content_hash=h, obs=obs, n_vars=7, source_path=None, cluster_by=cluster_by)


def test_obs_round_trip_and_cluster_order(store: sclstore.Store) -> None:
    obs = toy_obs(40)
    ds = _register(store, obs, cluster_by=("cell_type", "donor"))
    back = store.backend.read_obs(ds.id)
    expect = obs.reset_index().sort_values(["cell_type", "donor"], kind="mergesort").set_index("index")
    assert list(back.index) == list(expect.index)
    assert list(back["src_idx"]) == [obs.index.get_loc(c) for c in expect.index]
    for col in obs.columns:
        a, b = back[col].reset_index(drop=True), expect[col].reset_index(drop=True)
        if col == "cell_type":
            assert list(a.astype(str)) == list(b.astype(str))
        else:
            pd.testing.assert_series_equal(a, b, check_names=False, check_dtype=False)
    assert back["score"].isna().sum() == obs["score"].isna().sum()
    # contiguous: each cell type is one range of cell_idx
    for _ct, grp in back.groupby("cell_type", observed=True):
        idx = grp["cell_idx"].to_numpy()
        assert idx.max() - idx.min() + 1 == len(idx)


def test_same_data_twice_is_recognised(store: sclstore.Store) -> None:
    a = _register(store, toy_obs())
    b = _register(store, toy_obs(), name="other-name")
    assert a.id == b.id and len(store.datasets()) == 1


def test_name_taken_by_other_data(store: sclstore.Store) -> None:
    _register(store, toy_obs())
    before = _catalog_dump(store)
    with pytest.raises(DatasetError, match="already used by other data: pass another --name"):
        _register(store, toy_obs(seed=1), h="b" * 64)
    assert _catalog_dump(store) == before


def test_duplicate_obs_names_change_nothing(store: sclstore.Store) -> None:
    before = _catalog_dump(store)
    obs = toy_obs()
    obs.index = ["x"] * 2 + list(obs.index[2:])
    with pytest.raises(DuplicateObsNamesError, match="obs names are not unique.*obs_names_make_unique"):
        _register(store, obs)
    assert _catalog_dump(store) == before


def _run(store: sclstore.Store, n: int = 12, dim: int = 8, key: str = "k1"):
    ds = _register(store, toy_obs(n))
    model = store.backend.register_model(family="fake", name="fake-m", checkpoint_hash="c" * 64, n_layers=2, d_model=dim, config={})
    spec = ArraySpec(n_layers=3, n_cells=n, dim=dim, pools=("cls", "mean"))
    return store.backend.create_run(dataset=ds, model=model, key=cache_key(key), params={"p": 1}, layers=[0, 1, 2], spec=spec)


def test_run_lifecycle_and_reads(store: sclstore.Store) -> None:
    run = _run(store)
    assert run.status == "queued" and run.watermark == 0  # a new run waits for its shards to be claimed
    rng = np.random.default_rng(0)
    full = {p: rng.normal(size=(3, 12, 8)).astype(np.float32) for p in ("cls", "mean")}
    lease = store.backend.acquire(run.id, wait=False)
    store.backend.write_block(run, lease, 0, {p: v[:, :8] for p, v in full.items()})
    assert store.run(run.id).watermark == 8
    store.backend.write_block(run, lease, 8, {p: v[:, 8:] for p, v in full.items()})
    done = store.backend.complete(run, lease, {"x": 1})
    assert done.status == "complete" and done.watermark == 12 and done.lease_owner is None
    with store.backend.open_reader(run.id) as rd:
        np.testing.assert_array_equal(rd.read([1], None, "mean"), full["mean"][[1]])
        cells = np.array([0, 3, 4, 5, 11])
        np.testing.assert_array_equal(rd.read([2, 0], cells, "cls"), full["cls"][[2, 0]][:, cells])
    assert store.verify() == [{"run": run.id, "label": "toy/fake-m", "status": "complete", "ok": True, "problems": [], "direct_reads": True}]
    assert store.run("toy/fake-m").id == run.id
    with pytest.raises(RunNotFoundError, match="no run 99; runs: 1=toy/fake-m"):
        store.run(99)


def test_same_cache_key_returns_the_same_run(store: sclstore.Store) -> None:
    a = _run(store)
    b = _run(store)
    assert a.id == b.id and len(store.runs()) == 1
    assert len(list((store.path / "arrays").iterdir())) == 1


def test_lease_is_exclusive_and_stale_leases_are_taken_over(store: sclstore.Store) -> None:
    run = _run(store)
    lease = store.backend.acquire(run.id, wait=False)
    assert try_acquire(store.backend.engine, run.id, ttl_s=60, heartbeat_s=5) is None
    with pytest.raises(LeaseHeldError, match=r"being written by .* pid \d+ .*wait for it"):
        store.backend.acquire(run.id, wait=False)
    lease._stop.set()  # the owner stops beating, like a frozen process on another host
    from sclstore.store.models import Run

    with store.backend.engine.begin() as conn:
        conn.execute(sa.update(Run).values(heartbeat_at=time.time() - 120, lease_host="elsewhere", lease_pid=1))
    other = try_acquire(store.backend.engine, run.id, ttl_s=60, heartbeat_s=5)
    assert other is not None and other.owner != lease.owner
    with pytest.raises(LeaseHeldError, match="lost the lease"):
        store.backend.write_block(run, lease, 0, {p: np.zeros((3, 4, 8)) for p in ("cls", "mean")})
    other.release()


def test_dead_local_owner_is_taken_over_at_once(store: sclstore.Store) -> None:
    import subprocess
    import sys

    run = _run(store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    from sclstore.store.lease import BOOT_ID, HOSTNAME, PID_NAMESPACE
    from sclstore.store.models import Run

    # a holder on this host, this boot and this pid namespace whose pid is gone: taken at once
    # (other namespaces or boots rely on the heartbeat: tests/store/test_lease_namespaces.py)
    with store.backend.engine.begin() as conn:
        conn.execute(sa.update(Run).values(lease_owner="ghost", lease_host=HOSTNAME, lease_pid=int(dead.stdout), heartbeat_at=time.time(),
                                           lease_boot_id=BOOT_ID, lease_pidns=PID_NAMESPACE))
    lease = store.backend.acquire(run.id, wait=False)
    assert lease is not None
    lease.release()


def test_verify_reports_a_deleted_array(store: sclstore.Store) -> None:
    run = _run(store)
    lease = store.backend.acquire(run.id, wait=False)
    store.backend.write_block(run, lease, 0, {p: np.ones((3, 12, 8)) for p in ("cls", "mean")})
    store.backend.complete(run, lease, {})
    shutil.rmtree(run.array_uri)
    before = _catalog_dump(store)
    (report,) = store.verify()
    assert not report["ok"] and "array missing" in report["problems"][0]
    assert _catalog_dump(store) == before


def test_unknown_pool_is_a_clear_error(store: sclstore.Store) -> None:
    run = _run(store)
    lease = store.backend.acquire(run.id, wait=False)
    store.backend.write_block(run, lease, 0, {p: np.ones((3, 12, 8)) for p in ("cls", "mean")})
    store.backend.complete(run, lease, {})
    with store.backend.open_reader(run.id) as rd, pytest.raises(NotFoundError, match="stored pools: cls, mean"):
        rd.read([0], None, "max")


def test_verify_compares_direct_reads_with_libtiledb(store: sclstore.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from sclstore.store.tilefile import TileFile

    run = _run(store)
    lease = store.backend.acquire(run.id, wait=False)
    values = np.random.default_rng(0).normal(size=(3, 12, 8)).astype(np.float32)
    store.backend.write_block(run, lease, 0, {p: values for p in ("cls", "mean")})
    store.backend.complete(run, lease, {})
    (report,) = store.verify()
    assert report["ok"] and report["direct_reads"]
    with store.backend.open_reader(run.id) as rd:
        assert rd.direct
        np.testing.assert_array_equal(rd.read([2, 0], None, "mean"), values[[2, 0]])
    from sclstore.store import Backend, StoreSettings

    with Backend.open(store.backend.root, store.backend.catalog_url, settings=StoreSettings(direct_reads=False)) as off:
        (report,) = off.verify()
        assert report["ok"] and not report["direct_reads"]
        with off.open_reader(run.id) as rd:
            assert not rd.direct
            np.testing.assert_array_equal(rd.read([2, 0], None, "mean"), values[[2, 0]])
    real = TileFile.decode

    def flip(self: TileFile, t0: int, t1: int, dest: np.ndarray, *rest: object) -> None:  # a decoder bug
        real(self, t0, t1, dest, *rest)  # type: ignore[arg-type]
        dest[0, 0] += 1

    monkeypatch.setattr(TileFile, "decode", flip)
    (report,) = store.verify()
    assert not report["ok"] and "differ from libtiledb" in report["problems"][0]
