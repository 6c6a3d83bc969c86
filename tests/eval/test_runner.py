"""The evaluation runner over a real store, on simulated layers with a planted best layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sclstore
from sclstore.eval import task_perturbation as pert_mod
from sclstore.eval import task_trajectory as traj_mod
from sclstore.eval import tasks as tasks_mod
from sclstore.eval.simulate import log_pca, simulate_layers, simulate_perturbseq, simulate_trajectory
from sclstore.ingest.source import CountsSource
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store.errors import EvaluationError
from sclstore.testing import store_with_layers


def test_trajectory_best_layer_cached_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adata = simulate_trajectory(n_cells=600, n_genes=300, seed=1)
    t = adata.obs["latent_time"].to_numpy()
    latent = np.column_stack([t, (adata.obs["fate"] == "monocyte").to_numpy() * t])
    layers = simulate_layers(latent, n_layers=7, best_layer=3, seed=1)
    backend, run_id = store_with_layers(tmp_path, adata, layers, name="traj", cluster_by=("day",))
    with sclstore.Store(backend) as st:
        rep = st.evaluate_trajectory(run_id, pseudotime_key="latent_time", n_subsamples=4, n_neighbors=15)
        prim = rep.metric_table()
        lay = prim[prim["representation"] == "layer"]
        best = int(lay.loc[lay["score"].idxmax(), "layer"])
        assert abs(best - 3) <= 1
        assert lay.loc[lay["layer"] == 3, "score"].item() > lay.loc[lay["layer"] == 6, "score"].item()
        assert (prim["representation"] == "pca_hvg").sum() == 1  # the PCA-of-counts baseline row
        assert set(rep.table["metric"]) == {"spearman_time", "spearman_ref"}
        assert lay.loc[lay["layer"] == 6, "diff_vs_final"].item() == 0.0
        summ = rep.summary.query("metric == 'spearman_time'")
        assert summ["final_layer"].item() == 6
        assert summ["headline"].item() == rep.headline()[0]  # claim-aware headline
        assert bool(summ["claimed"].item()) == (summ["gain_ci_low"].item() > 0)
        assert summ["best_layer"].item() in summ["best_set"].item()
        assert sum(summ["win_frequency"].item().values()) == pytest.approx(1.0)
        assert lay["best_set"].notna().all() and rep.notes["cells"]["n_common"] <= 600
        assert set(rep.notes["root_sensitivity"]["per_layer"]) == {str(i) for i in range(7)}
        assert rep.params["protocol"] == "default" and rep.params["standardize"] is False and rep.params["common_cells"] is True
        assert not rep.cached

        def boom(*_a: object, **_k: object) -> None:
            raise AssertionError("a repeated evaluation must not recompute anything")

        monkeypatch.setattr(traj_mod, "layer_pseudotimes", boom)
        monkeypatch.setattr(tasks_mod.TaskContext, "read_layer", boom)
        again = st.evaluate_trajectory(run_id, pseudotime_key="latent_time", n_subsamples=4, n_neighbors=15)
        assert again.cached
        np.testing.assert_allclose(again.table["score"].to_numpy(float), rep.table["score"].to_numpy(float), equal_nan=True)
        monkeypatch.undo()
        paper = st.evaluate_trajectory(run_id, pseudotime_key="latent_time", n_subsamples=4, n_neighbors=15, protocol="paper", n_roots=0)
        assert not paper.cached and paper.params["primary_metric"] == "spearman_ref" and paper.params["root"] == "first"
        assert paper.params["common_cells"] is False and "root_sensitivity" not in paper.notes
        std = st.evaluate_trajectory(run_id, pseudotime_key="latent_time", n_subsamples=4, n_neighbors=15, standardize=True)
        assert not std.cached and std.params["standardize"] is True
        with pytest.raises(EvaluationError, match="unknown protocol 'papers'"):
            st.evaluate_trajectory(run_id, pseudotime_key="latent_time", protocol="papers")

        with pytest.raises(EvaluationError, match="'nope' is not in the obs.*it has: day, latent_time"):
            st.evaluate_trajectory(run_id, pseudotime_key="nope")
        with pytest.raises(EvaluationError, match="numeric obs columns: day, latent_time, phase"):
            st.evaluate_trajectory(run_id, pseudotime_key="donor")
        with pytest.raises(EvaluationError, match="no pool 'max'.*cls, mean"):
            st.evaluate_trajectory(run_id, pseudotime_key="latent_time", pool="max")


def test_perturbation_per_condition_with_de_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adata = simulate_perturbseq(n_perturbations=16, n_genes=300, cells_per_perturbation=30, n_control_cells=120,
                                conditions=("Rest", "Stim8hr"), effect_scale=(1.0, 2.0), n_donors=2, seed=2)
    layers = simulate_layers(log_pca(adata.X, n_comps=20), n_layers=9, best_layer=4, seed=3)
    backend, run_id = store_with_layers(tmp_path, adata, layers, name="pert", cluster_by=("condition", "gene"))
    calls = {"de": 0}
    real = pert_mod.run_de

    def counting(*a: object, **k: object):
        calls["de"] += 1
        return real(*a, **k)

    monkeypatch.setattr(pert_mod, "run_de", counting)
    kw = dict(perturbation_key="gene", control="NTC", condition_key="condition", replicate_key="donor", de_mode="fast",
              n_boot=50, n_perm=99)
    with sclstore.Store(backend) as st:
        rep = st.evaluate_perturbation(run_id, **kw)
        assert calls["de"] == 2  # once per condition, never pooled
        assert set(rep.table["condition"]) == {"Rest", "Stim8hr"}
        assert rep.params["crossfit"] is True and rep.params["primary_metric"] == "rsa_shift"
        for c in ("Rest", "Stim8hr"):
            ceil = rep.table[(rep.table["condition"] == c) & (rep.table["representation"] == "noise_ceiling")]
            assert ceil["score"].item() == pytest.approx(rep.notes["conditions"][c]["noise_ceiling"])
            assert ceil["score"].item() == pytest.approx(np.sqrt(rep.notes["conditions"][c]["split_half_rsa"]))
            rows = rep.table[(rep.table["condition"] == c) & (rep.table["representation"] == "layer")]
            best = int(rows.loc[rows["score"].idxmax(), "layer"])
            assert abs(best - 4) <= 1, (c, rows[["layer", "score"]])
            assert rows.loc[rows["layer"] == 4, "p_value"].item() <= 0.05
            assert 3 <= rep.notes["conditions"][c]["perturbations"] <= 16
        again = st.evaluate_perturbation(run_id, **kw)
        assert again.cached and calls["de"] == 2
        # another run of the same dataset: layers are read again, DE comes from the catalog
        backend2, run2 = store_with_layers(tmp_path, adata, layers[::-1].copy(), name="pert", cluster_by=("condition", "gene"), key="k2")
        other = sclstore.Store(backend2).evaluate_perturbation(run2, **kw)
        assert calls["de"] == 2 and not other.cached
        lay_o = other.table[other.table["representation"] == "layer"]
        lay_r = rep.table[rep.table["representation"] == "layer"]
        np.testing.assert_allclose(lay_o["score"].to_numpy(float),  # reversed layers, same scores reversed
                                   lay_r.groupby("condition", sort=False)["score"].transform(lambda s: s[::-1].to_numpy()).to_numpy(float))
        leak = st.evaluate_perturbation(run_id, **{**kw, "crossfit": False})
        assert not leak.cached and leak.params["primary_metric"] == "rsa_shift_samecells"
        leak_ceil = leak.table[leak.table["representation"] == "noise_ceiling"]
        assert leak_ceil["score"].to_numpy() == pytest.approx(
            [np.sqrt(leak.notes["conditions"][c]["spearman_brown"]) for c in ("Rest", "Stim8hr")])
        paper = st.evaluate_perturbation(run_id, **{**kw, "protocol": "paper"})
        assert paper.params["variant"] == "centroid" and paper.params["similarity"] == "spearman" and not paper.params["crossfit"]
        with pytest.raises(EvaluationError, match="control label 'CTRL' is not a value of 'gene'"):
            st.evaluate_perturbation(run_id, **{**kw, "control": "CTRL"})
        with pytest.raises(EvaluationError, match="condition column 'state' is not in the obs"):
            st.evaluate_perturbation(run_id, **{**kw, "condition_key": "state"})


def test_unembeddable_cells_are_skipped_with_a_count(tmp_path: Path) -> None:
    adata = simulate_trajectory(n_cells=300, n_genes=100, seed=2)
    t = adata.obs["latent_time"].to_numpy()
    layers = simulate_layers(np.column_stack([t, t**2]), n_layers=3, best_layer=1, seed=2)
    path = tmp_path / "u.h5ad"
    adata.write_h5ad(path)
    backend = Backend.create(tmp_path / "store")
    with CountsSource(path) as src:
        ds = backend.register_dataset(name="u", content_hash=src.scan(), obs=src.obs, n_vars=src.n_vars,
                                      source_path=str(path))
    n_layers, n, dim = layers.shape
    model = backend.register_model(family="synthetic", name="m", checkpoint_hash=cache_key("m"), n_layers=n_layers - 1,
                                   d_model=dim, config={})
    run = backend.create_run(dataset=ds, model=model, key=cache_key("u"), params={}, layers=list(range(n_layers)),
                             spec=ArraySpec(n_layers=n_layers, n_cells=n, dim=dim, pools=("cls", "mean")))
    order = backend.cell_order(ds.id)
    stored = layers[:, order].copy()
    skipped = [4, 50, 199]  # store order: NaN rows, as the pipeline writes cells a model cannot embed
    stored[:, skipped] = np.nan
    lease = backend.acquire(run.id, wait=False)
    backend.write_block(run, lease, 0, {"cls": stored, "mean": stored}, unembeddable=skipped)
    backend.complete(run, lease, {})
    assert backend.get_run(run.id).unembeddable == tuple(skipped)
    with sclstore.Store(backend) as st:
        rep = st.evaluate_trajectory(run.id, pseudotime_key="latent_time", n_subsamples=3, n_neighbors=15, reference=False)
    assert rep.notes["unembeddable_cells_skipped"] == 3
    # oracle: the same evaluation of a store that holds only the embedded cells
    keep_src = np.setdiff1d(np.arange(n), order[skipped])  # source rows of the embedded cells
    other, run2 = store_with_layers(tmp_path / "kept", adata[keep_src].copy(), layers[:, keep_src].copy(), name="k")
    with sclstore.Store(other) as st2:
        direct = st2.evaluate_trajectory(run2, pseudotime_key="latent_time", n_subsamples=3, n_neighbors=15, reference=False)
    for layer in range(n_layers):
        got = rep.table.query(f"layer == {layer} and metric == 'spearman_time'")["score"].item()
        want = direct.table.query(f"layer == {layer} and metric == 'spearman_time'")["score"].item()
        assert got == pytest.approx(want, abs=1e-12)
