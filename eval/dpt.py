"""Diffusion pseudotime on one representation: kNN graph -> diffusion map -> DPT from a root.

The building blocks of :mod:`sclstore.eval.trajectory`: the graph is ``sc.pp.neighbors`` with an
exact sklearn kNN (``transformer="sklearn"`` avoids the pynndescent/scanpy ``getnnz`` crash on
large inputs), ``random_state=seed``; ``sc.tl.diffmap`` with 10 components; ``sc.tl.dpt`` from a
deterministic root. :func:`reference_pseudotime` is the paper's reference (DPT on 50 PCs of
2,500 HVGs of log-normalised counts; ``research/data_eval.md`` §2.1).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd
from scipy import sparse
from scipy import stats as sps
from scipy.sparse.csgraph import connected_components

from sclstore.eval.knn import EXACT_METHODS, PrecomputedKnn, neighbour_lists
from sclstore.store.errors import EvaluationError, InvalidInputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "EIGSH_TOL",
    "ROOT_RULES",
    "DPTResult",
    "ReferencePseudotime",
    "RootRule",
    "as_time",
    "diffusion_map",
    "dpt_pseudotime",
    "lanczos_vectors",
    "reference_pseudotime",
    "standardize_columns",
]

logger = logging.getLogger(__name__)

RootRule = Literal["diffusion-extreme", "first"]
ROOT_RULES: tuple[str, ...] = get_args(RootRule)


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class DPTResult:
    """Diffusion pseudotime of one representation.

    Attributes
    ----------
    pseudotime
        DPT per cell, scaled to [0, 1] on the root's component; ``inf`` elsewhere.
    root
        Index of the root cell.
    n_components
        Number of connected components of the kNN graph.
    """

    pseudotime: np.ndarray = field(repr=False)
    root: int
    n_components: int


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays: compare fields explicitly
class ReferencePseudotime:
    """The paper's reference pseudotime and the PCA it was computed on.

    Attributes
    ----------
    pseudotime
        DPT per cell on the PCA (``nan`` for cells without counts, ``inf`` off the root's
        graph component).
    pca
        The PCA-of-HVG representation, cells x n_pcs (zeros for cells without counts); score
        it with :func:`~sclstore.eval.trajectory.score_trajectory` as the baseline row.
    root
        Root cell index (into the full input).
    n_genes
        Genes the PCA used (HVGs).
    """

    pseudotime: np.ndarray = field(repr=False)
    pca: np.ndarray = field(repr=False)
    root: int
    n_genes: int


def as_time(time: np.ndarray | pd.Series | Sequence[float]) -> np.ndarray:
    """Convert a time column to float: numbers as they are, ordered categories as their codes.

    Parameters
    ----------
    time
        Numeric values, an ordered categorical, or strings of numbers (``"2"``, ``"4"``).

    Returns
    -------
    numpy.ndarray
        Float array; missing values are ``nan``.

    Raises
    ------
    InvalidInputError
        If the column is not numeric and not an ordered categorical.
    """
    s = time if isinstance(time, pd.Series) else pd.Series(np.asarray(time))
    if isinstance(s.dtype, pd.CategoricalDtype):
        if s.cat.ordered:
            codes = s.cat.codes.to_numpy().astype(float)
            codes[codes < 0] = np.nan
            return codes
        s = s.astype(object)
    if pd.api.types.is_bool_dtype(s.dtype):
        msg = "time column is boolean; pass a numeric or ordered categorical time/pseudotime column"
        raise InvalidInputError(msg)
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna()
    if bad.any():
        example = s[bad].iloc[0]
        msg = (
            f"time column is not numeric (dtype {s.dtype}, e.g. {example!r}); pass a numeric or "
            "ordered categorical time/pseudotime column"
        )
        raise InvalidInputError(msg)
    return num.to_numpy(dtype=float)


def _check_X(X: np.ndarray, n: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        msg = f"embedding must be a 2-d (cells x dim) array, got shape {X.shape}"
        raise InvalidInputError(msg)
    if n is not None and X.shape[0] != n:
        msg = f"embedding has {X.shape[0]} rows but the time column has {n} values; pass one row per cell"
        raise InvalidInputError(msg)
    if not np.isfinite(X).all():
        msg = "embedding holds non-finite values (nan/inf); remove or fix those cells"
        raise InvalidInputError(msg)
    return X


def standardize_columns(X: np.ndarray) -> np.ndarray:
    """Z-score every coordinate (mean 0, sd 1); constant coordinates become 0.

    One coordinate with a large spread (a "rogue dimension") dominates Euclidean kNN; z-scoring
    gives every coordinate the same weight.

    Parameters
    ----------
    X
        cells x dim.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    Z[:, sd == 0] = 0.0
    return Z.astype(np.float32)


#: Relative residual tolerance of the diffusion map's ARPACK eigensolver. scanpy passes 0 (machine
#: precision, ~370 Lanczos products at 16,000 cells); 1e-8 needs ~30% fewer products and moves the
#: float32 eigenvectors it stores by at most a few float32 ulps (DPT within ~1e-7, Spearman within
#: ~1e-8 on the benchmark layers; ``tests/eval/test_diffmap.py``).
EIGSH_TOL = 1e-8


def lanczos_vectors(n: int, k: int) -> int:
    """Lanczos basis size of the fast diffusion map: ``3k + 6`` (scanpy/scipy: ``max(2k + 1, 20)``).

    Diffusion spectra of large kNN graphs are clustered (at 100,000 cells x 512 dims the 10
    eigenvalues of largest magnitude lie within 0.77-0.85 of each other, in +/- pairs); a larger
    basis needs fewer restarts: ~35% fewer products and ~30% less time at ``k = 10`` (36 vectors
    vs 21), the eigenpairs unchanged at the solver tolerance (``tests/eval/test_diffmap.py``).
    """
    return int(min(n - 1, max(3 * k + 6, 20)))


def diffusion_map(a: AnnData, n_comps: int, seed: int, *, tol: float = EIGSH_TOL, v0: np.ndarray | None = None,
                  float64_transitions: bool = False, ncv: int | None = None) -> None:
    """``sc.tl.diffmap`` with a solver tolerance and an optional start vector.

    The same transition matrix (Coifman-Lafon density normalisation, symmetric) and the same
    ``eigsh(which="LM")`` call as scanpy's :func:`scanpy.tl.diffmap`; with ``tol=0`` and ``v0=None``
    (scanpy's seeded normal start) the result is scanpy's bit for bit. Writes
    ``obsm["X_diffmap"]`` and ``uns["diffmap_evals"]`` (float32, decreasing).

    Parameters
    ----------
    a
        AnnData after ``sc.pp.neighbors`` (reads ``obsp["connectivities"]``).
    n_comps
        Eigenpairs to compute.
    seed
        Seed of scanpy's random start vector (used when ``v0`` is ``None``).
    tol
        ARPACK's relative residual tolerance (0: machine precision).
    v0
        Start vector of the Lanczos iteration (e.g. from a larger graph's eigenvectors).
    float64_transitions
        Build the transition matrix in float64 in one pass (:func:`~sclstore.eval.connectivity.transitions_sym`)
        instead of scanpy's float32 diagonal-matrix products (entries agree to float32 rounding),
        and let the solver read only its upper triangle (:class:`~sclstore.eval.symmetric.UpperSymmetric`:
        products ~0.6-0.7x the CSR product's time, equal to rounding).
    ncv
        Lanczos basis size (``None``: scipy's ``max(2k + 1, 20)``, as scanpy; see :func:`lanczos_vectors`).
    """
    from scipy.sparse.linalg import eigsh
    from sklearn.utils import check_random_state

    conn = a.obsp["connectivities"]
    n = conn.shape[0]
    matrix: Any
    if float64_transitions:
        from sclstore.eval.connectivity import transitions_sym
        from sclstore.eval.symmetric import UpperSymmetric

        matrix = UpperSymmetric(transitions_sym(conn))  # exactly symmetric: products read half the matrix
    else:
        dens = np.asarray(conn.sum(axis=0))
        D = sparse.spdiags(1.0 / dens, 0, n, n)
        conn_norm = D @ conn @ D
        z = np.sqrt(np.asarray(conn_norm.sum(axis=0)))
        Z = sparse.spdiags(1.0 / z, 0, n, n)
        matrix = (Z @ conn_norm @ Z).astype(np.float64)
    k = min(n - 1, n_comps)
    start = check_random_state(seed).standard_normal(n) if v0 is None else np.asarray(v0, dtype=np.float64)
    evals, evecs = eigsh(matrix, k=k, which="LM", ncv=None if ncv is None else min(n - 1, max(ncv, k + 1)), v0=start, tol=tol)
    a.obsm["X_diffmap"] = evecs.astype(np.float32)[:, ::-1]
    a.uns["diffmap_evals"] = evals.astype(np.float32)[::-1]


def _graph(X: np.ndarray, n_neighbors: int, n_dcs: int, seed: int, *, transformer: Any = "sklearn",
           diffmap_comps: int | None = None, v0: np.ndarray | None = None, eigen_tol: float = 0.0, direct: bool = False) -> AnnData:
    """kNN graph + diffusion map; ``transformer`` may be a precomputed one (:class:`~sclstore.eval.knn.PrecomputedKnn`).

    ``eigen_tol=0``, ``v0=None`` and ``direct=False`` give ``sc.pp.neighbors`` + ``sc.tl.diffmap`` bit
    for bit (every caller but the per-layer runner); ``eigen_tol > 0`` also enlarges the Lanczos
    basis (:func:`lanczos_vectors`). ``direct=True`` with precomputed neighbours builds the
    connectivities and the transition matrix straight from the lists (:mod:`sclstore.eval.connectivity`:
    the same graph without scanpy's matrix round trips). ``transformer="blocked"`` is an exact
    search like ``"sklearn"``.
    """
    import anndata as ad
    import scanpy as sc

    n = X.shape[0]
    k = min(n_neighbors, n - 1)
    a = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    direct = direct and k >= 2 and isinstance(transformer, PrecomputedKnn)
    if k >= 2 and (transformer in EXACT_METHODS or isinstance(transformer, PrecomputedKnn)):
        if not direct:  # direct: connectivities only, no representation or distance matrix kept
            a.obsm["rep"] = X
        _neighbour_graph(a, X, k, seed, transformer, distances=not direct)
    else:
        a.obsm["rep"] = X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.neighbors(a, n_neighbors=k, use_rep="rep", transformer=transformer, random_state=seed)
    comps = min(diffmap_comps or n_dcs, n - 2)
    diffusion_map(a, comps, seed, v0=v0, tol=eigen_tol, float64_transitions=direct,
                  ncv=lanczos_vectors(n, comps) if eigen_tol > 0 else None)  # the fast solver (tol > 0) only
    a.uns["sclstore_n_dcs"] = int(min(n_dcs, a.obsm["X_diffmap"].shape[1]))
    return a


def _neighbour_graph(a: AnnData, X: np.ndarray, k: int, seed: int, transformer: Any, *, distances: bool = True) -> None:
    """Write what ``sc.pp.neighbors(a, n_neighbors=k, use_rep="rep", transformer=...)`` writes.

    ``distances`` holds each cell's ``k - 1`` neighbours (not written with ``distances=False``:
    the diffusion map reads only the connectivities), ``connectivities`` umap's fuzzy union
    (:func:`~sclstore.eval.connectivity.umap_connectivities`), ``uns["neighbors"]`` scanpy's keys.
    """
    from sclstore.eval.connectivity import umap_connectivities

    if isinstance(transformer, PrecomputedKnn):
        pre = transformer
    else:  # an exact search: scanpy's transformer="sklearn" (tests/eval/test_knn.py) or the blocked one
        lists = neighbour_lists(X, k - 1, method=str(transformer))
        pre = PrecomputedKnn(lists.indices, lists.distances)
    n = X.shape[0]
    m = pre.indices.shape[1]
    if distances:
        a.obsp["distances"] = sparse.csr_matrix((pre.distances.ravel(), pre.indices.ravel(), np.arange(0, n * m + 1, m)),
                                                shape=(n, n))
    a.obsp["connectivities"] = umap_connectivities(*_with_self(pre.indices, pre.distances))
    a.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                          "params": {"n_neighbors": int(m + 1), "method": "umap", "random_state": seed, "metric": "euclidean",
                                     "use_rep": "rep"}}


def _with_self(indices: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists with each cell itself (distance 0) first, as umap takes them."""
    n = indices.shape[0]
    return (np.hstack([np.arange(n, dtype=np.int64)[:, None], np.asarray(indices, dtype=np.int64)]),
            np.hstack([np.zeros((n, 1), dtype=np.float32), np.asarray(distances, dtype=np.float32)]))


def _choose_root(a: AnnData, time: np.ndarray, root: RootRule | int, labels: np.ndarray | None = None) -> int:
    """Root cell index on the graph of ``a`` (AnnData after neighbors + diffmap).

    ``labels``: the graph's component labels when known (:func:`~sclstore.eval.dpt_direct.components`).
    """
    n = a.n_obs
    if not isinstance(root, str):
        r = int(root)
        if not 0 <= r < n:
            msg = f"root cell index {r} out of range for {n} cells; pass 0..{n - 1}"
            raise InvalidInputError(msg)
        return r
    finite = np.isfinite(time)
    if not finite.any():
        msg = "time column has no finite value; pass a numeric time/pseudotime column"
        raise InvalidInputError(msg)
    tmin = np.min(time[finite])
    cand = np.flatnonzero(finite & (time == tmin))
    if root == "first":
        return int(cand[0])
    # diffusion-extreme (scib trajectory_conservation): restrict to the largest component, then
    # each of the diffusion components 1..3 votes for its most extreme candidate, on the side of
    # the component where the candidates lie. Ties (three different picks) are broken by the
    # summed standardised extremeness over the three components, not by cell order: on branching
    # data the order-based tie-break picked branch-point cells in ~20% of subsamples.
    if labels is None:
        _, labels = connected_components(a.obsp["connectivities"], directed=False)
    big = np.bincount(labels).argmax()
    in_big = cand[labels[cand] == big]
    if in_big.size == 0:
        logger.warning("no earliest-time cell lies in the largest graph component; using all of them")
        in_big = cand
    dm = np.asarray(a.obsm["X_diffmap"], dtype=np.float64)
    ref = dm[labels == big]
    votes = np.zeros(in_big.size)
    extreme = np.zeros(in_big.size)
    for j in range(1, min(4, dm.shape[1])):
        vals = dm[in_big, j]
        mu, sd = ref[:, j].mean(), ref[:, j].std()
        side = -1.0 if vals.mean() < mu else 1.0
        votes[np.argmin(vals) if side < 0 else np.argmax(vals)] += 1
        extreme += side * (vals - mu) / (sd if sd > 0 else 1.0)
    top = np.flatnonzero(votes == votes.max())
    return int(in_big[top[int(np.argmax(extreme[top]))]])


def _dpt_from_graph(a: AnnData, root: int) -> np.ndarray:
    import scanpy as sc

    a.uns["iroot"] = int(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.dpt(a, n_dcs=int(a.uns.get("sclstore_n_dcs", a.obsm["X_diffmap"].shape[1])))
    return a.obs["dpt_pseudotime"].to_numpy(dtype=float)


def dpt_pseudotime(
    X: np.ndarray,
    time: np.ndarray | pd.Series | None = None,
    *,
    root: RootRule | int = "diffusion-extreme",
    n_neighbors: int = 30,
    n_dcs: int = 10,
    seed: int = 0,
) -> DPTResult:
    """Diffusion pseudotime on a representation, from a deterministic root.

    Parameters
    ----------
    X
        Representation, cells x dim.
    time
        Ground-truth time per cell (needed by the ``"diffusion-extreme"`` and ``"first"`` rules).
    root
        ``"diffusion-extreme"``: among the earliest-time cells in the largest graph component,
        the one most extreme on diffusion components 1–3 (majority vote, as scib's
        ``trajectory_conservation``; component 0, which only reflects density, is skipped; a
        three-way tie goes to the candidate with the largest summed standardised extremeness).
        ``"first"``: the lowest-index earliest-time cell (the paper's rule). An int: that cell.
    n_neighbors
        k of the kNN graph.
    n_dcs
        Diffusion components computed and used by DPT.
    seed
        ``random_state`` of the neighbour and eigen solvers.

    Returns
    -------
    DPTResult

    Raises
    ------
    InvalidInputError
        On a malformed embedding or time column, an unknown root rule or a bad root index.
    """
    X = _check_X(X)
    if isinstance(root, str) and root not in ROOT_RULES:
        msg = f"unknown root rule {root!r}; pass one of {list(ROOT_RULES)} or a cell index"
        raise InvalidInputError(msg)
    if isinstance(root, str) and time is None:
        msg = f"root rule {root!r} needs the time column; pass time=... or an explicit root index"
        raise InvalidInputError(msg)
    t = as_time(time) if time is not None else np.full(X.shape[0], np.nan)
    if t.shape[0] != X.shape[0]:
        msg = f"embedding has {X.shape[0]} rows but the time column has {t.shape[0]} values"
        raise InvalidInputError(msg)
    if X.shape[0] < 5:
        msg = f"DPT needs at least 5 cells, got {X.shape[0]}"
        raise EvaluationError(msg)
    a = _graph(X, n_neighbors, n_dcs, seed)
    r = _choose_root(a, t, root)
    pt = _dpt_from_graph(a, r)
    ncomp = int(connected_components(a.obsp["connectivities"], directed=False)[0])
    return DPTResult(pseudotime=pt, root=r, n_components=ncomp)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(sps.spearmanr(x[ok], y[ok]).statistic)


def reference_pseudotime(
    counts: np.ndarray | sparse.spmatrix,
    time: np.ndarray | pd.Series,
    *,
    n_top_genes: int = 2500,
    n_pcs: int = 50,
    n_neighbors: int = 30,
    root: RootRule | int = "diffusion-extreme",
    seed: int = 0,
) -> ReferencePseudotime:
    """The paper's reference: DPT on PCA of highly variable genes of log-normalised counts.

    ``normalize_total(1e4)`` -> ``log1p`` -> ``n_top_genes`` HVGs (all genes when there are
    fewer) -> ``n_pcs`` PCs -> kNN (k=30) -> diffmap -> DPT. The PCA matrix is returned too, so
    it can be scored with :func:`score_trajectory` as the PCA-of-counts baseline row.

    Parameters
    ----------
    counts
        Raw counts, cells x genes (dense or sparse).
    time
        Ground-truth time per cell (for the root rule).
    n_top_genes, n_pcs, n_neighbors
        Sizes of the reference pipeline.
    root
        Root rule or index, as in :func:`dpt_pseudotime`.
    seed
        Seed of PCA, neighbours and eigen solvers.

    Returns
    -------
    ReferencePseudotime

    Raises
    ------
    InvalidInputError
        If shapes disagree or the counts are negative.
    """
    import anndata as ad
    import scanpy as sc

    t = as_time(time)
    C = sparse.csr_matrix(counts, dtype=np.float32)
    if C.shape[0] != t.shape[0]:
        msg = f"counts have {C.shape[0]} cells but the time column has {t.shape[0]} values"
        raise InvalidInputError(msg)
    if C.nnz and C.data.min() < 0:
        msg = "counts hold negative values; pass raw counts (e.g. adata.raw.X or a counts layer)"
        raise InvalidInputError(msg)
    keep = np.asarray(C.sum(axis=1)).ravel() > 0
    a = ad.AnnData(C[keep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        if a.n_vars > n_top_genes:
            sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes, subset=True)
        nc = min(n_pcs, a.n_vars - 1, a.n_obs - 1)
        sc.pp.pca(a, n_comps=nc, random_state=seed)
    pca = np.zeros((C.shape[0], nc), dtype=np.float32)
    pca[keep] = a.obsm["X_pca"]
    if isinstance(root, str):
        r: RootRule | int = root
    else:
        if not (0 <= int(root) < C.shape[0] and keep[int(root)]):
            msg = f"root cell {root!r} is out of range or has no counts; pass another cell index"
            raise InvalidInputError(msg)
        r = int(np.cumsum(keep)[int(root)] - 1)
    res = dpt_pseudotime(pca[keep], t[keep], root=r, n_neighbors=n_neighbors, seed=seed)
    pt = np.full(C.shape[0], np.nan)
    pt[keep] = res.pseudotime
    return ReferencePseudotime(pseudotime=pt, pca=pca, root=int(np.flatnonzero(keep)[res.root]), n_genes=int(a.n_vars))
