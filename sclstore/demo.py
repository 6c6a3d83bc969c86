"""``sclstore demo``: the whole pipeline on bundled data with the built-in model.

1. scanpy's bundled ``pbmc68k_reduced`` (raw counts recovered) is ingested with
   ``sclstore-tiny``, every layer, cells clustered by cell type; two slice queries run.
2. A simulated branching differentiation is ingested and every layer is scored on trajectory
   inference (DPT vs the simulated latent time).
3. A simulated Perturb-seq screen in three activation states is ingested and every layer is
   scored on perturbation response, per state.

Everything lands in one folder: the store, the input files, the query outputs and the plots.
Run it twice and the second run is all cache hits.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclstore.api import open_store

__all__ = ["bundled_pbmc", "run_demo"]

logger = logging.getLogger(__name__)


def bundled_pbmc() -> Any:
    """scanpy's bundled pbmc68k_reduced (700 cells x 765 genes) with raw counts in ``X``.

    The file ships log-normalised values; counts are recovered as
    ``rint(expm1(raw.X) * n_counts / 1e4)`` (exact up to rounding).
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.rint(np.expm1(raw) * src.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    obs = src.obs[["bulk_labels", "louvain", "phase", "n_genes", "percent_mito", "n_counts"]].copy()
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[str(g) for g in src.raw.var_names]))


def run_demo(
    out_dir: str | Path, *, quick: bool = False, progress: bool = True, say: Callable[..., Any] | None = None
) -> dict[str, Any]:
    """Run the demo into ``out_dir`` and return a JSON-able report of what was done and where.

    Parameters
    ----------
    out_dir
        Folder for the store, inputs, outputs and plots (created).
    quick
        Smaller simulations and the fast DE mode (a minute on a laptop instead of a few).
    progress
        Show progress bars on stderr.
    say
        Where to print the narrative (e.g. ``rich.console.Console().print``); None is silent.
    """
    from sclstore.eval.simulate import simulate_perturbseq, simulate_trajectory

    def tell(text: str) -> None:
        if say is not None:
            say(text, markup=False, highlight=False)

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"out_dir": str(out), "store": str(out / "store"), "commands": []}
    opts: dict[str, Any] = {"progress": progress, "workers": 0}
    store_arg = f"--store {shlex.quote(str(out / 'store'))}"

    def cli(*args: str) -> None:
        """Say (and record) the command line that reproduces a step."""
        line = "sclstore " + " ".join(args) + " " + store_arg
        report["commands"].append(line)
        tell(f"   $ {line}")
    with open_store(out / "store", create=True) as store:
        # 1. real data, bundled with scanpy
        pbmc_path = out / "pbmc68k_reduced.h5ad"
        if not pbmc_path.exists():
            bundled_pbmc().write_h5ad(pbmc_path)
        run = store.ingest(pbmc_path, "sclstore-tiny", name="pbmc68k", cluster_by=("bulk_labels",), **opts)
        tell(f"1. ingested {pbmc_path.name}: run {run.id}, {run.cells} cells x {len(run.layers)} layers "
             f"(pools {', '.join(run.pools)}){' [cache hit]' if run.cache_hit else ''}")
        cli("ingest", shlex.quote(str(pbmc_path)), "--model sclstore-tiny --name pbmc68k --cluster-by bulk_labels --workers 0")
        sql = f"SELECT * FROM embeddings WHERE run = {run.id} AND layer = 3 AND bulk_labels = 'CD14+ Monocyte'"
        res = store.query(sql)
        slice_path = out / "cd14_monocytes_layer3.h5ad"
        res.to_anndata().write_h5ad(slice_path)
        tell(f"   query: {sql}\n   -> embeddings {tuple(res.embeddings.shape)}, written to {slice_path.name} (rows in the file's order)")
        cli("query", shlex.quote(sql), "-o", shlex.quote(str(slice_path)))
        cent = store.query(f"SELECT bulk_labels, layer, AVG(embedding), COUNT(*) FROM embeddings WHERE run = {run.id} "
                           "GROUP BY bulk_labels, layer")
        tell(f"   centroids per cell type and layer: {tuple(cent.embeddings.shape)} (layers x groups x dim)")
        cli("query", shlex.quote(f"SELECT bulk_labels, layer, AVG(embedding), COUNT(*) FROM embeddings WHERE run = {run.id} "
                                 "GROUP BY bulk_labels, layer"), "--csv")
        report["pbmc"] = {"run": run.id, "cells": run.cells, "layers": list(run.layers), "slice_shape": list(res.embeddings.shape),
                          "slice_file": str(slice_path)}

        # 2. trajectory on a simulated differentiation
        traj_path = out / "sim_trajectory.h5ad"
        if not traj_path.exists():
            simulate_trajectory(n_cells=600 if quick else 1500, n_genes=400, seed=0).write_h5ad(traj_path)
        trun = store.ingest(traj_path, "sclstore-tiny", name="sim-trajectory", **opts)
        traj = store.evaluate_trajectory(trun.id, pseudotime_key="latent_time", n_subsamples=5 if quick else 20, n_neighbors=15)
        traj_png = out / "trajectory_by_layer.png"
        traj.plot(traj_png)
        tell(f"2. trajectory (run {trun.id}): " + "; ".join(traj.headline()) + f"\n   plot: {traj_png.name}")
        cli("ingest", shlex.quote(str(traj_path)), "--model sclstore-tiny --name sim-trajectory --workers 0")
        cli("eval trajectory", str(trun.id), f"--pseudotime-key latent_time --n-neighbors 15 --bootstrap {5 if quick else 20}",
            "--plot", shlex.quote(str(traj_png)))
        report["trajectory"] = {"run": trun.id, "summary": traj.to_json()["summary"], "plot": str(traj_png)}

        # 3. perturbation response on a simulated Perturb-seq screen, per activation state
        pert_path = out / "sim_perturbseq.h5ad"
        if not pert_path.exists():
            simulate_perturbseq(n_perturbations=8 if quick else 12, n_genes=400, cells_per_perturbation=30 if quick else 50,
                                n_control_cells=150 if quick else 300, seed=0).write_h5ad(pert_path)
        prun = store.ingest(pert_path, "sclstore-tiny", name="sim-perturbseq", cluster_by=("condition", "gene"), **opts)
        de_mode = "fast" if quick else "pydeseq2"
        pert = store.evaluate_perturbation(prun.id, perturbation_key="gene", control="NTC", condition_key="condition",
                                           replicate_key="donor", de_mode=de_mode, n_boot=100 if quick else 200,
                                           n_perm=199 if quick else 999)
        pert_png = out / "perturbation_by_layer.png"
        pert.plot(pert_png)
        tell(f"3. perturbation (run {prun.id}, DE: {de_mode}):\n   " + "\n   ".join(pert.headline()) + f"\n   plot: {pert_png.name}")
        cli("ingest", shlex.quote(str(pert_path)), "--model sclstore-tiny --name sim-perturbseq --cluster-by condition,gene --workers 0")
        cli("eval perturbation", str(prun.id), "--perturbation-key gene --control NTC --condition-key condition --replicate-key donor",
            f"--de {de_mode} --bootstrap {100 if quick else 200} --permutations {199 if quick else 999}",
            "--plot", shlex.quote(str(pert_png)))
        report["perturbation"] = {"run": prun.id, "de_mode": de_mode, "summary": pert.to_json()["summary"], "plot": str(pert_png)}
    tell(f"everything is in {out}: store/ (catalog + arrays), the input .h5ad files, the query slice and the plots.\n"
         f"next: sclstore ls runs --store {out / 'store'}   |   sclstore query \"SELECT * FROM embeddings WHERE run = {run.id} "
         f"AND depth = 0.5\" --store {out / 'store'}")
    tell("note: sclstore-tiny is a small demo model; real analyses use real checkpoints (--model tahoe-x1 --checkpoint DIR).")
    return report
