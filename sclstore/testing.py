"""Helpers for testing code that uses sclstore (and sclstore's own tests).

Simulators with known answers live in :mod:`sclstore.eval.simulate`; this module re-exports
them next to small builders of AnnData objects and obs tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sclstore.eval.simulate import simulate_layers, simulate_perturbseq, simulate_trajectory

__all__ = ["toy_obs", "simulate_trajectory", "simulate_perturbseq", "simulate_layers"]


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
