"""Helpers for query tests: real stores (catalog + TileDB arrays) built from random obs and
known embeddings, plus a plain SQLite obs table for compiler tests.

The embedding oracle is ``emb_src[pool][slot, src_row, :]``: the embedding of the cell that sits
at row ``src_row`` of the source obs. The store orders cells by ``cluster_by``; the oracle maps
back through ``cell_order``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from sclstore.query.spec import OrderItem, Predicate
from sclstore.store import ArraySpec, Backend, ObsColumn
from sclstore.store.obs import build_obs_table, infer_obs_schema, obs_rows

from .oracle import selected


def random_obs(n: int, seed: int, *, with_nulls: bool = True) -> pd.DataFrame:
    """Obs with every kind of column, awkward names, NULLs and tricky strings."""
    rng = np.random.default_rng(seed)
    ct = rng.choice(["T", "B", "NK", "CD4 T", "mono_%", "it's"], size=n).astype(object)
    donor = rng.choice(["d1", "d2", "D1", "x*y", "é"], size=n).astype(object)
    score = rng.normal(size=n).round(3)
    n_genes = rng.integers(-5, 50, size=n)
    flag = rng.random(n) < 0.5
    if with_nulls:
        ct[rng.random(n) < 0.1] = None
        donor[rng.random(n) < 0.1] = None
        score[rng.random(n) < 0.15] = np.nan
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(ct),
            "donor id": donor,
            "score": score,
            "n_genes": n_genes,
            "is_ctrl": flag,
        },
        index=[f"c{i:04d}" for i in range(n)],
    )


@dataclass
class BuiltStore:
    """A store with one dataset and one complete run, and the truth it was built from."""

    backend: Backend
    root: Path
    run_id: int
    obs: pd.DataFrame  # source obs (source row order)
    emb: dict[str, np.ndarray]  # pool -> (n_slots, n_obs, dim), source row order
    layers: tuple[int, ...]
    n_model_layers: int
    order: np.ndarray  # order[cell_idx] = source row
    dataset: str
    model: str

    @property
    def cell_idx_of_src(self) -> np.ndarray:
        inv = np.empty_like(self.order)
        inv[self.order] = np.arange(len(self.order))
        return inv


def build_store(
    root: Path,
    *,
    obs: pd.DataFrame,
    layers: tuple[int, ...] = (0, 2, 3, 5, 8),
    n_model_layers: int = 8,
    dim: int = 6,
    pools: tuple[str, ...] = ("cls", "mean"),
    cluster_by: tuple[str, ...] = ("cell_type",),
    seed: int = 0,
    catalog: str | None = None,
    dataset: str = "toy",
    model: str = "tiny-m",
    dtype: str = "float32",
    consolidate: bool = True,
) -> BuiltStore:
    """Register a dataset, a model and one complete run with random known embeddings.

    ``consolidate=False`` skips TileDB consolidation at completion (it does not change the
    stored values and costs seconds), to keep the test suite fast.
    """
    if not consolidate:
        from unittest import mock

        with mock.patch("sclstore.store.arrays.consolidate", lambda *a, **k: None):
            return build_store(
                root, obs=obs, layers=layers, n_model_layers=n_model_layers, dim=dim, pools=pools,
                cluster_by=cluster_by, seed=seed, catalog=catalog, dataset=dataset, model=model, dtype=dtype,
            )
    backend = Backend.create(root, catalog)
    rng = np.random.default_rng(seed)
    n = obs.shape[0]
    content = hashlib.sha256(f"{dataset}-{seed}-{n}".encode()).hexdigest()
    ds = backend.register_dataset(name=dataset, content_hash=content, obs=obs, n_vars=10, source_path=None, cluster_by=cluster_by)
    m = backend.register_model(family="sclstore-tiny", name=model, checkpoint_hash="ck" + content[:8], n_layers=n_model_layers,
                               d_model=dim, config={})
    emb = {p: rng.normal(size=(len(layers), n, dim)).astype(np.float32) for p in pools}
    if dtype == "float16":  # the truth is what fp16 storage can hold
        emb = {p: e.astype(np.float16).astype(np.float32) for p, e in emb.items()}
    spec = ArraySpec(n_layers=len(layers), n_cells=n, dim=dim, pools=pools, dtype=dtype)  # type: ignore[arg-type]
    run = backend.create_run(dataset=ds, model=m, key=hashlib.sha256(("run" + content).encode()).hexdigest(), params={}, layers=layers, spec=spec)
    lease = backend.acquire(run.id, wait=False)
    assert lease is not None
    order = backend.cell_order(ds.id)
    step = 7
    for start in range(0, n, step):
        src = order[start : start + step]
        backend.write_block(run, lease, start, {p: emb[p][:, src] for p in pools})
    backend.complete(run, lease, {})
    return BuiltStore(backend, root, run.id, obs, emb, layers, n_model_layers, order, dataset, model)


@dataclass
class ObsDB:
    """A real SQLite obs table (the layout the store uses) and its source DataFrame."""

    engine: sa.Engine
    table: sa.Table
    schema: tuple[ObsColumn, ...]
    obs: pd.DataFrame  # row i has cell_idx i


def make_obs_db(obs: pd.DataFrame) -> ObsDB:
    """An in-memory SQLite obs table filled from ``obs`` (cell_idx = row position)."""
    engine = sa.create_engine("sqlite://")
    schema = infer_obs_schema(obs)
    table = build_obs_table("obs_test", schema, sa.MetaData())
    with engine.begin() as conn:
        table.create(conn)
        for rows in obs_rows(obs, schema, np.arange(obs.shape[0])):
            conn.execute(table.insert(), rows)
    return ObsDB(engine, table, schema, obs)


def frame_of(b: BuiltStore) -> pd.DataFrame:
    """Source obs plus the store's ``cell_idx`` of each cell (for the predicate oracle)."""
    return b.obs.assign(__cell_idx=b.cell_idx_of_src)


def expected_rows(b: BuiltStore, pred: Predicate | None, order: list[OrderItem] = [], limit: int | None = None) -> np.ndarray:  # noqa: B006
    """Source rows selected, in the query's output order."""
    frame = frame_of(b).assign(cell=b.obs.index.astype(str)).reset_index(drop=True)
    frame = frame[selected(pred, frame_of(b))]
    frame = frame.sort_values("__cell_idx", kind="mergesort")
    for key in reversed(order):
        col = frame[key.column]
        if isinstance(col.dtype, pd.CategoricalDtype):
            frame = frame.assign(**{key.column: col.astype(object)})
        nulls_first = key.nulls_first if key.nulls_first is not None else not key.desc
        frame = frame.sort_values(key.column, ascending=not key.desc, kind="mergesort", na_position="first" if nulls_first else "last")
    rows = frame.index.to_numpy()
    return rows if limit is None else rows[:limit]


def check_cells(b: BuiltStore, res: Any, rows: np.ndarray, layers: tuple[int, ...], pool: str) -> None:
    """The result equals the oracle: cells ``rows`` (source rows, in order) of ``layers``/``pool``."""
    assert res.layers == layers
    assert res.pool == pool
    assert res.run == b.run_id
    assert list(res.obs.index) == list(b.obs.index[rows])
    np.testing.assert_array_equal(res.cell_idx, b.cell_idx_of_src[rows])
    slots = [b.layers.index(x) for x in layers]
    want = b.emb[pool][slots][:, rows]
    assert res.embeddings.dtype == np.float32
    assert res.embeddings.shape == (len(layers), len(rows), want.shape[2])
    np.testing.assert_array_equal(res.embeddings, want)
