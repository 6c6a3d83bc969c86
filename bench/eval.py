"""Evaluation benchmark (issue 6): first vs cached vs re-ingest evaluation, and DPT cost vs cells.

One run, everything in a temp work folder:

E1  Two simulated datasets (``sclstore.eval.simulate``): a branching differentiation
    (``--traj-cells`` cells) and a Perturb-seq screen in three activation states
    (``--perturbations`` perturbations x ``--cells-per-perturbation`` + ``--control-cells``
    controls per state), both with ``--genes`` genes, are ingested with a 12-block model
    (13 stored layers, 0..12). By default the model is a *random* Tahoe-X1 checkpoint written
    here with the library's own config writer (``--blocks`` 12, ``--d-model`` 64, official HF
    layout, the simulator's gene symbols as vocabulary); ``--model sclstore-tiny`` uses the
    built-in model instead (it has 6 blocks, so that run has 7 layers, not 13). Then, timed:

    Both evaluations use the ``mean`` pool by default (``--pool``): a Tahoe-X1 run's layer 0 is
    the block-0 input, whose ``<cls>`` state is identical for every cell, so the perturbation
    evaluation of the ``cls`` pool stops with "RSA needs >=3" at layer 0.

    (a) first evaluation: ``Store.evaluate_trajectory`` (latent time, PCA-of-HVG reference,
        ``--subsamples`` subsamples) + ``Store.evaluate_perturbation`` (per state, with DE:
        ``--de fast`` median-of-ratios, or ``--de pydeseq2``);
    (b) the repeated identical evaluation (both answered from the catalog cache);
    (b2) a new evaluation of the same run with other metric parameters (subsamples and
        bootstrap size changed): embeddings re-read and metrics recomputed, but the reference
        pseudotime and DE come from the catalog cache;
    (c) what you pay without the store: ingest both files again (run the model) into a fresh
        store, then evaluate.

    The cached results are checked identical to the first ones, and (c)'s tables equal (a)'s.

E2  DPT cost per layer vs number of cells (``--dpt-cells``, default 500 1000 2000 4000) on a
    synthetic layer (``simulate_layers`` of the latent time, ``--dpt-dim`` wide):
    ``dpt_pseudotime`` (one kNN graph + diffusion map + DPT) and ``score_trajectory`` with
    ``--subsamples`` subsamples (what the evaluation pays per stored layer).

The machine's load average is printed with the tables. The default run used 9 min of CPU
(14 min wall at a load average of ~8 on 2 cores); ``--d-model``, ``--traj-cells`` and
``--subsamples`` are the knobs that shorten it.

Usage::

    python bench/eval.py [--de fast|pydeseq2] [--model random|sclstore-tiny] [--blocks 12]
                         [--d-model 64] [--pool mean|cls] [--traj-cells 1500] [--perturbations 12]
                         [--cells-per-perturbation 50] [--control-cells 300] [--genes 500]
                         [--subsamples 20] [--dpt-cells 500 1000 2000 4000] [--dpt-dim 64]
                         [--dpt-repeats 3] [--threads 2] [--dir WORK]

Scale (issue 14 item 7: 100k-cell trajectory, 2,000-perturbation screen, approximate vs exact kNN):
``bench/eval_scale.py [--size 0.05]``.

Smoke test::

    python bench/eval.py --traj-cells 300 --perturbations 6 --cells-per-perturbation 20 \\
        --control-cells 60 --genes 300 --d-model 32 --subsamples 2 --dpt-cells 300 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import sclstore
from sclstore.eval.dpt import dpt_pseudotime
from sclstore.eval.simulate import default_gene_names, simulate_layers, simulate_perturbseq, simulate_trajectory
from sclstore.eval.trajectory import score_trajectory


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs)"


def write_random_tahoe(out: Path, genes: list[str], *, blocks: int, d_model: int, seed: int) -> Path:
    """A random Tahoe-X1 checkpoint in the official HF layout (as ``train_tiny`` writes it, untrained)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from sclstore.ingest.models.tahoe.model import TahoeConfig
    from sclstore.ingest.models.train_tiny import TahoePretrainModel, model_configs

    vocab = {g: i for i, g in enumerate(genes)}
    for tok in ("<pad>", "<cls>", "<eoc>"):
        vocab[tok] = len(vocab)
    heads = max(1, d_model // 32)
    model_cfg, collator_cfg = model_configs(len(vocab), vocab["<pad>"], d_model=d_model, n_layers=blocks, n_heads=heads)
    torch.manual_seed(seed)
    model = TahoePretrainModel(TahoeConfig.from_dicts(model_cfg, collator_cfg))
    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "sclstore bench/eval.py (random)"})
    (out / "model_config.yml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (out / "collator_config.yml").write_text(yaml.safe_dump(collator_cfg, sort_keys=False))
    (out / "vocab.json").write_text(json.dumps(vocab) + "\n")
    return out


def ingest_both(store: Any, files: dict[str, Path], model: str, ckpt: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    runs, secs = {}, {}
    for key, name, cluster in (("traj", "sim-trajectory", ()), ("pert", "sim-perturbseq", ("condition", "gene"))):
        t = time.perf_counter()
        runs[key] = store.ingest(files[key], model, ckpt, name=name, cluster_by=cluster, progress=False, workers=0)
        secs[key] = time.perf_counter() - t
    return runs, secs


def warm_up() -> None:
    """Pay imports and numba/JIT compilation (scanpy neighbours, HVG) before anything is timed."""
    from sclstore.eval.de import de_fast  # noqa: F401
    from sclstore.eval.trajectory import reference_pseudotime

    a = simulate_trajectory(n_cells=200, n_genes=200, seed=1)
    t = a.obs["latent_time"].to_numpy()
    reference_pseudotime(a.X, t, n_neighbors=15)
    score_trajectory(np.c_[t, np.random.default_rng(0).normal(size=(200, 8))], t, n_neighbors=15, n_subsamples=2)


def evaluate_both(store: Any, runs: dict[str, Any], args: argparse.Namespace, *, subsamples: int, n_boot: int) -> tuple[Any, Any, float, float]:
    t = time.perf_counter()
    traj = store.evaluate_trajectory(runs["traj"].id, pseudotime_key="latent_time", n_subsamples=subsamples, n_neighbors=30,
                                     pool=args.pool)
    t_traj = time.perf_counter() - t
    t = time.perf_counter()
    pert = store.evaluate_perturbation(runs["pert"].id, perturbation_key="gene", control="NTC", condition_key="condition",
                                       replicate_key="donor", de_mode=args.de, n_boot=n_boot, n_perm=999, n_jobs=args.threads,
                                       pool=args.pool)
    return traj, pert, t_traj, time.perf_counter() - t


def same_table(a: Any, b: Any) -> bool:
    ta, tb = a.table.reset_index(drop=True), b.table.reset_index(drop=True)
    if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
        return False
    for col in ta.columns:
        x, y = ta[col], tb[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            if not np.allclose(x.to_numpy(float), y.to_numpy(float), rtol=1e-6, atol=1e-9, equal_nan=True):
                return False
        elif not x.astype(str).equals(y.astype(str)):
            return False
    return True


def eval_part(work: Path, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    files = {"traj": work / "sim_trajectory.h5ad", "pert": work / "sim_perturbseq.h5ad"}
    genes = default_gene_names(args.genes)
    simulate_trajectory(n_cells=args.traj_cells, n_genes=args.genes, seed=0, gene_names=genes).write_h5ad(files["traj"])
    simulate_perturbseq(n_perturbations=args.perturbations, n_genes=args.genes, cells_per_perturbation=args.cells_per_perturbation,
                        n_control_cells=args.control_cells, seed=0, gene_names=genes).write_h5ad(files["pert"])
    if args.model == "random":
        ckpt: str | None = str(write_random_tahoe(work / "ckpt", genes, blocks=args.blocks, d_model=args.d_model, seed=0))
        model = "tahoe-x1"
    else:
        ckpt, model = None, "sclstore-tiny"

    with sclstore.open_store(work / "store-a", create=True) as store:
        runs, secs = ingest_both(store, files, model, ckpt)
        t_ingest = sum(secs.values())
        info = store.run(runs["traj"].id)
        n_pert = store.run(runs["pert"].id).n_cells
        print(f"ingested {info.n_cells} + {n_pert} cells with {model} ({info.n_model_layers} blocks, d={info.dim}): "
              f"{len(info.layers)} stored layers {info.layers[0]}..{info.layers[-1]}, {t_ingest:.1f} s  [{load()}]")
        traj1, pert1, a_traj, a_pert = evaluate_both(store, runs, args, subsamples=args.subsamples, n_boot=200)
        print(f"(a) first evaluation {a_traj + a_pert:.1f} s  [{load()}]")
        traj2, pert2, b_traj, b_pert = evaluate_both(store, runs, args, subsamples=args.subsamples, n_boot=200)
        assert traj2.cached and pert2.cached, "the repeated evaluation was not served from the cache"
        assert same_table(traj1, traj2) and same_table(pert1, pert2), "cached results differ from the first ones"
        _t3, _p3, c_traj, c_pert = evaluate_both(store, runs, args, subsamples=max(1, args.subsamples // 2), n_boot=100)
        print(f"(b) repeated {b_traj + b_pert:.3f} s, (b2) new parameters {c_traj + c_pert:.1f} s  [{load()}]")
        headline = traj1.headline() + pert1.headline()

    with sclstore.open_store(work / "store-b", create=True) as store:
        t = time.perf_counter()
        runs_b, secs_b = ingest_both(store, files, model, ckpt)
        t_ingest_b = sum(secs_b.values())
        traj4, pert4, d_traj, d_pert = evaluate_both(store, runs_b, args, subsamples=args.subsamples, n_boot=200)
        t_total = time.perf_counter() - t
        assert not (traj4.cached or pert4.cached)
        equal = same_table(traj1, traj4) and same_table(pert1, pert4)
        print(f"(c) fresh store: ingest {t_ingest_b:.1f} s + evaluation {d_traj + d_pert:.1f} s; tables equal to (a): {equal}  [{load()}]")
    for line in headline:
        print("   ", line)

    return [
        ("(a) first evaluation (with DE)", a_traj, a_pert, a_traj + a_pert),
        ("(b) repeated identical evaluation (cached)", b_traj, b_pert, b_traj + b_pert),
        ("(b2) new metric parameters, DE + reference cached", c_traj, c_pert, c_traj + c_pert),
        ("(c) re-ingest (model run) + evaluation, fresh store", secs_b["traj"] + d_traj, secs_b["pert"] + d_pert, t_total),
        ("    of which: ingest (model run)", secs_b["traj"], secs_b["pert"], t_ingest_b),
        ("    of which: evaluation", d_traj, d_pert, d_traj + d_pert),
    ] + ([] if equal else [("    WARNING: (c) tables differ from (a)", float("nan"), float("nan"), float("nan"))])


def dpt_part(args: argparse.Namespace) -> list[tuple[int, float, float, float]]:
    from threadpoolctl import threadpool_limits

    def median_dpt(X: np.ndarray, t: np.ndarray) -> float:
        times = []
        for _ in range(args.dpt_repeats):
            t0 = time.perf_counter()
            dpt_pseudotime(X, t, n_neighbors=30)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    for n in args.dpt_cells:
        rng = np.random.default_rng(n)
        t = rng.uniform(0, 1, n)
        X = simulate_layers(np.c_[t, rng.normal(size=(n, 4))], n_layers=1, best_layer=0, dim=args.dpt_dim, seed=n)[0]
        dpt_pseudotime(X, t, n_neighbors=30)  # warm-up
        d_default = median_dpt(X, t)
        with threadpool_limits(limits=1):  # OpenMP (sklearn kNN) and BLAS pools at one thread
            d_one = median_dpt(X, t)
        t0 = time.perf_counter()
        score_trajectory(X, t, n_neighbors=30, n_subsamples=args.subsamples)
        rows.append((n, d_default, d_one, time.perf_counter() - t0))
        print(f"DPT {n} cells: {d_default:.3f} s ({d_one:.3f} s on one thread); score_trajectory {rows[-1][3]:.2f} s  [{load()}]")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--de", choices=["fast", "pydeseq2"], default="fast", help="DE mode of the perturbation evaluation")
    ap.add_argument("--model", choices=["random", "sclstore-tiny"], default="random",
                    help="random: a random Tahoe-X1 checkpoint with --blocks blocks; sclstore-tiny: the built-in model (6 blocks)")
    ap.add_argument("--blocks", type=int, default=12, help="transformer blocks of the random checkpoint")
    ap.add_argument("--d-model", type=int, default=64, help="width of the random checkpoint (sclstore-tiny's is 64; Tahoe-X1 70M's 512)")
    ap.add_argument("--pool", choices=["mean", "cls"], default="mean",
                    help="pool evaluated (cls: layer 0's <cls> state is the same for every cell, so the perturbation RSA fails)")
    ap.add_argument("--traj-cells", type=int, default=1500)
    ap.add_argument("--perturbations", type=int, default=12)
    ap.add_argument("--cells-per-perturbation", type=int, default=50)
    ap.add_argument("--control-cells", type=int, default=300)
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--subsamples", type=int, default=20, help="trajectory subsamples (the library default is 20)")
    ap.add_argument("--dpt-cells", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--dpt-dim", type=int, default=64, help="width of the synthetic layer of the DPT table")
    ap.add_argument("--dpt-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and DE jobs")
    ap.add_argument("--skip-dpt", action="store_true", help="only the evaluation table")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.dir or tempfile.mkdtemp(prefix="sclstore-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {load()} at start")
    t_start = time.perf_counter()
    try:
        warm_up()
        ev = eval_part(work, args)
        dpt = [] if args.skip_dpt else dpt_part(args)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    n_pert_cells = 3 * (args.perturbations * args.cells_per_perturbation + args.control_cells)
    print(f"\n### E1: evaluation of a {args.blocks if args.model == 'random' else 6}-block run over simulated data "
          f"(trajectory {args.traj_cells} cells; Perturb-seq {n_pert_cells} cells, 3 states, DE: {args.de})")
    print(f"model: {'random Tahoe-X1, d_model ' + str(args.d_model) if args.model == 'random' else 'sclstore-tiny'}; "
          f"pool {args.pool}; {args.subsamples} trajectory subsamples; 200 bootstraps, 999 permutations; {args.threads} threads; {load()} at end\n")
    first = ev[0][3]
    print("| evaluation | trajectory s | perturbation s | total s | / first evaluation |")
    print("|---|---|---|---|---|")
    for label, a, b, total in ev:
        fa = "" if math.isnan(a) else f"{a:.3f}"
        fb = "" if math.isnan(b) else f"{b:.3f}"
        ratio = "" if math.isnan(total) else f"{total / first:.4f}" if total < first / 100 else f"{total / first:.2f}"
        print(f"| {label} | {fa} | {fb} | {'' if math.isnan(total) else f'{total:.3f}'} | {ratio} |")
    print("\n(c)'s total also holds opening the fresh store; imports and JIT compilation were paid by a warm-up before (a).")

    if dpt:
        n0, d0, o0, _s0 = dpt[0]
        print(f"\n### E2: DPT cost per layer vs cells (synthetic layer, {args.dpt_dim} dims, k = 30; dpt_pseudotime median of "
              f"{args.dpt_repeats}, with the default thread pools and with OpenMP/BLAS limited to 1 thread; "
              f"score_trajectory = 1 + {args.subsamples} subsample DPTs, default threads; {load()})\n")
        print("| cells | dpt_pseudotime s | / smallest | exponent | dpt_pseudotime, 1 thread s | / smallest | exponent "
              "| score_trajectory s | 13 layers x score s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n, d, o, s in dpt:
            e1 = "" if n == n0 else f"{math.log(d / d0) / math.log(n / n0):.2f}"
            e2 = "" if n == n0 else f"{math.log(o / o0) / math.log(n / n0):.2f}"
            print(f"| {n} | {d:.3f} | {d / d0:.2f} | {e1} | {o:.3f} | {o / o0:.2f} | {e2} | {s:.2f} | {13 * s:.1f} |")
        print("\nexponent: log(time / time at the smallest size) / log(cells / smallest cells).")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s; {load()}")


if __name__ == "__main__":
    main()
