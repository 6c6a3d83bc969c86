"""Candidate buffers and block scans keep each cell's best values, on one thread or several."""

from __future__ import annotations

import numpy as np
import pytest

from sclstore.eval import knn_blocks


@pytest.mark.parametrize(("n", "block"), [(1000, 128), (1025, 128), (300, 100), (90, 512)])
def test_rounds_hold_every_block_pair_once_and_no_cell_twice(n: int, block: int) -> None:
    starts = range(0, n, block)
    rounds = knn_blocks.rounds(n, block)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == sorted((a, b) for a in starts for b in starts if a <= b)
    for r in rounds:
        blocks = [x for i0, j0 in r for x in {i0, j0}]
        assert len(blocks) == len(set(blocks))  # disjoint: threads never share a cell's list


def test_select_keeps_the_k_smallest_with_their_indices() -> None:
    rng = np.random.default_rng(9)
    for m, k in [(10, 1), (138, 69), (50, 50), (7, 3)]:
        v = rng.integers(0, 20, m).astype(np.float64)  # many ties
        ix = np.arange(m)
        w, j = v.copy(), ix.copy()
        knn_blocks.select(w, j, k)
        assert np.array_equal(np.sort(w[:k]), np.sort(v)[:k]) and w[k - 1] == w[:k].max()
        assert np.array_equal(v[j], w) and np.array_equal(np.sort(j), ix)  # a permutation, pairs kept


@pytest.mark.parametrize(("n", "block", "keep", "threads", "dtype"),
                         [(700, 128, 9, 1, np.float32), (700, 100, 30, 2, np.float32), (513, 64, 12, 3, np.int64), (40, 512, 39, 1, np.int64)])
def test_a_sweep_keeps_each_cells_smallest_values(n: int, block: int, keep: int, threads: int, dtype: type) -> None:
    # a symmetric matrix of distinct values; the oracle: each row's `keep` smallest off the diagonal
    rng = np.random.default_rng(n + keep)
    upper = rng.permutation(n * n).reshape(n, n).astype(dtype)
    D = np.triu(upper, 1) + np.triu(upper, 1).T
    bd, bi, count, thr = knn_blocks.buffers(n, keep, dtype)
    knn_blocks.sweep(n, block, threads, lambda i0, j0, slot: knn_blocks.scan(
        np.ascontiguousarray(D[i0:i0 + block, j0:j0 + block]), i0, j0, i0 == j0, bd, bi, count, keep, thr))
    last = knn_blocks.finish(bd, bi, count, keep)
    off = np.where(np.eye(n, dtype=bool), np.iinfo(np.int64).max, D.astype(np.int64))
    want = np.sort(off, axis=1)[:, :keep]
    got = np.take_along_axis(D, bi[:, :keep], axis=1)
    assert np.array_equal(np.sort(got, axis=1).astype(np.int64), want)
    assert np.array_equal(last, want[:, -1].astype(np.float64))
    assert ((bi[:, :keep] != np.arange(n)[:, None]).all())  # never a cell with itself


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_diagonal_blocks_seed_empty_buffers_and_offer_otherwise(dtype: type) -> None:
    # diagonal blocks first fill the buffers by one selection each; visited last they offer their
    # upper triangle like any block: the same lists either way (oracle: each row's smallest values)
    n, block, keep = 300, 64, 20
    rng = np.random.default_rng(4)
    upper = rng.permutation(n * n).reshape(n, n).astype(dtype)
    D = np.triu(upper, 1) + np.triu(upper, 1).T
    pairs = list(knn_blocks.block_pairs(n, block))
    want = np.sort(np.where(np.eye(n, dtype=bool), np.iinfo(np.int64).max, D.astype(np.int64)), axis=1)[:, :keep]
    for order in (pairs, pairs[::-1]):
        bd, bi, count, thr = knn_blocks.buffers(n, keep, dtype)
        for i0, j0 in order:
            knn_blocks.scan(np.ascontiguousarray(D[i0:i0 + block, j0:j0 + block]), i0, j0, i0 == j0, bd, bi, count, keep, thr)
        knn_blocks.finish(bd, bi, count, keep)
        got = np.sort(np.take_along_axis(D, bi[:, :keep], axis=1), axis=1).astype(np.int64)
        assert np.array_equal(got, want)
        assert (thr >= want[:, -1]).all()  # a threshold is never below the list's last (what the proof uses)
