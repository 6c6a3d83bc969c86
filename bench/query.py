"""Query benchmark (issue 5): resolving obs predicates in the catalog, and end-to-end slice queries.

Two parts, one run, everything in a temp work folder:

Q1  a catalog of ``--catalog-cells`` cells (default 1M; obs with categorical columns of
    realistic cardinality -- ``sample`` 10, ``cell_type`` 40 (skewed), ``donor`` 200,
    ``gene`` 2000 -- plus an int and a float column; cells *not* clustered). Registration is
    timed once. Then a predicate selecting 10% of the cells (``sample = 'S03'``) is resolved to
    sorted ``cell_idx`` through the query layer's own code path (``parse_query`` ->
    ``plan_query`` -> ``select_cells``, and ``execute_query`` of ``SELECT cell_idx``), against
    anchors: the same bound SELECT through the raw ``sqlite3`` module, and a numpy filter of
    the in-memory obs. Target: < 0.5 s on SQLite.

Q2  a store of ``--cells`` cells (default 100k) x ``--layers`` (13) x ``--dim`` (512), float32,
    synthetic embeddings written through ``Backend.write_block``, the dataset clustered by
    ``sample`` (``cluster_by``). ``execute_query`` of one layer x 10% of the cells
    (``sample = 'S03'``) vs a direct TileDB read of the same coordinates (``tiledb.open`` +
    ``multi_index`` of the coalesced cell ranges: libtiledb's own reader; target <= 1.3x), vs
    sclstore's ``ArrayReader.read`` of the same cells without the catalog (which reads complete
    runs straight from their tile files, so it shows the query layer's own overhead), and vs loading the
    same slice from an .h5ad holding one obsm matrix per layer written by anndata (anchors:
    ``h5py`` indexing of that obsm dataset, ``h5py`` full-layer read + numpy take, and
    ``anndata.read_h5ad(backed="r")`` + indexing). Results are checked equal.

Timings are warm (page cache hot, one untimed warm-up per case): the cases of a table run
round-robin ``--repeats`` times (so load changes on a shared machine hit all alike), and the
median and the minimum are reported; open + read + close are inside each timing. The machine's load average is printed with the tables.

Usage::

    python bench/query.py [--cells 100000] [--catalog-cells 1000000] [--layers 13] [--dim 512]
                          [--repeats 11] [--dir WORK]

Smoke test::

    python bench/query.py --cells 5000 --catalog-cells 20000 --layers 3 --dim 64 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import tiledb

from sclstore.query import execute_query, parse_query, plan_query
from sclstore.query.read import select_cells
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store.arrays import coalesce

VALUE = "S03"  # the predicate value: one of 10 equally likely samples -> ~10% of the cells


def timed(cases: list[tuple[str, Callable[[], Any]]], repeats: int) -> list[tuple[float, float, Any]]:
    """(median s, min s, last output) per case; the cases are interleaved round-robin after one
    untimed warm-up each, so a load change on a shared machine hits every case alike."""
    outs = [fn() for _label, fn in cases]  # warm-up
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_label, fn) in enumerate(cases):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [(statistics.median(ts), min(ts), out) for ts, out in zip(times, outs, strict=False)]


def make_obs(n: int, seed: int) -> pd.DataFrame:
    """Obs with realistic cardinalities: sample 10, cell_type 40 (Zipf-like), donor 200, gene 2000."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 41) ** 1.1
    cat = pd.Categorical.from_codes
    return pd.DataFrame(
        {
            "sample": cat(rng.integers(0, 10, n), categories=[f"S{i:02d}" for i in range(1, 11)]),
            "cell_type": cat(rng.choice(40, size=n, p=p / p.sum()), categories=[f"type_{i:02d}" for i in range(40)]),
            "donor": cat(rng.integers(0, 200, n), categories=[f"D{i:03d}" for i in range(200)]),
            "gene": cat(rng.integers(0, 2000, n), categories=[f"G{i:04d}" for i in range(2000)]),
            "n_genes": rng.integers(200, 6000, n).astype(np.int64),
            "total_counts": rng.lognormal(8.0, 0.6, n),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n)]),
    )


def new_run(backend: Backend, obs: pd.DataFrame, *, tag: str, layers: int, dim: int, cluster_by: tuple[str, ...]) -> tuple[Any, Any, Any, float]:
    """Register the dataset (timed), a synthetic model and a run; returns (dataset, run, lease, register_s)."""
    n = obs.shape[0]
    t = time.perf_counter()
    ds = backend.register_dataset(name=f"bench-{tag}", content_hash=cache_key("bench-query", tag, n), obs=obs,
                                  n_vars=1, source_path=None, cluster_by=cluster_by)
    t_reg = time.perf_counter() - t
    model = backend.register_model(family="synthetic", name=f"synthetic-{tag}", checkpoint_hash=cache_key("model", tag),
                                   n_layers=layers - 1, d_model=dim, config={})
    spec = ArraySpec(n_layers=layers, n_cells=n, dim=dim, pools=("cls",), dtype="float32")
    run = backend.create_run(dataset=ds, model=model, key=cache_key("bench-query-run", tag, n, layers, dim), params={},
                             layers=list(range(layers)), spec=spec)
    lease = backend.acquire(run.id, wait=False)
    return ds, run, lease, t_reg


def catalog_part(backend: Backend, n: int, repeats: int) -> list[tuple[str, float, float]]:
    obs = make_obs(n, seed=1)
    ds, run, lease, t_reg = new_run(backend, obs, tag="catalog", layers=1, dim=8, cluster_by=())
    backend.write_block(run, lease, 0, {"cls": np.zeros((1, n, 8), dtype=np.float32)})
    run = backend.complete(run, lease, {})
    col = next(c.column for c in ds.obs_schema if c.name == "sample")
    truth = np.flatnonzero(obs["sample"].to_numpy() == VALUE)  # not clustered: cell_idx == obs row

    sql_emb = f"SELECT embedding FROM embeddings WHERE run = {run.id} AND sample = '{VALUE}'"
    sql_idx = f"SELECT cell_idx FROM embeddings WHERE run = {run.id} AND sample = '{VALUE}'"
    sql_star = f"SELECT * FROM embeddings WHERE run = {run.id} AND sample = '{VALUE}'"
    plan_emb = plan_query(backend, parse_query(sql_emb))
    plan_star = plan_query(backend, parse_query(sql_star))

    def resolve_parse_plan() -> np.ndarray:
        plan = plan_query(backend, parse_query(sql_emb))
        return select_cells(backend, plan)[0]

    def raw_sqlite() -> np.ndarray:
        con = sqlite3.connect(backend.engine.url.database)
        try:
            rows = con.execute(f"SELECT cell_idx FROM {ds.obs_table} WHERE {col} = ? ORDER BY cell_idx", (VALUE,)).fetchall()
        finally:
            con.close()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    codes = obs["sample"].cat.codes.to_numpy()
    code = list(obs["sample"].cat.categories).index(VALUE)
    cases: list[tuple[str, Callable[[], Any], Callable[[Any], np.ndarray]]] = [
        ("anchor: raw sqlite3, same SELECT (cell_idx only)", raw_sqlite, lambda r: r),
        ("anchor: numpy filter of in-memory obs codes", lambda: np.flatnonzero(codes == code), lambda r: r),
        ("parse + plan only", lambda: plan_query(backend, parse_query(sql_emb)), lambda r: truth),
        ("select_cells (plan reused): cell_idx + cell", lambda: select_cells(backend, plan_emb)[0], lambda r: r),
        ("parse + plan + select_cells", resolve_parse_plan, lambda r: r),
        ("execute_query `SELECT cell_idx ...` (no array read)", lambda: execute_query(backend, sql_idx), lambda r: np.asarray(r.cell_idx)),
        ("select_cells for `SELECT *` (all 6 obs columns)", lambda: select_cells(backend, plan_star)[0], lambda r: r),
    ]
    rows = []
    for (label, _fn, get), (t, t_min, out) in zip(cases, timed([(c[0], c[1]) for c in cases], repeats), strict=False):
        got = get(out)
        assert np.array_equal(got, truth), f"{label}: {len(got)} cells, expected {len(truth)}"
        rows.append((label, t, t_min))
    rows.insert(0, (f"register_dataset ({n:,} cells, 6 obs columns; once)", t_reg, t_reg))
    return rows


def store_part(backend: Backend, work: Path, n: int, nl: int, d: int, repeats: int) -> list[tuple[str, float, float]]:
    import anndata as ad

    obs = make_obs(n, seed=2)
    rng = np.random.default_rng(0)
    # embeddings in source (obs) order, one memmap on disk, written layer by layer
    mm = np.lib.format.open_memmap(work / "emb.npy", mode="w+", dtype=np.float32, shape=(nl, n, d))
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    for layer in range(nl):
        mm[layer] = latent @ rng.normal(size=(32, d)).astype(np.float32) + 0.1 * rng.normal(size=(n, d)).astype(np.float32)
    mm.flush()

    t = time.perf_counter()
    ds, run, lease, t_reg = new_run(backend, obs, tag="store", layers=nl, dim=d, cluster_by=("sample",))
    order = backend.cell_order(ds.id)  # src row of each cell_idx
    for lo in range(0, n, 8192):
        backend.write_block(run, lease, lo, {"cls": np.asarray(mm[:, order[lo: lo + 8192]])})
    run = backend.complete(run, lease, {})
    t_store = time.perf_counter() - t

    h5 = work / "emb.h5ad"
    t = time.perf_counter()
    ad.AnnData(obs=obs).write_h5ad(h5)
    with h5py.File(h5, "a") as f:  # one obsm matrix per layer, each written by anndata's own writer
        for layer in range(nl):
            ad.io.write_elem(f["obsm"], f"X_L{layer:02d}", np.asarray(mm[layer]))
    t_h5 = time.perf_counter() - t
    print(f"store: {t_reg:.1f} s register + write + consolidate {t_store - t_reg:.1f} s; h5ad written in {t_h5:.1f} s")

    layer = nl // 2
    key = f"X_L{layer:02d}"
    src = np.flatnonzero(obs["sample"].to_numpy() == VALUE)  # h5ad rows, ascending
    cells = np.flatnonzero(obs["sample"].to_numpy()[order] == VALUE)  # cell_idx, ascending (clustered: one range)
    assert np.array_equal(order[cells], src)
    ref = np.asarray(mm[layer][src])
    sql_emb = f"SELECT embedding FROM embeddings WHERE run = {run.id} AND layer = {layer} AND sample = '{VALUE}'"
    sql_star = f"SELECT * FROM embeddings WHERE run = {run.id} AND layer = {layer} AND sample = '{VALUE}'"

    def query(sql: str) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            res = execute_query(backend, sql)
            assert np.array_equal(np.asarray(res.cell_idx), cells)
            return res.embeddings[0]
        return fn

    ranges = coalesce(cells)

    def tiledb_direct() -> np.ndarray:
        with tiledb.open(run.array_uri) as arr:  # libtiledb's own reader, same coordinates
            return arr.multi_index[[(layer, layer)], ranges, :]["cls"][0]

    def sclstore_reader() -> np.ndarray:
        with backend.open_reader(run) as rd:  # sclstore's reader (direct tile-file reads when they qualify)
            return rd.read([layer], cells, "cls")[0]

    def h5py_index() -> np.ndarray:
        with h5py.File(h5, "r") as f:
            return f["obsm"][key][src]

    def h5py_full_take() -> np.ndarray:
        with h5py.File(h5, "r") as f:
            return f["obsm"][key][()][src]

    def anndata_backed() -> np.ndarray:
        a = ad.read_h5ad(h5, backed="r")
        try:
            mask = (a.obs["sample"] == VALUE).to_numpy()
            return np.asarray(a.obsm[key][mask])
        finally:
            a.file.close()

    cases = [
        ("direct TileDB read (anchor)", tiledb_direct),
        ("sclstore ArrayReader.read, same cells (no catalog)", sclstore_reader),
        ("execute_query `SELECT embedding ...`", query(sql_emb)),
        ("execute_query `SELECT * ...` (+ 6 obs columns)", query(sql_star)),
        ("h5ad: h5py index of the obsm dataset", h5py_index),
        ("h5ad: h5py full layer + numpy take", h5py_full_take),
        ("h5ad: anndata backed='r' + index", anndata_backed),
    ]
    rows = []
    for (label, _fn), (t, t_min, got) in zip(cases, timed(cases, repeats), strict=False):
        assert np.array_equal(got, ref), f"{label}: results differ"
        rows.append((label, t, t_min))
    print(f"slice: layer {layer}, {len(cells):,} of {n:,} cells ({len(cells) / n:.1%}); results checked equal")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000, help="cells of the Q2 store")
    ap.add_argument("--catalog-cells", type=int, default=1_000_000, help="cells of the Q1 catalog")
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=11, help="timed repeats per case (interleaved)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="sclstore-bench-query-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"work folder {work}; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)")
    try:
        backend = Backend.create(work / "store")
        cat_rows = catalog_part(backend, args.catalog_cells, args.repeats)
        store_rows = store_part(backend, work, args.cells, args.layers, args.dim, args.repeats)
        backend.close()
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    load = f"load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)"

    print(f"\n### Q1: resolve `sample = '{VALUE}'` (10% of {args.catalog_cells:,} cells, not clustered) to sorted cell_idx, SQLite")
    print(f"warm, {args.repeats} interleaved repeats; every result checked equal to a numpy filter; {load}\n")
    raw, raw_min = cat_rows[1][1], cat_rows[1][2]
    print("| step | median s | min s | median / raw sqlite3 | min / raw sqlite3 |")
    print("|---|---|---|---|---|")
    for label, t, t_min in cat_rows:
        if label.startswith("register"):
            print(f"| {label} | {t:.2f} |  |  |  |")
        else:
            print(f"| {label} | {t:.4f} | {t_min:.4f} | {t / raw:.2f} | {t_min / raw_min:.2f} |")
    e2e, e2e_min = cat_rows[5][1], cat_rows[5][2]
    print(f"\nQ1 target (< 0.5 s, parse + plan + select_cells): median {e2e:.3f} s, min {e2e_min:.3f} s -> {'met' if e2e < 0.5 else 'NOT met'}")

    print(f"\n### Q2: one layer x 10% of {args.cells:,} cells (`sample = '{VALUE}'`, store clustered by sample), "
          f"{args.layers} layers x {args.dim} float32")
    print(f"warm, {args.repeats} interleaved repeats; open + read + close timed; results checked equal; {load}\n")
    anchor, anchor_min = store_rows[0][1], store_rows[0][2]
    print("| read | median s | min s | median / direct TileDB | min / direct TileDB |")
    print("|---|---|---|---|---|")
    for label, t, t_min in store_rows:
        print(f"| {label} | {t:.4f} | {t_min:.4f} | {t / anchor:.2f} | {t_min / anchor_min:.2f} |")
    q, q_min = store_rows[2][1] / anchor, store_rows[2][2] / anchor_min
    verdict = "met" if q <= 1.3 and q_min <= 1.3 else "NOT met" if q > 1.3 and q_min > 1.3 else "borderline (median and min disagree)"
    print(f"\nQ2 target (execute_query `SELECT embedding` <= 1.3x direct TileDB read): median {q:.2f}x, min {q_min:.2f}x -> {verdict}")
    own = store_rows[2][1] - store_rows[1][1]
    print(f"query layer over sclstore's own reader of the same cells: {store_rows[2][1] / store_rows[1][1]:.2f}x median "
          f"(+{own * 1e3:.1f} ms: parse, plan, catalog range check, cell names)")


if __name__ == "__main__":
    main()
