"""Issue 10 item 5 (evaluation side): an evaluation's cached result is keyed by every parameter
that can change it.

The evaluation functions hash their whole parameter dict. This test changes every keyword of
``evaluate_trajectory`` and ``evaluate_perturbation`` one at a time and checks the key changes
for all of them except where the data come from (``counts_path``: the counts are verified
against the dataset's content hash) and how many processes compute (``n_jobs``).
"""

from __future__ import annotations

import inspect
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sclstore.eval import runner
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store.errors import SclstoreError

EXEMPT = {"counts_path", "n_jobs"}


class _Looked(SclstoreError):
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Backend, int]:
    root = tmp_path_factory.mktemp("evalkeys")
    rng = np.random.default_rng(0)
    n = 40
    obs = pd.DataFrame({
        "time": rng.random(n), "time2": rng.random(n),
        "pert": pd.Categorical(rng.choice(["ctrl", "ctrl2", "A", "B"], n)),
        "pert2": pd.Categorical(rng.choice(["ctrl", "ctrl2", "C"], n)),
        "cond": rng.choice(["x", "y"], n), "rep": rng.choice(["r1", "r2"], n), "rep2": rng.choice(["q1", "q2"], n),
    }, index=[f"c{i:03d}" for i in range(n)])
    path = root / "d.h5ad"
    ad.AnnData(X=sp.csr_matrix(rng.poisson(2, (n, 30)).astype(np.float32)), obs=obs).write_h5ad(path)
    from sclstore.ingest.source import CountsSource

    backend = Backend.create(root / "store")
    with CountsSource(path) as src:
        ds = backend.register_dataset(name="d", content_hash=src.scan(), obs=src.obs, n_vars=src.n_vars, source_path=str(path))
    model = backend.register_model(family="synthetic", name="m", checkpoint_hash=cache_key("m"), n_layers=1, d_model=4, config={})
    run = backend.create_run(dataset=ds, model=model, key=cache_key("r"), params={}, layers=[0, 1],
                             spec=ArraySpec(n_layers=2, n_cells=n, dim=4, pools=("cls", "mean")))
    lease = backend.acquire(run.id, wait=False)
    block = rng.normal(size=(2, n, 4)).astype(np.float32)
    backend.write_block(run, lease, 0, {"cls": block, "mean": block})
    backend.complete(run, lease, {})
    return backend, run.id


def _key(monkeypatch: pytest.MonkeyPatch, backend: Backend, fn: Any, run: int, **kw: Any) -> str:
    seen: list[str] = []

    def lookup(run_id: int, task: str, phash: str) -> None:
        seen.append(f"{run_id}/{task}/{phash}")
        raise _Looked("looked up")

    monkeypatch.setattr(backend, "get_evaluation", lookup)
    with pytest.raises(_Looked):
        fn(backend, run, **kw)
    return seen[0]


TRAJECTORY = {"pseudotime_key": ("time", "time2"), "root_cell": (None, "c003"), "pool": ("cls", "mean"), "n_subsamples": (20, 7),
              "n_neighbors": (30, 11), "reference": (True, False), "seed": (0, 4), "counts_path": (None, "elsewhere.h5ad")}
PERTURBATION = {"perturbation_key": ("pert", "pert2"), "control": ("ctrl", "ctrl2"), "condition_key": (None, "cond"),
                "replicate_key": ("rep", "rep2"), "de_mode": ("pydeseq2", "fast"), "pool": ("cls", "mean"),
                "variant": ("shift", "centroid"), "n_boot": (200, 50), "n_perm": (999, 99), "min_cells": (10, 3),
                "ceiling": (True, False), "n_jobs": (1, 3), "seed": (0, 4), "counts_path": (None, "elsewhere.h5ad")}


@pytest.mark.parametrize(("fn", "table"), [(runner.evaluate_trajectory, TRAJECTORY), (runner.evaluate_perturbation, PERTURBATION)],
                         ids=["trajectory", "perturbation"])
def test_every_parameter_one_at_a_time(store: tuple[Backend, int], monkeypatch: pytest.MonkeyPatch, fn: Any, table: dict[str, Any]) -> None:
    backend, run = store
    keywords = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(table) == keywords  # a new parameter must be added to the table
    base = {k: v[0] for k, v in table.items()}
    first = _key(monkeypatch, backend, fn, run, **base)
    assert _key(monkeypatch, backend, fn, run, **base) == first
    changed = {name for name, (_, alt) in table.items() if _key(monkeypatch, backend, fn, run, **(base | {name: alt})) != first}
    assert changed == keywords - EXEMPT
