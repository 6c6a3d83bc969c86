"""One neighbour search per representation, reused by every subsample replicate.

The trajectory evaluation reruns kNN graph -> diffusion map -> DPT on ``B`` subsamples of the
cells. The former code searched the neighbours of each subsample from scratch: ``B + 1``
searches per layer, 97-99% of the time. A cell's ``k`` nearest neighbours *within a subsample*
are the first ``k`` members of the subsample in its full-data neighbour list, provided the list
is long enough to hold ``k`` of them. So one search of ``K > k / f`` neighbours on all cells
(subsampling fraction ``f``) gives every subsample's exact kNN lists; the rare cell whose ``K``
full-data neighbours hold fewer than ``k`` subsample members is searched again, exactly, within
the subsample. With an exact search the subsample graphs are the ones a fresh search would
build (``tests/eval/test_knn.py`` checks graphs and scores against the former path); with
pynndescent they are restrictions of one approximate search.

:class:`PrecomputedKnn` hands the lists to ``sc.pp.neighbors`` through scanpy's public
``transformer=`` interface, so connectivities, diffusion map and DPT are scanpy's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from scipy import sparse

from sclstore.store.errors import InvalidInputError

__all__ = ["EXACT_METHODS", "NEIGHBOUR_METHODS", "NeighbourLists", "PrecomputedKnn", "list_length", "neighbour_lists", "restrict",
           "subsample_fraction"]

#: ``sklearn``: exact brute-force search (scanpy's ``transformer="sklearn"``); ``blocked``: exact, by
#: blocked matrix products (:mod:`sclstore.eval.knn_exact`, ~7x faster than ``sklearn`` at 100,000
#: cells x 512 dims); ``pynndescent``: approximate.
NEIGHBOUR_METHODS = ("sklearn", "blocked", "pynndescent")
#: The exact ones.
EXACT_METHODS = ("sklearn", "blocked")


@dataclass(frozen=True, kw_only=True, eq=False)  # holds arrays
class NeighbourLists:
    """Each cell's nearest other cells on the full data.

    Attributes
    ----------
    indices
        ``(n, K)`` neighbour indices, nearest first, the cell itself excluded.
    distances
        ``(n, K)`` Euclidean distances, ascending.
    method
        Search used (``sklearn`` or ``pynndescent``).
    """

    indices: np.ndarray = field(repr=False)
    distances: np.ndarray = field(repr=False)
    method: str


def list_length(n_cells: int, k: int, fraction: float) -> int:
    """Full-data list length ``K`` that holds ``k`` members of a ``fraction`` subsample for nearly every cell.

    ``ceil(k / f) + 15``: at ``k = 30, f = 0.8`` a list of 53 holds fewer than 29 subsample members
    with probability ~5e-6 per cell (binomial), and those cells are searched again anyway.

    Parameters
    ----------
    n_cells, k, fraction
        Cells, neighbours per cell (the cell itself excluded), subsampling fraction.

    Returns
    -------
    int
        ``k`` when ``fraction >= 1`` (the full data only).
    """
    if fraction >= 1.0:  # no subsample: the k nearest are all that is needed
        return int(min(n_cells - 1, k))
    f = max(fraction, 1e-3)
    return int(min(n_cells - 1, math.ceil(k / f) + 15))


def _drop_self(idx: np.ndarray, dist: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    n = idx.shape[0]
    rows = np.arange(n)
    if (idx[:, 0] == rows).all():
        return idx[:, 1:K + 1], dist[:, 1:K + 1]
    out_i, out_d = np.empty((n, K), dtype=idx.dtype), np.empty((n, K), dtype=dist.dtype)
    for i in range(n):  # duplicates can put the cell itself after a tied neighbour
        keep = idx[i] != i
        out_i[i], out_d[i] = idx[i][keep][:K], dist[i][keep][:K]
    return out_i, out_d


def neighbour_lists(X: np.ndarray, K: int, *, method: str = "sklearn", seed: int = 0) -> NeighbourLists:
    """The ``K`` nearest other cells of every cell (Euclidean).

    Parameters
    ----------
    X
        Representation, cells x dim.
    K
        List length (``1 <= K < n``).
    method
        ``sklearn`` (exact, brute force, as ``sc.pp.neighbors(transformer="sklearn")``),
        ``blocked`` (exact, :func:`~sclstore.eval.knn_exact.exact_neighbours`) or ``pynndescent``
        (approximate).
    seed
        Seed of pynndescent.

    Returns
    -------
    NeighbourLists
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if not 1 <= K < n:
        raise InvalidInputError(f"neighbour list length must be between 1 and n_cells - 1 = {n - 1}, got {K}")
    if method == "pynndescent":
        from pynndescent import NNDescent

        index = NNDescent(X, n_neighbors=K + 1, random_state=seed, n_jobs=1)
        idx, dist = index.neighbor_graph
    elif method == "blocked":
        from sclstore.eval.knn_exact import exact_neighbours

        idx, dist = exact_neighbours(X, K)
        return NeighbourLists(indices=idx, distances=dist, method=method)
    elif method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=K + 1, algorithm="brute").fit(X).kneighbors(X)
    else:
        raise InvalidInputError(f"unknown neighbour method {method!r}; pass one of {', '.join(NEIGHBOUR_METHODS)}")
    idx, dist = _drop_self(np.asarray(idx, dtype=np.int64), np.asarray(dist, dtype=np.float32), K)
    return NeighbourLists(indices=idx, distances=dist, method=method)


def restrict(lists: NeighbourLists, X: np.ndarray, subset: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of each subset cell within the subset, from the full-data lists.

    Parameters
    ----------
    lists
        :func:`neighbour_lists` of all cells.
    X
        The representation (for the few cells whose list is too short, searched again exactly).
    subset
        Sorted cell indices of the subsample.
    k
        Neighbours per cell, the cell itself excluded.

    Returns
    -------
    tuple of numpy.ndarray
        ``(indices, distances)`` of shape ``(m, k)`` in subset coordinates, nearest first.
    """
    subset = np.asarray(subset, dtype=np.int64)
    n = lists.indices.shape[0]
    m = subset.shape[0]
    if not 1 <= k < m:
        raise InvalidInputError(f"k must be between 1 and subset size - 1 = {m - 1}, got {k}")
    where = np.full(n, -1, dtype=np.int64)
    where[subset] = np.arange(m)
    out_i = np.empty((m, k), dtype=np.int64)
    out_d = np.empty((m, k), dtype=np.float32)
    short = _first_members(np.asarray(lists.indices, dtype=np.int64), np.asarray(lists.distances, dtype=np.float32), subset, where,
                           out_i, out_d)
    if short.any():  # too few subset members in the full list: exact search within the subset
        from sklearn.neighbors import NearestNeighbors

        Xs = np.ascontiguousarray(X[subset], dtype=np.float32)
        rows = np.flatnonzero(short)
        d, i = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(Xs).kneighbors(Xs[rows])
        for r, di, ii in zip(rows, d, i, strict=False):
            keep = ii != r
            out_i[r], out_d[r] = ii[keep][:k], di[keep][:k]
    return out_i, out_d


@numba.njit(nogil=True, cache=True)
def _first_members(indices: np.ndarray, distances: np.ndarray, subset: np.ndarray, where: np.ndarray, out_i: np.ndarray,
                   out_d: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """Per subset cell, the first ``k`` subset members of its full-data list (subset coordinates).

    Returns a mask of the cells whose list holds fewer than ``k`` members (their rows unfilled).
    """
    m, k = out_i.shape
    short = np.zeros(m, dtype=np.bool_)
    for r in range(m):
        c = 0
        for j in range(indices.shape[1]):
            w = where[indices[subset[r], j]]
            if w >= 0:
                out_i[r, c] = w
                out_d[r, c] = distances[subset[r], j]
                c += 1
                if c == k:
                    break
        short[r] = c < k
    return short


class PrecomputedKnn:
    """A scanpy ``transformer=`` that returns given neighbour lists (scanpy's transformer protocol).

    ``sc.pp.neighbors(adata, transformer=PrecomputedKnn(idx, dist))`` builds the connectivities
    from these lists exactly as from its own search: each row holds the cell itself (distance 0)
    and then its neighbours, nearest first, ``k`` entries in all (as scanpy's exact path keeps).

    Parameters
    ----------
    indices, distances
        ``(m, k - 1)`` neighbours of each cell, the cell itself excluded, nearest first.
    """

    def __init__(self, indices: np.ndarray, distances: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.distances = np.asarray(distances, dtype=np.float32)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The number of neighbours per row, the cell itself included (scanpy reads ``n_neighbors``)."""
        return {"n_neighbors": int(self.indices.shape[1] + 1)}

    def fit_transform(self, X: Any) -> sparse.csr_matrix:
        """The distance graph: per row the cell itself, then its neighbours (explicit zeros kept)."""
        m, kk = self.indices.shape
        if X.shape[0] != m:
            raise InvalidInputError(f"precomputed neighbours are for {m} cells, got {X.shape[0]}")
        ind = np.hstack([np.arange(m, dtype=np.int64)[:, None], self.indices])
        dat = np.hstack([np.zeros((m, 1), dtype=np.float32), self.distances])
        indptr = np.arange(0, m * (kk + 1) + 1, kk + 1)
        return sparse.csr_matrix((dat.ravel(), ind.ravel(), indptr), shape=(m, m))


def subsample_fraction(n_cells: int, subsamples: Sequence[np.ndarray]) -> float:
    """Smallest subsample size over ``n_cells`` (1.0 without subsamples)."""
    return min((len(s) / n_cells for s in subsamples), default=1.0)
