"""Evaluation runner: loops the pure metrics over a run's stored layers, caches everything.

Embeddings are read through the slice language (:func:`sclstore.query.execute_query`); raw
counts (for the PCA reference and DE) come from the dataset's source .h5ad. DE results and
reference pseudotimes are cached in the catalog keyed by the dataset's content hash and the
parameters, so another run of the same dataset never recomputes them; a repeated identical
evaluation returns the stored report without reading any embedding.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from sclstore.query import execute_query
from sclstore.store import Backend, DatasetInfo, RunInfo, cache_key
from sclstore.store.errors import EvaluationError, InvalidInputError

from .de import DE_MODES, DEResult, pseudobulk, run_de
from .perturbation import perturbation_paired_difference, rsa_from_centroids, select_perturbations, split_half_ceiling
from .report import EvalReport
from .results import BASELINE_LAYER, LayerScore, layer_table, summarize_layers
from .trajectory import as_time, reference_pseudotime, score_trajectory, trajectory_paired_difference

__all__ = ["evaluate_trajectory", "evaluate_perturbation", "EVAL_VERSION"]

logger = logging.getLogger(__name__)
EVAL_VERSION = "1"  # bump when a metric changes, so cached results are not reused


# ----------------------------------------------------------------------------------- helpers
def _complete_run(backend: Backend, run: int | str) -> RunInfo:
    info = backend.get_run(run)
    if info.status != "complete":
        msg = f"run {info.id} is {info.status} ({info.watermark}/{info.n_cells} cells): finish it by rerunning the same ingest"
        raise EvaluationError(msg)
    return info


def _pool(info: RunInfo, pool: str | None) -> str:
    if pool is None:
        return info.pools[0]
    if pool not in info.pools:
        raise EvaluationError(f"run {info.id} has no pool {pool!r}; it stores: {', '.join(info.pools)} (pass --pool one of them)")
    return pool


def _column(obs: pd.DataFrame, ds: DatasetInfo, key: str, what: str) -> pd.Series:
    if key not in obs.columns or key in ("cell_idx", "src_idx"):
        have = ", ".join(c.name for c in ds.obs_schema) or "(none)"
        raise EvaluationError(f"{what} column {key!r} is not in the obs of dataset {ds.name!r}; it has: {have}")
    return obs[key]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float | np.integer | np.floating):
        return repr(float(value)) if isinstance(value, float | np.floating) else str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def _layers(backend: Backend, info: RunInfo, pool: str, where: str = "") -> list[np.ndarray]:
    """Every stored layer as a (cells x dim) matrix in cell_idx order, read through the query layer."""
    out = []
    for layer in info.layers:
        sql = f"SELECT embedding.{pool} FROM embeddings WHERE run = {info.id} AND layer = {layer}{where} ORDER BY cell_idx"
        res = execute_query(backend, sql)
        out.append(res.embeddings[0])
    return out


def _embedded(info: RunInfo, n_cells: int) -> np.ndarray:
    """Bool mask of the cells the model embedded (the run's unembeddable cells hold NaN and are skipped)."""
    keep = np.ones(n_cells, dtype=bool)
    if info.unembeddable:
        keep[np.asarray(info.unembeddable, dtype=np.int64)] = False
    return keep


def _skip_unembeddable(info: RunInfo) -> str:
    """A WHERE term excluding the run's unembeddable cells (empty when there are none)."""
    if not info.unembeddable:
        return ""
    return f" AND cell_idx NOT IN ({', '.join(str(int(c)) for c in info.unembeddable)})"


def _counts(ds: DatasetInfo, counts_path: str | Path | None, obs: pd.DataFrame) -> tuple[sp.csr_matrix, np.ndarray]:
    """Raw counts of the dataset's cells in cell_idx order, and the gene names."""
    from sclstore.ingest.source import CountsSource

    path = Path(counts_path or ds.source_path or "")
    if not path.is_file():
        msg = (f"the raw counts of dataset {ds.name!r} are needed and its source file {str(path)!r} is not there: "
               "pass counts_path= (--counts PATH) with the .h5ad that was ingested")
        raise EvaluationError(msg)
    with CountsSource(path) as src:
        if src.scan() != ds.content_hash:
            raise EvaluationError(f"{path} is not the data of dataset {ds.name!r} (content hash differs): pass the ingested file")
        counts = src.rows(0, src.n_obs)[obs["src_idx"].to_numpy()]
        return counts.tocsr(), src.var_names


def _cached_intermediate(backend: Backend, kind: str, params: dict[str, Any], compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    key = cache_key(kind, params)
    blob = backend.get_intermediate(key)
    if blob is not None:
        logger.info("%s: cache hit", kind)
        return pd.read_parquet(io.BytesIO(blob))
    df = compute()
    buf = io.BytesIO()
    df.to_parquet(buf)
    backend.put_intermediate(kind, key, params, buf.getvalue())
    return df


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


# ----------------------------------------------------------------------------------- trajectory
def evaluate_trajectory(
    backend: Backend,
    run: int | str,
    *,
    pseudotime_key: str,
    root_cell: str | None = None,
    pool: str | None = None,
    n_subsamples: int = 20,
    n_neighbors: int = 30,
    reference: bool = True,
    counts_path: str | Path | None = None,
    seed: int = 0,
) -> EvalReport:
    """Score every stored layer of a run on trajectory inference.

    Per layer: kNN -> diffusion map -> DPT from a deterministic root -> Spearman against the
    ground-truth time (metric ``spearman_time``) and against the paper's reference, DPT on PCA
    of highly variable genes (``spearman_ref``); a PCA-of-counts baseline row; intervals from
    repeated 80% subsamples; each layer's paired difference vs the final layer.

    Raises
    ------
    EvaluationError
        Missing or non-numeric time column, unknown root cell or pool, incomplete run.
    """
    info = _complete_run(backend, run)
    pool = _pool(info, pool)
    ds = backend.get_dataset(info.dataset_id)
    obs = backend.read_obs(ds.id)
    raw_time = _column(obs, ds, pseudotime_key, "pseudotime")
    try:
        time = as_time(raw_time)
    except (InvalidInputError, EvaluationError) as exc:
        numeric = [c.name for c in ds.obs_schema if c.kind in ("int", "float")]
        raise EvaluationError(f"{exc}; numeric obs columns: {', '.join(numeric) or '(none)'}") from None
    root: Any = "diffusion-extreme"
    if root_cell is not None:
        if root_cell not in obs.index:
            raise EvaluationError(f"root cell {root_cell!r} is not a cell of dataset {ds.name!r} (e.g. {', '.join(obs.index[:3])})")
        root = int(obs.index.get_loc(root_cell))
    keep = _embedded(info, len(obs))
    time_all, root_all = time, root  # the counts reference sees every cell
    if not keep.all():
        if isinstance(root, int):
            if not keep[root]:
                raise EvaluationError(f"root cell {root_cell!r} could not be embedded by the model (no known gene); "
                                      "pick another --root-cell")
            root = int(keep[:root].sum())
        time = np.asarray(time)[keep]
    params = {"task": "trajectory", "version": EVAL_VERSION, "pseudotime_key": pseudotime_key, "root": root_cell or "diffusion-extreme",
              "pool": pool, "n_subsamples": n_subsamples, "n_neighbors": n_neighbors, "reference": reference, "seed": seed,
              "primary_metric": "spearman_time"}
    phash = cache_key(params)
    stored = backend.get_evaluation(info.id, "trajectory", phash)
    if stored is not None:
        return EvalReport.from_json(stored, cached=True)

    ref_pt, ref_rho = None, float("nan")
    if reference:
        ref_params = {"dataset": ds.content_hash, "time": pseudotime_key, "k": n_neighbors, "root": params["root"], "seed": seed}

        def compute_ref() -> pd.DataFrame:
            counts, _genes = _counts(ds, counts_path, obs)
            res = reference_pseudotime(counts, time_all, n_neighbors=n_neighbors, root=root_all, seed=seed)
            pca = np.asarray(res.pca, dtype=float)
            return pd.DataFrame({"pseudotime": np.asarray(res.pseudotime, dtype=float),
                                 **{f"pc{i}": pca[:, i] for i in range(pca.shape[1])}})

        ref_df = _cached_intermediate(backend, "reference_pseudotime", ref_params, compute_ref)
        ref_pt = ref_df["pseudotime"].to_numpy()[keep]
        pca = ref_df[[c for c in ref_df.columns if c.startswith("pc")]].to_numpy()[keep]
        with threadpool_limits(limits=1):
            base = score_trajectory(pca, time, reference=ref_pt, n_neighbors=n_neighbors, root=root, n_subsamples=n_subsamples,
                                    seed=seed)
        ref_rho = base.rho_time
    Xs = [X[keep] for X in _layers(backend, info, pool)]
    scores: list[Any] = []
    undefined: dict[int, str] = {}
    for layer, X in zip(info.layers, Xs):
        if np.ptp(X, axis=0).max() == 0:
            undefined[layer] = "the embedding is the same for every cell (e.g. cls at the input layer)"
            scores.append(None)
            continue
        try:
            with threadpool_limits(limits=1):  # kNN/diffmap on these sizes: oversubscribed threads cost up to 10x
                scores.append(score_trajectory(X, time, reference=ref_pt, n_neighbors=n_neighbors, root=root,
                                               n_subsamples=n_subsamples, seed=seed))
        except EvaluationError as exc:
            undefined[layer] = str(exc)
            scores.append(None)
    final = scores[-1]
    rows = []
    for layer, sc in zip(info.layers, scores):
        depth = info.depth(layer)
        for metric, against in (("spearman_time", "time"), ("spearman_ref", "reference")):
            if metric == "spearman_ref" and ref_pt is None:
                continue
            if sc is None:
                rows.append(LayerScore(layer=layer, depth=depth, score=float("nan"), pool=pool, metric=metric, n=0))
                continue
            value, lo, hi = (sc.rho_time, sc.ci_low, sc.ci_high) if against == "time" else (sc.rho_ref, sc.ref_ci_low, sc.ref_ci_high)
            diff = trajectory_paired_difference(sc, final, against=against) if final is not None and sc is not final else None  # type: ignore[arg-type]
            rows.append(LayerScore(layer=layer, depth=depth, score=_finite(value), ci_low=_finite(lo), ci_high=_finite(hi),
                                   pool=pool, metric=metric, n=sc.n_cells - sc.n_dropped,
                                   diff_vs_final=diff.estimate if diff else (0.0 if sc is final else float("nan")),
                                   diff_ci_low=diff.ci_low if diff else float("nan"),
                                   diff_ci_high=diff.ci_high if diff else float("nan"),
                                   diff_p_value=diff.p_value if diff else float("nan")))
    if ref_pt is not None:
        rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=_finite(base.rho_time), ci_low=_finite(base.ci_low),
                               ci_high=_finite(base.ci_high), pool=pool, metric="spearman_time", representation="pca_hvg",
                               n=base.n_cells - base.n_dropped))
    table = layer_table(rows)
    report = EvalReport(task="trajectory", run_id=info.id, run_label=info.label, params=params, table=table,
                        summary=summarize_layers(table), notes={"n_cells": int(len(time)), "pca_reference_rho": ref_rho,
                                                               "undefined_layers": {str(k): v for k, v in undefined.items()},
                                                               "unembeddable_cells_skipped": int((~keep).sum())})
    backend.put_evaluation(info.id, "trajectory", phash, params, report.to_json())
    return report


# ----------------------------------------------------------------------------------- perturbation
def _centroids(backend: Backend, info: RunInfo, pool: str, key: str, where: str) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {label: centroid}} from one streaming GROUP BY query per condition."""
    sql = (f"SELECT {_quote_ident(key)}, layer, AVG(embedding.{pool}), COUNT(*) FROM embeddings "
           f"WHERE run = {info.id}{where} GROUP BY {_quote_ident(key)}, layer")
    res = execute_query(backend, sql)
    labels = res.obs[key].astype(str).to_numpy()
    out: dict[int, dict[str, np.ndarray]] = {}
    for li, layer in enumerate(res.layers):
        out[int(layer)] = {lab: res.embeddings[li, gi] for gi, lab in enumerate(labels)}
    return out


def evaluate_perturbation(
    backend: Backend,
    run: int | str,
    *,
    perturbation_key: str,
    control: str,
    condition_key: str | None = None,
    replicate_key: str | None = None,
    de_mode: str = "pydeseq2",
    pool: str | None = None,
    variant: str = "shift",
    n_boot: int = 200,
    n_perm: int = 999,
    min_cells: int = 10,
    ceiling: bool = True,
    n_jobs: int = 1,
    counts_path: str | Path | None = None,
    seed: int = 0,
) -> EvalReport:
    """Score every stored layer on perturbation response, separately per condition.

    Per condition: pseudobulk raw counts per (perturbation, replicate) -> DE of each
    perturbation vs control (pydeseq2, or the fast median-of-ratios log-ratio) -> per layer the
    RSA between corr(DE) and cos(shift) (``rsa_shift``; the paper's centroid variant with
    ``variant="centroid"``), Mantel p-value, bootstrap CI over perturbations, paired difference
    vs the final layer, and a split-half DE ceiling. DE is cached per dataset.

    Raises
    ------
    EvaluationError
        Missing columns, unknown control, too few cells/replicates/perturbations, unknown pool.
    """
    info = _complete_run(backend, run)
    pool = _pool(info, pool)
    if de_mode not in DE_MODES:
        raise EvaluationError(f"unknown DE mode {de_mode!r}: pass one of {', '.join(DE_MODES)}")
    ds = backend.get_dataset(info.dataset_id)
    obs = backend.read_obs(ds.id)
    perts = _column(obs, ds, perturbation_key, "perturbation").astype(str)
    if control not in set(perts):
        have = ", ".join(sorted(perts.unique())[:12])
        raise EvaluationError(f"control label {control!r} is not a value of {perturbation_key!r}; values include: {have}")
    conds = _column(obs, ds, condition_key, "condition").astype(str) if condition_key else pd.Series("all", index=obs.index)
    reps = _column(obs, ds, replicate_key, "replicate").astype(str) if replicate_key else None
    params = {"task": "perturbation", "version": EVAL_VERSION, "perturbation_key": perturbation_key, "control": control,
              "condition_key": condition_key, "replicate_key": replicate_key, "de_mode": de_mode, "pool": pool, "variant": variant,
              "n_boot": n_boot, "n_perm": n_perm, "min_cells": min_cells, "ceiling": ceiling, "seed": seed,
              "primary_metric": f"rsa_{variant}"}
    phash = cache_key(params)
    stored = backend.get_evaluation(info.id, "perturbation", phash)
    if stored is not None:
        return EvalReport.from_json(stored, cached=True)

    counts: sp.csr_matrix | None = None
    genes: np.ndarray | None = None
    rows: list[LayerScore] = []
    notes: dict[str, Any] = {"de_mode": de_mode, "conditions": {}, "unembeddable_cells_skipped": len(info.unembeddable)}
    for cond in sorted(conds.unique()):
        mask = (conds == cond).to_numpy()
        rep = reps[mask] if reps is not None else _pseudo_replicates(obs.index[mask], seed)
        keep = select_perturbations(perts[mask], rep, control, min_cells=min_cells)
        de_params = {"dataset": ds.content_hash, "condition_key": condition_key, "condition": cond, "key": perturbation_key,
                     "replicate_key": replicate_key, "control": control, "mode": de_mode, "min_cells": min_cells,
                     "perturbations": sorted(keep), "seed": seed}

        def need_counts() -> tuple[sp.csr_matrix, np.ndarray]:
            nonlocal counts, genes
            if counts is None:
                counts, genes = _counts(ds, counts_path, obs)
            return counts, genes  # type: ignore[return-value]

        def compute_de() -> pd.DataFrame:
            c, g = need_counts()
            pb, meta = pseudobulk(c[mask], perts[mask].to_numpy(), np.asarray(rep), gene_names=list(g))
            res: DEResult = run_de(pb, meta, control, mode=de_mode, perturbations=[p for p in keep if p != control], n_jobs=n_jobs)  # type: ignore[arg-type]
            return res.lfc

        lfc = _cached_intermediate(backend, "de", de_params, compute_de)
        cond_note: dict[str, Any] = {"perturbations": int(lfc.shape[0]), "genes": int(lfc.shape[1])}
        if ceiling:
            def compute_ceiling() -> pd.DataFrame:
                c, _g = need_counts()
                ce = split_half_ceiling(c[mask], perts[mask].to_numpy(), np.asarray(rep), control,
                                        perturbations=[p for p in keep if p != control], mode="fast", seed=seed)
                return pd.DataFrame({"rsa": [ce.rsa], "spearman_brown": [ce.spearman_brown]})

            ce = _cached_intermediate(backend, "de_ceiling", de_params, compute_ceiling)
            cond_note["split_half_ceiling"] = float(ce["rsa"].iloc[0])
            cond_note["spearman_brown_ceiling"] = float(ce["spearman_brown"].iloc[0])
        notes["conditions"][cond] = cond_note
        where = f" AND {_quote_ident(condition_key)} = {_quote_value(cond)}" if condition_key else ""
        cents = _centroids(backend, info, pool, perturbation_key, where + _skip_unembeddable(info))
        scores: dict[int, Any] = {}
        for layer in info.layers:
            try:
                scores[layer] = rsa_from_centroids(cents[layer], control, lfc, variant=variant, n_boot=n_boot,  # type: ignore[arg-type]
                                                   n_perm=n_perm, seed=seed)
            except EvaluationError as exc:  # e.g. cls at the input layer: every shift is zero
                scores[layer] = None
                cond_note.setdefault("undefined_layers", {})[str(layer)] = str(exc)
        final = scores[info.layers[-1]]
        label = None if cond == "all" and not condition_key else cond
        for layer, sc in scores.items():
            if sc is None:
                rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, condition=label,
                                       metric=f"rsa_{variant}", n=0))
                continue
            diff = perturbation_paired_difference(sc, final) if final is not None and sc is not final and n_boot > 0 else None
            rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=sc.score, ci_low=sc.ci_low, ci_high=sc.ci_high,
                                   p_value=sc.p_value, pool=pool, condition=label, metric=f"rsa_{variant}", n=sc.n_perturbations,
                                   diff_vs_final=diff.estimate if diff else (0.0 if sc is final else float("nan")),
                                   diff_ci_low=diff.ci_low if diff else float("nan"), diff_ci_high=diff.ci_high if diff else float("nan"),
                                   diff_p_value=diff.p_value if diff else float("nan")))
    table = layer_table(rows)
    report = EvalReport(task="perturbation", run_id=info.id, run_label=info.label, params=params, table=table,
                        summary=summarize_layers(table), notes=notes)
    backend.put_evaluation(info.id, "perturbation", phash, params, report.to_json())
    return report


def _pseudo_replicates(cells: Sequence[str], seed: int, n: int = 2) -> np.ndarray:
    """Random pseudo-replicates when the data have no replicate column (p-values anti-conservative)."""
    rng = np.random.default_rng(seed)
    return np.asarray([f"pseudo{i}" for i in rng.integers(0, n, size=len(cells))])

