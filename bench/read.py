"""Read benchmark: sclstore's TileDB layout vs a numpy memmap (the physical reference) and an h5ad.

Builds one synthetic run (default 50k cells x 13 layers x 512, float32) three ways in a temp
folder and times, warm (open + read + close inside the timing; the readers of one case run
round-robin ``--repeats`` times, median and minimum reported):

  R1  one full layer
  R2c one layer x a contiguous 10% of cells
  R2  one layer x a random 10% of cells
  R3  all layers x 100 random cells

sclstore is timed twice: its reader as shipped (a complete run is read straight from its tile
files, ``sclstore.store.tilefile``) and the same reader with ``direct=False`` (libtiledb's dense
reader), so the table shows what each path costs.

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


def timed(fns: list[Callable[[], np.ndarray]], repeats: int) -> list[tuple[float, float, np.ndarray]]:
    """(median s, min s, output) per function; one warm-up each, then round-robin repeats."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [(statistics.median(ts), min(ts), out) for ts, out in zip(times, outs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=7)
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

    from sclstore.store.arrays import ArrayReader

    with backend.open_reader(run.id) as rd:
        direct = rd.direct
    print(f"direct tile reads for this run: {direct}")

    def tdb(slots: list[int], cells: np.ndarray | None, *, direct: bool = True) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            with ArrayReader(run.array_uri, direct=direct) as rd:
                return rd.read(slots, cells, "cls")
        return fn

    def memmap(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            m = np.load(work / "emb.npy", mmap_mode="r")
            out = np.empty((len(slots), n if cells is None else cells.size, d), dtype=np.float32)
            for i, s in enumerate(slots):  # one copy (with the dtype conversion) of only the rows asked for
                out[i] = m[s] if cells is None else np.take(m[s], cells, axis=0)
            return out
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
        fns = [memmap(slots, cells), tdb(slots, cells), tdb(slots, cells, direct=False), h5ad(slots, cells)]
        (t_mm, m_mm, ref), (t_sc, m_sc, got), (t_lt, m_lt, got_lt), (t_h5, m_h5, got_h5) = timed(fns, args.repeats)
        assert all(np.array_equal(x, ref) for x in (got, got_lt, got_h5)), f"{label}: results differ"
        rows.append((label, t_sc, t_lt, t_mm, t_h5, m_sc / m_mm))
    import os

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{n} cells x {nl} layers x {d} dims, {args.dtype}; warm, median of {args.repeats} round-robin repeats; "
          f"results checked equal; load average {load}\n")
    print("| read | sclstore s | sclstore via libtiledb s | memmap s | h5ad (h5py) s | sclstore / memmap | (min / min) "
          "| via libtiledb / memmap | h5ad / memmap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, sc, lt, mm_t, h5_t, ratio_min in rows:
        print(f"| {label} | {sc:.4f} | {lt:.4f} | {mm_t:.4f} | {h5_t:.4f} | {sc / mm_t:.2f} | {ratio_min:.2f} | {lt / mm_t:.2f} | {h5_t / mm_t:.2f} |")
    r1 = rows[0][1]
    print(f"\nrandom 10% / full layer (sclstore): {rows[2][1] / r1:.2f}; contiguous 10% / full layer: {rows[1][1] / r1:.2f}")
    backend.close()


if __name__ == "__main__":
    main()
