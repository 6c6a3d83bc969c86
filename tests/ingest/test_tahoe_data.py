"""Tahoe-X1 data path: binning, tokenizing, subsampling, collating and gene mapping."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from sclstore.ingest.adapter import cell_generator, map_to_vocab
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.tahoe.data import TahoeTokenizer, binning
from sclstore.store.errors import InvalidInputError, ModelError, SclstoreError

Counts = Callable[..., scipy.sparse.csr_matrix]


def ens(n: int) -> list[str]:
    """The fake Ensembl ids of the conftest checkpoints."""
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


# ---------------------------------------------------------------- binning (hand-computed cases)
@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # research/models.md §1.3, verified there against the official collator
        ([1, 1, 1, 2, 3, 5, 8, 13, 1, 2, 40, 1, 1], [1, 1, 1, 26, 34, 38, 42, 46, 1, 26, 50, 1, 1]),
        # all ties -> every boundary equals the value -> lowest bin
        ([5, 5, 5], [1, 1, 1]),
        ([7], [1]),
        # boundaries linspace(1, 2, 50): 1 is <= b0 -> bin 1; 2 first reaches b49 -> bin 50
        ([1, 2], [1, 50]),
        # boundaries 1 + 2 i / 49: 2 first reached at i = 25 -> bin 26
        ([1, 2, 3], [1, 26, 50]),
        ([6, 2, 4], [50, 1, 26]),
        # zeros (never fed at inference) are binned to 1; boundaries over the nonzero values only
        ([0, 3, 1], [1, 50, 1]),
    ],
)
def test_binning_hand_cases(row: list[int], expected: list[int]) -> None:
    got = binning(np.asarray(row, dtype=np.float32))
    assert got.dtype == np.float32
    assert got.astype(int).tolist() == expected


def test_binning_right_sided_hand_case() -> None:
    # right=True: index of the first boundary > value, no +1: 1 -> 1, 2 -> 25, 3 -> 50
    assert binning(np.array([1, 2, 3], dtype=np.float32), right=True).astype(int).tolist() == [1, 25, 50]


@pytest.mark.parametrize("seed", range(5))
def test_binning_matches_numpy_oracle(seed: int) -> None:
    """float64 numpy quantiles + left searchsorted give the same bins as the float32 torch path."""
    rng = np.random.default_rng(seed)
    row = (rng.negative_binomial(1, 0.1, size=rng.integers(20, 400)) + 1).astype(np.float32)
    bounds = np.quantile(row.astype(np.float64), np.linspace(0, 1, 50), method="linear")
    oracle = np.searchsorted(bounds, row, side="left") + 1
    got = binning(row)
    assert got.min() >= 1 and got.max() == 50
    np.testing.assert_array_equal(got.astype(int), oracle)


# ---------------------------------------------------------------- tokenizer
def _tokenizer(max_length: int = 64, keep: int = 1, n_genes: int = 5) -> TahoeTokenizer:
    tok = TahoeTokenizer(
        cls_id=101, pad_token_id=100, pad_value=-2.0, num_bins=51, right_binning=False,
        keep_first_n_tokens=keep, max_length=max_length,
    )
    return tok.bind(map_to_vocab(ens(n_genes), {g: 10 + i for i, g in enumerate(ens(n_genes))},
                                 model="t", min_matched=1))


def test_tokenize_structure_hand_case() -> None:
    tok = _tokenizer()
    counts = scipy.sparse.csr_matrix(np.array([[0, 3, 0, 1, 5], [2, 0, 0, 0, 0]], dtype=np.float32))
    r0, r1 = tok.tokenize(counts, np.array([7, 8]), seed=0)
    assert r0.cell_idx == 7 and r1.cell_idx == 8
    # <cls> first with pad_value, then the nonzero genes in var order, values binned within the cell
    assert r0.gene_ids.tolist() == [101, 11, 13, 14]
    assert r0.values.tolist() == [-2.0, 26.0, 1.0, 50.0]
    assert r1.gene_ids.tolist() == [101, 10] and r1.values.tolist() == [-2.0, 1.0]
    assert tok.seq_len(r0) == 4


def _count_dataset_row(counts: scipy.sparse.csr_matrix, idx: int, gene_ids: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Upstream ``tahoe_x1.data.CountDataset.__getitem__`` (no ``<cls>``): ``row = getrow(idx)``,
    genes ``gene_ids[row.indices]``, values ``row.data`` -- the row's entries as stored."""
    row = counts.getrow(idx)
    return gene_ids[row.indices].tolist(), np.asarray(row.data, dtype=np.float32)


def test_tokenize_keeps_explicit_zeros_and_stored_order_as_official() -> None:
    tok = _tokenizer()
    data = np.array([5.0, 0.0, 3.0, 1.0], dtype=np.float32)
    indices = np.array([4, 0, 1, 3])  # unsorted, with an explicit zero
    counts = scipy.sparse.csr_matrix((data, indices, np.array([0, 4])), shape=(1, 5))
    (rec,) = tok.tokenize(counts, np.array([0]), seed=0)
    genes, values = _count_dataset_row(counts, 0, np.arange(10, 15))
    assert rec.gene_ids.tolist() == [101, *genes] == [101, 14, 10, 11, 13]
    # the explicit zero is a token in bin 1; the other bins are those of the nonzero values
    assert rec.values.tolist() == [-2.0, *binning(values).tolist()] == [-2.0, 50.0, 1.0, 26.0, 1.0]


def test_tokenize_keeps_duplicate_entries_as_two_tokens() -> None:
    tok = _tokenizer()
    counts = scipy.sparse.csr_matrix((np.array([2.0, 3.0, 7.0], dtype=np.float32), np.array([1, 1, 2]),
                                      np.array([0, 3])), shape=(1, 5))
    (rec,) = tok.tokenize(counts, np.array([0]), seed=0)
    genes, values = _count_dataset_row(counts, 0, np.arange(10, 15))
    assert rec.gene_ids.tolist() == [101, *genes] == [101, 11, 11, 12]
    np.testing.assert_array_equal(rec.values[1:], binning(values))


def test_cell_without_genes_is_not_embeddable() -> None:
    tok = _tokenizer()
    counts = scipy.sparse.csr_matrix(np.array([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=np.float32))
    empty, one = tok.tokenize(counts, np.array([0, 1]), seed=0)
    assert empty.gene_ids.tolist() == [101] and not empty.embeddable
    assert one.embeddable
    # an explicit zero is a gene token upstream, so that cell is embedded
    (z,) = tok.tokenize(scipy.sparse.csr_matrix((np.zeros(1, dtype=np.float32), np.array([2]), np.array([0, 1])),
                                                shape=(1, 5)), np.array([0]), seed=0)
    assert z.gene_ids.tolist() == [101, 12] and z.values.tolist() == [-2.0, 1.0] and z.embeddable


def test_tokenize_keep_first_two_feeds_first_gene_raw() -> None:
    """Upstream 3B quirk: with keep_first_n_tokens=2 the first expressed gene is not binned."""
    tok = _tokenizer(keep=2)
    counts = scipy.sparse.csr_matrix(np.array([[0, 9, 1, 2, 3]], dtype=np.float32))
    (rec,) = tok.tokenize(counts, np.array([0]), seed=0)
    assert rec.values.tolist() == [-2.0, 9.0, 1.0, 26.0, 50.0]


def test_tokenize_errors() -> None:
    unbound = TahoeTokenizer(cls_id=1, pad_token_id=0, pad_value=-2, num_bins=51, right_binning=False,
                             keep_first_n_tokens=1, max_length=8)
    with pytest.raises(ModelError, match="map_genes"):
        unbound.tokenize(scipy.sparse.csr_matrix((1, 5)), np.array([0]), seed=0)
    tok = _tokenizer()
    with pytest.raises(InvalidInputError, match="non-negative"):
        tok.tokenize(scipy.sparse.csr_matrix(np.array([[1, -1, 0, 0, 0]], dtype=np.float32)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="columns"):
        tok.tokenize(scipy.sparse.csr_matrix((1, 4)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="max length"):
        TahoeTokenizer(cls_id=1, pad_token_id=0, pad_value=-2, num_bins=51, right_binning=False,
                       keep_first_n_tokens=1, max_length=1)


def test_subsampling_bins_first_then_seeded_randperm(random_counts: Counts) -> None:
    n_genes, max_length = 60, 16
    tok = _tokenizer(max_length=max_length, n_genes=n_genes)
    full = _tokenizer(max_length=10_000, n_genes=n_genes)
    counts = random_counts(12, n_genes, seed=3, density=0.9)
    cells = np.arange(100, 112)
    recs = tok.tokenize(counts, cells, seed=5)
    fulls = full.tokenize(counts, cells, seed=5)
    for rec, ref, cell in zip(recs, fulls, cells, strict=False):
        n = len(ref)
        assert len(rec) == min(n, max_length)
        assert rec.gene_ids[0] == 101 and rec.values[0] == -2.0
        if n <= max_length:
            np.testing.assert_array_equal(rec.gene_ids, ref.gene_ids)
            continue
        # the official algorithm: keep <cls>, then randperm(n - 1)[: max_length - 1] + 1, in that order
        perm = torch.randperm(n - 1, generator=cell_generator(5, int(cell)))[: max_length - 1].numpy() + 1
        np.testing.assert_array_equal(rec.gene_ids[1:], ref.gene_ids[perm])
        # values were binned over all of the cell's genes before subsampling
        np.testing.assert_array_equal(rec.values[1:], ref.values[perm])
    assert any(len(r) == max_length for r in recs)


def test_subsampling_is_per_cell_deterministic_and_batch_independent(random_counts: Counts) -> None:
    tok = _tokenizer(max_length=12, n_genes=50)
    counts = random_counts(10, 50, seed=4, density=0.9)
    cells = np.arange(500, 510)
    batch = tok.tokenize(counts, cells, seed=1)
    # each cell alone, in reverse order, and in another split: identical records
    for i in reversed(range(10)):
        (alone,) = tok.tokenize(counts[i], cells[i : i + 1], seed=1)
        np.testing.assert_array_equal(alone.gene_ids, batch[i].gene_ids)
        np.testing.assert_array_equal(alone.values, batch[i].values)
    resumed = tok.tokenize(counts[6:], cells[6:], seed=1)
    for a, b in zip(resumed, batch[6:], strict=False):
        np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    other_seed = tok.tokenize(counts, cells, seed=2)
    assert any(not np.array_equal(a.gene_ids, b.gene_ids) for a, b in zip(other_seed, batch, strict=False))
    other_cell = tok.tokenize(counts, cells + 1000, seed=1)
    assert any(not np.array_equal(a.gene_ids, b.gene_ids) for a, b in zip(other_cell, batch, strict=False))


def test_tokenizer_pickles_without_weights(tiny_tahoe_hf: Path, random_counts: Counts) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    adapter.map_genes(ens(40))
    blob = pickle.dumps(adapter.tokenizer)
    assert len(blob) < 4096 and b"torch" not in blob
    clone = pickle.loads(blob)
    counts = random_counts(3, 40, seed=0)
    for a, b in zip(clone.tokenize(counts, np.arange(3), seed=0), adapter.tokenizer.tokenize(counts, np.arange(3), seed=0), strict=False):
        np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
        np.testing.assert_array_equal(a.values, b.values)


def test_collate_pads_and_masks(tiny_tahoe_hf: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    adapter.map_genes(ens(40))
    counts = scipy.sparse.csr_matrix(np.array([[1, 2, 3] + [0] * 37, [4] + [0] * 39], dtype=np.float32))
    batch = adapter.collate(adapter.tokenizer.tokenize(counts, np.array([3, 9]), seed=0))
    pad, cls = adapter.vocab["<pad>"], adapter.vocab["<cls>"]
    assert batch.size == 2 and batch.cell_idx.tolist() == [3, 9]
    assert batch.gene_ids.tolist() == [[cls, 0, 1, 2], [cls, 0, pad, pad]]
    assert batch.values.tolist() == [[-2.0, 1.0, 26.0, 50.0], [-2.0, 1.0, -2.0, -2.0]]
    assert batch.padding_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.gene_mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert batch.positions["cls"].tolist() == [0, 0]
    assert batch.to("cpu", non_blocking=True).size == 2


# ---------------------------------------------------------------- gene mapping
def test_map_genes_subset_and_stats(tiny_tahoe_hf: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    genes = ens(40)
    ids = [genes[5], "ENSG99999999999", genes[0] + ".7", genes[39], "ENSG88888888888"]
    mapping = adapter.map_genes(ids * 4)  # 20 ids, 12 known (versions stripped)
    assert mapping.var_index[:3].tolist() == [0, 2, 3]
    assert mapping.token_ids[:3].tolist() == [5, 0, 39]
    assert mapping.stats() == {"n_vars": 20, "n_matched": 12, "matched_fraction": 0.6}


def test_map_genes_symbols_for_ensembl_model(tiny_tahoe_hf: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    with pytest.raises(InvalidInputError, match=r"look like gene symbols.*--gene-column ensembl_id") as err:
        adapter.map_genes(["CD3E", "MS4A1", "LYZ", "NKG7"] * 10)
    assert "\n" not in str(err.value)


def test_map_genes_ensembl_for_symbol_model(tiny_tahoe_factory: Callable[..., Path]) -> None:
    folder = tiny_tahoe_factory(gene_ids=[f"GENE{i}" for i in range(1, 31)])
    adapter = load_adapter("tahoe-x1", folder)
    with pytest.raises(InvalidInputError, match=r"look like Ensembl ids.*--gene-column"):
        adapter.map_genes(ens(30))
    assert adapter.map_genes([f"GENE{i}" for i in range(1, 31)]).n_matched == 30


def test_map_genes_too_few(tiny_tahoe_hf: Path) -> None:
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    ids = ens(40)[:5] + [f"ENSG{7 * 10**9 + i:011d}" for i in range(95)]
    with pytest.raises(SclstoreError, match=r"only 5 of 100 gene ids \(5.0%\)"):
        adapter.map_genes(ids)
    with pytest.raises(InvalidInputError, match="no genes"):
        adapter.map_genes([])
