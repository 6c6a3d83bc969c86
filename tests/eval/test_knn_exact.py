"""The blocked exact search equals a float64 brute force (ties by index) and scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from sclstore.eval import knn_blocks, knn_exact
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


PRODUCTS = ("float32", "int8")


@pytest.fixture
def searched_again(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of cells of each float64 search-again call (the search's fallback), recorded."""
    again: list[int] = []
    real = knn_exact._search_again

    def counting(X: np.ndarray, rows: np.ndarray, *args: object) -> None:
        again.append(len(rows))
        real(X, rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(knn_exact, "_search_again", counting)
    return again


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize(("n", "dim", "K", "block"), [(300, 5, 12, 64), (257, 40, 30, 100), (90, 3, 89, 512), (1000, 64, 53, 128)])
def test_equals_a_float64_brute_force(n: int, dim: int, K: int, block: int, products: str) -> None:
    rng = np.random.default_rng(n)
    X = (rng.standard_normal((n, dim)) * 3 + 50).astype(np.float32)  # off-centre: the search centres
    idx, dist = exact_neighbours(X, K, block=block, products=products)
    want_i, want_d = _oracle(X, K)
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert np.array_equal(idx, want_i)
    assert np.array_equal(dist, want_d)


@pytest.mark.parametrize("products", PRODUCTS)
def test_duplicate_cells_tie_by_index(products: str) -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    X[200:300] = X[:100]  # each of the first 100 cells has a twin at distance 0
    idx, dist = exact_neighbours(X, 10, block=96, products=products)
    want_i, want_d = _oracle(X, 10)
    assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert (dist[:100, 0] == 0).all() and (idx[:100, 0] == np.arange(200, 300)).all()


@pytest.mark.parametrize("products", PRODUCTS)
def test_cells_the_products_cannot_resolve_are_searched_again(searched_again: list[int], products: str) -> None:
    # two tight clusters far apart: after centring, norms ~1e8 make float32 squared distances err by
    # ~1e3, and the 16-bit grid's step is ~0.3, while neighbours within a cluster are ~1e-2 apart;
    # only the float64 search orders them
    rng = np.random.default_rng(2)
    X = np.vstack([rng.normal(1e4, 1e-2, (150, 6)), rng.normal(-1e4, 1e-2, (150, 6))]).astype(np.float32)
    idx, dist = exact_neighbours(X, 7, block=64, products=products)
    want_i, want_d = _oracle(X, 7)
    assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert searched_again and searched_again[0] > 250  # nearly every cell needed the float64 search


@pytest.mark.parametrize("products", PRODUCTS)
def test_the_bound_proves_nearly_every_list_on_ordinary_data(searched_again: list[int], products: str) -> None:
    # the bound is not so loose that the search degrades to a float64 brute force
    rng = np.random.default_rng(11)
    X = (rng.standard_normal((2000, 48)) + 20).astype(np.float32)
    idx, _ = exact_neighbours(X, 30, block=256, products=products)
    assert np.array_equal(idx, _oracle(X, 30)[0])
    assert sum(searched_again) <= 0.01 * X.shape[0]


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


@pytest.mark.parametrize("products", PRODUCTS)
def test_threads_find_the_same_lists(products: str) -> None:
    rng = np.random.default_rng(10)
    X = (rng.standard_normal((1100, 24)) * 2 + 7).astype(np.float32)
    one = exact_neighbours(X, 25, block=128, products=products, threads=1)
    want_i, want_d = _oracle(X, 25)
    assert np.array_equal(one[0], want_i) and np.array_equal(one[1], want_d)
    for threads, block in [(2, 128), (3, 100)]:
        idx, dist = exact_neighbours(X, 25, block=block, products=products, threads=threads)
        assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)


def test_int8_products_that_are_not_exact_are_caught(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # a kernel that saturates 16-bit pair sums (as int8 kernels without VNNI or AMX may): the real
    # blocks are checked, and the search falls back to float32 products with the same result
    import torch

    real = torch._int_mm

    def saturating(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        got = real(a, b, out=out)
        out.copy_(got.clamp(-(2**15), 2**15 - 1))  # wrong wherever a product sum leaves int16
        return out

    monkeypatch.setattr(torch, "_int_mm", saturating)
    rng = np.random.default_rng(7)
    X = (rng.standard_normal((300, 16)) * 3).astype(np.float32)
    with caplog.at_level("WARNING", logger="sclstore.eval.knn_exact"):
        idx, dist = exact_neighbours(X, 9, block=128, products="int8")
    want_i, want_d = _oracle(X, 9)
    assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert "not exact on this CPU" in caplog.text


def test_auto_products_are_decided_at_the_searchs_own_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # int8's advantage depends on the width (its int32 outputs cost the same at any width): the
    # decision is timed at the search's width, rounded up to 64, and either choice is exact
    seen: list[int] = []

    def pay(dim: int) -> bool:
        seen.append(dim)
        return len(seen) == 2

    monkeypatch.setattr(knn_exact, "_int8_products_pay", pay)
    X = np.random.default_rng(3).standard_normal((200, 100)).astype(np.float32)
    want_i, want_d = _oracle(X, 5)
    for _ in range(2):  # float32, then int8 products
        idx, dist = exact_neighbours(X, 5)
        assert np.array_equal(idx, want_i) and np.array_equal(dist, want_d)
    assert seen == [128, 128]


def test_int8_products_do_not_pay_where_they_saturate(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    real = torch._int_mm

    def saturating(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        got = real(a, b).clamp(-(2**15), 2**15 - 1)
        return got if out is None else out.copy_(got)

    monkeypatch.setattr(torch, "_int_mm", saturating)
    knn_exact._int8_products_pay.cache_clear()
    try:
        assert knn_exact._int8_products_pay(64) is False
    finally:
        knn_exact._int8_products_pay.cache_clear()


def test_quantised_cells_hold_the_grid_and_its_error() -> None:
    rng = np.random.default_rng(8)
    X = (rng.standard_normal((500, 33)) * [10] + 100).astype(np.float32)
    X[3, 4] = 1e4  # one far coordinate sets the grid step
    a, b, Q, b_norm, s, e = knn_exact._quantised(X)
    q = 256 * a.astype(np.int64) + b
    y = X - X.mean(axis=0, dtype=np.float64)
    assert a.dtype == b.dtype == np.int8 and np.abs(q).max() <= knn_exact._QMAX
    np.testing.assert_array_less(np.abs(y / s - q), 0.5 + 1e-9)  # the nearest grid point
    assert np.array_equal(Q, (q * q).sum(axis=1))
    np.testing.assert_allclose(b_norm, np.linalg.norm(b.astype(np.float64), axis=1), rtol=1e-15)
    np.testing.assert_allclose(e, np.linalg.norm(y - s * q, axis=1), rtol=1e-12)


def test_torch_threads_follow_the_blas_limit_and_are_restored() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=1):
        assert knn_blocks.blas_threads() == 1
        with knn_exact._torch_threads(torch, knn_blocks.blas_threads()):
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_input_is_one_clear_error() -> None:
    X = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="between 1 and n_cells - 1 = 9"):
        exact_neighbours(X, 10)
    X[3, 1] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite"):
        exact_neighbours(X, 2)
    with pytest.raises(InvalidInputError, match="products must be auto, float32 or int8, got 'fp16'"):
        exact_neighbours(np.zeros((10, 3), np.float32), 2, products="fp16")
