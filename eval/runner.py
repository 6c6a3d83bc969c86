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
from .perturbation import (
    VARIANTS,
    ceiling_from_folds,
    crossfit_de,
    crossfit_halves,
    rsa_from_centroids,
    score_perturbation_crossfit,
    select_perturbations,
)
from .report import EvalReport
from .claims import layer_claims
from .results import BASELINE_LAYER, LayerScore, apply_claim, claim_summary_row, layer_table, summarize_layers
from .stats import subsample_indices
from .trajectory import (
    GraphOptions,
    as_time,
    combine_layer_pseudotimes,
    earliest_roots,
    layer_pseudotimes,
    reference_pseudotime,
)

__all__ = ["evaluate_trajectory", "evaluate_perturbation", "EVAL_VERSION", "PROTOCOLS"]

logger = logging.getLogger(__name__)
EVAL_VERSION = "2"  # bump when a metric changes, so cached results are not reused


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


# ----------------------------------------------------------------------------------- claims
PROTOCOLS = ("default", "paper")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}: pass one of {', '.join(PROTOCOLS)}")


def _claimed_rows(rows: list[LayerScore], est: np.ndarray, resamples: np.ndarray, info: RunInfo, layers: Sequence[int], *,
                  scale: float, metric: str, seed: int, summary: list[dict[str, Any]], notes: dict[str, Any],
                  **keys: Any) -> list[LayerScore]:
    """Apply the shared claim logic to one group's rows; append its summary row."""
    depths = {int(li): info.depth(li) for li in layers}
    try:
        claim = layer_claims(est, resamples, list(layers), scale=scale, seed=seed, metric=metric,
                             depths=[depths[int(li)] for li in layers], final_layer=int(layers[-1]) if np.isfinite(est[-1]) else None)
    except InvalidInputError as exc:  # too few resamples or no finite score: report estimates, claim nothing
        notes.setdefault("claims_skipped", []).append(f"{keys}: {exc}")
        return rows
    summary.append(claim_summary_row(claim, depths=depths, metric=metric, **keys))
    return apply_claim(rows, claim)


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
    protocol: str = "default",
    standardize: bool = False,
    n_roots: int = 5,
) -> EvalReport:
    """Score every stored layer of a run on trajectory inference.

    Per layer: kNN -> diffusion map -> DPT from a deterministic root -> Spearman against the
    ground-truth time (metric ``spearman_time``) and against the paper's reference, DPT on PCA
    of highly variable genes (``spearman_ref``); a PCA-of-counts baseline row; calibrated
    intervals from repeated 80% subsamples; every layer scored on one common cell set; claims
    (best layer set, win frequencies, gain vs final) from :func:`~sclstore.eval.claims.layer_claims`;
    a root-sensitivity report over ``n_roots`` random earliest-time roots.

    ``protocol="paper"`` reproduces the authors' code: first earliest-time cell as root,
    scanpy's default kNN and 15 diffusion components, each layer on its own finite cells, and
    the headline (primary metric) against the reference pseudotime.

    Raises
    ------
    EvaluationError
        Missing or non-numeric time column, unknown root cell, pool or protocol, incomplete run.
    """
    _check_protocol(protocol)
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
    paper = protocol == "paper"
    root: Any = "first" if paper else "diffusion-extreme"
    if root_cell is not None:
        if root_cell not in obs.index:
            raise EvaluationError(f"root cell {root_cell!r} is not a cell of dataset {ds.name!r} (e.g. {', '.join(obs.index[:3])})")
        root = int(obs.index.get_loc(root_cell))
    options = GraphOptions(n_neighbors=n_neighbors, n_dcs=10, diffmap_comps=15 if paper else None,
                           transformer=None if paper else "sklearn", standardize=standardize, seed=seed)
    fraction = 0.8
    params = {"task": "trajectory", "version": EVAL_VERSION, "pseudotime_key": pseudotime_key,
              "root": root_cell or (root if isinstance(root, str) else "explicit"), "pool": pool, "n_subsamples": n_subsamples,
              "subsample_fraction": fraction, "n_neighbors": n_neighbors, "reference": reference, "seed": seed, "protocol": protocol,
              "standardize": standardize, "common_cells": not paper, "n_roots": n_roots, "diffmap_comps": options.diffmap_comps,
              "knn": options.transformer or "scanpy-default",
              "primary_metric": "spearman_ref" if paper and reference else "spearman_time"}
    phash = cache_key(params)
    stored = backend.get_evaluation(info.id, "trajectory", phash)
    if stored is not None:
        return EvalReport.from_json(stored, cached=True)

    ref_pt, ref_rho = None, float("nan")
    base = None
    forced = None if isinstance(root, str) else int(root)
    idxs = subsample_indices(len(time), n_subsamples=n_subsamples, fraction=fraction, seed=seed,
                             always_include=forced) if n_subsamples else []
    extra = earliest_roots(time, n_roots, seed=seed)
    if reference:
        ref_params = {"dataset": ds.content_hash, "time": pseudotime_key, "k": n_neighbors, "root": params["root"], "seed": seed}

        def compute_ref() -> pd.DataFrame:
            counts, _genes = _counts(ds, counts_path, obs)
            res = reference_pseudotime(counts, time, n_neighbors=n_neighbors, root=root, seed=seed)
            pca = np.asarray(res.pca, dtype=float)
            return pd.DataFrame({"pseudotime": np.asarray(res.pseudotime, dtype=float),
                                 **{f"pc{i}": pca[:, i] for i in range(pca.shape[1])}})

        ref_df = _cached_intermediate(backend, "reference_pseudotime", ref_params, compute_ref)
        ref_pt = ref_df["pseudotime"].to_numpy()
        pca = ref_df[[c for c in ref_df.columns if c.startswith("pc")]].to_numpy()
        with threadpool_limits(limits=1):
            bpt = layer_pseudotimes(pca, time, subsamples=idxs, root=root, options=options)
        base = combine_layer_pseudotimes([bpt], time, subsamples=idxs, reference=ref_pt, subsample_fraction=fraction,
                                         names=["PCA baseline"])
        ref_rho = float(base.rho_time[0])
    Xs = _layers(backend, info, pool)
    undefined: dict[int, str] = {}
    pts, scored = [], []
    for layer, X in zip(info.layers, Xs):
        if np.ptp(X, axis=0).max() == 0:
            undefined[layer] = "the embedding is the same for every cell (e.g. cls at the input layer)"
            continue
        try:
            with threadpool_limits(limits=1):  # kNN/diffmap on these sizes: oversubscribed threads cost up to 10x
                pts.append(layer_pseudotimes(X, time, subsamples=idxs, root=root, options=options, extra_roots=extra))
            scored.append(layer)
        except EvaluationError as exc:
            undefined[layer] = str(exc)
    notes: dict[str, Any] = {"n_cells": int(len(time)), "pca_reference_rho": ref_rho,
                             "undefined_layers": {str(k): v for k, v in undefined.items()}, "protocol": protocol}
    rows: list[LayerScore] = []
    summary: list[dict[str, Any]] = []
    if pts:
        res = combine_layer_pseudotimes(pts, time, subsamples=idxs, reference=ref_pt, subsample_fraction=fraction, common=not paper,
                                        extra_roots=extra, names=[f"layer {li}" for li in scored])
        notes["cells"] = {"n_common": res.n_common, "unreachable_per_layer": {str(li): int(u) for li, u in zip(scored, res.n_unreached)},
                          "why": "not in the root's connected component of that layer's kNN graph (DPT infinite)",
                          "scored_on": "cells reached in every layer" if not paper else "each layer's own reached cells (paper)"}
        if extra:
            rr = res.root_rho_time
            notes["root_sensitivity"] = {"roots": [str(obs.index[e]) for e in extra],
                                         "per_layer": {str(li): {"mean": _finite(np.nanmean(rr[i])), "sd": _finite(np.nanstd(rr[i])),
                                                                 "min": _finite(np.nanmin(rr[i])), "max": _finite(np.nanmax(rr[i]))}
                                                       for i, li in enumerate(scored)}}
        n_scored = res.n_common if not paper else None
        for metric, est, lo, hi, R in (("spearman_time", res.rho_time, res.ci_low, res.ci_high, res.resamples_time),
                                       ("spearman_ref", res.rho_ref, res.ref_ci_low, res.ref_ci_high, res.resamples_ref)):
            if metric == "spearman_ref" and ref_pt is None:
                continue
            grp = [LayerScore(layer=li, depth=info.depth(li), score=_finite(est[i]), ci_low=_finite(lo[i]), ci_high=_finite(hi[i]),
                              pool=pool, metric=metric, n=n_scored if n_scored is not None else int(res.n_cells - res.n_unreached[i]))
                   for i, li in enumerate(scored)]
            if n_subsamples and scored[-1] == info.layers[-1]:
                grp = _claimed_rows(grp, est, R, info, scored, scale=res.scale, metric=metric, seed=seed, summary=summary,
                                    notes=notes, pool=pool)
            rows.extend(grp)
    for layer in undefined:
        for metric in ("spearman_time", *(("spearman_ref",) if ref_pt is not None else ())):
            rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, metric=metric, n=0))
    if base is not None:
        rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=_finite(base.rho_time[0]), ci_low=_finite(base.ci_low[0]),
                               ci_high=_finite(base.ci_high[0]), pool=pool, metric="spearman_time", representation="pca_hvg",
                               n=int(base.n_common)))
    table = layer_table(rows)
    report = EvalReport(task="trajectory", run_id=info.id, run_label=info.label, params=params, table=table,
                        summary=pd.DataFrame(summary) if summary else summarize_layers(table), notes=notes)
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
    variant: str | None = None,
    n_boot: int = 200,
    n_perm: int = 999,
    min_cells: int = 10,
    ceiling: bool = True,
    n_jobs: int = 1,
    counts_path: str | Path | None = None,
    seed: int = 0,
    protocol: str = "default",
    crossfit: bool | None = None,
    n_splits: int = 1,
    similarity: str | None = None,
) -> EvalReport:
    """Score every stored layer on perturbation response, separately per condition.

    Per condition: pseudobulk raw counts per (perturbation, replicate) -> DE of each
    perturbation vs control (pydeseq2, or the fast median-of-ratios log-ratio) -> per layer the
    RSA between corr(DE) and cos(shift). By default the RSA is cross-fitted: the cells of every
    (perturbation, replicate) group are split in halves, DE comes from one half and the layer's
    centroids from the other, both ways, averaged over ``n_splits`` splits (metric
    ``rsa_shift``); ``crossfit=False`` scores DE and centroids of the same cells (leak-prone,
    metric ``rsa_shift_samecells``). Mantel p-value, bootstrap CI over perturbations, claims
    vs the final layer (:func:`~sclstore.eval.claims.layer_claims`) and a noise ceiling
    (``sqrt`` of the split-half reliability, Spearman–Brown corrected for full-data DE) computed
    with the same DE mode and similarity. DE is cached per dataset.

    ``protocol="paper"`` reproduces the authors' choices: raw centroids (``variant="centroid"``),
    Spearman between DE profiles, DE and centroids from the same cells.

    Raises
    ------
    EvaluationError
        Missing columns, unknown control, too few cells/replicates/perturbations, unknown pool.
    """
    _check_protocol(protocol)
    paper = protocol == "paper"
    variant = variant or ("centroid" if paper else "shift")
    similarity = similarity or ("spearman" if paper else "pearson")
    crossfit = (not paper) if crossfit is None else bool(crossfit)
    if variant not in VARIANTS:
        raise EvaluationError(f"unknown variant {variant!r}: pass one of {', '.join(VARIANTS)}")
    if similarity not in ("pearson", "spearman"):
        raise EvaluationError(f"unknown DE similarity {similarity!r}: pass pearson or spearman")
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
    metric = f"rsa_{variant}" + ("" if crossfit else "_samecells")
    params = {"task": "perturbation", "version": EVAL_VERSION, "perturbation_key": perturbation_key, "control": control,
              "condition_key": condition_key, "replicate_key": replicate_key, "de_mode": de_mode, "pool": pool, "variant": variant,
              "n_boot": n_boot, "n_perm": n_perm, "min_cells": min_cells, "ceiling": ceiling, "seed": seed, "protocol": protocol,
              "crossfit": crossfit, "n_splits": n_splits if crossfit else 0, "similarity": similarity, "primary_metric": metric}
    phash = cache_key(params)
    stored = backend.get_evaluation(info.id, "perturbation", phash)
    if stored is not None:
        return EvalReport.from_json(stored, cached=True)

    counts: sp.csr_matrix | None = None
    genes: np.ndarray | None = None
    rows: list[LayerScore] = []
    summary: list[dict[str, Any]] = []
    notes: dict[str, Any] = {"de_mode": de_mode, "conditions": {}, "protocol": protocol,
                             "scoring": ("cross-fitted: DE from one half of the cells, centroids from the other" if crossfit
                                         else "DE and centroids from the same cells (leak-prone)")}
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
        # the halves serve the cross-fitted scores and the noise ceiling (DE(A) vs DE(B): no extra fits)
        halves = crossfit_halves(perts[mask].to_numpy(), np.asarray(rep), n_splits=n_splits, seed=seed) if crossfit or ceiling else []
        de_folds: list[pd.DataFrame] = []
        for s_i, _half in enumerate(halves):
            for h_i in range(2):
                def compute_fold(s_i: int = s_i, h_i: int = h_i) -> pd.DataFrame:
                    c, g = need_counts()
                    return crossfit_de(c[mask], perts[mask].to_numpy(), np.asarray(rep), control, [halves[s_i]],
                                       perturbations=[p for p in keep if p != control], genes=lfc.columns, gene_names=list(g),
                                       mode=de_mode, n_jobs=n_jobs, only=h_i)[0]  # type: ignore[arg-type]
                de_folds.append(_cached_intermediate(backend, "de_crossfit", {**de_params, "split": s_i, "half": h_i,
                                                                              "n_splits": n_splits}, compute_fold))
        ceil_value = float("nan")
        if ceiling:
            ce = ceiling_from_folds(de_folds, mode=de_mode, similarity=similarity)  # type: ignore[arg-type]
            cond_note["split_half_rsa"] = ce.rsa
            cond_note["spearman_brown"] = ce.spearman_brown
            ceil_value = ce.ceiling_half if crossfit else ce.ceiling_full
            cond_note["noise_ceiling"] = ceil_value
            cond_note["noise_ceiling_rule"] = ("sqrt(split-half RSA): the DE side uses half of the cells" if crossfit
                                               else "sqrt(Spearman-Brown corrected split-half RSA)")
        notes["conditions"][cond] = cond_note
        where = f" AND {_quote_ident(condition_key)} = {_quote_value(cond)}" if condition_key else ""
        scores: dict[int, Any] = {}
        if crossfit:
            lab_c = perts[mask].to_numpy()
            for layer, X in zip(info.layers, _layers(backend, info, pool, where)):
                try:
                    scores[layer] = score_perturbation_crossfit(X, lab_c, control, de_folds, halves, variant=variant,  # type: ignore[arg-type]
                                                                similarity=similarity, n_boot=n_boot, n_perm=n_perm, seed=seed)  # type: ignore[arg-type]
                except EvaluationError as exc:
                    scores[layer] = None
                    cond_note.setdefault("undefined_layers", {})[str(layer)] = str(exc)
        else:
            cents = _centroids(backend, info, pool, perturbation_key, where)
            for layer in info.layers:
                try:
                    scores[layer] = rsa_from_centroids(cents[layer], control, lfc, variant=variant, similarity=similarity,  # type: ignore[arg-type]
                                                       n_boot=n_boot, n_perm=n_perm, seed=seed)
                except EvaluationError as exc:  # e.g. cls at the input layer: every shift is zero
                    scores[layer] = None
                    cond_note.setdefault("undefined_layers", {})[str(layer)] = str(exc)
        label = None if cond == "all" and not condition_key else cond
        grp: list[LayerScore] = []
        for layer, sc in scores.items():
            if sc is None:
                rows.append(LayerScore(layer=layer, depth=info.depth(layer), score=float("nan"), pool=pool, condition=label,
                                       metric=metric, n=0))
                continue
            grp.append(LayerScore(layer=layer, depth=info.depth(layer), score=sc.score, ci_low=sc.ci_low, ci_high=sc.ci_high,
                                  p_value=sc.p_value, pool=pool, condition=label, metric=metric, n=sc.n_perturbations))
        ok_layers = [li for li, sc in scores.items() if sc is not None]
        same_perts = len({scores[li].perturbations for li in ok_layers}) == 1
        if grp and n_boot >= 3 and ok_layers[-1] == info.layers[-1] and same_perts:
            est = np.array([scores[li].score for li in ok_layers])
            R = np.vstack([scores[li].boot for li in ok_layers])
            grp = _claimed_rows(grp, est, R, info, ok_layers, scale=1.0, metric=metric, seed=seed, summary=summary, notes=notes,
                                pool=pool, condition=label)
        rows.extend(grp)
        if np.isfinite(ceil_value):
            rows.append(LayerScore(layer=BASELINE_LAYER, depth=float("nan"), score=ceil_value, pool=pool, condition=label, metric=metric,
                                   representation="noise_ceiling"))
    table = layer_table(rows)
    report = EvalReport(task="perturbation", run_id=info.id, run_label=info.label, params=params, table=table,
                        summary=pd.DataFrame(summary) if summary else summarize_layers(table), notes=notes)
    backend.put_evaluation(info.id, "perturbation", phash, params, report.to_json())
    return report


def _pseudo_replicates(cells: Sequence[str], seed: int, n: int = 2) -> np.ndarray:
    """Random pseudo-replicates when the data have no replicate column (p-values anti-conservative)."""
    rng = np.random.default_rng(seed)
    return np.asarray([f"pseudo{i}" for i in rng.integers(0, n, size=len(cells))])

