"""Cell-type probing: macro-F1 against scikit-learn, kNN exact vs approximate, planted label layer."""

from __future__ import annotations

import numpy as np
import pytest
from sclstore.eval import celltype as ct
from sclstore.store.errors import EvaluationError


def test_macro_f1_matches_sklearn_and_bootstrap_is_resampled_f1(rng: np.random.Generator) -> None:
    from sklearn.metrics import f1_score

    truth = rng.integers(0, 5, size=400)
    pred = np.where(rng.random(400) < 0.6, truth, rng.integers(0, 6, size=400))  # class 5 only predicted
    assert ct.macro_f1(truth, pred) == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))
    boot = ct.bootstrap_f1(truth, pred, n_boot=30, seed=4)
    idx = np.random.default_rng(4).integers(0, 400, size=(30, 400))
    for b in (0, 17, 29):
        assert boot[b] == pytest.approx(f1_score(truth[idx[b]], pred[idx[b]], average="macro", zero_division=0))
    s = ct.probe_score(truth, pred, n_boot=200, seed=0)
    assert s.ci_low < s.macro_f1 < s.ci_high and s.accuracy == pytest.approx(np.mean(truth == pred))


def test_probes_on_separable_and_random_labels(rng: np.random.Generator) -> None:
    centres = rng.normal(scale=8, size=(4, 6))
    codes = np.repeat(np.arange(4), 60)
    X = centres[codes] + rng.normal(size=(240, 6))
    assert ct.macro_f1(codes, ct.knn_predictions(X, codes, k=10)) == 1.0
    assert ct.macro_f1(codes, ct.logistic_predictions(X, codes, folds=5)) == 1.0
    noise = rng.normal(size=(240, 6))  # labels carry no signal: chance level (0.25) within noise
    assert ct.macro_f1(codes, ct.logistic_predictions(noise, codes, folds=5)) < 0.45
    # leave-one-out: a cell never votes for itself (two far-apart singletons of the same class pattern)
    with pytest.raises(EvaluationError, match="fewer than 5 cells"):
        ct.encode_labels(np.array(["a"] * 10 + ["b"] * 3), min_per_class=5)
    with pytest.raises(EvaluationError, match="2 cells have no label"):
        ct.encode_labels(np.array(["a", None, "b", np.nan], dtype=object))


@pytest.mark.slow  # pynndescent compiles with numba on first use
def test_approximate_knn_matches_exact(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    centres = rng.normal(scale=1.0, size=(8, 10))
    codes = rng.integers(0, 8, size=3000)
    X = centres[codes] + rng.normal(size=(3000, 10))
    exact = ct.nearest_neighbors(X, 15, method="exact")
    approx = ct.nearest_neighbors(X, 15, method="approx", seed=0)
    recall = np.mean([len(set(a) & set(e)) / 15 for a, e in zip(approx, exact)])
    assert recall > 0.95
    f_exact = ct.macro_f1(codes, ct.knn_vote(exact, codes))
    f_approx = ct.macro_f1(codes, ct.knn_vote(approx, codes))
    assert 0.5 < f_exact < 1.0 and abs(f_exact - f_approx) < 0.01
    # "auto" switches to the approximate search above the threshold
    calls = []
    import pynndescent

    real = pynndescent.NNDescent
    monkeypatch.setattr(pynndescent, "NNDescent", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ct, "APPROX_KNN_ABOVE", 200)
    small = X[:300]
    assert ct.nearest_neighbors(small, 5, method="auto").shape == (300, 5) and calls == [1]
    monkeypatch.setattr(ct, "APPROX_KNN_ABOVE", 8192)
    np.testing.assert_array_equal(ct.nearest_neighbors(small, 5, method="auto"), ct.nearest_neighbors(small, 5, method="exact"))
    assert calls == [1]
