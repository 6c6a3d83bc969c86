"""Components without a transpose equal scipy's undirected ones; the direct DPT equals ``sc.tl.dpt`` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from sclstore.eval.dpt import _choose_root, _dpt_from_graph, _graph
from sclstore.eval.dpt_direct import components, dpt_pseudotime_from_map
from sclstore.eval.knn import PrecomputedKnn, neighbour_lists


@pytest.mark.parametrize("seed", range(5))
def test_components_equal_scipys_undirected_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    rows, cols = rng.integers(0, n, 200), rng.integers(0, n, 200)  # sparse: many components, isolated cells
    A = sparse.csr_matrix((np.ones(400), (np.r_[rows, cols], np.r_[cols, rows])), shape=(n, n))
    want = connected_components(A, directed=False)[1]
    got = components(A)
    assert want.max() > 10  # the case is not trivial
    assert np.array_equal(got, want)


def _trajectory(n: int, seed: int, gap: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.05, size=(n, 6))]
    X[t > 0.5, 0] += gap  # a gap wider than any neighbour distance cuts the graph in two
    return X.astype(np.float32), t


@pytest.mark.parametrize(("gap", "n_dcs"), [(0.0, 10), (0.0, 4), (50.0, 10)])
def test_the_direct_pseudotime_is_scanpys_bit_for_bit(gap: float, n_dcs: int) -> None:
    X, t = _trajectory(600, 3, gap)
    lists = neighbour_lists(X, 14, method="blocked")
    a = _graph(X, 15, n_dcs, 0, transformer=PrecomputedKnn(lists.indices, lists.distances), eigen_tol=1e-8, direct=True)
    labels = components(a.obsp["connectivities"])
    assert (labels.max() > 0) == (gap > 0)
    m = int(a.uns["sclstore_n_dcs"])
    for root in (int(np.argmin(t)), 17, int(np.argmax(t))):
        want = _dpt_from_graph(a, root)  # scanpy's sc.tl.dpt
        got = dpt_pseudotime_from_map(a.uns["diffmap_evals"][:m], a.obsm["X_diffmap"][:, :m], root, labels)
        assert np.array_equal(got, want)
        assert np.isinf(got).any() == (gap > 0)
    assert _choose_root(a, t, "diffusion-extreme", labels) == _choose_root(a, t, "diffusion-extreme")
