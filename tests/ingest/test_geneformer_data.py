"""Geneformer data path: median-normalised rank encoding, truncation, totals, collating."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclstore.ingest.adapter import GeneMapping
from sclstore.ingest.models.geneformer.data import GeneformerTokenizer, collate_geneformer, official_gene_layout
from sclstore.store.errors import InvalidInputError, ModelError

CLS, EOS = 2, 3
MEDIANS = [1.0, 2.0, 0.25, 5.0, 1.0]


def _mapping(tokens: list[int]) -> GeneMapping:
    n = len(tokens)
    return GeneMapping(var_index=np.arange(n), token_ids=np.asarray(tokens, dtype=np.int64), n_vars=n)


def _tok(version: str = "V1", max_length: int = 64, tokens: list[int] | None = None,
         medians: list[float] | None = None) -> GeneformerTokenizer:
    v2 = version == "V2"
    tok = GeneformerTokenizer(max_length=max_length, cls_id=CLS if v2 else None, eos_id=EOS if v2 else None)
    tokens = tokens if tokens is not None else [10 + i for i in range(5)]
    return tok.bind(_mapping(tokens), medians if medians is not None else MEDIANS[: len(tokens)])


def _row(values: list[float]) -> sp.csr_matrix:
    return sp.csr_matrix(np.asarray([values], dtype=np.float32))


# ---------------------------------------------------------------- hand-computed cells
# counts [0, 4, 1, 8, 3], total 20, medians [1, 2, 0.25, 5, 1]:
#   gene1 4/20*1e4/2 = 1000, gene2 1/20*1e4/0.25 = 2000, gene3 8/20*1e4/5 = 800, gene4 3/20*1e4/1 = 1500
# -> rank order gene2, gene4, gene1, gene3 (gene3 has the most counts but the largest median)
HAND = [0, 4, 1, 8, 3]


def test_v1_rank_order_and_values_hand_case() -> None:
    (rec,) = _tok("V1").tokenize(_row(HAND), np.array([5]), seed=0, totals=np.array([20.0]))
    assert rec.cell_idx == 5
    assert rec.gene_ids.tolist() == [12, 14, 11, 13]
    np.testing.assert_allclose(rec.values, [2000, 1500, 1000, 800], rtol=1e-7)


def test_v2_adds_cls_and_eos_hand_case() -> None:
    (rec,) = _tok("V2").tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))
    assert rec.gene_ids.tolist() == [CLS, 12, 14, 11, 13, EOS]
    assert rec.values[0] == 0 and rec.values[-1] == 0


@pytest.mark.parametrize(("version", "max_length", "expected"), [
    ("V1", 3, [12, 14, 11]),            # the top-ranked genes are kept
    ("V1", 1, [12]),
    ("V2", 4, [CLS, 12, 14, EOS]),      # model_input_size - 2 genes, then <cls>/<eos>
    ("V2", 3, [CLS, 12, EOS]),
])
def test_truncation_keeps_top_ranked_genes(version: str, max_length: int, expected: list[int]) -> None:
    (rec,) = _tok(version, max_length).tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))
    assert rec.gene_ids.tolist() == expected


def test_total_scales_values_but_not_the_rank_order() -> None:
    tok = _tok("V1")
    (a,) = tok.tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))
    (b,) = tok.tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([40.0]))
    (c,) = tok.tokenize(_row(HAND), np.array([0]), seed=0)  # default: row sum of the given counts (16)
    assert a.gene_ids.tolist() == b.gene_ids.tolist() == c.gene_ids.tolist()
    np.testing.assert_allclose(b.values, a.values / 2, rtol=1e-7)
    np.testing.assert_allclose(c.values, a.values * 20 / 16, rtol=1e-7)


def test_exact_duplicate_ids_stay_two_tokens_as_upstream() -> None:
    # 1:1 mapping -> upstream collapses nothing: gene 10 twice gives two tokens (each its own column)
    tok = _tok("V1", tokens=[10, 11, 10], medians=[1.0, 2.0, 1.0])
    (rec,) = tok.tokenize(_row([1, 4, 2]), np.array([0]), seed=0, totals=np.array([10.0]))
    # 10: 1/10*1e4/1 = 1000, 11: 4/10*1e4/2 = 2000, 10 again: 2000 (tie with 11, argsort order)
    np.testing.assert_allclose(sorted(rec.values.tolist()), [1000, 2000, 2000])
    assert sorted(rec.gene_ids.tolist()) == [10, 10, 11]


def test_gene_layout_collapses_aliases_and_places_sums_last() -> None:
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG1": 10, "ENSG2": 11, "ENSG3": 12}
    medians = {"ENSG1": 1.0, "ENSG2": 2.0, "ENSG3": 1.0}
    # ENSGOLD is an alias of ENSG1; ensg3 is matched upper-cased; ENSG9 maps to no token
    ens_map = {"ENSG1": "ENSG1", "ENSGOLD": "ENSG1", "ENSG2": "ENSG2", "ENSG3": "ENSG3", "ENSG9": "ENSG9"}
    layout = official_gene_layout(["ENSG1", "ENSG2", "ENSGOLD", "ensg3", "ENSG9"], tokens, medians, ens_map)
    assert layout.mapping.var_index.tolist() == [0, 1, 2, 3]
    assert layout.slot_tokens.tolist() == [11, 12, 10]          # singles in var order, then the summed gene
    assert layout.col_slot.tolist() == [2, 0, 2, 1]
    assert layout.summed.tolist() == [False, False, True]
    tok = GeneformerTokenizer(max_length=64).bind_layout(layout)
    (rec,) = tok.tokenize(_row([1, 4, 2, 3]), np.array([0]), seed=0, totals=np.array([10.0]))
    # ENSG1: (1 + 2)/10*1e4/1 = 3000, ENSG3: 3000 (tie), ENSG2: 4/10*1e4/2 = 2000
    assert sorted(rec.gene_ids.tolist()[:2]) == [10, 12] and rec.gene_ids.tolist()[2] == 11
    # without a mapping file: identity over the token dictionary; exact duplicates stay separate
    plain = official_gene_layout(["ENSG1", "ENSG1", "ENSGOLD"], tokens, medians, None)
    assert plain.mapping.var_index.tolist() == [0, 1] and plain.slot_tokens.tolist() == [10, 10]
    assert not plain.summed.any()


def test_empty_cells_are_not_embeddable() -> None:
    counts = sp.csr_matrix(np.zeros((1, 5), dtype=np.float32))
    (v1,) = _tok("V1").tokenize(counts, np.array([0]), seed=0, totals=np.array([0.0]))
    (v2,) = _tok("V2").tokenize(counts, np.array([0]), seed=0, totals=np.array([7.0]))
    assert len(v1) == 0 and v2.gene_ids.tolist() == [CLS, EOS]
    assert not v1.embeddable and not v2.embeddable
    (full,) = _tok("V2").tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))
    assert full.embeddable


# ---------------------------------------------------------------- against the official arithmetic
def _official(X: np.ndarray | sp.csr_matrix, n_counts: np.ndarray, medians: np.ndarray, tokens: np.ndarray,
              size: int, special: bool) -> list[list[int]]:
    """Upstream ``TranscriptomeTokenizer.tokenize_anndata`` + ``create_dataset``, step by step.

    Follows ``geneformer/tokenizer.py`` (HF ``ctheodoris/Geneformer``): ``n_counts =
    obs["n_counts"].values[:, None]``; ``X_norm = X_view / n_counts * target_sum /
    norm_factor_vector`` with the real scipy (sparse ``X``) or numpy (dense ``X``) operators;
    ``sp.csr_matrix(X_norm)``; ``rank_genes(X_norm[i].data, tokens[X_norm[i].indices])`` =
    ``argsort(-data)``; then truncation and ``<cls>``/``<eos>``; empty cells dropped.
    """
    X_norm = X / n_counts[:, None] * 10_000
    X_norm = sp.csr_matrix(X_norm / medians)
    out = []
    for i in range(X_norm.shape[0]):
        ranked = tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)]
        out.append([CLS, *ranked[: size - 2], EOS] if special else list(ranked[:size]))
    return out


@pytest.mark.parametrize("x_dtype", [np.float32, np.int32])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("n_counts_dtype", [np.float64, np.float32, np.int64])
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_matches_official_arithmetic_with_many_ties(version: str, n_counts_dtype: type, dense: bool,
                                                    x_dtype: type) -> None:
    rng = np.random.default_rng(7)
    n_genes = 60
    medians = rng.choice([0.5, 1.0, 1.5, 3.0, 0.7], size=n_genes)  # repeated medians + small counts -> ties
    tokens = np.arange(10, 10 + n_genes)
    X = (rng.random((40, n_genes)) < 0.6) * rng.integers(1, 6, size=(40, n_genes))
    X = X.astype(x_dtype)
    n_counts = (X.sum(1) + rng.integers(0, 5000, size=40)).astype(n_counts_dtype)  # unmapped genes count too
    size = 20
    tok = _tok(version, size, tokens.tolist(), medians.tolist()).for_storage(dense=dense, dtype=x_dtype)
    recs = tok.tokenize(sp.csr_matrix(X.astype(np.float32)), np.arange(40), seed=0, totals=n_counts)
    expected = _official(X if dense else sp.csr_matrix(X), n_counts, medians, tokens, size, version == "V2")
    assert [r.gene_ids.tolist() for r in recs] == expected
    assert any(len(r) == size for r in recs)


def test_sparse_and_dense_official_results_differ_and_each_is_reproduced() -> None:
    """Near-ties: the reciprocal (sparse) and division (dense) arithmetic order some cells differently."""
    rng = np.random.default_rng(3)
    n_genes, n_cells = 200, 300
    medians = rng.choice([0.5, 0.75, 1.0, 1.5, 3.0, 0.3], size=n_genes)  # x1/m1 == x2/m2 across genes
    tokens = np.arange(4, 4 + n_genes)
    X = (rng.poisson(2.0, size=(n_cells, n_genes))).astype(np.float32)
    n_counts = (X.sum(1) + rng.integers(0, 3000, size=n_cells)).astype(np.float32)
    sparse_off = _official(sp.csr_matrix(X), n_counts, medians, tokens, 4096, True)
    dense_off = _official(X, n_counts, medians, tokens, 4096, True)
    base = _tok("V2", 4096, tokens.tolist(), medians.tolist())
    for dense, expected in ((False, sparse_off), (True, dense_off)):
        recs = base.for_storage(dense=dense, dtype=np.float32).tokenize(
            sp.csr_matrix(X), np.arange(n_cells), seed=0, totals=n_counts)
        assert [r.gene_ids.tolist() for r in recs] == expected
    # the storage matters upstream (here for some cells), so it must here
    assert sum(a != b for a, b in zip(sparse_off, dense_off, strict=False)) > 0


def test_stored_zeros_and_duplicates_in_sparse_x_as_official() -> None:
    # upstream keeps stored zeros of a sparse X as tokens (ranked last) and sums duplicates after scaling
    data = np.array([3, 0, 1, 2, 0, 5], dtype=np.float32)
    indices = np.array([0, 1, 2, 2, 3, 4])
    X = sp.csr_matrix((data, indices, np.array([0, 6])), shape=(1, 5))
    medians = np.array(MEDIANS)
    tokens = np.arange(10, 15)
    expected = _official(X, np.array([20.0]), medians, tokens, 64, False)
    (rec,) = _tok("V1").tokenize(X, np.array([0]), seed=0, totals=np.array([20.0]))
    assert rec.gene_ids.tolist() == expected[0]
    assert rec.gene_ids.tolist()[-2:] in ([11, 13], [13, 11]) and len(rec) == 5


# ---------------------------------------------------------------- totals and obs
def test_cell_totals_prefers_obs_n_counts() -> None:
    full = sp.csr_matrix(np.array([[1, 2, 0, 5], [0, 0, 3, 0]], dtype=np.float32))
    np.testing.assert_array_equal(GeneformerTokenizer.cell_totals(full), [8.0, 3.0])
    obs = pd.DataFrame({"n_counts": np.array([100, 30], dtype=np.int32)}, index=["a", "b"])
    totals = GeneformerTokenizer.cell_totals(full, obs)
    assert totals.dtype == np.float64 and totals.tolist() == [100.0, 30.0]
    obs32 = pd.DataFrame({"n_counts": np.array([100, 30], dtype=np.float32)})
    assert GeneformerTokenizer.cell_totals(full, obs32).dtype == np.float32  # followed as upstream
    assert GeneformerTokenizer.cell_totals(full, pd.DataFrame({"other": [1, 2]})).tolist() == [8.0, 3.0]


def test_check_obs_and_bad_totals() -> None:
    assert GeneformerTokenizer.check_obs(pd.DataFrame({"x": [1]})) == "row sums of the raw counts"
    assert GeneformerTokenizer.check_obs(pd.DataFrame({"n_counts": [3.0]})) == "obs['n_counts']"
    for bad in ([1.0, np.nan], [1.0, -2.0], ["a", "b"]):
        with pytest.raises(InvalidInputError, match="n_counts") as err:
            GeneformerTokenizer.check_obs(pd.DataFrame({"n_counts": bad}))
        assert "\n" not in str(err.value)
    with pytest.raises(InvalidInputError, match=r"cell 4 has counts but a total count of 0"):
        _tok().tokenize(_row(HAND), np.array([4]), seed=0, totals=np.array([0.0]))


def test_tokenize_errors() -> None:
    unbound = GeneformerTokenizer(max_length=8)
    with pytest.raises(ModelError, match="map_genes"):
        unbound.tokenize(_row(HAND), np.array([0]), seed=0)
    tok = _tok()
    with pytest.raises(InvalidInputError, match="columns"):
        tok.tokenize(sp.csr_matrix((1, 4), dtype=np.float32), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="non-negative"):
        tok.tokenize(_row([1, -1, 0, 0, 0]), np.array([0]), seed=0)
    with pytest.raises(InvalidInputError, match="totals differ"):
        tok.tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([1.0, 2.0]))
    with pytest.raises(InvalidInputError, match="no room for genes"):
        GeneformerTokenizer(max_length=2, cls_id=CLS, eos_id=EOS)
    with pytest.raises(ModelError, match="both <cls> and <eos>"):
        GeneformerTokenizer(max_length=8, cls_id=CLS)


def test_tokenizer_pickles_small() -> None:
    tok = _tok("V2")
    blob = pickle.dumps(tok)
    assert len(blob) < 4096 and b"torch" not in blob
    clone = pickle.loads(blob)
    a = clone.tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))[0]
    b = tok.tokenize(_row(HAND), np.array([0]), seed=0, totals=np.array([20.0]))[0]
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)


# ---------------------------------------------------------------- collate
def test_collate_v2_masks_exclude_cls_eos_and_padding() -> None:
    recs = _tok("V2").tokenize(sp.csr_matrix(np.array([HAND, [0, 0, 0, 1, 0]], dtype=np.float32)),
                               np.array([3, 9]), seed=0, totals=np.array([20.0, 1.0]))
    batch = collate_geneformer(recs, pad_token_id=0, n_special=2)
    assert batch.gene_ids.tolist() == [[CLS, 12, 14, 11, 13, EOS], [CLS, 13, EOS, 0, 0, 0]]
    assert batch.padding_mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    assert batch.gene_mask.tolist() == [[False, True, True, True, True, False], [False, True] + [False] * 4]
    assert batch.positions["cls"].tolist() == [0, 0] and batch.cell_idx.tolist() == [3, 9]


def test_collate_v1_has_no_cls_and_handles_empty_cells() -> None:
    recs = _tok("V1").tokenize(sp.csr_matrix(np.array([[0] * 5, [0, 0, 0, 1, 0]], dtype=np.float32)),
                               np.array([0, 1]), seed=0)
    batch = collate_geneformer(recs, pad_token_id=0, n_special=0)
    assert batch.gene_ids.tolist() == [[0], [13]]
    assert batch.gene_mask.tolist() == [[False], [True]] and dict(batch.positions) == {}
    only_empty = collate_geneformer(recs[:1], pad_token_id=0, n_special=0)
    assert only_empty.gene_ids.shape == (1, 1) and not only_empty.padding_mask.any()
    assert isinstance(batch.values, torch.Tensor) and batch.values.dtype == torch.float32


# ---------------------------------------------------------------- oracle: sum_ensembl_ids + tokenize_anndata
def _official_pipeline(adata, token_dict: dict, median_dict: dict, mapping_dict: dict, size: int) -> list[list[int]]:
    """Upstream ``geneformer/tokenizer.py`` (HF ``ctheodoris/Geneformer``), h5ad path, V2, written
    from its steps with the same anndata / pandas / scipy operations:

    ``TranscriptomeTokenizer.__init__``: mapping restricted to values in the token dictionary.
    ``sum_ensembl_ids`` (``collapse_gene_ids=True``): if the dataset ids found in the mapping and
    their mapped values are equally many distinct ids, only ``var['ensembl_id_collapsed'] =
    ensembl_id.str.upper().map(mapping)``; else var names := collapsed ids, unmapped columns
    dropped, each id occurring more than once summed (``pd.DataFrame.sparse.from_spmatrix(...).sum(axis=1)``)
    and ``sc.concat([non-duplicated columns, summed columns], axis=1)``.
    ``tokenize_anndata``: columns whose collapsed id is a token, ``X_view / n_counts * target_sum /
    norm_factor_vector``, ``sp.csr_matrix``, ``argsort(-data)`` per row; ``create_dataset``:
    first ``size - 2`` genes between ``<cls>`` and ``<eos>``.
    """
    import collections

    import anndata as ad
    import pandas as pd
    import scanpy as sc

    mapping = {k: v for k, v in mapping_dict.items() if v in token_dict}
    ids = list(adata.var["ensembl_id"])
    in_map = [g for g in ids if g in mapping]
    adata = adata.copy()
    adata.var["ensembl_id_collapsed"] = adata.var["ensembl_id"].str.upper().map(mapping)
    if len(set(in_map)) != len({mapping[g] for g in in_map}):
        adata.var_names = adata.var["ensembl_id_collapsed"].astype(object).where(adata.var["ensembl_id_collapsed"].notna(), None)
        adata = adata[:, ~adata.var.index.isna()]
        dups = [g for g, c in collections.Counter(adata.var_names).items() if c > 1]
        sums = []
        for g in dups:
            part = adata[:, adata.var_names == g]
            df = pd.DataFrame.sparse.from_spmatrix(part.X, index=part.obs_names, columns=part.var_names)
            s = pd.DataFrame(df.sum(axis=1))
            s.columns = [g]
            sums.append(s)
        summed = pd.concat(sums, axis=1)
        extra = ad.AnnData(X=summed, obs=adata.obs, var=pd.DataFrame({"ensembl_id_collapsed": summed.columns}, index=summed.columns))
        dedup = adata[:, ~adata.var.index.isin(dups)]
        obs = adata.obs
        adata = sc.concat([dedup, extra], axis=1)
        adata.obs = obs
    collapsed = adata.var["ensembl_id_collapsed"]
    loc = np.where([token_dict.get(g) is not None if isinstance(g, str) else False for g in collapsed])[0]
    norm = np.array([median_dict[g] for g in collapsed.iloc[loc]])
    tokens = np.array([token_dict[g] for g in collapsed.iloc[loc]])
    n_counts = adata.obs["n_counts"].values[:, None]
    X_norm = sp.csr_matrix(adata.X[:, loc] / n_counts * 10_000 / norm)
    return [[CLS, *tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)][: size - 2], EOS] for i in range(X_norm.shape[0])]


@pytest.mark.parametrize("aliases", [False, True])
def test_gene_layout_and_tokens_match_official_sum_ensembl_ids(aliases: bool) -> None:
    import anndata as ad

    rng = np.random.default_rng(11)
    n = 50
    genes = [f"ENSG{i:011d}" for i in range(n)]
    token_dict = {"<pad>": 0, "<mask>": 1, "<cls>": CLS, "<eos>": EOS} | {g: 4 + i for i, g in enumerate(genes)}
    median_dict = {g: float(m) for g, m in zip(genes, rng.choice([0.5, 1.0, 2.0, 0.25], size=n), strict=False)}
    mapping_dict = {g: g for g in genes}
    ids = [*genes[:40], "ENSG99999999999"]
    if aliases:  # two old ids mapped onto genes 3 and 7, and a lower-case id
        mapping_dict |= {"ENSGOLD00000001": genes[3], "ENSGOLD00000002": genes[7]}
        ids += ["ENSGOLD00000001", "ENSGOLD00000002", genes[45].lower()]
    else:  # 1:1 on the dataset: an exact duplicate id stays two columns (two tokens)
        ids += [genes[5], genes[45].lower()]
    X = sp.csr_matrix(((rng.random((30, len(ids))) < 0.5) * rng.integers(1, 6, size=(30, len(ids)))).astype(np.float32))
    n_counts = (np.asarray(X.sum(1)).ravel() + rng.integers(0, 100, size=30)).astype(np.float32)
    adata = ad.AnnData(X=X, obs=pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(30)]),
                       var=pd.DataFrame({"ensembl_id": ids}, index=[f"v{i}" for i in range(len(ids))]))
    expected = _official_pipeline(adata, token_dict, median_dict, mapping_dict, size=64)
    layout = official_gene_layout(ids, token_dict, median_dict, mapping_dict)
    tok = GeneformerTokenizer(max_length=64, cls_id=CLS, eos_id=EOS).bind_layout(layout)
    recs = tok.tokenize(X[:, layout.mapping.var_index], np.arange(30), seed=0, totals=n_counts)
    assert [r.gene_ids.tolist() for r in recs] == expected
    assert bool(layout.summed.any()) == aliases
