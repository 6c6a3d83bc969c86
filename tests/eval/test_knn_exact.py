"""The blocked exact search equals a float64 brute force (ties by index) and scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from sclstore.eval import knn_exact
from sclstore.eval.knn import neighbour_lists
from sclstore.eval.knn_exact import exact_neighbours
from sclstore.eval.trajectory import GraphOptions, combine_layer_pseudotimes, layer_pseudotimes
from sclstore.store.errors import InvalidInputError


def _oracle(X: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances of every pair, each row sorted by (distance, index), the cell itself excluded."""
    X64 = X.astype(np.float64)
    D = ((X64[:, None, :] - X64[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(X.shape[0]), D.shape), D), axis=1)[:, :K]
    return order, np.sqrt(np.take_along_axis(D, order, axis=1)).astype(np.float32)


@pytest.mark.parametrize(("n", "dim", "K", "block"), [(300, 5, 12, 64), (257, 40, 30, 100), (90, 3, 89, 512), (1000, 64, 53, 128)])
def test_equals_a_float64_brute_force(n: int, dim: int, K: int, block: int) -> None:
    rng = np.random.default_rng(n)
    X = (rng.standard_normal((n, dim)) * 3 + 50).astype(np.float32)  # off-centre: the search centres
    idx, dist = exact_neighbours(X, K, block=block)
    want_i, want_d = _oracle(X, K)
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx, want_i)
    assert np.array_equal(dist, want_d)


def test_duplicate_cells_tie_by_index() -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    X[200:300] = X[:100]  # each of the first 100 cells has a twin at distance 0
    idx, dist = exact_neighbours(X, 10, block=96)
    want_i, want_d = _oracle(X, 10)
    assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert (dist[:100, 0] == 0).all() and (idx[:100, 0] == np.arange(200, 300)).all()


def test_cells_float32_cannot_resolve_are_searched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # two tight clusters far apart: after centring, norms ~1e8 make float32 squared distances err by
    # ~1e3, while neighbours within a cluster are ~1e-4 apart; only the float64 search orders them
    rng = np.random.default_rng(2)
    X = np.vstack([rng.normal(1e4, 1e-2, (150, 6)), rng.normal(-1e4, 1e-2, (150, 6))]).astype(np.float32)
    again: list[int] = []
    real = knn_exact._search_again

    def counting(X: np.ndarray, rows: np.ndarray, *args: object) -> None:
        again.append(len(rows))
        real(X, rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(knn_exact, "_search_again", counting)
    idx, dist = exact_neighbours(X, 7, block=64)
    want_i, want_d = _oracle(X, 7)
    assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert again and again[0] > 250  # nearly every cell needed the float64 search


def test_equals_scikit_learn_and_the_neighbour_lists_method() -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((1500, 32)).astype(np.float32)
    d, i = NearestNeighbors(n_neighbors=21, algorithm="brute").fit(X).kneighbors(X)
    lists = neighbour_lists(X, 20, method="blocked")
    assert lists.method == "blocked"
    assert np.array_equal(lists.indices, i[:, 1:])
    np.testing.assert_allclose(lists.distances, d[:, 1:], rtol=1e-5)


def test_runner_scores_equal_with_either_exact_search() -> None:
    rng = np.random.default_rng(4)
    n = 900
    t = rng.uniform(0, 1, n)
    X = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, 10))].astype(np.float32)
    subs = [np.sort(rng.choice(n, size=720, replace=False)) for _ in range(3)]
    pts = {m: layer_pseudotimes(X, t, subsamples=subs, options=GraphOptions(n_neighbors=15, transformer=m)) for m in ("sklearn", "blocked")}
    np.testing.assert_allclose(pts["blocked"].full, pts["sklearn"].full, rtol=0, atol=1e-6)
    for a, b in zip(pts["blocked"].subsamples, pts["sklearn"].subsamples, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    scores = {m: combine_layer_pseudotimes([p], t, subsamples=subs) for m, p in pts.items()}
    np.testing.assert_allclose(scores["blocked"].resamples_time, scores["sklearn"].resamples_time, rtol=0, atol=1e-9)


def test_bad_input_is_one_clear_error() -> None:
    X = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="between 1 and n_cells - 1 = 9"):
        exact_neighbours(X, 10)
    X[3, 1] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite"):
        exact_neighbours(X, 2)
