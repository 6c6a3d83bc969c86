"""The split persistence boundary: Backend composes focused repositories and keeps its API.

Oracles: the public method list and signatures Backend had before the split (written out by
hand below), direct SQL counts of the catalog's rows, and hand-computed lease messages.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from sclstore.store import ArraySpec, StoreSettings, cache_key
from sclstore.store.backend import Backend
from sclstore.store.datasets import DatasetRepository
from sclstore.store.errors import CatalogDamagedError, InvalidInputError, LeaseHeldError, NotFoundError, RunNotFoundError
from sclstore.store.model_registry import ModelRepository
from sclstore.store.results_cache import ResultCache
from sclstore.store.run_writer import RunWriter
from sclstore.store.runs import RunRepository
from sclstore.testing import toy_obs

# Backend's public methods before the split (and those added since: get_model, the sharded
# ingest's), with their parameters (other code calls them): they must keep these parameters.
BEFORE = {
    "acquire": ["run_id", "wait", "poll_s"],
    "array_path": ["uri"],
    "cell_order": ["dataset_id"],
    "cell_order_range": ["dataset_id", "lo", "hi"],
    "close": [],
    "complete": ["run", "lease", "stats"],
    "create_run": ["dataset", "model", "key", "params", "layers", "spec", "plan", "shared"],
    "fail": ["run", "lease", "error"],
    "finalise_run": ["run_id", "stats"],
    "find_dataset": ["content_hash"],
    "find_run": ["key"],
    "get_dataset": ["dataset"],
    "get_evaluation": ["run_id", "task", "params_hash"],
    "get_evaluation_by_id": ["evaluation_id"],
    "get_intermediate": ["key_hash"],
    "get_model": ["model_id"],
    "get_run": ["run"],
    "list_datasets": [],
    "list_evaluations": ["run_id"],
    "list_models": [],
    "list_runs": ["dataset", "model", "status"],
    "mark_failed": ["run_id", "error"],
    "obs_index": ["dataset"],
    "obs_table": ["dataset_id"],
    "open_reader": ["run"],
    "put_evaluation": ["run_id", "task", "params_hash", "params", "result"],
    "put_intermediate": ["kind", "key_hash", "params", "payload"],
    "read_obs": ["dataset_id", "cells"],
    "register_dataset": ["name", "content_hash", "obs", "n_vars", "source_path", "cluster_by"],
    "register_model": ["family", "name", "checkpoint_hash", "n_layers", "d_model", "config"],
    "verify": ["run"],
    "write_block": ["run", "lease", "start", "block", "unembeddable"],
    "write_shard_block": ["run", "lease", "start", "block", "unembeddable", "cells_per_s", "peak_rss"],
}


def test_backend_keeps_every_public_method_and_its_parameters() -> None:
    for name, params in BEFORE.items():
        fn = getattr(Backend, name)
        got = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert got == params, name
    for name in ("open", "create", "default_catalog"):
        assert callable(getattr(Backend, name))
    for name in ("root", "settings", "read_only"):
        assert isinstance(inspect.getattr_static(Backend, name), property)


def _rows(b: Backend, table: str) -> int:
    with b.engine.connect() as conn:
        return int(conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar_one())


@pytest.fixture
def backend(tmp_path: Path):
    with Backend.create(tmp_path / "s") as b:
        yield b


def _dataset_model_run(b: Backend, n: int = 6):
    ds = b.register_dataset(name="d", content_hash="a" * 64, obs=toy_obs(n), n_vars=3, source_path=None)
    m = b.register_model(family="fake", name="m", checkpoint_hash="c" * 64, n_layers=1, d_model=4, config={})
    run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1],
                       spec=ArraySpec(n_layers=2, n_cells=n, dim=4, pools=("cls",)))
    return ds, m, run


def test_repositories_work_on_their_own_engine(backend: Backend) -> None:
    ds, m, run = _dataset_model_run(backend)
    # fresh repositories on the same engine (no shared caches) see exactly what Backend wrote
    datasets, models = DatasetRepository(backend.engine), ModelRepository(backend.engine)
    assert datasets.get("d") == ds and datasets.get(ds.id) == ds and datasets.find("a" * 64) == ds
    assert datasets.list_all() == [ds] and models.list_all() == [m]
    assert models.get(m.id) == m and backend.get_model(m.id) == m
    with pytest.raises(NotFoundError, match="no model 99; list them with `sclstore ls models`"):
        models.get(99)
    with pytest.raises(NotFoundError, match="no dataset 'x'; datasets: d"):
        datasets.get("x")
    obs = toy_obs(6)
    frame = datasets.obs_index(ds).frame(None)
    assert list(frame.index) == list(obs.index) and list(frame["src_idx"]) == list(range(6))
    runs = RunRepository(backend.engine, backend.array_store)
    assert runs.get(run.id) == run and runs.get("d/m") == run and runs.find(cache_key("r")) == run
    assert runs.list_all(status="queued") == [run] and runs.list_all(status="complete") == []
    with pytest.raises(RunNotFoundError, match=f"no run 7; runs: {run.id}=d/m \\(queued\\)"):
        runs.get(7)
    with pytest.raises(InvalidInputError, match="is queued \\(0/6 cells\\)"):
        runs.open_reader(run)
    # a writer on its own: lease, two blocks, completion; the reader returns what was written
    writer = RunWriter(backend.engine, backend.array_store, runs)
    lease = writer.acquire(run.id, wait=False)
    assert lease is not None
    values = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    writer.write_block(run, lease, 0, {"cls": values[:, :4]})
    assert runs.get(run.id).watermark == 4
    writer.write_block(run, lease, 4, {"cls": values[:, 4:]}, unembeddable=[5])
    done = writer.complete(run, lease, {"n": 6})
    assert done.status == "complete" and done.watermark == 6 and done.stats == {"n": 6}
    assert writer.acquire(run.id, wait=False) is None  # complete: nothing to lease
    with backend.open_reader(run.id) as rd:
        np.testing.assert_array_equal(rd.read([1, 0], None, "cls"), values[[1, 0]])


def test_backend_settings_reach_the_lease_writer(backend: Backend) -> None:
    _, _, run = _dataset_model_run(backend)
    lease = backend.acquire(run.id, wait=False)
    backend.settings = StoreSettings(lease_ttl_s=42.0, heartbeat_s=1.0)
    assert backend.writer.settings.lease_ttl_s == 42.0
    with pytest.raises(LeaseHeldError, match=r"rerun once its lease expires \(42 s\)"):
        backend.acquire(run.id, wait=False)
    assert lease is not None
    backend.fail(run, lease, "stopped by the test")
    failed = backend.get_run(run.id)
    assert failed.status == "failed" and failed.lease_owner is None


def test_result_cache_skips_writes_when_read_only(backend: Backend) -> None:
    _, _, run = _dataset_model_run(backend)
    backend.put_evaluation(run.id, "t", "h1", {"k": 1}, {"score": 0.5})
    assert backend.get_evaluation(run.id, "t", "h1") == {"score": 0.5}
    assert [e["params"] for e in backend.list_evaluations(run.id)] == [{"k": 1}]
    backend.read_only = "the store is read-only for this user"
    assert backend.results.read_only == backend.read_only
    backend.put_evaluation(run.id, "t", "h2", {"k": 2}, {"score": 0.7})
    backend.put_intermediate("knn", "i" * 64, {}, b"xyz")
    assert _rows(backend, "evaluations") == 1 and _rows(backend, "intermediates") == 0
    backend.read_only = None
    backend.put_intermediate("knn", "i" * 64, {}, b"xyz")
    backend.put_intermediate("knn", "i" * 64, {}, b"xyz")  # identical concurrent insert: harmless
    assert backend.get_intermediate("i" * 64) == b"xyz" and _rows(backend, "intermediates") == 1


def test_repository_errors_are_translated_once(backend: Backend) -> None:
    cache = ResultCache(backend.engine)
    with backend.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE intermediates"))
    for call in (lambda: cache.get_intermediate("x"), lambda: backend.get_intermediate("x")):
        with pytest.raises(CatalogDamagedError) as info:
            call()
        assert "no such table: intermediates" in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value.__cause__, sa.exc.OperationalError)  # translated once, not wrapped twice
