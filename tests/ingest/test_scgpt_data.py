"""scGPT data path: random-tie binning, tokenizing, subsampling and collating, on hand-computed cells.

Boundaries in the hand cases: ``np.quantile(v, linspace(0, 1, 50))`` of the cell's nonzero values,
so boundary ``i`` sits at sorted position ``i * (n - 1) / 49``. A value ``x`` gets
``ceil(u * (right - left) + left)`` with ``left = #{b <= x}`` and ``right = #{b < x}``
(upstream ``_digitize(side="both")``): ``left`` exactly when no boundary equals ``x``.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclstore.ingest.adapter import GeneMapping, cell_generator
from sclstore.ingest.models.scgpt.data import ScGPTTokenizer, binning, digitize_random
from sclstore.store.errors import InvalidInputError, ModelError


def _uniforms(seed: int, cell: int, n: int) -> np.ndarray:
    """The tie-breaking uniforms a cell's generator draws first."""
    return torch.rand(n, generator=cell_generator(seed, cell), dtype=torch.float64).numpy()


# ---------------------------------------------------------------- digitize / binning
def test_digitize_random_hand_cases() -> None:
    bins = np.array([1.0, 1.0, 1.0, 2.0, 3.0])
    x = np.array([1.0, 1.0, 1.0, 1.5, 2.0, 3.0, 9.0])
    # x=1: left 3, right 0 -> ceil(3 - 3u); 1.5: 3 (no tie); 2: left 4, right 3 -> 4; 3: 5; 9: 5
    u = np.array([0.0, 0.5, 0.99, 0.7, 0.3, 0.999, 0.2])
    assert digitize_random(x, bins, u).tolist() == [3, 2, 1, 3, 4, 5, 5]
    with pytest.raises(ModelError, match="1-d"):
        digitize_random(x, bins, u[:3])


def test_binning_ties_spread_with_the_cells_generator() -> None:
    # 4 values, sorted [1, 1, 1, 2]: boundaries 0..32 are 1 (position 3i/49 <= 2), then rise to 2
    row = np.array([1, 1, 2, 1], dtype=np.float32)
    got = binning(row, generator=cell_generator(3, 17))
    u = _uniforms(3, 17, 4)
    expected = [math.ceil(33 - 33 * u[0]), math.ceil(33 - 33 * u[1]), 50, math.ceil(33 - 33 * u[3])]
    assert got.dtype == np.float32 and got.astype(int).tolist() == expected
    # one value: all 50 boundaries equal it -> uniform over 1..50
    (single,) = binning(np.array([7.0]), generator=cell_generator(0, 5)).astype(int).tolist()
    assert single == math.ceil(50 - 50 * _uniforms(0, 5, 1)[0])


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # boundaries linspace(1, 3, 50): 1 == b0 -> ceil(1 - u) = 1; 2 lies between b24 and b25 -> 25; 3 == b49 -> 50
        ([1, 2, 3], [1, 25, 50]),
        ([6, 2, 4], [50, 1, 25]),
        # zeros stay 0; boundaries over the nonzero values only
        ([0, 3, 1], [0, 50, 1]),
        ([0, 0], [0, 0]),
        ([], []),
    ],
)
def test_binning_without_ambiguous_ties(row: list[float], expected: list[int]) -> None:
    for seed in range(3):
        got = binning(np.asarray(row, dtype=np.float32), generator=cell_generator(seed, 0))
        assert got.astype(int).tolist() == expected


def test_binning_research_example() -> None:
    """research/models.md §1.3 row: ties among the 1s (21 boundaries) and 2s (boundaries 25..28)."""
    row = np.array([1, 1, 1, 2, 3, 5, 8, 13, 1, 2, 40, 1, 1], dtype=np.float32)
    seen_ones: set[int] = set()
    seen_twos: set[int] = set()
    for cell in range(200):
        got = binning(row, generator=cell_generator(0, cell)).astype(int)
        assert got[[4, 5, 6, 7, 10]].tolist() == [33, 37, 41, 45, 50]  # no ties: #boundaries <= x
        u = _uniforms(0, cell, 13)
        ones = [0, 1, 2, 8, 11, 12]
        assert got[ones].tolist() == [math.ceil(21 - 21 * u[i]) for i in ones]
        assert got[[3, 9]].tolist() == [math.ceil(29 - 4 * u[i]) for i in (3, 9)]
        seen_ones.update(got[ones].tolist())
        seen_twos.update(got[[3, 9]].tolist())
    assert seen_ones == set(range(1, 22)) and seen_twos == {26, 27, 28, 29}


@pytest.mark.parametrize("seed", range(4))
def test_binning_matches_a_brute_force_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.negative_binomial(1, 0.2, size=rng.integers(20, 300)) + 1).astype(np.float32)
    got = binning(row, generator=cell_generator(seed, 1)).astype(int)
    srt = np.sort(row.astype(np.float64))
    pos = np.arange(50) * (len(srt) - 1) / 49
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(srt) - 1)
    bounds = srt[lo] + (pos - lo) * (srt[hi] - srt[lo])
    u = _uniforms(seed, 1, len(row))
    for i, v in enumerate(row):
        left, right = int((bounds <= v).sum()), int((bounds < v).sum())
        assert got[i] == math.ceil(u[i] * (right - left) + left), (i, v, left, right)
    assert got.min() >= 1 and got.max() == 50


# ---------------------------------------------------------------- tokenizer
def _tokenizer(max_length: int = 64, n_genes: int = 5) -> ScGPTTokenizer:
    tok = ScGPTTokenizer(cls_id=101, pad_token_id=100, pad_value=-2.0, max_length=max_length)
    ids = np.arange(n_genes, dtype=np.int64)
    return tok.bind(GeneMapping(var_index=ids, token_ids=ids + 10, n_vars=n_genes))


def test_tokenize_structure_hand_case() -> None:
    tok = _tokenizer()
    x = sp.csr_matrix(np.array([[0, 3, 0, 1, 5], [2, 0, 0, 0, 7], [0, 0, 4, 0, 0]], dtype=np.float32))
    r0, r1, r2 = tok.tokenize(x, np.array([7, 8, 9]), seed=0)
    assert [r.cell_idx for r in (r0, r1, r2)] == [7, 8, 9]
    # <cls> first with pad_value, then the nonzero genes in var order, values binned within the cell
    assert r0.gene_ids.tolist() == [101, 11, 13, 14] and r0.values.tolist() == [-2.0, 25.0, 1.0, 50.0]
    assert r1.gene_ids.tolist() == [101, 10, 14] and r1.values.tolist() == [-2.0, 1.0, 50.0]
    # a single gene is tied with all 50 boundaries: its bin is random
    assert r2.gene_ids.tolist() == [101, 12]
    assert r2.values.tolist() == [-2.0, math.ceil(50 - 50 * _uniforms(0, 9, 1)[0])]
    assert tok.seq_len(r0) == 4


def test_tokenize_drops_explicit_zeros_and_sorts_indices() -> None:
    tok = _tokenizer()
    x = sp.csr_matrix((np.array([5.0, 0.0, 3.0, 1.0]), np.array([4, 0, 1, 3]), np.array([0, 4])), shape=(1, 5))
    (rec,) = tok.tokenize(x, np.array([0]), seed=0)
    assert rec.gene_ids.tolist() == [101, 11, 13, 14] and rec.values.tolist() == [-2.0, 25.0, 1.0, 50.0]


def test_empty_cell_is_cls_only() -> None:
    (rec,) = _tokenizer().tokenize(sp.csr_matrix((1, 5), dtype=np.float32), np.array([0]), seed=0)
    assert rec.gene_ids.tolist() == [101] and rec.values.tolist() == [-2.0]


def test_subsampling_bins_first_then_seeded_randperm() -> None:
    n_genes, max_length = 60, 16
    tok, full = _tokenizer(max_length, n_genes), _tokenizer(10_000, n_genes)
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((12, n_genes)) < 0.8) * (rng.poisson(2.0, (12, n_genes)) + 1).astype(np.float32))
    cells = np.arange(100, 112)
    recs, fulls = tok.tokenize(x, cells, seed=5), full.tokenize(x, cells, seed=5)
    for rec, ref, cell in zip(recs, fulls, cells, strict=False):
        n = len(ref)
        assert len(rec) == min(n, max_length) and rec.gene_ids[0] == 101 and rec.values[0] == -2.0
        if n <= max_length:
            np.testing.assert_array_equal(rec.gene_ids, ref.gene_ids)
            continue
        # one generator per cell: n - 1 tie-breaking uniforms, then randperm(n - 1)[: max_length - 1] + 1
        gen = cell_generator(5, int(cell))
        torch.rand(n - 1, generator=gen, dtype=torch.float64)
        perm = torch.randperm(n - 1, generator=gen)[: max_length - 1].numpy() + 1
        np.testing.assert_array_equal(rec.gene_ids[1:], ref.gene_ids[perm])
        np.testing.assert_array_equal(rec.values[1:], ref.values[perm])  # binned over all genes first
    assert sum(len(r) == max_length for r in recs) > 6


def test_tokens_are_per_cell_deterministic_and_batch_independent() -> None:
    tok = _tokenizer(12, 50)
    rng = np.random.default_rng(4)
    x = sp.csr_matrix((rng.random((10, 50)) < 0.7) * rng.integers(1, 4, (10, 50)).astype(np.float32))
    cells = np.arange(500, 510)
    batch = tok.tokenize(x, cells, seed=1)
    for i in reversed(range(10)):
        (alone,) = tok.tokenize(x[i], cells[i : i + 1], seed=1)
        np.testing.assert_array_equal(alone.gene_ids, batch[i].gene_ids)
        np.testing.assert_array_equal(alone.values, batch[i].values)
    other = tok.tokenize(x, cells, seed=2)
    assert any(not np.array_equal(a.values, b.values) for a, b in zip(other, batch, strict=False))
    moved = tok.tokenize(x, cells + 1000, seed=1)
    assert any(not np.array_equal(a.gene_ids, b.gene_ids) for a, b in zip(moved, batch, strict=False))


def test_tokenize_errors_and_pickling() -> None:
    unbound = ScGPTTokenizer(cls_id=1, pad_token_id=0, pad_value=-2, max_length=8)
    with pytest.raises(ModelError, match="map_genes"):
        unbound.tokenize(sp.csr_matrix((1, 5)), np.array([0]), seed=0)
    tok = _tokenizer()
    with pytest.raises(InvalidInputError, match="non-negative"):
        tok.tokenize(sp.csr_matrix(np.array([[1, -1, 0, 0, 0]], dtype=np.float32)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="columns"):
        tok.tokenize(sp.csr_matrix((1, 4)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="max length 1"):
        ScGPTTokenizer(cls_id=1, pad_token_id=0, pad_value=-2, max_length=1)
    blob = pickle.dumps(tok)
    assert len(blob) < 4096 and b"torch" not in blob
    x = sp.csr_matrix(np.array([[1, 2, 2, 0, 9]], dtype=np.float32))
    a, b = pickle.loads(blob).tokenize(x, np.array([3]), seed=0)[0], tok.tokenize(x, np.array([3]), seed=0)[0]
    np.testing.assert_array_equal(a.values, b.values)
