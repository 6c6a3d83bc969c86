"""Cell-identity probing of one layer (pure functions; no store access).

* :func:`knn_predictions`: leave-one-out kNN majority vote (each cell's label predicted from its
  ``k`` nearest other cells); exact neighbours below ``approx_above`` cells, pynndescent's
  approximate graph above it (scanpy's rule, 8,192 cells).
* :func:`logistic_predictions`: out-of-fold predictions of a standardised multinomial logistic
  regression (lbfgs, ``max_iter=1000``) in stratified ``k``-fold cross-validation — the probe of
  the paper's repository.
* :func:`macro_f1` and :func:`bootstrap_f1`: macro-F1 (over the classes present in the truth or
  the predictions, as scikit-learn) and a percentile interval over a bootstrap of the cells of
  the out-of-fold predictions. The bootstrap indices depend only on the number of cells and the
  seed, so replicates of different layers are paired (:func:`~sclstore.eval.stats.paired_difference`).
  The interval reflects which cells were sampled, not the variability of refitting the probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sclstore.store.errors import EvaluationError, InvalidInputError

__all__ = [
    "APPROX_KNN_ABOVE",
    "ProbeScore",
    "bootstrap_f1",
    "encode_labels",
    "knn_predictions",
    "knn_vote",
    "logistic_predictions",
    "macro_f1",
    "nearest_neighbors",
    "probe_score",
]

#: Above this many cells the kNN probe uses approximate neighbours (scanpy's default threshold).
APPROX_KNN_ABOVE = 8192


@dataclass(frozen=True, kw_only=True, eq=False)
class ProbeScore:
    """Macro-F1 and accuracy of one probe on one layer.

    Attributes
    ----------
    macro_f1, accuracy
        On the out-of-fold (or leave-one-out) predictions of every cell.
    ci_low, ci_high
        Percentile bootstrap interval of ``macro_f1`` over cells.
    boot
        Bootstrap replicates of ``macro_f1`` (paired across layers with the same seed and cells).
    n_cells, n_classes
        Cells and classes scored.
    """

    macro_f1: float
    accuracy: float
    ci_low: float
    ci_high: float
    n_cells: int
    n_classes: int
    boot: np.ndarray = field(repr=False)


def encode_labels(labels: np.ndarray, *, min_per_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of string labels and the class names; missing labels are refused.

    Raises
    ------
    EvaluationError
        Missing labels, fewer than two classes, or a class with fewer than ``min_per_class`` cells.
    """
    lab = np.asarray(labels, dtype=object)
    missing = np.array([x is None or (isinstance(x, float) and np.isnan(x)) for x in lab])
    if missing.any():
        raise EvaluationError(f"{int(missing.sum())} cells have no label; filter them out or fill the label column")
    classes, codes = np.unique(lab.astype(str), return_inverse=True)
    if classes.size < 2:
        raise EvaluationError(f"label probing needs at least two classes, got {classes.size}")
    counts = np.bincount(codes, minlength=classes.size)
    small = [str(c) for c, k in zip(classes, counts) if k < min_per_class]
    if small:
        raise EvaluationError(f"classes with fewer than {min_per_class} cells cannot be cross-validated: {', '.join(small[:8])}; "
                              "drop them or lower the number of folds")
    return codes.astype(np.int64), classes


def nearest_neighbors(X: np.ndarray, k: int, *, method: str = "auto", seed: int = 0) -> np.ndarray:
    """Indices of each row's ``k`` nearest other rows (Euclidean), shape ``(n, k)``.

    ``method``: ``"exact"`` (scikit-learn), ``"approx"`` (pynndescent) or ``"auto"`` (approximate
    above :data:`APPROX_KNN_ABOVE` rows).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if not 1 <= k < n:
        raise InvalidInputError(f"k must be between 1 and n_cells - 1 = {n - 1}, got {k}")
    if method not in ("auto", "exact", "approx"):
        raise InvalidInputError(f"unknown neighbour method {method!r}; pass auto, exact or approx")
    if method == "approx" or (method == "auto" and n > APPROX_KNN_ABOVE):
        from pynndescent import NNDescent

        index = NNDescent(X, n_neighbors=k + 1, random_state=seed, n_jobs=1)
        idx, _ = index.neighbor_graph
    else:
        from sklearn.neighbors import NearestNeighbors

        _, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    out = np.empty((n, k), dtype=np.int64)
    rows = np.arange(n)
    for i in range(n):  # drop the cell itself (it may not be first when duplicates tie)
        r = idx[i][idx[i] != rows[i]]
        out[i] = r[:k]
    return out


def knn_predictions(X: np.ndarray, codes: np.ndarray, *, k: int = 15, method: str = "auto", seed: int = 0) -> np.ndarray:
    """Leave-one-out kNN majority-vote label per cell (ties: the nearest neighbour's class among the tied)."""
    return knn_vote(nearest_neighbors(X, k, method=method, seed=seed), codes)


def knn_vote(nn: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Majority vote of precomputed neighbours ``nn`` (n x k, nearest first) over integer ``codes``."""
    k = nn.shape[1]
    n_classes = int(codes.max()) + 1
    votes = np.zeros((nn.shape[0], n_classes))
    weights = 1.0 + 1e-6 * (k - np.arange(k))  # break ties in favour of closer neighbours
    np.add.at(votes, (np.repeat(np.arange(nn.shape[0]), k), codes[nn].ravel()), np.tile(weights, nn.shape[0]))
    return votes.argmax(axis=1)


def logistic_predictions(X: np.ndarray, codes: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions of StandardScaler + LogisticRegression in stratified k-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if np.bincount(codes).min() < folds:
        raise EvaluationError(f"a class has fewer cells than the {folds} folds; pass fewer folds or drop the rare classes")
    pred = np.empty_like(codes)
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, codes):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(X[train], codes[train])
        pred[test] = model.predict(X[test])
    return pred


def _f1_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Macro-F1 of confusion matrices ``(..., K, K)`` (rows truth, columns prediction)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(float)
    support = conf.sum(axis=-1)
    predicted = conf.sum(axis=-2)
    present = (support + predicted) > 0
    den = support + predicted
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    return (f1 * present).sum(axis=-1) / present.sum(axis=-1)


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in the truth or the predictions."""
    truth, pred = np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    K = int(max(truth.max(), pred.max())) + 1
    conf = np.bincount(truth * K + pred, minlength=K * K).reshape(K, K)
    return float(_f1_from_confusion(conf))


def bootstrap_f1(truth: np.ndarray, pred: np.ndarray, *, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """Macro-F1 of ``n_boot`` bootstrap resamples of the cells (vectorised over replicates)."""
    truth, pred = np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = truth.size
    K = int(max(truth.max(), pred.max())) + 1
    if n_boot <= 0:
        return np.empty(0)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    cell = truth * K + pred
    flat = (np.arange(n_boot)[:, None] * (K * K) + cell[idx]).ravel()
    conf = np.bincount(flat, minlength=n_boot * K * K).reshape(n_boot, K, K)
    return _f1_from_confusion(conf)


def probe_score(truth: np.ndarray, pred: np.ndarray, *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> ProbeScore:
    """Macro-F1, accuracy and a bootstrap interval of out-of-fold predictions."""
    boot = bootstrap_f1(truth, pred, n_boot=n_boot, seed=seed)
    a = (1 - level) / 2
    lo, hi = (float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))) if boot.size else (float("nan"), float("nan"))
    return ProbeScore(macro_f1=macro_f1(truth, pred), accuracy=float(np.mean(truth == pred)), ci_low=lo, ci_high=hi,
                      n_cells=int(truth.size), n_classes=int(np.unique(truth).size), boot=boot)
