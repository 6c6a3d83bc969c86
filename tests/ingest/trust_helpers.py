"""Helpers of the trust tests (issue 10): hostile pickles, store snapshots, test-module loading."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent


class Evil:
    """Unpickling this object runs ``touch MARKER`` (``os.system``): a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def load_test_module(name: str) -> ModuleType:
    """Import a sibling test module (``test_scgpt_model``) by path, for its checkpoint writers."""
    key = f"_sclstore_trust_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def write_h5ad(path: Path, counts: sp.spmatrix, genes: list[str], *, var: pd.DataFrame | None = None, **kw: Any) -> Path:
    """An .h5ad with ``counts`` as X (CSR), cells ``cell0000...`` and the given gene ids as var index."""
    n = counts.shape[0]
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"condition": pd.Categorical(rng.choice(["a", "b"], size=n))}, index=[f"cell{i:04d}" for i in range(n)])
    var = var if var is not None else pd.DataFrame(index=genes)
    ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var, **kw).write_h5ad(path)
    return path


def snapshot(store: Path) -> dict[str, Any]:
    """Every catalog table (all rows, sorted) and a listing of every file below ``arrays/``."""
    con = sqlite3.connect(f"file:{store / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        dump = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}
    finally:
        con.close()
    arrays = store / "arrays"
    files = sorted((str(p.relative_to(store)), p.stat().st_size) for p in arrays.rglob("*")) if arrays.exists() else []
    others = sorted(p.name for p in store.iterdir() if not p.name.startswith("catalog.sqlite"))
    return {"tables": dump, "arrays": files, "top": others}
