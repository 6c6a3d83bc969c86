"""Shared, session-scoped simulated data for the evaluation tests (kept small for CI)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


@pytest.fixture(scope="session")
def traj_adata():
    """A 1,500-cell x 300-gene branching differentiation."""
    from sclstore.eval.simulate import simulate_trajectory

    return simulate_trajectory(n_cells=1500, n_genes=300, seed=0)


@pytest.fixture(scope="session")
def pert_adata():
    """One condition (Rest) of a 24-perturbation screen, 3 donors, 400 genes."""
    from sclstore.eval.simulate import simulate_perturbseq

    return simulate_perturbseq(
        n_perturbations=24, n_genes=400, cells_per_perturbation=40, n_control_cells=300,
        conditions=("Rest",), effect_scale=(1.0,), seed=0,
    )


@pytest.fixture(scope="session")
def pert_de(pert_adata):
    """Labels, pseudobulks and fast DE of ``pert_adata``."""
    from sclstore.eval.de import de_fast, pseudobulk
    from sclstore.eval.perturbation import select_perturbations

    pert = pert_adata.obs["gene"].astype(str).to_numpy()
    donor = pert_adata.obs["donor"].astype(str).to_numpy()
    kept = select_perturbations(pert, donor, "NTC")
    pb, meta = pseudobulk(pert_adata.X, pert, donor, gene_names=pert_adata.var_names)
    return {"pert": pert, "donor": donor, "kept": kept, "pb": pb, "meta": meta,
            "de": de_fast(pb, meta, "NTC", perturbations=kept)}


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
