"""Perturbation metric: pseudobulk, DE (fast vs pydeseq2), RSA, Mantel, bootstrap, ceiling, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from sclstore.eval.de import de_fast, de_pydeseq2, expressed_genes, median_of_ratios, pseudobulk, run_de
from sclstore.eval.perturbation import (
    group_centroids,
    perturbation_paired_difference,
    rsa_from_centroids,
    score_perturbation,
    select_perturbations,
    split_half_ceiling,
)
from sclstore.eval.simulate import log_pca, simulate_layers, simulate_perturbseq
from sclstore.eval.stats import de_similarity, mantel_test, rsa_spearman
from sclstore.store.errors import EvaluationError, InvalidInputError


# ---------------------------------------------------------------- pseudobulk and fast DE
def test_pseudobulk_equals_groupby_sum(pert_adata, pert_de):
    pb, meta = pert_de["pb"], pert_de["meta"]
    dense = pd.DataFrame(pert_adata.X.toarray(), columns=pert_adata.var_names)
    expect = dense.groupby([pert_de["pert"], pert_de["donor"]]).sum()
    assert pb.shape == (25 * 3, 400)
    for (p, d), row in expect.iterrows():
        np.testing.assert_array_equal(pb.loc[f"{p}|{d}"].to_numpy(), row.to_numpy())
    assert meta.loc["NTC|D1", "n_cells"] == 100 and meta["n_cells"].sum() == pert_adata.n_obs


def test_median_of_ratios_matches_pydeseq2(pert_de):
    from pydeseq2.preprocessing import deseq2_norm

    X = pert_de["pb"].loc[:, expressed_genes(pert_de["pb"])].to_numpy()
    _, sf = deseq2_norm(X)
    np.testing.assert_allclose(median_of_ratios(X), sf, rtol=1e-10)


def test_de_fast_hand_computed():
    counts = pd.DataFrame([[10, 20, 30], [12, 18, 33], [40, 20, 30], [44, 22, 28]], columns=["a", "b", "c"],
                          index=["ctl|1", "ctl|2", "KO|1", "KO|2"])
    meta = pd.DataFrame({"perturbation": ["ctl", "ctl", "KO", "KO"], "replicate": ["1", "2", "1", "2"]}, index=counts.index)
    res = de_fast(counts, meta, "ctl", genes=["a", "b", "c"])
    logc = np.log(counts.to_numpy(float))
    sf = np.exp(np.median(logc - logc.mean(axis=0), axis=1))
    norm = counts.to_numpy(float) / sf[:, None]
    expect = np.log2((norm[2:].mean(0) + 1) / (norm[:2].mean(0) + 1))
    np.testing.assert_allclose(res.lfc.loc["KO"].to_numpy(), expect)
    assert res.mode == "fast" and list(res.lfc.index) == ["KO"]


def test_fast_de_recovers_planted_effects(pert_adata, pert_de):
    lfc = pert_de["de"].lfc
    true = pert_adata.varm["true_log2fc_Rest"].T.loc[lfc.index, lfc.columns]
    mod = pert_adata.var_names[pert_adata.var["module"] >= 0].intersection(lfc.columns)
    r = sps.pearsonr(true[mod].to_numpy().ravel(), lfc[mod].to_numpy().ravel()).statistic
    assert r > 0.7


# ---------------------------------------------------------------- pydeseq2 (slow: keep tiny)
@pytest.fixture(scope="module")
def deseq_case():
    a = simulate_perturbseq(n_perturbations=6, n_genes=300, n_modules=3, module_size=20, cells_per_perturbation=40,
                            n_control_cells=120, conditions=("Stim48hr",), effect_scale=(2.0,), seed=1)
    pert = a.obs["gene"].astype(str).to_numpy()
    donor = a.obs["donor"].astype(str).to_numpy()
    pb, meta = pseudobulk(a.X, pert, donor, gene_names=a.var_names)
    genes = expressed_genes(pb)[:200]
    perts = select_perturbations(pert, donor, "NTC")[:3]
    return pb, meta, genes, perts, de_pydeseq2(pb, meta, "NTC", perturbations=perts, genes=genes)


def test_fast_de_tracks_pydeseq2(deseq_case):
    pb, meta, genes, perts, slow = deseq_case
    fast = run_de(pb, meta, "NTC", mode="fast", perturbations=perts, genes=genes)
    assert slow.mode == "pydeseq2" and slow.lfc.shape == (3, 200) and slow.padj is not None
    assert list(slow.lfc.columns) == list(genes)
    for p in perts:
        assert sps.pearsonr(fast.lfc.loc[p], slow.lfc.loc[p]).statistic > 0.9


def test_de_pydeseq2_equals_direct_call(deseq_case):
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    pb, meta, genes, perts, ours = deseq_case
    p = perts[0]
    rows = meta.index[meta["perturbation"].isin([p, "NTC"])]
    counts = pb.loc[rows, list(genes)]
    md = pd.DataFrame({"replicate": meta.loc[rows, "replicate"], "condition": meta.loc[rows, "perturbation"]})
    inf = DefaultInference(n_cpus=1)
    dds = DeseqDataSet(counts=counts, metadata=md, design="~replicate + condition", inference=inf, quiet=True)
    dds.deseq2()
    st = DeseqStats(dds, contrast=["condition", p, "NTC"], inference=inf, quiet=True)
    st.summary()
    np.testing.assert_array_equal(ours.lfc.loc[p].to_numpy(), st.results_df["log2FoldChange"].to_numpy())
    np.testing.assert_array_equal(ours.padj.loc[p].to_numpy(), st.results_df["padj"].to_numpy())


# ---------------------------------------------------------------- RSA, Mantel, bootstrap
def _small_case(rng: np.random.Generator, k: int = 4):
    de = pd.DataFrame(rng.normal(size=(k, 30)), index=[f"P{i}" for i in range(k)])
    cents = {f"P{i}": rng.normal(size=8) for i in range(k)}
    cents["NTC"] = rng.normal(size=8)
    return de, cents


def test_rsa_hand_computed_shift_and_centroid(rng):
    de, cents = _small_case(rng)
    iu = np.triu_indices(4, 1)
    s_de = np.array([[np.corrcoef(de.iloc[i], de.iloc[j])[0, 1] for j in range(4)] for i in range(4)])
    for variant, vec in [("shift", lambda p: cents[p] - cents["NTC"]), ("centroid", lambda p: cents[p])]:
        V = [vec(f"P{i}") for i in range(4)]
        s_emb = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in V] for a in V])
        expect = sps.spearmanr(s_de[iu], s_emb[iu]).statistic
        got = rsa_from_centroids(cents, "NTC", de, variant=variant, n_boot=50, n_perm=23)
        assert got.score == pytest.approx(expect)
        assert got.n_perturbations == 4 and got.n_pairs == 6 and got.variant == variant


def test_score_from_cells_equals_score_from_centroids(pert_adata, pert_de, rng):
    X = rng.normal(size=(pert_adata.n_obs, 6))
    lab = pert_de["pert"]
    a = score_perturbation(X, lab, "NTC", pert_de["de"].lfc, n_boot=20, n_perm=19)
    b = rsa_from_centroids(group_centroids(X, lab), "NTC", pert_de["de"].lfc, n_boot=20, n_perm=19)
    assert a.score == pytest.approx(b.score) and a.p_value == b.p_value
    np.testing.assert_allclose(a.boot, b.boot)


def test_shift_is_invariant_to_a_common_offset_centroid_is_not(pert_adata, pert_de, rng):
    lat = log_pca(pert_adata.X, n_comps=10)
    X = simulate_layers(lat, n_layers=7, best_layer=6, seed=0)[5]
    off = X + 5.0 * X.std() * rng.normal(size=X.shape[1])
    lfc, lab = pert_de["de"].lfc, pert_de["pert"]
    kw = {"n_boot": 0, "n_perm": 0}
    assert score_perturbation(off, lab, "NTC", lfc, **kw).score == pytest.approx(score_perturbation(X, lab, "NTC", lfc, **kw).score)
    assert score_perturbation(off, lab, "NTC", lfc, variant="centroid", **kw).score != pytest.approx(
        score_perturbation(X, lab, "NTC", lfc, variant="centroid", **kw).score, abs=1e-3)


def test_mantel_identical_structure_is_minimal_and_matches_brute_force(rng):
    A = np.corrcoef(rng.normal(size=(7, 20)))
    assert mantel_test(A, A, n_perm=99, seed=0) == pytest.approx(1 / 100)
    B = A + 0.3 * np.corrcoef(rng.normal(size=(7, 20)))
    iu = np.triu_indices(7, 1)
    obs = sps.spearmanr(A[iu], B[iu]).statistic
    perms = np.argsort(np.random.default_rng(4).random((199, 7)), axis=1)
    hits = sum(sps.spearmanr(A[iu], B[np.ix_(p, p)][iu]).statistic >= obs - 1e-12 for p in perms)
    assert mantel_test(A, B, n_perm=199, seed=4) == pytest.approx((1 + hits) / 200)


def test_mantel_independent_structure_is_uniform(rng):
    ps = np.array([
        mantel_test(np.corrcoef(rng.normal(size=(8, 20))), np.corrcoef(rng.normal(size=(8, 20))), n_perm=199, seed=i)
        for i in range(100)
    ])
    assert 0.38 < ps.mean() < 0.62
    assert (ps < 0.05).mean() < 0.12


def test_planted_best_layer_mantel_and_paired_bootstrap(pert_adata, pert_de):
    lat = log_pca(pert_adata.X, n_comps=20)
    layers = simulate_layers(lat, n_layers=12, best_layer=6, seed=0)
    lfc, lab = pert_de["de"].lfc, pert_de["pert"]
    scores = [score_perturbation(L, lab, "NTC", lfc, n_boot=200, n_perm=199, seed=1) for L in layers]
    rho = np.array([s.score for s in scores])
    assert abs(int(np.argmax(rho)) - 6) <= 1
    noise_layers = (0, 1, 2, 10, 11)  # signal weight <= exp(-4): pure noise
    for noise_layer in noise_layers:  # not significant at a family-wise 5% (Bonferroni)
        assert scores[noise_layer].p_value > 0.05 / len(noise_layers)
    for good in (5, 6, 7):
        assert scores[good].p_value <= 0.01
        assert scores[good].ci_low < scores[good].score < scores[good].ci_high
    d = perturbation_paired_difference(scores[6], scores[11])
    assert d.estimate == pytest.approx(rho[6] - rho[11]) and d.ci_low > 0
    assert scores[6].n_perturbations == 24 and scores[6].n_pairs == 276


def test_split_half_ceiling_reads_noise(pert_adata, pert_de):
    lfc = pert_de["de"].lfc
    real = split_half_ceiling(pert_adata.X, pert_de["pert"], pert_de["donor"], "NTC", n_splits=2,
                              genes=lfc.columns, gene_names=pert_adata.var_names)
    assert real.rsa == pytest.approx(
        split_half_ceiling(pert_adata.X, pert_de["pert"], pert_de["donor"], "NTC", n_splits=2).rsa)  # same universe
    null = simulate_perturbseq(n_perturbations=24, n_genes=400, cells_per_perturbation=40, n_control_cells=300,
                               conditions=("Rest",), effect_scale=(0.0,), seed=0)
    none = split_half_ceiling(null.X, null.obs["gene"], null.obs["donor"], "NTC", n_splits=2)
    assert real.rsa > 0.2 and real.spearman_brown == pytest.approx(2 * real.rsa / (1 + real.rsa))
    assert abs(none.rsa) < 0.15
    assert real.n_perturbations == 24 and len(real.values) == 2 and real.mode == "fast"


def test_de_similarity_pairwise_complete():
    lfc = pd.DataFrame([[1.0, 2, 3, np.nan, 5], [2.0, 4, 6, 8, 9], [3.0, 1, 2, 7, np.nan]])
    S = de_similarity(lfc)
    assert S[0, 1] == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 6, 9])[0, 1])
    assert rsa_spearman(S, S) == pytest.approx(1.0)


# ---------------------------------------------------------------- errors
def test_missing_control_errors(pert_de, rng):
    with pytest.raises(EvaluationError, match="control label 'CTRL' not found.*'NTC'.*pass control="):
        select_perturbations(pert_de["pert"], pert_de["donor"], "CTRL")
    with pytest.raises(EvaluationError, match="control label 'CTRL' not found"):
        de_fast(pert_de["pb"], pert_de["meta"], "CTRL")
    with pytest.raises(EvaluationError, match="control label 'CTRL' not found"):
        score_perturbation(rng.normal(size=(len(pert_de["pert"]), 4)), pert_de["pert"], "CTRL", pert_de["de"].lfc)


def test_too_few_replicates_cells_or_perturbations(pert_de):
    one_donor = np.full(len(pert_de["pert"]), "D1")
    with pytest.raises(EvaluationError, match="control 'NTC' has 300 cells in 1 replicates.*replicate key"):
        select_perturbations(pert_de["pert"], one_donor, "NTC")
    with pytest.raises(EvaluationError, match=r"only 0 of 24 perturbations have >=100 cells"):
        select_perturbations(pert_de["pert"], pert_de["donor"], "NTC", min_cells=100)
    pb, meta = pseudobulk(np.ones((6, 3)), ["NTC", "NTC", "A", "A", "B", "B"], ["1", "2", "1", "1", "1", "2"])
    with pytest.raises(EvaluationError, match=r"\['A'\] have fewer than 2 replicates"):
        de_fast(pb, meta, "NTC", genes=["g0", "g1", "g2"])
    de, cents = _small_case(np.random.default_rng(0), k=2)
    with pytest.raises(EvaluationError, match="RSA needs >=3 perturbations"):
        rsa_from_centroids(cents, "NTC", de)


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="raw integer counts"):
        pseudobulk(np.full((2, 2), 0.5), ["a", "b"], ["1", "1"])
    with pytest.raises(InvalidInputError, match="unknown DE mode 'edger'"):
        run_de(pd.DataFrame(), pd.DataFrame(), "NTC", mode="edger")
    de, cents = _small_case(np.random.default_rng(0))
    with pytest.raises(InvalidInputError, match="unknown variant 'raw'"):
        rsa_from_centroids(cents, "NTC", de, variant="raw")


def test_de_pydeseq2_parallel_equals_serial(deseq_case):
    pb, meta, genes, perts, serial = deseq_case
    parallel = de_pydeseq2(pb, meta, "NTC", perturbations=perts[:2], genes=genes, n_jobs=2)
    pd.testing.assert_frame_equal(parallel.lfc, serial.lfc.loc[perts[:2]])
