"""Contention benchmark: sclstore on a machine it shares, with and without the thread policy.

Measures, in one run (ratios are within this run):

1. **Ingest** of ``--cells`` cells (default 5,000, resampled from scanpy's bundled PBMC) with the
   built-in model ``sclstore-tiny``, into a fresh store each time;
2. **one trajectory evaluation** (every layer of a ``--traj-cells`` (1,500) cell simulated
   differentiation embedded by ``sclstore-tiny``, ``--subsamples`` (20) interval subsamples, on a
   fresh copy of the store so nothing is cached);
3. (``--tasks blas``) ``--blas-rounds`` numpy matrix products with pure-Python work between them:
   wall and CPU seconds, showing OpenBLAS's idle threads spinning without the policy;

each ``--reps`` times **idle** and ``--reps`` times **under load** (one busy-looping process per
usable CPU, started and stopped by the bench), with the thread policy **on** (the default:
on the CPU, one batch per thread, batches side by side), **split** (the policy, but each batch
split over all the threads, one batch at a time: the default before CPU streams) and **off**
(``SCLSTORE_THREADS=off`` and split batches: the behaviour before the policy: torch's OpenMP pool
at every core, spin-waiting), the policies interleaved rep by rep so that the other jobs' load
drifts over all alike; the 1-minute load average before and after each rep is recorded. Every
measurement is a fresh Python process (the policy acts at start-up); only the ``store.ingest`` /
``store.evaluate_trajectory`` call is timed, not the imports.

4. **Start-up**: wall time of ``sclstore --help``, ``sclstore ls runs`` and a one-layer query on a
   small store (median of ``--startup-reps``), with the top imports of ``python -X importtime``.

Usage::

    python bench/contention.py [--cells 5000] [--reps 5] [--off-reps N] [--traj-cells 1500] [--subsamples 20]
                               [--startup-reps 5] [--tasks ingest,trajectory] [--out contention.json]

Targets (issue 17): under load, median <= 2.5x the idle median (a fair share of the CPUs is 2x)
and max/min <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MODES = ("on", "split", "off")
SPLIT_VAR = "_SCLSTORE_BENCH_SPLIT"  # the child plans one batch split over all its threads (the former default)
POLICY_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMBA_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "SCLSTORE_THREADS",
               "_SCLSTORE_SET_VARS")


# ------------------------------------------------------------------------------ children
def child_ingest(data: str, store: str) -> dict[str, Any]:
    import sclstore
    from sclstore.store import runtime

    runtime.configure()  # as Store.ingest does, but before the (untimed) torch import
    import torch

    import sclstore.ingest.pipeline
    from sclstore.ingest import embed, plan

    if os.environ.get(SPLIT_VAR):
        plan.CPU_THREADS_PER_BATCH = torch.get_num_threads()
    with sclstore.open_store(store, create=True) as st:
        t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        res = st.ingest(data, "sclstore-tiny", workers=1, device="cpu", progress=False)
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0 + _children_cpu() - k0  # every thread, and the (reaped) tokenizer worker
        per_batch = int(st.run(res.run_id).params["cpu_threads"])
    threads = torch.get_num_threads()
    return {"seconds": secs, "cpu": cpu, "cells": res.cells, "torch_threads": threads, "threads_per_batch": per_batch,
            "streams": embed.stream_count(threads, per_batch)}


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def child_trajectory(store: str, run: int, subsamples: int) -> dict[str, Any]:
    import sclstore
    from sclstore.store import runtime

    runtime.configure()
    import sclstore.eval.runner

    with sclstore.open_store(store) as st:
        t0 = time.perf_counter()
        rep = st.evaluate_trajectory(run, pseudotime_key="latent_time", n_subsamples=subsamples, n_neighbors=15)
        secs = time.perf_counter() - t0
    assert not rep.cached
    return {"seconds": secs}


def child_blas(rounds: int) -> dict[str, Any]:
    """numpy BLAS calls with pure-Python work between them, the pattern of an evaluation: with
    OpenBLAS's default its idle threads spin ~0.1 s after each call, burning CPU that the other
    load (and this process's own Python thread) needs; the policy makes them sleep at once."""
    from sclstore.store import runtime

    runtime.configure()
    import numpy as np

    a = np.random.default_rng(0).random((256, 256))
    t0, c0 = time.perf_counter(), time.process_time()
    total = 0
    for _ in range(rounds):
        a @ a
        for i in range(20000):
            total += i
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}


# ------------------------------------------------------------------------------ parent
def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*POLICY_VARS, SPLIT_VAR)}
    if mode == "off":
        env["SCLSTORE_THREADS"] = "off"
    if mode in ("off", "split"):
        env[SPLIT_VAR] = "1"
    return env


def _child(args: list[str], policy: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE), "--child", *args], capture_output=True, text=True, env=_env(policy),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Busy:
    """One busy-looping process per usable CPU (the competing load)."""

    def __init__(self, n: int, settle: float = 30.0) -> None:
        self.n = n
        self.settle = settle
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(self.settle)  # the first repetitions after the load starts ran slowest: measure in the steady state
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)


def _prepare(work: Path, cells: int, traj_cells: int) -> tuple[Path, Path, int]:
    import numpy as np

    from sclstore import open_store
    from sclstore.demo import bundled_pbmc
    from sclstore.eval.simulate import simulate_trajectory

    pbmc = bundled_pbmc()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resampled cells repeat names until renamed below
        ad = pbmc[rng.integers(0, pbmc.n_obs, size=cells)].copy()
    ad.obs_names = [f"c{i}" for i in range(cells)]
    data = work / f"pbmc_{cells}.h5ad"
    ad.write_h5ad(data)
    traj = work / "trajectory.h5ad"
    simulate_trajectory(n_cells=traj_cells, n_genes=400, seed=0).write_h5ad(traj)
    tstore = work / "traj-store"
    with open_store(tstore, create=True) as st:
        run = st.ingest(traj, "sclstore-tiny", workers=0, progress=False).id
    return data, tstore, run


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "max_over_min": max(xs) / min(xs)}


def _run_once(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall s, CPU s = user + system of the child) of one run of ``cmd``."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _timed(cmd: list[str], reps: int, env: dict[str, str], cwd: Path | None = None) -> list[float]:
    return [_run_once(cmd, env, cwd)[0] for _ in range(reps)]


def _top_imports(code: str, n: int = 8) -> list[tuple[str, float]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=_env(True), timeout=300)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = line.split("|")
        if cum.strip().isdigit() and len(name) - len(name.lstrip()) <= 3:  # top-level imports (and their direct children)
            rows.append((name.strip(), int(cum) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:n]


def startup(work: Path, reps: int, baseline: str | None = None) -> dict[str, Any]:
    import numpy as np

    from sclstore.store import ArraySpec, Backend, cache_key
    from sclstore.testing import toy_obs

    root = work / "small-store"
    with Backend.create(root) as b:
        ds = b.register_dataset(name="toy", content_hash="t" * 64, obs=toy_obs(200), n_vars=5, source_path=None, cluster_by=())
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=4, d_model=16, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1, 2, 3, 4],
                           spec=ArraySpec(n_layers=5, n_cells=200, dim=16, pools=("cls",)))
        lease = b.acquire(run.id, wait=False)
        b.write_block(run, lease, 0, {"cls": np.ones((5, 200, 16), np.float32)})
        b.complete(run, lease, {})
    exe = [str(Path(sys.executable).with_name("sclstore"))]
    if not Path(exe[0]).exists():
        exe = [sys.executable, "-m", "sclstore.cli"]
    query = f"SELECT * FROM embeddings WHERE run = {run.id} AND layer = 2"
    args = {"sclstore --help": ["--help"], "sclstore ls runs": ["ls", "runs", "--store", str(root)],
            "sclstore query (one layer)": ["query", query, "--store", str(root), "--json"]}
    # the other install's console script (e.g. the code before a start-up change), run outside any
    # source checkout so that its own package is imported
    installs = {"now": (exe, None)} | ({"baseline": ([str(Path(baseline).with_name("sclstore"))], work)} if baseline else {})
    env = _env(True)
    times: dict[str, dict[str, list[tuple[float, float]]]] = {i: {k: [] for k in args} for i in installs}
    for cmd, cwd in installs.values():  # warm the file cache (and byte-code caches, where Python may write them)
        for a in args.values():
            _run_once([*cmd, *a], env, cwd)
    for _ in range(reps):  # interleaved: load changes hit both installs alike
        for k, a in args.items():
            for name, (cmd, cwd) in installs.items():
                times[name][k].append(_run_once([*cmd, *a], env, cwd))
    out: dict[str, Any] = {"wall_s": {k: _stats([w for w, _ in v]) for k, v in times["now"].items()},
                           "cpu_s": {k: _stats([c for _, c in v]) for k, v in times["now"].items()}}
    if baseline:
        out["baseline_wall_s"] = {k: _stats([w for w, _ in v]) for k, v in times["baseline"].items()}
        out["baseline_cpu_s"] = {k: _stats([c for _, c in v]) for k, v in times["baseline"].items()}
    out["python_startup_s"] = _stats(_timed([sys.executable, "-c", "pass"], reps, env))
    out["top_imports_cli"] = _top_imports("import sclstore.cli")
    out["top_imports_ls"] = _top_imports(
        f"import sys; from sclstore.cli import main; sys.argv = ['sclstore', 'ls', 'runs', '--store', {str(root)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass")
    out["top_imports_query"] = _top_imports(
        f"import sys; from sclstore.cli import main; sys.argv = ['sclstore', 'query', {query!r}, '--store', {str(root)!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--settle", type=float, default=30.0, help="Seconds the load runs before the first loaded repetition.")
    ap.add_argument("--reps", type=int, default=5, help="Repetitions per cell of the table (the issue asks for 5).")
    ap.add_argument("--off-reps", type=int, default=None,
                    help="Repetitions of the policy-off rows (default --reps; they are the slow ones on a loaded machine).")
    ap.add_argument("--startup-reps", type=int, default=5)
    ap.add_argument("--traj-cells", type=int, default=1500, help="Cells of the simulated differentiation.")
    ap.add_argument("--subsamples", type=int, default=20, help="Subsamples of the trajectory evaluation's intervals.")
    ap.add_argument("--tasks", default="ingest,trajectory", help="Comma list: ingest, trajectory, blas (empty: start-up only).")
    ap.add_argument("--blas-rounds", type=int, default=300, help="BLAS calls of the blas task.")
    ap.add_argument("--policies", default="on,split,off",
                    help="Comma list: on (the thread policy, CPU streams), split (the policy, one batch split over the threads), "
                         "off (SCLSTORE_THREADS=off, split batches).")
    ap.add_argument("--conditions", default="idle,loaded", help="Comma list: idle, loaded (e.g. to add repetitions to one condition).")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--baseline-python", default=None, help="Also time start-up with this interpreter's sclstore install.")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds per measurement before giving up.")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ingest":
            res = child_ingest(*rest)
        elif kind == "blas":
            res = child_blas(int(rest[0]))
        else:
            res = child_trajectory(rest[0], int(rest[1]), int(rest[2]))
        sys.stdout.write(json.dumps(res) + "\n")
        return

    from sclstore.store import runtime

    allowance = runtime.detect_allowance()
    report: dict[str, Any] = {"allowance": allowance.describe(), "busy_processes": allowance.cpus, "reps": args.reps,
                              "cells": args.cells, "traj_cells": args.traj_cells, "subsamples": args.subsamples,
                              "load_at_start": os.getloadavg()}
    print(f"allowance {allowance.describe()}; load average at start {report['load_at_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sclstore-contention-") as tmp:
        work = Path(tmp)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        prepare = any(t in ("ingest", "trajectory") for t in tasks)
        data, tstore, trun = _prepare(work, args.cells, args.traj_cells) if prepare else (work, work, 0)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        bad = [p for p in policies if p not in MODES]
        if bad:
            ap.error(f"unknown --policies {bad}; choose from {', '.join(MODES)}")
        rows: list[dict[str, Any]] = []
        for task in tasks:
            modes = [p for p in policies if p != "split" or task == "ingest"]  # only ingest runs batches
            for loaded in [c.strip() == "loaded" for c in args.conditions.split(",") if c.strip()]:
                cells = {pol: {"task": task, "policy": pol, "loaded": loaded, "seconds": [], "load1": [], "torch_threads": None,
                               "streams": None}
                         for pol in modes}
                with Busy(allowance.cpus, args.settle) if loaded else _Null():
                    for i in range(args.reps):
                        for policy in modes:  # interleaved: a change in the other jobs' load hits both policies alike
                            if policy == "off" and args.off_reps is not None and i >= args.off_reps:
                                continue
                            cell = cells[policy]
                            load0 = os.getloadavg()[0]
                            tag = f"{task}-{policy}-{loaded}-{i}"
                            if task == "ingest":
                                res = _child(["ingest", str(data), str(work / tag)], policy, args.timeout)
                                cell["torch_threads"], cell["streams"] = res["torch_threads"], res["streams"]
                                cell.setdefault("cpu", []).append(res["cpu"])
                                shutil.rmtree(work / tag, ignore_errors=True)
                            elif task == "blas":
                                res = _child(["blas", str(args.blas_rounds)], policy, args.timeout)
                                cell.setdefault("cpu", []).append(res["cpu"])
                            else:
                                shutil.copytree(tstore, work / tag)
                                res = _child(["trajectory", str(work / tag), str(trun), str(args.subsamples)], policy, args.timeout)
                                shutil.rmtree(work / tag, ignore_errors=True)
                            cell["seconds"].append(res["seconds"])
                            cell["load1"].append((load0, os.getloadavg()[0]))  # 1-minute load average before / after the rep
                            cpu = f", CPU {res['cpu']:.2f} s" if "cpu" in res else ""
                            print(f"  {task:10s} policy={policy:5s} {'loaded' if loaded else 'idle  '} rep {i}: "
                                  f"{res['seconds']:.2f} s{cpu} (load {load0:.1f} -> {cell['load1'][-1][1]:.1f})", flush=True)
                rows += [cell | _stats(cell["seconds"]) | ({"cpu_median": statistics.median(cell["cpu"])} if "cpu" in cell else {})
                         for cell in cells.values()]
        rows.sort(key=lambda r: (tasks.index(r["task"]), MODES.index(r["policy"]), r["loaded"]))
        report["rows"] = rows
        for row in rows:
            idle = next((r for r in rows if r["task"] == row["task"] and r["policy"] == row["policy"] and not r["loaded"]), None)
            if row["loaded"] and idle is not None:
                row["loaded_over_idle"] = row["median"] / idle["median"]
        if not args.skip_startup:
            report["startup"] = startup(work, args.startup_reps, args.baseline_python)
    report["load_at_end"] = os.getloadavg()
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _load_range(loads: list[tuple[float, float]]) -> str:
    vals = [x for pair in loads for x in pair]
    return f"{min(vals):.1f}-{max(vals):.1f}" if vals else ""


def render(report: dict[str, Any]) -> str:
    lines = [f"allowance: {report['allowance']}; busy processes under load: {report['busy_processes']}; "
             f"load average start {report['load_at_start']}, end {report['load_at_end']}", "",
             "| task | policy | condition | median s | min s | max s | max/min | loaded/idle median | torch threads (streams) "
             "| 1-min load during reps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    label = {"on": "on", "split": "on, split batches", "off": "off (old)"}
    for r in report.get("rows", []):
        ratio = f"{r['loaded_over_idle']:.2f}x" if "loaded_over_idle" in r else ""
        threads = "" if r["torch_threads"] is None else f"{r['torch_threads']} ({r.get('streams')})"
        lines.append(f"| {r['task']} | {label[r['policy']]} | {'loaded' if r['loaded'] else 'idle'} | "
                     f"{r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['max_over_min']:.2f} | {ratio} | "
                     f"{threads} | {_load_range(r.get('load1', []))} |")
    cpu = [r for r in report.get("rows", []) if "cpu_median" in r]
    if cpu:  # CPU seconds the same work took, and the CPUs it got (CPU s / wall s): its share of the machine
        lines += ["", "| task | policy | condition | CPU s median | CPU s min-max | max/min | CPUs used (CPU s / wall s), min-max |",
                  "|---|---|---|---|---|---|---|"]
        for r in cpu:
            used = [c / w for c, w in zip(r["cpu"], r["seconds"], strict=True)]
            lines.append(f"| {r['task']} | {label[r['policy']]} | {'loaded' if r['loaded'] else 'idle'} | {r['cpu_median']:.2f} | "
                         f"{min(r['cpu']):.2f}-{max(r['cpu']):.2f} | {max(r['cpu']) / min(r['cpu']):.2f} | "
                         f"{min(used):.2f}-{max(used):.2f} |")
    if "startup" in report:
        s = report["startup"]
        base, bcpu, cpu_s = s.get("baseline_wall_s", {}), s.get("baseline_cpu_s", {}), s.get("cpu_s", {})

        def fmt(d: dict[str, Any], k: str) -> str:
            return f"{d[k]['median']:.3f} ({d[k]['min']:.3f})" if k in d else ""

        lines += ["", "| command | wall median (min) s | CPU median (min) s | baseline wall median (min) s | baseline CPU median (min) s |",
                  "|---|---|---|---|---|"]
        for k in [*s["wall_s"], "python -c pass"]:
            wall = s["wall_s"] if k in s["wall_s"] else {k: s["python_startup_s"]}
            lines.append(f"| {k} | {fmt(wall, k)} | {fmt(cpu_s, k)} | {fmt(base, k)} | {fmt(bcpu, k)} |")
        lines += ["", "top imports, `import sclstore.cli`: " + ", ".join(f"{n} {t:.3f} s" for n, t in s["top_imports_cli"]),
                  "top imports, `sclstore ls runs`: " + ", ".join(f"{n} {t:.3f} s" for n, t in s.get("top_imports_ls", [])),
                  "top imports, one-layer query: " + ", ".join(f"{n} {t:.3f} s" for n, t in s["top_imports_query"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
