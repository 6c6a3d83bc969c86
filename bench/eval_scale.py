"""Evaluation at scale (issue 14 item 7): large trajectory and perturbation evaluations, approximate kNN.

Everything runs on synthetic layers written straight into a store (no model run), so only the
evaluation is timed. Sizes default to the issue's targets; ``--size`` scales every cell and
perturbation count down (e.g. ``--size 0.05``) for a run that fits a shared machine, and the
printout extrapolates to the full size with the stated cost model (labelled as such).

E3  trajectory: ``--traj-cells`` (100,000) cells x ``--layers`` (13) layers x ``--dim`` (512),
    ``--subsamples`` subsamples, ``--jobs`` worker processes over layers, no PCA reference.
E4  perturbation: ``--perturbations`` (2,000) x 3 conditions x 13 layers, fast DE, ``--jobs``.
E5  approximate vs exact kNN (celltype kNN probe): neighbour recall, macro-F1 of both, times, on
    ``--knn-cells`` (50,000) cells x ``--dim``.
E6  trajectory cost per layer vs cells, in-process CPU seconds (load-independent, unlike wall time):
    ``layer_pseudotimes`` (one neighbour search reused by ``--subsamples`` subsamples) on one
    synthetic ``--dim`` layer at ``--layer-cells`` sizes, with the kNN method ``--knn``; the
    fitted power law is extrapolated to ``--traj-cells`` x ``--layers`` on ``--jobs`` cores.
E7  RSA cost per layer and condition vs perturbations, in-process CPU seconds: cross-fitted
    ``rsa_folds`` (2 folds, 200 bootstraps, 999 permutations) at ``--rsa-k`` perturbations
    (the target 2,000 included), extrapolated to 3 conditions x ``--layers`` on ``--jobs`` cores.
E8  neighbour search of one E3 layer (the final, noisiest one; ``--traj-cells`` x ``--dim``), one
    CPU: the blocked exact search vs pynndescent (times, pynndescent's recall against the exact
    lists), scikit-learn's brute force timed on ``--knn-sklearn-cells`` cells; the blocked search
    with int8 and with float32 products on the final and the best layer; then the best
    layer's trajectory scores (all cells + ``--e8-subsamples`` subsamples) with exact vs
    approximate graphs.

Usage::

    python bench/eval_scale.py [--size 1.0] [--jobs 2] [--subsamples 20] [--only E3 E4 E5 E6 E7] [--dir WORK]
                               [--layer-cells 5000 10000 20000] [--knn approx] [--rsa-k 500 1000 2000]
                               [--knn-sklearn-cells 20000] [--e8-subsamples 5] [--e3-knn auto]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import sclstore
from sclstore.eval import celltype as ct
from sclstore.eval.simulate import log_pca, simulate_layers, simulate_perturbseq
from sclstore.testing import store_with_layers


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))})"


def speed_anchor() -> str:
    """One CPU's time for a fixed dense product and fixed sparse products (this VM's speed drifts by up to ~1.4x)."""
    from scipy import sparse
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    A = rng.standard_normal((4096, 512)).astype(np.float32)
    S = sparse.csr_matrix((rng.random(100_000 * 50), rng.integers(0, 100_000, 100_000 * 50), np.arange(0, 100_000 * 50 + 1, 50)),
                          shape=(100_000, 100_000))  # 50 entries a row, like a kNN graph's transitions
    x = rng.standard_normal(100_000)
    with threadpool_limits(limits=1):
        c0 = time.process_time()
        for _ in range(4):
            A @ A.T
        dense = time.process_time() - c0
        c0 = time.process_time()
        for _ in range(200):
            S @ x
        sparse_ = time.process_time() - c0
    return f"speed anchor: dense {dense:.2f} s, sparse {sparse_:.2f} s"


def e3(work: Path, args: argparse.Namespace) -> None:
    n = max(200, int(args.traj_cells * args.size))
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, n)
    latent = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, 3))]
    layers = simulate_layers(latent, n_layers=args.layers, best_layer=args.layers // 2, dim=args.dim, seed=1)
    obs = pd.DataFrame({"time": t}, index=[f"c{i}" for i in range(n)])
    # counts are not used (no reference); one count per gene keeps the ingest check (no empty cells) happy
    adata = ad.AnnData(np.ones((n, 5), np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))
    backend, run = store_with_layers(work / "e3", adata, layers, name="traj")
    del layers
    print(f"E3 before: {speed_anchor()}")
    t0 = time.perf_counter()
    rep = sclstore.Store(backend).evaluate_trajectory(run, pseudotime_key="time", reference=False, n_subsamples=args.subsamples,
                                                      n_jobs=args.jobs, progress=True, knn=args.e3_knn)
    sec = time.perf_counter() - t0
    full = args.traj_cells
    factor = (full / n) ** 2  # exact kNN: O(n^2 d) dominates
    approx = (full / n) ** 1.14  # ASSUMPTION: pynndescent's empirical ~n^1.14, the diffusion map ~linear (sparse graph)
    reps = (1 + 20) / (1 + args.subsamples)  # the library default is 20 subsamples
    print(f"E3 trajectory {n} cells x {args.layers} layers x {args.dim} dims, {args.subsamples} subsamples, jobs {args.jobs}, "
          f"kNN {rep.notes.get('knn', 'auto')}: {sec:.1f} s ({sec / args.layers:.1f} s per layer); "
          f"best layer {int(rep.summary['best_layer'].iloc[0])}  [{load()}]")
    print(f"E3 after: {speed_anchor()}")
    if n < full or args.subsamples != 20:
        print(f"   EXTRAPOLATED to {full} cells, 20 subsamples: exact kNN (x (n/{n})^2) {sec * factor * reps / 60:.0f} min; "
              f"approximate kNN (x (n/{n})^1.14, assumed) {sec * approx * reps / 60:.0f} min")


def e4(work: Path, args: argparse.Namespace) -> None:
    P = max(10, int(args.perturbations * args.size))
    adata = simulate_perturbseq(n_perturbations=P, n_genes=args.genes, cells_per_perturbation=args.cells_per_perturbation,
                                n_control_cells=max(100, 5 * args.cells_per_perturbation), n_donors=2, seed=2)
    layers = simulate_layers(log_pca(adata.X, n_comps=20), n_layers=args.layers, best_layer=args.layers // 3, dim=64, seed=3)
    backend, run = store_with_layers(work / "e4", adata, layers, name="pert", cluster_by=("condition", "gene"))
    t0 = time.perf_counter()
    rep = sclstore.Store(backend).evaluate_perturbation(run, perturbation_key="gene", control="NTC", condition_key="condition",
                                                        replicate_key="donor", de_mode="fast", n_jobs=args.jobs, progress=True)
    sec = time.perf_counter() - t0
    print(f"E4 perturbation {P} perturbations x 3 conditions x {args.layers} layers ({adata.n_obs} cells), fast DE, jobs {args.jobs}: "
          f"{sec:.1f} s; perturbations scored per condition "
          f"{[c['perturbations'] for c in rep.notes['conditions'].values()]}  [{load()}]")
    print(f"   EXTRAPOLATED to {args.perturbations} perturbations (RSA ~ K^2 pairs x (boot + perm)): "
          f"{sec * (args.perturbations / P) ** 2 / 60:.0f} min (upper bound; DE is linear in K)")


def e5(args: argparse.Namespace) -> None:
    n = max(1000, int(args.knn_cells * args.size))
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 10, size=n)
    X = (rng.normal(scale=1.0, size=(10, args.dim))[codes] + rng.normal(size=(n, args.dim))).astype(np.float32)
    ct.nearest_neighbors(X[:2000], 15, method="approx")  # numba JIT paid before timing
    t0 = time.perf_counter()
    exact = ct.nearest_neighbors(X, 15, method="exact")
    te = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = ct.nearest_neighbors(X, 15, method="approx")
    ta = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(e)) / 15 for a, e in zip(approx, exact, strict=False)]))
    fe, fa = ct.macro_f1(codes, ct.knn_vote(exact, codes)), ct.macro_f1(codes, ct.knn_vote(approx, codes))
    print(f"E5 kNN (k=15) {n} cells x {args.dim} dims: exact {te:.1f} s, approximate {ta:.1f} s; neighbour recall {recall:.4f}; "
          f"kNN-probe macro-F1 exact {fe:.4f} vs approximate {fa:.4f} (difference {fa - fe:+.4f})  [{load()}]")


def _fit(xs: list[float], ys: list[float]) -> float:
    """Power-law exponent from the two largest sizes."""
    return float(np.log(ys[-1] / ys[-2]) / np.log(xs[-1] / xs[-2]))


def e6(args: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    from sclstore.eval.stats import subsample_indices
    from sclstore.eval.trajectory import GraphOptions, layer_pseudotimes

    tr = {"exact": "sklearn", "blocked": "blocked", "approx": "pynndescent"}[args.knn]
    cpu = []
    for n in args.layer_cells:
        rng = np.random.default_rng(0)
        t = rng.uniform(0, 1, n)
        X = simulate_layers(np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, 3))], n_layers=1, best_layer=0, dim=args.dim, seed=1)[0]
        idx = subsample_indices(n, n_subsamples=args.subsamples, fraction=0.8, seed=0)
        with threadpool_limits(limits=1):  # as the runner does per layer
            if n == args.layer_cells[0]:  # numba JIT (pynndescent compiles per input size class) paid before timing
                layer_pseudotimes(X, t, subsamples=[idx[0]], options=GraphOptions(transformer=tr))
            c0, w0 = time.process_time(), time.perf_counter()
            layer_pseudotimes(X, t, subsamples=idx, options=GraphOptions(transformer=tr))
            cpu.append(time.process_time() - c0)
        print(f"E6 one layer, {n} cells x {args.dim} dims, {args.subsamples} subsamples, kNN {tr}: {cpu[-1]:.1f} s CPU "
              f"({time.perf_counter() - w0:.1f} s wall)  [{load()}]")
    if len(cpu) >= 2:
        e = _fit(args.layer_cells, cpu)
        full = cpu[-1] * (args.traj_cells / args.layer_cells[-1]) ** e * args.layers / args.jobs
        print(f"   EXTRAPOLATED (CPU ~ n^{e:.2f} from the two largest sizes) to {args.traj_cells} cells x {args.layers} layers on "
              f"{args.jobs} idle cores: {full / 60:.0f} min")


def e7(args: argparse.Namespace) -> None:
    from sclstore.eval.stats import rsa_folds

    cpu = []
    for K in args.rsa_k:
        rng = np.random.default_rng(K)
        z = rng.normal(size=(K, 10))
        folds = [(np.corrcoef(z + rng.normal(size=(K, 10))), np.corrcoef(z + rng.normal(size=(K, 10)))) for _ in range(2)]
        rsa_folds([(a[:20, :20], b[:20, :20]) for a, b in folds], n_boot=2, n_perm=2)  # JIT
        c0, w0 = time.process_time(), time.perf_counter()
        rsa_folds(folds, n_boot=200, n_perm=999, seed=0)
        cpu.append(time.process_time() - c0)
        print(f"E7 cross-fitted RSA (2 folds, 200 bootstraps, 999 permutations), {K} perturbations: {cpu[-1]:.1f} s CPU "
              f"({time.perf_counter() - w0:.1f} s wall) per layer and condition  [{load()}]")
    print(f"   at {args.rsa_k[-1]} perturbations x 3 conditions x {args.layers} layers on {args.jobs} idle cores: "
          f"{cpu[-1] * 3 * args.layers / args.jobs / 60:.1f} min of RSA (plus DE and centroids, linear in cells: E4)")


def e8(args: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    from sclstore.eval.knn import list_length, neighbour_lists
    from sclstore.eval.knn_exact import exact_neighbours
    from sclstore.eval.stats import subsample_indices
    from sclstore.eval.trajectory import GraphOptions, combine_layer_pseudotimes, layer_pseudotimes

    n = max(2000, int(args.traj_cells * args.size))
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, n)
    latent = np.c_[t, np.sin(3 * t), rng.normal(scale=0.3, size=(n, 3))]  # E3's data; its final layer
    layers = simulate_layers(latent, n_layers=args.layers, best_layer=args.layers // 2, dim=args.dim, seed=1)
    X, best = layers[-1], layers[args.layers // 2]
    del layers
    K = list_length(n, 29, 0.8)  # the runner's list at k = 30 and 80% subsamples
    with threadpool_limits(limits=1):  # as the runner runs a layer
        neighbour_lists(X[:3000], 20, method="pynndescent")  # numba compilation paid before timing
        neighbour_lists(X[:3000], 20, method="blocked")
        cpu = {}
        lists = {}
        for m in ("blocked", "pynndescent"):
            c0 = time.process_time()
            lists[m] = neighbour_lists(X, K, method=m)
            cpu[m] = time.process_time() - c0
        m_sk = min(n, args.knn_sklearn_cells)
        c0 = time.process_time()
        neighbour_lists(X[:m_sk], K, method="sklearn")
        sk = time.process_time() - c0
        ex, ap_ = lists["blocked"].indices, lists["pynndescent"].indices
        recall = float(np.mean([len(set(a[:29]) & set(e[:29])) / 29 for a, e in zip(ap_, ex, strict=True)]))
        print(f"E8 neighbour lists (K = {K}) of {n} cells x {args.dim} dims, one CPU: blocked exact {cpu['blocked']:.1f} s, "
              f"pynndescent {cpu['pynndescent']:.1f} s (recall of the 29 nearest {recall:.3f}); scikit-learn brute force "
              f"{sk:.1f} s at {m_sk} cells (x (n/{m_sk})^2 = {sk * (n / m_sk) ** 2:.0f} s at {n}, extrapolated)  [{load()}]")
        prod = {}
        for p in ("int8", "float32"):  # the blocked search's two kinds of products, on the noisy and the best layer
            for name, Y in (("final", X), ("best", best)):
                c0 = time.process_time()
                got, _ = exact_neighbours(Y, K, products=p)
                prod[p, name] = (time.process_time() - c0, got)  # the indices only (distances follow from them)
        same = all(np.array_equal(prod["int8", m][1], prod["float32", m][1]) for m in ("final", "best"))
        print(f"E8 blocked search, one CPU: final layer int8 {prod['int8', 'final'][0]:.1f} s, float32 {prod['float32', 'final'][0]:.1f} s; "
              f"best layer int8 {prod['int8', 'best'][0]:.1f} s, float32 {prod['float32', 'best'][0]:.1f} s; "
              f"lists identical: {same}  [{load()}]")
        del prod
        idx = subsample_indices(n, n_subsamples=args.e8_subsamples, fraction=0.8, seed=0)
        layer_pseudotimes(best[:3000], t[:3000], options=GraphOptions(transformer="blocked"))  # imports paid before timing
        scores = {}
        for m in ("blocked", "pynndescent"):
            c0 = time.process_time()
            pts = layer_pseudotimes(best, t, subsamples=idx, options=GraphOptions(transformer=m))
            sc_ = combine_layer_pseudotimes([pts], t, subsamples=idx)
            scores[m] = (float(sc_.rho_time[0]), sc_.resamples_time[0], time.process_time() - c0)
    (re_, rs_e, ce), (ra, rs_a, ca) = scores["blocked"], scores["pynndescent"]
    print(f"   trajectory score of the best layer ({args.layers // 2}), all cells: exact graph {re_:.4f} vs approximate {ra:.4f} "
          f"(difference {ra - re_:+.4f}); "
          f"{args.e8_subsamples} subsamples: largest difference {np.abs(rs_a - rs_e).max():.4f}; CPU {ce:.0f} s vs {ca:.0f} s  [{load()}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="scale of every cell/perturbation count (1 = the issue's targets)")
    ap.add_argument("--traj-cells", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--subsamples", type=int, default=20)
    ap.add_argument("--perturbations", type=int, default=2000)
    ap.add_argument("--cells-per-perturbation", type=int, default=20)
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--knn-cells", type=int, default=50_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--layer-cells", type=int, nargs="+", default=[5000, 10000, 20000], help="E6 sizes")
    ap.add_argument("--knn", choices=["exact", "blocked", "approx"], default="approx",
                    help="E6 neighbour search (exact: scikit-learn's; auto picks blocked above 8,192 cells, approx above 131,072)")
    ap.add_argument("--e3-knn", choices=["auto", "exact", "approx"], default="auto", help="E3 neighbour search (the task's knn)")
    ap.add_argument("--knn-sklearn-cells", type=int, default=20_000, help="E8: cells for scikit-learn's brute force")
    ap.add_argument("--e8-subsamples", type=int, default=5, help="E8: subsamples scored with each graph")
    ap.add_argument("--rsa-k", type=int, nargs="+", default=[500, 1000, 2000], help="E7 perturbation counts")
    ap.add_argument("--only", nargs="+", default=["E3", "E4", "E5", "E6", "E7", "E8"])
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="sclstore-bench-scale-"))
    print(f"work folder {work}; size {args.size}; {load()} at start")
    try:
        if "E5" in args.only:
            e5(args)
        if "E4" in args.only:
            e4(work, args)
        if "E3" in args.only:
            e3(work, args)
        if "E6" in args.only:
            e6(args)
        if "E7" in args.only:
            e7(args)
        if "E8" in args.only:
            e8(args)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
