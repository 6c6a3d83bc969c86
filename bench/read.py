"""Read benchmark: sclstore's TileDB layout vs a numpy memmap (the physical reference) and an h5ad.

Builds one synthetic run (default 50k cells x 13 layers x 512, float32) three ways in a temp
folder and times, warm (median of repeats, open + read + close inside the timing):

  R1  one full layer
  R2c one layer x a contiguous 10% of cells
  R2  one layer x a random 10% of cells
  R3  all layers x 100 random cells

Usage::

    python bench/read.py [--cells 50000] [--layers 13] [--dim 512] [--dtype float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from sclstore.store import ArraySpec, Backend, cache_key


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    n, nl, d = args.cells, args.layers, args.dim
    np_dtype = np.float16 if args.dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    work = Path(args.dir or tempfile.mkdtemp(prefix="sclstore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building {nl} layers x {n} cells x {d} ({args.dtype}) in {work}")

    # --- data, written layer by layer to keep memory flat
    mm = np.lib.format.open_memmap(work / "emb.npy", mode="w+", dtype=np_dtype, shape=(nl, n, d))
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    for layer in range(nl):
        proj = rng.normal(size=(32, d)).astype(np.float32)
        mm[layer] = (latent @ proj + 0.1 * rng.normal(size=(n, d))).astype(np_dtype)
    mm.flush()

    # --- sclstore store
    backend = Backend.create(work / "store")
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(list("abcdefghij"), size=n))}, index=[f"c{i}" for i in range(n)])
    ds = backend.register_dataset(name="bench", content_hash=cache_key("bench", n, nl, d), obs=obs, n_vars=1, source_path=None)
    model = backend.register_model(family="synthetic", name="synthetic", checkpoint_hash="0" * 64, n_layers=nl - 1, d_model=d, config={})
    spec = ArraySpec(n_layers=nl, n_cells=n, dim=d, pools=("cls",), dtype=args.dtype)
    run = backend.create_run(dataset=ds, model=model, key=cache_key("bench-run", n, nl, d, args.dtype), params={},
                             layers=list(range(nl)), spec=spec)
    if run.status != "complete":
        lease = backend.acquire(run.id, wait=False)
        t = time.perf_counter()
        for lo in range(0, n, 8192):
            backend.write_block(run, lease, lo, {"cls": np.asarray(mm[:, lo : lo + 8192], dtype=np.float32)})
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        run = backend.complete(run, lease, {})
        print(f"sclstore write {t_write:.1f} s, full consolidation {time.perf_counter() - t:.1f} s")

    # --- h5ad: one obsm matrix per layer (anndata's own writer: contiguous datasets)
    import anndata as ad

    h5 = work / "emb.h5ad"
    if not h5.exists():
        adata = ad.AnnData(obs=obs)
        for layer in range(nl):
            adata.obsm[f"X_L{layer:02d}"] = np.asarray(mm[layer])
        adata.write_h5ad(h5)
        del adata

    layer = nl // 2
    contiguous = np.arange(n // 2, n // 2 + n // 10)
    random10 = np.sort(rng.choice(n, size=n // 10, replace=False))
    few = np.sort(rng.choice(n, size=100, replace=False))

    def tdb(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            with backend.open_reader(run.id) as rd:
                return rd.read(slots, cells, "cls")
        return fn

    def memmap(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            m = np.load(work / "emb.npy", mmap_mode="r")
            block = m[slots] if cells is None else m[slots][:, cells] if len(slots) > 1 else m[slots[0]][cells][None]
            return np.asarray(block, dtype=np.float32)
        return fn

    def h5ad(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            with h5py.File(h5, "r") as f:
                parts = [f["obsm"][f"X_L{s:02d}"][()] if cells is None else f["obsm"][f"X_L{s:02d}"][cells] for s in slots]
            return np.stack(parts).astype(np.float32)
        return fn

    cases = [
        ("R1  one full layer", [layer], None),
        ("R2c layer x contiguous 10%", [layer], contiguous),
        ("R2  layer x random 10%", [layer], random10),
        ("R3  all layers x 100 cells", list(range(nl)), few),
    ]
    rows = []
    for label, slots, cells in cases:
        t_mm, ref = timed(memmap(slots, cells), args.repeats)
        t_tdb, got = timed(tdb(slots, cells), args.repeats)
        t_h5, got_h5 = timed(h5ad(slots, cells), args.repeats)
        assert np.array_equal(got, ref) and np.array_equal(got_h5, ref), f"{label}: results differ"
        rows.append((label, t_tdb, t_mm, t_h5))
    import os

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{n} cells x {nl} layers x {d} dims, {args.dtype}; warm, median of {args.repeats}; results checked equal; "
          f"load average {load}\n")
    print("| read | sclstore s | memmap s | h5ad (h5py) s | sclstore / memmap | h5ad / memmap |")
    print("|---|---|---|---|---|---|")
    for label, a, b, c in rows:
        print(f"| {label} | {a:.4f} | {b:.4f} | {c:.4f} | {a / b:.2f} | {c / b:.2f} |")
    r1 = rows[0][1]
    print(f"\nrandom 10% / full layer (sclstore): {rows[2][1] / r1:.2f}; contiguous 10% / full layer: {rows[1][1] / r1:.2f}")
    backend.close()


if __name__ == "__main__":
    main()
