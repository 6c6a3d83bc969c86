"""Simulators (schema, counts, truth, h5ad round trip), result tables, the plot, stats helpers."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from scipy import stats as sps

from sclstore.eval.plot import plot_layer_scores
from sclstore.eval.results import BASELINE_LAYER, TABLE_COLUMNS, LayerScore, layer_depth, layer_table, summarize_layers
from sclstore.eval.simulate import default_gene_names, simulate_layers, simulate_perturbseq, simulate_trajectory
from sclstore.eval.stats import paired_difference, percentile_ci, subsample_indices
from sclstore.store.errors import InvalidInputError


def _is_counts(X) -> bool:
    d = X.data if sparse.issparse(X) else np.asarray(X)
    return bool((d >= 0).all() and np.array_equal(d, np.round(d)))


def test_gene_names_are_the_bundled_pbmc68k_symbols():
    names = default_gene_names()
    assert names == list(sc.datasets.pbmc68k_reduced().var_names) and len(names) == 765
    assert default_gene_names(5) == names[:5]
    with pytest.raises(InvalidInputError, match="n_genes=800 but only 765 bundled gene symbols.*gene_names="):
        simulate_trajectory(n_cells=50, n_genes=800)


def test_trajectory_simulator_schema_and_truth(traj_adata, tmp_path):
    a = traj_adata
    assert sparse.isspmatrix_csr(a.X) or isinstance(a.X, sparse.csr_array)
    assert _is_counts(a.X) and a.X.dtype == np.float32
    assert list(a.var_names) == default_gene_names(300)
    assert {"day", "latent_time", "fate", "cell_type", "donor"} <= set(a.obs.columns)
    assert sorted(a.obs["day"].unique()) == [2, 4, 6]
    assert sps.spearmanr(a.obs["day"], a.obs["latent_time"]).statistic > 0.85
    early = a.obs["latent_time"] < 0.4
    assert (a.obs.loc[early, "fate"] == "uncommitted").all()
    assert set(a.obs.loc[~early, "fate"]) == {"monocyte", "erythroid"}
    # trajectory genes follow the latent time
    traj = np.flatnonzero(a.var["gene_class"] == "trajectory")
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    norm = np.log1p(a.X[:, traj].toarray() / lib[:, None] * 1e4)
    rhos = [abs(sps.spearmanr(norm[:, j], a.obs["latent_time"]).statistic) for j in range(len(traj))]
    assert np.median(rhos) > 0.4
    # deterministic and writable
    b = simulate_trajectory(n_cells=1500, n_genes=300, seed=0)
    assert (a.X != b.X).nnz == 0
    path = tmp_path / "traj.h5ad"
    a.write_h5ad(path)
    c = ad.read_h5ad(path)
    assert (c.X != a.X).nnz == 0 and c.obs.equals(a.obs)


def test_perturbseq_simulator_schema_and_truth(tmp_path):
    a = simulate_perturbseq(n_perturbations=12, n_genes=300, cells_per_perturbation=20, n_control_cells=90, seed=2)
    assert a.n_obs == 3 * (12 * 20 + 90) and _is_counts(a.X)
    assert list(a.obs["condition"].cat.categories) == ["Rest", "Stim8hr", "Stim48hr"] and a.obs["condition"].cat.ordered
    assert (a.obs["gene"] == "NTC").sum() == 3 * 90
    perts = a.uns["simulation"]["perturbations"]
    assert set(a.obs["gene"]) == {"NTC", *perts} and set(perts) <= set(a.var_names)
    assert set(a.obs["donor"]) == {"D1", "D2", "D3"}
    assert a.obs.groupby(["condition", "gene"], observed=True)["donor"].nunique().min() == 3
    rest, s48 = a.varm["true_log2fc_Rest"], a.varm["true_log2fc_Stim48hr"]
    assert list(rest.columns) == perts and list(rest.index) == list(a.var_names)
    np.testing.assert_allclose(s48.to_numpy(), 2.0 * rest.to_numpy())
    # the knocked-down target is depleted
    p = perts[0]
    X = a.X.toarray()
    lib = X.sum(axis=1, keepdims=True)
    j = list(a.var_names).index(p)
    assert (X[(a.obs["gene"] == p).to_numpy(), j] / lib[(a.obs["gene"] == p).to_numpy(), 0]).mean() < 0.5 * (
        X[(a.obs["gene"] == "NTC").to_numpy(), j] / lib[(a.obs["gene"] == "NTC").to_numpy(), 0]).mean()
    path = tmp_path / "screen.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(b.varm["true_log2fc_Rest"], rest, check_dtype=False)
    assert b.uns["simulation"]["control"] == "NTC"


def test_simulate_layers_plants_the_signal(rng):
    latent = rng.normal(size=(400, 3))
    L = simulate_layers(latent, n_layers=9, best_layer=4, dim=16, library_size=rng.lognormal(7, 0.3, 400), seed=0)
    assert L.shape == (9, 400, 16) and L.dtype == np.float32
    # linear recoverability of the latent from each layer peaks at the planted layer
    r2 = []
    for X in L:
        coef, *_ = np.linalg.lstsq(np.c_[X, np.ones(400)], latent, rcond=None)
        r2.append(1 - ((np.c_[X, np.ones(400)] @ coef - latent) ** 2).sum() / ((latent - latent.mean(0)) ** 2).sum())
    assert int(np.argmax(r2)) == 4 and r2[4] > 0.99
    with pytest.raises(InvalidInputError, match="best_layer=12 outside 0..8"):
        simulate_layers(latent, n_layers=9, best_layer=12)


def _table() -> pd.DataFrame:
    rows = []
    for cond, peak in [("Rest", 0), ("Stim48hr", 8)]:
        for layer in range(13):
            s = 0.8 - 0.05 * abs(layer - peak)
            rows.append(LayerScore(layer=layer, depth=layer_depth(layer, 12), score=s, ci_low=s - 0.1, ci_high=s + 0.1,
                                   p_value=0.001, pool="cls", condition=cond, metric="rsa_shift", n=24))
        rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=0.95, pool="cls", condition=cond,
                               metric="rsa_shift", representation="pca_hvg"))
    return layer_table(rows)


def test_layer_table_and_summary():
    t = _table()
    assert tuple(t.columns) == TABLE_COLUMNS and len(t) == 28
    assert list(t["condition"].unique()) == ["Rest", "Stim48hr"]
    assert t.iloc[13]["representation"] == "pca_hvg"  # baselines after the layers of a group
    s = summarize_layers(t).set_index("condition")
    assert s.loc["Rest", "best_layer"] == 0 and s.loc["Stim48hr", "best_layer"] == 8  # the baseline is not a layer
    assert s.loc["Rest", "final_layer"] == 12 and s.loc["Rest", "final_score"] == pytest.approx(0.2)
    assert s.loc["Rest", "gain"] == pytest.approx(0.6) and s.loc["Rest", "relative_gain"] == pytest.approx(3.0)
    assert s.loc["Stim48hr", "best_depth"] == pytest.approx(8 / 12)
    with pytest.raises(InvalidInputError, match="layer 13 outside 0..12"):
        layer_depth(13, 12)


def test_plot_writes_a_png(tmp_path):
    import matplotlib.image as mpimg

    out = plot_layer_scores(_table(), tmp_path / "fig" / "rsa.png", title="RSA by depth", ylabel="RSA", dpi=80)
    img = mpimg.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not blank
    one = _table().query("condition == 'Rest'").assign(condition=None)
    assert plot_layer_scores(one, tmp_path / "one.png", dpi=60).stat().st_size > 1000
    with pytest.raises(InvalidInputError, match=r"lacks columns \['depth'\]"):
        plot_layer_scores(_table().drop(columns="depth"), tmp_path / "x.png")


def test_stats_helpers():
    v = np.r_[np.arange(1, 101, dtype=float), np.nan]
    lo, hi = percentile_ci(v, level=0.9)
    assert lo == pytest.approx(np.quantile(np.arange(1, 101), 0.05)) and hi == pytest.approx(np.quantile(np.arange(1, 101), 0.95))
    d = paired_difference(np.array([0.5, 0.6, 0.7, 0.8]), np.array([0.1, 0.2, 0.3, 0.9]), estimate=0.3)
    diffs = np.array([0.4, 0.4, 0.4, -0.1])
    half = sps.t.ppf(0.975, 3) * diffs.std(ddof=1)  # calibrated: estimate +- t * sd (scale 1 for a bootstrap)
    assert d.estimate == 0.3 and d.n_resamples == 4 and (d.ci_low, d.ci_high) == pytest.approx((0.3 - half, 0.3 + half))
    assert d.p_value == pytest.approx(2 * sps.t.sf(0.3 / diffs.std(ddof=1), 3))
    a = subsample_indices(100, n_subsamples=3, fraction=0.8, seed=1, always_include=7)
    b = subsample_indices(100, n_subsamples=3, fraction=0.8, seed=1, always_include=7)
    assert all(np.array_equal(x, y) and len(x) == 80 and 7 in x and len(set(x)) == 80 for x, y in zip(a, b, strict=False))
    with pytest.raises(InvalidInputError, match="paired scores must come from the same resamples"):
        paired_difference(np.ones(3), np.ones(4))


def _legend(fig) -> dict[str, object]:
    ax = fig.axes[0]
    return {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)}


def test_plot_shows_every_layer_and_matching_legend_colours():
    from matplotlib.colors import to_hex

    from sclstore.eval.plot import layer_scores_figure

    one = _table().query("condition == 'Rest'").assign(condition=None)
    one.loc[one["layer"] == 0, ["score", "ci_low", "ci_high"]] = float("nan")  # e.g. a constant layer
    fig = layer_scores_figure(one, title="trajectory - run 2 sim/tiny, pool cls\ntime=latent_time, n_neighbors=15")
    ax = fig.axes[0]
    legend = _legend(fig)
    # layer 0 has no score: it is marked on the axis and named, not silently dropped
    assert "no score (undefined): layer 0" in legend
    crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 0.0
    # the baseline's legend entry has the colour of the baseline's line
    base_y = float(one.loc[one["representation"] == "pca_hvg", "score"].iloc[0])
    base_line = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and list(ln.get_ydata()) == [base_y, base_y])
    assert to_hex(legend["PCA-of-counts baseline"].get_color()) == to_hex(base_line.get_color())
    # the title names the pool and the keys; one condition gets a band
    assert "pool cls" in ax.get_title() and "time=latent_time" in ax.get_title()
    assert len(ax.collections) == 1  # the CI band


def test_plot_several_conditions_dodged_error_bars_and_gains_in_legend():
    from sclstore.eval.plot import layer_scores_figure

    t = _table()
    t["claimed_best"] = t["best_set"] = None
    lay = t["representation"] == "layer"
    t.loc[lay, ["claimed_best", "best_set"]] = False
    t.loc[lay & (t["condition"] == "Stim48hr") & (t["layer"] == 8), ["claimed_best", "best_set"]] = True
    fig = layer_scores_figure(t)
    ax = fig.axes[0]
    legend = _legend(fig)
    # the supported gain (layer 8 vs final 12: 0.8 - 0.6) is in the condition's legend entry, not an overlapping label
    assert "Stim48hr  (layer 8: +0.20 vs final)" in legend and "Rest" in legend
    assert not ax.texts
    # no translucent bands that overlap: error bars, dodged so they do not sit on each other
    from matplotlib.collections import LineCollection, PolyCollection

    assert not any(isinstance(c, PolyCollection) for c in ax.collections)
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 2
    xs = [sorted({round(float(seg[0][0]), 4) for seg in c.get_segments()}) for c in bars]
    assert xs[0] != xs[1]
    # reference lines take their condition's colour; the legend says so
    assert "PCA-of-counts baseline, colour of its condition" in legend


def test_figure_title_names_run_pool_and_keys():
    from sclstore.eval.report import EvalReport

    rep = EvalReport(task="perturbation", run_id=3, run_label="screen/tiny", table=_table(), summary=pd.DataFrame(),
                     params={"pool": "mean", "perturbation_key": "gene", "control": "NTC", "condition_key": "condition",
                             "replicate_key": None, "de_mode": "fast", "protocol": "default"})
    assert rep.figure_title() == ("perturbation - run 3 screen/tiny, pool mean\n"
                                  "perturbation=gene, control=NTC, condition=condition, de_mode=fast")
    traj = EvalReport(task="trajectory", run_id=2, run_label="sim/tiny", table=_table(), summary=pd.DataFrame(),
                      params={"pool": "cls", "pseudotime_key": "latent_time", "n_neighbors": 15, "protocol": "paper"})
    assert traj.figure_title().splitlines()[1] == "time=latent_time, n_neighbors=15, protocol=paper"
