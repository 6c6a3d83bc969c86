"""The task registry and the generic runner over a real store: celltype, diagnostics, --jobs, progress, cache."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sclstore
from sclstore.eval import diagnostics, runner, tasks
from sclstore.eval.simulate import simulate_layers
from sclstore.store.errors import EvaluationError, InvalidInputError
from sclstore.testing import store_with_layers


def _labelled(n: int = 600, n_types: int = 4, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_types, size=n)
    latent = rng.normal(scale=2.5, size=(n_types, 5))[codes] + rng.normal(size=(n, 5))
    counts = rng.poisson(2.0, size=(n, 30)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{c}" for c in codes]), "batch": rng.choice(["a", "b"], n)},
                       index=[f"c{i}" for i in range(n)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)])), latent


def test_celltype_finds_planted_layer_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adata, latent = _labelled()
    layers = simulate_layers(latent, n_layers=7, best_layer=2, dim=16, width=1.0, noise=4.0, seed=1)
    backend, run_id = store_with_layers(tmp_path, adata, layers, name="ct")
    with sclstore.Store(backend) as st:
        rep = st.evaluate("celltype", run_id, label_key="cell_type", n_boot=100)
        lr = rep.metric_table("logreg_f1").set_index("layer")
        assert int(lr["score"].idxmax()) in (1, 2, 3)
        assert lr.loc[2, "score"] > 0.8 and lr.loc[6, "score"] < lr.loc[2, "score"]
        assert lr.loc[2, "ci_low"] < lr.loc[2, "score"] < lr.loc[2, "ci_high"]
        assert lr.loc[2, "diff_ci_low"] > 0  # the planted layer is supported as better than the final one
        assert lr.loc[6, "diff_vs_final"] == 0.0
        assert set(rep.table["metric"]) == {"logreg_f1", "knn_f1"}
        assert rep.notes["classes"] == ["type0", "type1", "type2", "type3"]
        assert rep.summary.query("metric == 'logreg_f1'")["best_layer"].item() == int(lr["score"].idxmax())

        monkeypatch.setattr(tasks.TaskContext, "read_layer", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
        again = st.evaluate("celltype", run_id, label_key="cell_type", n_boot=100, n_jobs=3, progress=True)  # key ignores jobs
        assert again.cached
        np.testing.assert_allclose(again.table["score"].to_numpy(float), rep.table["score"].to_numpy(float))
        monkeypatch.undo()
        with pytest.raises(EvaluationError, match=r"label column 'kind' is not in the obs.*cell_type"):
            st.evaluate("celltype", run_id, label_key="kind")
        with pytest.raises(InvalidInputError, match=r"unknown option.*foo.*valid:.*label_key"):
            st.evaluate("celltype", run_id, label_key="cell_type", foo=1)
        with pytest.raises(EvaluationError, match="unknown evaluation task 'nope'; registered: celltype, diagnostics"):
            st.evaluate("nope", run_id)


def test_diagnostics_sequential_equals_parallel_and_progress(tmp_path: Path) -> None:
    adata, latent = _labelled(n=400)
    layers = simulate_layers(latent, n_layers=5, best_layer=1, dim=12, seed=2)
    layers[3] = layers[2] @ np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))[0] * 3.0  # rotated+scaled copy
    backend, run_id = store_with_layers(tmp_path, adata, layers, name="dg")
    with sclstore.Store(backend) as st:
        seq = st.evaluate("diagnostics", run_id, cka_map=True, twonn_cells=300)
        t = seq.table.pivot(index="layer", columns="metric", values="score")
        assert t.loc[4, "cka_final"] == pytest.approx(1.0) and np.isnan(t.loc[0, "cka_previous"])
        assert t.loc[3, "cka_previous"] == pytest.approx(1.0)  # CKA is invariant to rotation and scaling
        for la in range(5):
            X = layers[la].astype(np.float64)
            assert t.loc[la, "participation_ratio"] == pytest.approx(diagnostics.participation_ratio(X), rel=1e-5)
        M = np.asarray(seq.notes["cka_map"]["matrix"])
        assert M.shape == (5, 5) and M[2, 3] == pytest.approx(1.0) and M[0, 4] == pytest.approx(t.loc[0, "cka_final"])
        backend.close()
    # the same evaluation in 2 worker processes, in another store: identical numbers; progress lines on a non-TTY
    backend2, run2 = store_with_layers(tmp_path / "b", adata, layers, name="dg")
    buf = io.StringIO()
    real = runner.LayerProgress

    class Captured(real):  # type: ignore[misc,valid-type]
        def __init__(self, total: int, label: str, *, enabled: bool, **kw: object) -> None:
            super().__init__(total, label, enabled=enabled, interval=0.0, stream=buf)

    runner.LayerProgress = Captured  # type: ignore[misc]
    try:
        par = sclstore.Store(backend2).evaluate("diagnostics", run2, cka_map=True, twonn_cells=300, n_jobs=2, progress=True)
    finally:
        runner.LayerProgress = real  # type: ignore[misc]
    np.testing.assert_allclose(par.table["score"].to_numpy(float), seq.table["score"].to_numpy(float), equal_nan=True)
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith(f"diagnostics run {run2}: 5/5 layers") and len(lines) == 5 and "ETA" in lines[0]


def test_config_key_is_derived_and_plugins_register() -> None:
    task = tasks.get_task("trajectory")
    cfg = task.config_cls(pseudotime_key="t", pool="cls", n_jobs=4, progress=True)
    params = tasks.config_params(task, cfg)
    assert "n_jobs" not in params and "progress" not in params
    assert params["task"] == "trajectory" and params["pseudotime_key"] == "t" and params["n_subsamples"] == 20

    @dataclass(frozen=True, kw_only=True)
    class MeanCfg(tasks.TaskConfig):
        scale: float = 1.0

    class MeanNorm(tasks.Task):
        name = "mean-norm-test"
        config_cls = MeanCfg

        def compute_layer(self, config, state, layer, data):
            return float(np.linalg.norm(data.mean(axis=0))) * config.scale

    tasks.register_task(MeanNorm())
    assert "mean-norm-test" in tasks.task_names()
    with pytest.raises(InvalidInputError, match="already registered"):
        tasks.register_task(type("Other", (MeanNorm,), {})())


@pytest.mark.slow  # pynndescent compiles with numba on first use
def test_trajectory_approximate_knn_scores_match_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from sclstore.eval import task_trajectory as tt
    from sclstore.eval.trajectory import GraphOptions, combine_layer_pseudotimes, layer_pseudotimes

    rng = np.random.default_rng(7)
    n = 3000
    t = rng.uniform(0, 1, n)
    X = simulate_layers(np.c_[t, np.sin(4 * t), rng.normal(scale=0.2, size=(n, 2))], n_layers=1, best_layer=0, dim=24, seed=7)[0]
    scores = {}
    for method in ("sklearn", "pynndescent"):
        pts = layer_pseudotimes(X, t, options=GraphOptions(n_neighbors=30, transformer=method, seed=0))
        scores[method] = float(combine_layer_pseudotimes([pts], t).rho_time[0])
    assert scores["sklearn"] > 0.8
    assert abs(scores["sklearn"] - scores["pynndescent"]) < 0.02, scores
    cfg = tt.TrajectoryConfig(pseudotime_key="t")
    assert tt._transformer(cfg, 8192) == "sklearn" and tt._transformer(cfg, 8193) == "blocked"
    assert tt._transformer(cfg, 2**17) == "blocked" and tt._transformer(cfg, 2**17 + 1) == "pynndescent"
    assert tt._transformer(tasks.replace_config(cfg, knn="exact"), 10**6) == "blocked"
    assert tt._transformer(tasks.replace_config(cfg, knn="exact"), 100) == "sklearn"
    assert tt._transformer(tasks.replace_config(cfg, knn="approx"), 100) == "pynndescent"
    assert tt._transformer(tasks.replace_config(cfg, protocol="paper"), 100) is None


@pytest.mark.parametrize(("threaded", "jobs", "want"), [
    (True, 2, [1, 1, 1, 1, 2]),  # the odd last layer gets both CPUs, after the others
    (False, 2, [1, 1, 1, 1, 1]),  # a task that does not use threads keeps one per layer
    (True, 1, [2, 2, 2, 2, 2]),  # one process: every CPU for each layer
])
def test_runner_gives_threaded_layers_the_idle_cpus(monkeypatch: pytest.MonkeyPatch, threaded: bool, jobs: int,
                                                    want: list[int]) -> None:
    class ThreadsSeen(tasks.Task):  # defined here: pickled by value into the worker processes
        name = "threads-seen-test"
        threaded_layers = threaded

        def layer_input(self, ctx, config, state, layer):  # type: ignore[no-untyped-def]
            return layer

        def compute_layer(self, config, state, layer, data):  # type: ignore[no-untyped-def]
            from threadpoolctl import threadpool_info

            from sclstore.eval.tasks import layer_threads

            return layer_threads(), {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    monkeypatch.setattr(runner, "cpu_allowance", lambda: 2)
    got = runner._compute_layers(ThreadsSeen(), None, tasks.TaskConfig(n_jobs=jobs), None, list(range(5)),  # type: ignore[arg-type]
                                 runner.LayerProgress(5, "t", enabled=False))
    assert [got[la][0] for la in range(5)] == want
    if jobs > 1:  # in the workers, the BLAS limit follows
        assert [got[la][1] for la in range(5)] == [{w} for w in want]


def test_threaded_subsample_graphs_give_the_same_numbers() -> None:
    from sclstore.eval.stats import subsample_indices
    from sclstore.eval.trajectory import GraphOptions, layer_pseudotimes

    rng = np.random.default_rng(5)
    n = 1200
    t = rng.uniform(0, 1, n)
    X = simulate_layers(np.c_[t, np.sin(4 * t), rng.normal(scale=0.2, size=(n, 2))], n_layers=1, best_layer=0, dim=16, seed=5)[0]
    idx = subsample_indices(n, n_subsamples=6, fraction=0.8, seed=1)
    one, two = (layer_pseudotimes(X, t, subsamples=idx, options=GraphOptions(n_neighbors=15), threads=th) for th in (1, 2))
    assert np.array_equal(one.full, two.full) and one.root == two.root
    for a, b in zip(one.subsamples, two.subsamples, strict=True):
        assert np.array_equal(a, b)


def test_cpu_allowance_follows_the_thread_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from sclstore.store import runtime

    monkeypatch.setattr(runtime, "_ACTIVE", None)
    free = runner.cpu_allowance()
    monkeypatch.setattr(runtime, "_ACTIVE", runtime.decide(1))  # --threads 1
    assert runner.cpu_allowance() == 1
    monkeypatch.setattr(runtime, "_ACTIVE", runtime.decide(env={"SCLSTORE_THREADS": "off"}))  # disabled: the affinity set
    assert runner.cpu_allowance() == free
