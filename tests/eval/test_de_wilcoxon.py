"""The paper protocol's per-cell Wilcoxon DE (scanpy rank_genes_groups) against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from sclstore.eval.de import run_de
from sclstore.eval.de_wilcoxon import de_wilcoxon
from sclstore.eval.perturbation import crossfit_de, crossfit_halves
from sclstore.eval.task_perturbation import PerturbationConfig
from sclstore.store.errors import EvaluationError, InvalidInputError


def _counts(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = np.repeat(["NTC", "A", "B", "C"], [40, 20, 20, 20])
    mu = np.full((4, 30), 5.0)
    mu[1, :5] *= 4  # A up on genes 0-4
    mu[2, 5:10] /= 4  # B down on genes 5-9
    codes = {"NTC": 0, "A": 1, "B": 2, "C": 3}
    X = rng.poisson(mu[[codes[x] for x in lab]]).astype(float)
    rep = np.tile(["d1", "d2"], lab.shape[0] // 2)
    return X, lab, rep


def _hand_lfc(X: np.ndarray, lab: np.ndarray, group: str, control: str) -> np.ndarray:
    # scanpy's recipe, written out: normalise each cell to 1e4, log1p, compare expm1 of the mean logs
    L = np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)
    g, c = np.expm1(L[lab == group].mean(axis=0)), np.expm1(L[lab == control].mean(axis=0))
    return np.log2((g + 1e-9) / (c + 1e-9))


def test_wilcoxon_lfc_equals_the_hand_computation() -> None:
    X, lab, _ = _counts()
    names = [f"G{i}" for i in range(X.shape[1])]
    res = de_wilcoxon(X, lab, "NTC", gene_names=names)
    assert res.mode == "wilcoxon" and list(res.lfc.index) == ["A", "B", "C"] and list(res.lfc.columns) == names
    for p in ("A", "B", "C"):
        np.testing.assert_allclose(res.lfc.loc[p].to_numpy(), _hand_lfc(X, lab, p, "NTC"), rtol=1e-4, atol=1e-4)
    assert (res.lfc.loc["A"].iloc[:5] > 1).all() and (res.lfc.loc["B"].iloc[5:10] < -1).all()
    sub = de_wilcoxon(X, lab, "NTC", perturbations=["B"], gene_names=names, genes=["G7", "G1"])
    np.testing.assert_allclose(sub.lfc.loc["B"].to_numpy(), _hand_lfc(X, lab, "B", "NTC")[[7, 1]], rtol=1e-4, atol=1e-4)


def test_wilcoxon_errors_and_dispatch() -> None:
    X, lab, _ = _counts()
    with pytest.raises(EvaluationError, match="control label 'CTRL' not found"):
        de_wilcoxon(X, lab, "CTRL")
    with pytest.raises(EvaluationError, match="have no cells"):
        de_wilcoxon(X, lab, "NTC", perturbations=["Z"])
    with pytest.raises(InvalidInputError, match="single cells"):
        run_de(None, None, "NTC", mode="wilcoxon")  # type: ignore[arg-type]


def test_crossfit_folds_use_wilcoxon_on_each_half() -> None:
    X, lab, rep = _counts(1)
    names = [f"G{i}" for i in range(X.shape[1])]
    halves = crossfit_halves(lab, rep, seed=0)
    folds = crossfit_de(X, lab, rep, "NTC", halves, gene_names=names, genes=names, mode="wilcoxon")
    for fold, mask in zip(folds, (halves[0], ~halves[0]), strict=True):
        want = de_wilcoxon(X[mask], lab[mask], "NTC", gene_names=names)
        np.testing.assert_allclose(fold.loc[want.lfc.index].to_numpy(), want.lfc.to_numpy())


def test_paper_protocol_resolves_to_wilcoxon() -> None:
    assert PerturbationConfig(perturbation_key="gene", control="NTC", protocol="paper").de_mode == "wilcoxon"
    assert PerturbationConfig(perturbation_key="gene", control="NTC").de_mode == "pydeseq2"
    assert PerturbationConfig(perturbation_key="gene", control="NTC", protocol="paper", de_mode="fast").de_mode == "fast"
