"""Helpers for testing code that uses sclstore (and sclstore's own tests).

Simulators with known answers live in :mod:`sclstore.eval.simulate`; this module re-exports
them next to small builders of AnnData objects and obs tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclstore.eval.simulate import simulate_layers, simulate_perturbseq, simulate_trajectory

__all__ = ["toy_obs", "store_with_layers", "simulate_trajectory", "simulate_perturbseq", "simulate_layers"]


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
    backend.write_block(run, lease, 0, {"cls": layers[:, order], "mean": layers[:, order] * 0.5})
    backend.complete(run, lease, {})
    return backend, run.id
