"""Diffusion pseudotime from a diffusion map, without building scanpy's ``Neighbors`` object.

``sc.tl.dpt`` wraps the graph in a ``Neighbors`` object whose constructor runs a connected-components
search (transposing the graph), and the root rule runs another; at 100,000 cells that is ~0.3 s of a
~4 s subsample graph. The per-layer runner's graphs are exactly symmetric (umap's fuzzy union,
:func:`~sclstore.eval.connectivity.umap_connectivities`), so their components come from one
directed search with no transpose (:func:`components`), shared by the root rule and the pseudotime;
:func:`dpt_pseudotime_from_map` then evaluates DPT's distance to the root in scanpy's float32
order, so the pseudotime equals ``sc.tl.dpt``'s bit for bit (``tests/eval/test_dpt_direct.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["STATIONARY", "components", "dpt_pseudotime_from_map"]

#: Eigenvalues at or above this count as stationary (scanpy's cut-off for float32 eigenvalues):
#: their components enter the distance unweighted.
STATIONARY = 0.9994


def components(conn: sparse.csr_matrix) -> np.ndarray:
    """Connected-component label per cell of a symmetric graph, numbered in order of first cell.

    On a symmetric graph the strong components of the directed search are the connected ones;
    numbering them by their first cell gives the labels of scipy's undirected search (which
    labels components as its scan from cell 0 meets them) without transposing the graph.

    Parameters
    ----------
    conn
        Symmetric adjacency (CSR); symmetry is the caller's guarantee.

    Returns
    -------
    numpy.ndarray
        int64 labels, 0 for cell 0's component.
    """
    _, labels = connected_components(conn, directed=True, connection="strong")
    first = np.full(labels.max() + 1, labels.shape[0], dtype=np.int64)
    np.minimum.at(first, labels, np.arange(labels.shape[0]))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    return rank[labels]


def dpt_pseudotime_from_map(evals: np.ndarray, basis: np.ndarray, root: int, labels: np.ndarray) -> np.ndarray:
    """DPT of every cell from ``root``, scaled to a maximum of 1; cells outside the root's component inf.

    The distance is ``sqrt(sum_j (l_j / (1 - l_j) (psi_j(root) - psi_j))^2)`` over the non-stationary
    components plus the unweighted squared differences of the stationary ones, accumulated
    component by component in float32 as ``sc.tl.dpt`` does (Haghverdi et al. 2016; Wolf et al. 2019).

    Parameters
    ----------
    evals, basis
        The diffusion map's eigenvalues (float32, decreasing) and eigenvectors (cells x components),
        already cut to the components DPT uses.
    root
        Root cell.
    labels
        Component label per cell (:func:`components`).

    Returns
    -------
    numpy.ndarray
        float64 pseudotime.
    """
    ev = np.asarray(evals, dtype=np.float32)
    B = np.asarray(basis, dtype=np.float32)
    row = np.zeros(B.shape[0], dtype=np.float32)  # 0 + x is x: the same sums as scanpy's
    stationary = np.zeros(B.shape[0], dtype=np.float32)
    for j in range(ev.size):
        if ev[j] < STATIONARY:
            row += (ev[j] / (1 - ev[j]) * (B[root, j] - B[:, j])) ** 2
        else:
            stationary += (B[root, j] - B[:, j]) ** 2
    row += stationary
    if labels.max() > 0:
        row[labels != labels[root]] = np.inf
    pt = np.sqrt(row)
    with np.errstate(divide="ignore", invalid="ignore"):  # all distances 0 (identical cells): nan, as scanpy's
        pt /= np.max(pt[pt < np.inf])
    return pt.astype(np.float64)
