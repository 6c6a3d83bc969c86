"""scFoundation data path: gene list, T/S resolution tokens, value selection, tokenizing, collating.

Expected values are computed by hand from the official ``get_embedding.py`` formulas
(``log1p(x / total * 1e4)``, T per ``tgthighres``, ``S = log10(total)``, keep values > 0).
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclstore.ingest.adapter import TokenRecord, map_to_vocab
from sclstore.ingest.models.scfoundation.data import (
    GENE_LIST_FILE,
    Resolution,
    ScFoundationTokenizer,
    cell_values,
    collate_records,
    empty_rows,
    gather_positive,
    packaged_gene_list,
    read_gene_list,
)
from sclstore.store.errors import CheckpointError, InvalidInputError, ModelError

LIST = ["A", "B", "C", "D", "E", "F", "G", "H"]  # a gene list of 8: T is position 8, S position 9


def _tokenizer(genes: list[str], tgthighres: str = "t4") -> ScFoundationTokenizer:
    vocab = {g: i for i, g in enumerate(LIST)}
    tok = ScFoundationTokenizer(n_genes=len(LIST), resolution=Resolution.parse(tgthighres))
    return tok.bind(map_to_vocab(genes, vocab, model="t", min_matched=1, min_fraction=0.0))


def _f32(x: float) -> float:
    return float(np.float32(x))


# ---------------------------------------------------------------- official value selection
def test_gather_positive_matches_the_official_gather_data_example() -> None:
    """``research/models.md`` §3.3 step 4, verified there against the official ``gatherData``."""
    rows = [[0, 2.3, 0, 1.1, 0, 0.5, 4, 3.2], [1, 0, 0, 0, 0, 0, 4, 3.2]]
    recs = []
    for i, row in enumerate(rows):
        pos, val = gather_positive(np.array(row, dtype=np.float32))
        recs.append(TokenRecord(cell_idx=i, gene_ids=pos, values=val))
    batch = collate_records(recs, pad_value=103.0, pad_position=103)
    expected = np.array([[2.3, 1.1, 0.5, 4, 3.2], [1, 4, 3.2, 103, 103]], dtype=np.float32)
    np.testing.assert_array_equal(batch.values.numpy(), expected)
    assert batch.gene_ids.tolist() == [[1, 3, 5, 6, 7], [0, 6, 7, 103, 103]]
    assert batch.padding_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


@pytest.mark.parametrize(
    ("tgthighres", "t_value"),
    [("t4", 4.0), ("t4.5", 4.5), ("f1", 1.0), ("f2", math.log10(20)), ("a5", 6.0), ("a0.5", 1.5)],
)
def test_hand_computed_cell(tgthighres: str, t_value: float) -> None:
    # dataset order C, A, X (unknown), H, D with counts 3, 1, 9, 0, 6: total over the list = 10
    tok = _tokenizer(["C", "A", "X", "H", "D"], tgthighres)
    counts = sp.csr_matrix(np.array([[3, 1, 9, 0, 6]], dtype=np.float32))
    mapping_cols = [0, 1, 3, 4]  # the pipeline passes X[:, mapping.var_index]
    (rec,) = tok.tokenize(counts[:, mapping_cols], np.array([42]), seed=0)
    assert rec.cell_idx == 42 and rec.values.dtype == np.float32
    # gene-list order A, C, D (H has no count), then T and S = log10(10) = 1
    assert rec.gene_ids.tolist() == [0, 2, 3, 8, 9]
    expected = [math.log1p(1000.0), math.log1p(3000.0), math.log1p(6000.0), t_value, 1.0]
    assert rec.values.tolist() == [_f32(v) for v in expected]
    assert tok.seq_len(rec) == 5


def test_resolution_tokens_at_or_below_zero_are_dropped_as_upstream() -> None:
    tok = _tokenizer(LIST, "t4")
    counts = sp.csr_matrix(np.array([[0, 0, 1, 0, 0, 0, 0, 0], [0] * 8, [0, 0, 0, 0, 0, 0, 1, 1]], dtype=np.float32))
    one, empty, two = tok.tokenize(counts, np.arange(3), seed=0)
    assert one.gene_ids.tolist() == [2, 8] and one.values.tolist() == [_f32(math.log1p(1e4)), 4.0]  # S = log10(1) = 0
    assert empty.gene_ids.tolist() == [8] and empty.values.tolist() == [4.0]  # no genes, S = -inf
    assert two.gene_ids.tolist() == [6, 7, 8, 9] and two.values[-1] == _f32(math.log10(2))
    (none,) = _tokenizer(LIST, "a5").tokenize(counts[1], np.array([0]), seed=0)
    assert len(none) == 0  # a5: T = -inf + 5


def test_cell_values_rounds_float64_once() -> None:
    counts = np.array([0, 7, 0, 13, 1], dtype=np.float64)
    got = cell_values(counts, Resolution.parse("f3"))
    total = 21.0
    expected = [math.log1p(c / total * 1e4) for c in counts] + [math.log10(total * 3), math.log10(total)]
    assert got.dtype == np.float32 and got.tolist() == [_f32(v) for v in expected]


def test_resolution_parse() -> None:
    assert Resolution.parse("t4") == Resolution("t", 4.0) and str(Resolution.parse("t4.0")) == "t4"
    assert Resolution.parse("a-1").tokens(100.0) == (1.0, 2.0)
    assert Resolution.parse("f1e1").tokens(10.0) == (2.0, 1.0)
    for bad in ["x4", "t", "4", "t0", "f-1", "tinf", "", "t 4a"]:
        with pytest.raises(InvalidInputError, match="tgthighres"):
            Resolution.parse(bad)


# ---------------------------------------------------------------- tokenizer mechanics
def test_tokenizer_errors_and_seed_independence() -> None:
    unbound = ScFoundationTokenizer(n_genes=8, resolution=Resolution.parse("t4"))
    with pytest.raises(ModelError, match="map_genes"):
        unbound.tokenize(sp.csr_matrix((1, 8)), np.array([0]), seed=0)
    tok = _tokenizer(LIST)
    with pytest.raises(InvalidInputError, match="non-negative"):
        tok.tokenize(sp.csr_matrix(np.array([[1, -1, 0, 0, 0, 0, 0, 0]], dtype=np.float32)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="columns"):
        tok.tokenize(sp.csr_matrix((1, 7)), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="cell indices"):
        tok.tokenize(sp.csr_matrix((2, 8)), np.array([0]), seed=0)
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, size=(5, 8)).astype(np.float32))
    a = tok.tokenize(counts, np.arange(5), seed=0)
    b = tok.tokenize(counts, np.arange(5) + 100, seed=7)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x.gene_ids, y.gene_ids)
        np.testing.assert_array_equal(x.values, y.values)


def test_tokenizer_pickles_without_weights() -> None:
    tok = _tokenizer(LIST)
    blob = pickle.dumps(tok)
    assert len(blob) < 4096 and b"torch" not in blob
    counts = sp.csr_matrix(np.arange(16, dtype=np.float32).reshape(2, 8))
    clone = pickle.loads(blob)
    for x, y in zip(clone.tokenize(counts, np.arange(2), seed=0), tok.tokenize(counts, np.arange(2), seed=0), strict=False):
        np.testing.assert_array_equal(x.values, y.values)


def test_collate_positions_masks_and_empty_rows() -> None:
    recs = [
        TokenRecord(cell_idx=5, gene_ids=np.array([0, 3, 8, 9]), values=np.array([1, 2, 4, 1.5], dtype=np.float32)),
        TokenRecord(cell_idx=6, gene_ids=np.array([8]), values=np.array([4.0], dtype=np.float32)),
        TokenRecord(cell_idx=7, gene_ids=np.array([], dtype=np.int64), values=np.array([], dtype=np.float32)),
    ]
    batch = collate_records(recs, pad_value=103.0, pad_position=10)
    assert batch.cell_idx.tolist() == [5, 6, 7]
    assert batch.gene_ids.tolist() == [[0, 3, 8, 9], [8, 10, 10, 10], [10, 10, 10, 10]]
    assert batch.values[1].tolist() == [4.0, 103.0, 103.0, 103.0]
    assert batch.padding_mask.tolist() == [[True] * 4, [True, False, False, False], [True, False, False, False]]
    assert batch.gene_mask.tolist() == [[True, True, False, False], [False] * 4, [False] * 4]
    assert batch.positions["T"].tolist() == [2, 0, 0] and batch.positions["S"].tolist() == [3, 0, 0]
    assert empty_rows(batch, 10).tolist() == [False, False, True]
    only_empty = collate_records(recs[2:], pad_value=103.0, pad_position=10)
    assert only_empty.gene_ids.shape == (1, 1) and only_empty.padding_mask.tolist() == [[True]]
    with pytest.raises(ModelError, match="empty list"):
        collate_records([], pad_value=103.0, pad_position=10)
    assert isinstance(batch.pooling_info().gene_mask, torch.Tensor)


# ---------------------------------------------------------------- gene lists
def test_packaged_gene_list_is_the_official_19264() -> None:
    genes = packaged_gene_list()
    assert len(genes) == 19264 == len(set(genes))
    assert genes[:3] == ("A1BG", "A1CF", "A2M") and genes[-3:] == ("ZYX", "ZZEF1", "ZZZ3")
    # upstream order is not plain sorted order: ARL1 follows ARL8B, ZAR1 follows ZAR1L
    assert genes.index("ARL1") == genes.index("ARL8B") + 1 and genes.index("ZAR1") == genes.index("ZAR1L") + 1
    assert {"CD3E", "MS4A1", "LYZ", "NKG7", "MT-ATP6"} <= set(genes)
    digest = hashlib.sha256(GENE_LIST_FILE.read_bytes()).hexdigest()
    assert digest == "ad8756ed4c9c9eff244a6b10686ef671c06fdce4fedb712572a280cb4e6b5544"


def test_read_gene_list_formats_and_errors(tmp_path: Path) -> None:
    tsv = tmp_path / "OS_scRNA_gene_index.3.tsv"
    tsv.write_text("gene_name\tindex\nB\t0\nA\t1\nC\t2\n")
    assert read_gene_list(tsv) == ("B", "A", "C")
    txt = tmp_path / "genes.txt"
    txt.write_text("B\nA\n\nC\n")
    assert read_gene_list(txt) == ("B", "A", "C")
    bad = tmp_path / "bad.tsv"
    bad.write_text("symbol\tindex\nA\t0\n")
    with pytest.raises(CheckpointError, match="no 'gene_name' column"):
        read_gene_list(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("A\nB\nA\n")
    with pytest.raises(CheckpointError, match="repeats gene 'A'"):
        read_gene_list(dup)
