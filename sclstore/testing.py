"""Helpers for testing code that uses sclstore (and sclstore's own tests).

Simulators with known answers live in :mod:`sclstore.eval.simulate`; this module re-exports
them next to small builders of AnnData objects and obs tables.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclstore.eval.simulate import simulate_layers, simulate_perturbseq, simulate_trajectory

__all__ = ["simulate_layers", "simulate_perturbseq", "simulate_trajectory", "store_snapshot", "store_with_layers", "toy_obs"]


def toy_obs(n: int = 12, seed: int = 0) -> pd.DataFrame:
    """Obs with every kind of column: category, string, int, float (with NaN), bool.

    Parameters
    ----------
    n
        Number of cells (named ``cell000``, ``cell001``, ...).
    seed
        Seed of the random values.
    """
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], size=n)),
            "donor": rng.choice(["d1", "d2"], size=n).astype(object),
            "n_genes": rng.integers(100, 1000, size=n),
            "score": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
            "is_ctrl": rng.random(n) < 0.5,
        },
        index=[f"cell{i:03d}" for i in range(n)],
    )


def store_snapshot(root: str | os.PathLike[str], catalog: str | None = None) -> dict[str, Any]:
    """A dump of every catalog table and a listing of the store folder, for "store unchanged" checks.

    The SQLite catalog inside the store is read without writing anything (``immutable=1`` when
    it has no ``-wal`` file, else ``mode=ro``), so taking a snapshot does not change the listing.

    Parameters
    ----------
    root
        The store folder.
    catalog
        The catalog URL when it is not the SQLite file inside the store.

    Returns
    -------
    dict
        ``{"files": [(relative path, size, mtime_ns), ...], "tables": {name: sorted rows}}``.
    """
    import sqlite3

    import sqlalchemy as sa

    base = Path(root)
    files = sorted(
        (str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in base.rglob("*") if p.is_file()
    )
    tables: dict[str, list[tuple[Any, ...]]] = {}
    if catalog is None:
        db = base / "catalog.sqlite"
        mode = "mode=ro" if db.with_name(db.name + "-wal").exists() else "immutable=1"
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(db.resolve()))}?{mode}", uri=True)
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            for name in names:
                rows = conn.execute(f'SELECT * FROM "{name}"').fetchall()
                tables[name] = sorted(rows, key=repr)
        finally:
            conn.close()
    else:
        engine = sa.create_engine(catalog)
        try:
            with engine.connect() as c:
                for name in sorted(sa.inspect(c).get_table_names()):
                    rows = [tuple(r) for r in c.execute(sa.text(f'SELECT * FROM "{name}"'))]
                    tables[name] = sorted(rows, key=repr)
        finally:
            engine.dispose()
    return {"files": files, "tables": tables}


def store_with_layers(root: str | Path, adata: Any, layers: np.ndarray, *, name: str, cluster_by: tuple[str, ...] = (),
                      key: str = "k") -> tuple[Any, int]:
    """A store under ``root/store`` holding one complete run whose layers are ``layers`` (no model is run).

    ``adata`` (raw counts and obs) is written to ``root/<name>.h5ad`` and registered as the dataset;
    ``layers`` is ``(n_layers, n_cells, dim)`` in the file's cell order; pools ``cls`` (the layers)
    and ``mean`` (half of them). Returns ``(backend, run_id)``: wrap the backend in ``sclstore.Store``.
    """
    from sclstore.ingest.source import CountsSource
    from sclstore.store import ArraySpec, Backend, cache_key

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.h5ad"
    if not path.exists():
        adata.write_h5ad(path)
    backend = Backend.create(root / "store")
    with CountsSource(path) as src:
        ds = backend.register_dataset(name=name, content_hash=src.scan(), obs=src.obs, n_vars=src.n_vars,
                                      source_path=str(path), cluster_by=cluster_by)
    n_layers, n, dim = layers.shape
    model = backend.register_model(family="synthetic", name=f"planted-{key}", checkpoint_hash=cache_key(key), n_layers=n_layers - 1,
                                   d_model=dim, config={})
    run = backend.create_run(dataset=ds, model=model, key=cache_key(name, key), params={}, layers=list(range(n_layers)),
                             spec=ArraySpec(n_layers=n_layers, n_cells=n, dim=dim, pools=("cls", "mean")))
    order = backend.cell_order(ds.id)
    lease = backend.acquire(run.id, wait=False)
    assert lease is not None  # a freshly created run is free to lease
    backend.write_block(run, lease, 0, {"cls": layers[:, order], "mean": layers[:, order] * 0.5})
    backend.complete(run, lease, {})
    return backend, run.id
