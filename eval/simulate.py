"""Seeded simulators with a known answer, for tests and the demo.

* :func:`simulate_trajectory`: a branching differentiation (CLADES/LARRY-like obs: ``day``,
  ``latent_time``, ``fate``, ``cell_type``, ``donor``) with negative-binomial counts.
* :func:`simulate_perturbseq`: a CRISPRi screen in three CD4+ T-cell activation states
  (Zhu et al.-like obs: ``gene`` = target gene symbol or ``"NTC"``, ``condition`` in
  ``Rest``/``Stim8hr``/``Stim48hr``, ``donor``), perturbations hitting gene modules with known
  effects (``adata.varm["true_log2fc_<condition>"]``, genes x perturbations).
* :func:`simulate_layers`: synthetic per-layer embeddings with a planted best layer.

Counts are raw integers stored as float32 in a CSR ``.X``; write a file with
``adata.write_h5ad(path)``. Gene names default to the 765 HGNC symbols of scanpy's bundled
``pbmc68k_reduced`` (the vocabulary of the built-in demo model), so ``n_genes <= 765`` unless
``gene_names`` is given. Designs follow ``research/data_eval.md`` §1.4.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from sclstore.store.errors import InvalidInputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "CONTROL_LABEL",
    "PERTURBSEQ_CONDITIONS",
    "default_gene_names",
    "log_pca",
    "simulate_layers",
    "simulate_perturbseq",
    "simulate_trajectory",
]

logger = logging.getLogger(__name__)

PERTURBSEQ_CONDITIONS: tuple[str, ...] = ("Rest", "Stim8hr", "Stim48hr")
CONTROL_LABEL = "NTC"


@functools.lru_cache(maxsize=1)
def _bundled_symbols() -> tuple[str, ...]:
    import scanpy as sc

    return tuple(str(g) for g in sc.datasets.pbmc68k_reduced().var_names)


def default_gene_names(n_genes: int | None = None) -> list[str]:
    """The gene symbols of scanpy's bundled ``pbmc68k_reduced`` (765), loaded once.

    Parameters
    ----------
    n_genes
        How many (the first ``n_genes``); default all.

    Returns
    -------
    list of str

    Raises
    ------
    InvalidInputError
        If more names are asked for than the bundled 765.
    """
    names = _bundled_symbols()
    if n_genes is None:
        return list(names)
    if not 0 < n_genes <= len(names):
        msg = f"n_genes={n_genes} but only {len(names)} bundled gene symbols exist; pass n_genes<={len(names)} or gene_names=[...]"
        raise InvalidInputError(msg)
    return list(names[:n_genes])


def _gene_names(n_genes: int, gene_names: Sequence[str] | None) -> list[str]:
    if gene_names is None:
        return default_gene_names(n_genes)
    names = [str(g) for g in gene_names]
    if len(names) != n_genes or len(set(names)) != n_genes:
        msg = f"gene_names must be {n_genes} unique names, got {len(names)} ({len(set(names))} unique)"
        raise InvalidInputError(msg)
    return names


def _nb(rng: np.random.Generator, mu: np.ndarray, theta: float) -> sparse.csr_matrix:
    lam = rng.gamma(shape=theta, scale=mu / theta)
    return sparse.csr_matrix(rng.poisson(lam).astype(np.float32))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate_trajectory(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    branch_point: float = 0.4,
    days: Sequence[int] = (2, 4, 6),
    n_donors: int = 2,
    theta: float = 5.0,
    seed: int = 0,
    gene_names: Sequence[str] | None = None,
) -> AnnData:
    """Branching differentiation with negative-binomial counts.

    Latent time ``t ~ U(0, 1)``; after ``branch_point`` cells commit to one of two fates
    (``"monocyte"``, ``"erythroid"``). Gene classes (``var["gene_class"]``): ``trajectory``
    (log-mean = base + amp * sigmoid((t - c) / 0.08)), ``branch`` (switched on after the branch
    point in one fate), ``cycle`` (a nuisance cell-cycle phase) and ``flat``. Size factors
    ``LogNormal(log 2, 0.35)``, small donor effects, counts ``NB(mu, theta)``.

    Parameters
    ----------
    n_cells, n_genes
        Size.
    branch_point
        Latent time of the fate decision.
    days
        Observed sampling days; ``obs["day"]`` is the latent time plus noise, binned into
        equal thirds (LARRY-like day 2/4/6 sampling).
    n_donors
        Donors ``D1..Dn`` (``obs["donor"]``).
    theta
        NB inverse dispersion.
    seed
        Seed.
    gene_names
        Gene names; default the bundled pbmc68k symbols.

    Returns
    -------
    anndata.AnnData
        ``.X`` raw counts (CSR float32 integers); obs ``day`` (int), ``latent_time`` (truth),
        ``fate``, ``cell_type``, ``donor``, ``phase``; var ``gene_class``; ``uns["simulation"]``.
    """
    import anndata as ad

    names = _gene_names(n_genes, gene_names)
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n_cells)
    fate_id = rng.integers(0, 2, n_cells)
    committed = t > branch_point
    phase = rng.uniform(0, 1, n_cells)
    donor = rng.integers(0, n_donors, n_cells)
    classes = rng.choice(["trajectory", "branch", "cycle", "flat"], size=n_genes, p=[0.3, 0.2, 0.1, 0.4])
    base = rng.uniform(-2.0, 1.0, n_genes)
    logmu = np.tile(base, (n_cells, 1))
    for j in np.flatnonzero(classes == "trajectory"):
        amp = rng.uniform(1.5, 3.0) * rng.choice([-1, 1])
        logmu[:, j] += amp * _sigmoid((t - rng.uniform(0.1, 0.9)) / 0.08) - (amp if amp < 0 else 0)
    for j in np.flatnonzero(classes == "branch"):
        f = rng.integers(0, 2)
        on = committed & (fate_id == f)
        logmu[:, j] += on * rng.uniform(1.5, 3.0) * _sigmoid((t - branch_point - rng.uniform(0.05, 0.4)) / 0.05)
    for j in np.flatnonzero(classes == "cycle"):
        logmu[:, j] += rng.uniform(0.5, 1.5) * np.cos(2 * np.pi * (phase + rng.uniform(0, 1)))
    logmu += rng.normal(0, 0.1, (n_donors, n_genes))[donor]
    size = rng.lognormal(np.log(2.0), 0.35, n_cells)
    X = _nb(rng, size[:, None] * np.exp(logmu), theta)
    obs_t = t + rng.normal(0, 0.05, n_cells)
    day = np.asarray(days)[np.digitize(obs_t, np.linspace(0, 1, len(days) + 1)[1:-1])]
    fates = np.array(["monocyte", "erythroid"])
    fate = np.where(committed, fates[fate_id], "uncommitted")
    cell_type = np.where(~committed, "HSPC", np.where(t < branch_point + 0.3, np.char.add(fates[fate_id], " progenitor"), fates[fate_id]))
    obs = pd.DataFrame(
        {
            "day": day.astype(np.int64),
            "latent_time": t,
            "fate": pd.Categorical(fate),
            "cell_type": pd.Categorical(cell_type),
            "donor": pd.Categorical([f"D{i + 1}" for i in donor]),
            "phase": phase,
        },
        index=pd.Index([f"cell{i:05d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"gene_class": pd.Categorical(classes)}, index=pd.Index(names))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["simulation"] = {"kind": "trajectory", "seed": seed, "branch_point": branch_point, "theta": theta}
    return adata


def simulate_perturbseq(
    n_perturbations: int = 24,
    n_genes: int = 500,
    *,
    n_modules: int = 6,
    module_size: int = 25,
    cells_per_perturbation: int = 60,
    n_control_cells: int = 600,
    conditions: Sequence[str] = PERTURBSEQ_CONDITIONS,
    effect_scale: Sequence[float] = (1.0, 1.5, 2.0),
    n_donors: int = 3,
    theta: float = 4.0,
    seed: int = 0,
    gene_names: Sequence[str] | None = None,
) -> AnnData:
    """CRISPRi Perturb-seq screen in several activation states, with known effects.

    Each perturbation knocks down its target gene and hits one of ``n_modules`` gene modules
    with a signed module pattern (times a per-perturbation magnitude) plus 10 private genes, so
    perturbations sharing a module have similar DE profiles. Conditions add a shared
    stimulation program and scale the perturbation effects by ``effect_scale``.

    Parameters
    ----------
    n_perturbations, n_genes
        Size (perturbation names are gene symbols of the vocabulary).
    n_modules, module_size
        Effect modules.
    cells_per_perturbation, n_control_cells
        Cells per perturbation and non-targeting controls, per condition.
    conditions, effect_scale
        Activation states and the effect multiplier of each.
    n_donors
        Donors ``D1..Dn``, spread evenly within every perturbation and the control.
    theta
        NB inverse dispersion.
    seed
        Seed.
    gene_names
        Gene names; default the bundled pbmc68k symbols.

    Returns
    -------
    anndata.AnnData
        ``.X`` raw counts (CSR float32 integers); obs ``gene`` (target symbol or ``"NTC"``),
        ``condition`` (ordered categorical), ``donor``, ``module`` (-1 for controls); var
        ``module``; ``varm["true_log2fc_<condition>"]`` (genes x perturbations DataFrame of the
        planted log2 effects); ``uns["simulation"]``.
    """
    import anndata as ad

    if len(effect_scale) != len(conditions):
        msg = f"effect_scale has {len(effect_scale)} values for {len(conditions)} conditions"
        raise InvalidInputError(msg)
    need = n_modules * module_size + 2 * n_perturbations
    if n_genes < need:
        msg = f"n_genes={n_genes} too small for {n_modules} modules of {module_size} genes and {n_perturbations} targets; pass n_genes>={need}"
        raise InvalidInputError(msg)
    names = _gene_names(n_genes, gene_names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_genes)
    modules = order[: n_modules * module_size].reshape(n_modules, module_size)
    free = order[n_modules * module_size:]
    targets = rng.choice(free, size=n_perturbations, replace=False)
    pert_names = [names[i] for i in targets]
    gene_module = np.full(n_genes, -1)
    for m, g in enumerate(modules):
        gene_module[g] = m
    patterns = rng.normal(0, 1.0, (n_modules, module_size))
    pert_module = np.arange(n_perturbations) % n_modules
    effect = np.zeros((n_perturbations, n_genes))  # natural-log effects at scale 1
    for k in range(n_perturbations):
        m = pert_module[k]
        effect[k, modules[m]] = rng.uniform(0.7, 1.3) * patterns[m] + rng.normal(0, 0.15, module_size)
        private = rng.choice(np.setdiff1d(free, targets[k]), size=10, replace=False)
        effect[k, private] += rng.normal(0, 0.4, 10)
        effect[k, targets[k]] = -2.0
    base = rng.uniform(-2.0, 1.0, n_genes)
    stim = np.zeros(n_genes)
    stim_genes = rng.choice(n_genes, size=n_genes // 10, replace=False)
    stim[stim_genes] = rng.normal(0, 1.0, stim_genes.size)
    stim_level = np.linspace(0.0, 1.2, len(conditions))
    donor_eff = rng.normal(0, 0.1, (n_donors, n_genes))
    labels = [CONTROL_LABEL] * n_control_cells + [p for p in pert_names for _ in range(cells_per_perturbation)]
    kidx = np.array([-1] * n_control_cells + [k for k in range(n_perturbations) for _ in range(cells_per_perturbation)])
    blocks, obs_parts = [], []
    true = {}
    for c, (cond, scale) in enumerate(zip(conditions, effect_scale, strict=False)):
        n = len(labels)
        donor = np.empty(n, dtype=np.int64)  # donors balanced within every perturbation
        for k in range(-1, n_perturbations):
            rows = np.flatnonzero(kidx == k)
            donor[rows] = rng.permutation(np.arange(rows.size) % n_donors)
        logmu = base[None, :] + stim_level[c] * stim[None, :] + donor_eff[donor]
        pert_rows = kidx >= 0
        logmu[pert_rows] += scale * effect[kidx[pert_rows]]
        size = rng.lognormal(np.log(2.0), 0.35, n)
        blocks.append(_nb(rng, size[:, None] * np.exp(logmu), theta))
        obs_parts.append(pd.DataFrame({
            "gene": labels,
            "condition": cond,
            "donor": [f"D{i + 1}" for i in donor],
            "module": np.where(kidx >= 0, pert_module[np.maximum(kidx, 0)], -1),
        }))
        true[cond] = pd.DataFrame((scale * effect / np.log(2)).T, index=pd.Index(names), columns=pd.Index(pert_names))
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = pd.Index([f"cell{i:06d}" for i in range(len(obs))])
    obs["gene"] = pd.Categorical(obs["gene"], categories=[CONTROL_LABEL, *pert_names])
    obs["condition"] = pd.Categorical(obs["condition"], categories=list(conditions), ordered=True)
    obs["donor"] = pd.Categorical(obs["donor"])
    var = pd.DataFrame({"module": gene_module}, index=pd.Index(names))
    adata = ad.AnnData(X=sparse.vstack(blocks, format="csr"), obs=obs, var=var)
    for cond, df in true.items():
        adata.varm[f"true_log2fc_{cond}"] = df
    adata.uns["simulation"] = {
        "kind": "perturbseq", "seed": seed, "theta": theta, "control": CONTROL_LABEL,
        "perturbation_key": "gene", "condition_key": "condition", "replicate_key": "donor",
        "perturbations": list(pert_names), "perturbation_module": [int(m) for m in pert_module],
        "effect_scale": [float(s) for s in effect_scale],
    }
    return adata


def log_pca(counts: np.ndarray | sparse.spmatrix, *, n_comps: int = 20, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised counts (``normalize_total(1e4)``, ``log1p``): a latent for layers.

    Parameters
    ----------
    counts
        Raw counts, cells x genes.
    n_comps
        Components.
    seed
        PCA seed.

    Returns
    -------
    numpy.ndarray
        cells x n_comps.
    """
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(sparse.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=min(n_comps, a.n_vars - 1, a.n_obs - 1), random_state=seed)
    return np.asarray(a.obsm["X_pca"])


def simulate_layers(
    latent: np.ndarray,
    n_layers: int = 12,
    best_layer: int = 6,
    *,
    dim: int = 32,
    width: float = 2.0,
    library_size: np.ndarray | None = None,
    library_strength: float = 1.0,
    noise: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """Synthetic per-layer embeddings with a planted best layer.

    Layer ``l`` = ``w_l * S + noise * (1 - w_l) * N_l + (l / (L - 1)) * library_strength * z(log lib) u``
    with ``w_l = exp(-((l - best_layer) / width)^2)``, ``S`` the standardised latent rotated
    into ``dim`` dimensions, ``N_l`` independent standard normal noise and ``u`` a random unit
    direction (deep layers absorbing a technical signal).

    Parameters
    ----------
    latent
        Signal per cell, cells x k (e.g. :func:`log_pca` of the counts, or the latent time).
    n_layers
        Number of layer matrices returned (indices ``0..n_layers-1``).
    best_layer
        The planted optimum.
    dim
        Embedding width.
    width
        Width of the signal profile over layers.
    library_size
        Per-cell library sizes for the technical direction (omitted when ``None``).
    library_strength
        Scale of the technical direction at the last layer.
    noise
        Scale of the noise term; larger values sharpen the peak of any score around
        ``best_layer`` (scores saturate less on the neighbouring layers).
    seed
        Seed.

    Returns
    -------
    numpy.ndarray
        ``(n_layers, n_cells, dim)`` float32.

    Raises
    ------
    InvalidInputError
        Bad shapes or a best layer outside ``0..n_layers-1``.
    """
    Z = np.asarray(latent, dtype=np.float64)
    if Z.ndim == 1:
        Z = Z[:, None]
    if Z.ndim != 2:
        msg = f"latent must be cells x k, got shape {Z.shape}"
        raise InvalidInputError(msg)
    if not 0 <= best_layer < n_layers:
        msg = f"best_layer={best_layer} outside 0..{n_layers - 1}"
        raise InvalidInputError(msg)
    n, k = Z.shape
    rng = np.random.default_rng(seed)
    sd = Z.std(axis=0)
    Z = (Z - Z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    R = np.linalg.qr(rng.normal(size=(max(dim, k), max(dim, k))))[0][:k, :dim]
    S = Z @ R * np.sqrt(dim / min(k, dim))
    tech = np.zeros((n, dim))
    if library_size is not None:
        lib = np.log(np.asarray(library_size, dtype=np.float64).ravel())
        if lib.shape[0] != n:
            msg = f"library_size has {lib.shape[0]} values for {n} cells"
            raise InvalidInputError(msg)
        u = rng.normal(size=dim)
        tech = ((lib - lib.mean()) / (lib.std() or 1.0))[:, None] * (u / np.linalg.norm(u))[None, :] * np.sqrt(dim)
    out = np.empty((n_layers, n, dim), dtype=np.float32)
    for layer in range(n_layers):
        w = np.exp(-(((layer - best_layer) / width) ** 2))
        depth = layer / max(n_layers - 1, 1)
        out[layer] = w * S + noise * (1 - w) * rng.normal(size=(n, dim)) + depth * library_strength * tech
    return out
