"""Read benchmark: sclstore's TileDB layout vs a numpy memmap (the physical reference), h5py on an
h5ad and zarr v3; with ``--s3``, the same run on S3 (moto on loopback) vs a raw ranged GET.

Builds one synthetic run (default 50k cells x 13 layers x 512, float32) in a temp folder and
times, warm (open + read + close inside the timing; the readers of one case run round-robin
``--repeats`` times, median and minimum reported):

  R1  one full layer
  R2c one layer x a contiguous 10% of cells
  R2  one layer x a random 10% of cells
  R3  all layers x 100 random cells

sclstore is timed four ways: its reader as shipped (a complete run is read straight from its
tile files, ``sclstore.store.tilefile``), the same reader with ``direct=False`` (libtiledb's
dense reader), and ``store.query`` (parse, plan, catalog, read; R1, R2c and R2 only: the random
10% is ``grp = 'a'`` over a random 10-level column) twice: warm, as a process that queries again
(the run's layout, the dataset's cell names and the selection are kept in memory), and with those
caches cleared before each call (what the first query of a new process pays, less imports).

The memmap anchor file is written with ``ndarray.tofile`` behind an ``.npy`` header (not through
``np.memmap``, whose page-fault-written file reads ~1.9x slower), and its page-cache speed is
printed next to a plain ``readinto`` of the same bytes, so the anchor is checked to be fair. The
anchor maps the file inside every timing, like every other reader opens its file; a second
anchor, ``memmap kept mapped``, maps it once (its page tables stay populated across reads, as
sclstore's per-process layout cache keeps a complete run's tile files mapped).

``--s3`` starts moto's S3 server on 127.0.0.1 (a child process; nothing else is contacted), builds
the run on ``s3://bench/store`` with the catalog in a local SQLite file, and times sclstore's
reader as shipped (a complete remote run is read by ranged VFS reads of its tile files and decoded
in numpy, ``sclstore.store.direct``, with the store's tuned object-storage settings); the same
with ``vfs.min_parallel_size`` raised so that no read is split into parallel ranged GETs; the
reader through libtiledb (``direct=False``, the store's settings); libtiledb with its default
settings; and two anchors: a raw boto3 ranged GET of the same tile bytes (one request per run of
tiles), and the same bytes requested as the store's settings make TileDB request them (a run of
tiles of >= ``vfs.min_parallel_size`` split into equal parallel ranged GETs). Ratios are printed
against both: moto serves every ranged GET by copying the whole object, so on moto the split
costs what it saves on real object storage.

Usage::

    python bench/read.py [--cells 50000] [--layers 13] [--dim 512] [--dtype float32] [--repeats 7] [--clock cpu]
    python bench/read.py --s3 --layers 4 [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from sclstore.store import ArraySpec, Backend, cache_key

CLOCK: Callable[[], float] = time.perf_counter
"""What :func:`timed` measures: wall time, or with ``--clock cpu`` this process's CPU time."""


def timed(fns: list[Callable[[], np.ndarray]], repeats: int) -> list[tuple[float, float, np.ndarray]]:
    """(median s, min s, output) per function; one warm-up each, then round-robin repeats."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = CLOCK()
            outs[i] = fn()
            times[i].append(CLOCK() - t)
    return [(statistics.median(ts), min(ts), out) for ts, out in zip(times, outs, strict=True)]


def write_anchor(path: Path, layers: Iterator[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> None:
    """An ``.npy`` file written with ``write()`` (header, then ``tofile`` per layer)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        for arr in layers:
            np.ascontiguousarray(arr, dtype=dtype).tofile(f)


def page_cache_check(path: Path, layer_bytes: int, offset: int, repeats: int) -> tuple[float, float]:
    """GB/s of one layer's bytes: ``readinto`` a buffer, and a memmap copy (both warm)."""
    buf = np.empty(layer_bytes, dtype=np.uint8)
    t_read, t_mm = [], []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            f.readinto(memoryview(buf))
        t_read.append(time.perf_counter() - t)
        t = time.perf_counter()
        m = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(layer_bytes,))
        np.copyto(buf, m)
        del m
        t_mm.append(time.perf_counter() - t)
    return layer_bytes / statistics.median(t_read[1:]) / 1e9, layer_bytes / statistics.median(t_mm[1:]) / 1e9


def synthetic_layers(n: int, nl: int, d: int, np_dtype: type, seed: int = 0) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    for _ in range(nl):
        proj = rng.normal(size=(32, d)).astype(np.float32)
        yield (latent @ proj + 0.1 * rng.normal(size=(n, d))).astype(np_dtype)


def build_run(backend: Backend, mm: np.ndarray, dtype: str, n: int, nl: int, d: int, obs: pd.DataFrame) -> object:
    ds = backend.register_dataset(name="bench", content_hash=cache_key("bench", n, nl, d), obs=obs, n_vars=1, source_path=None)
    model = backend.register_model(family="synthetic", name="synthetic", checkpoint_hash="0" * 64, n_layers=nl - 1, d_model=d, config={})
    spec = ArraySpec(n_layers=nl, n_cells=n, dim=d, pools=("cls",), dtype=dtype)  # type: ignore[arg-type]
    run = backend.create_run(dataset=ds, model=model, key=cache_key("bench-run", n, nl, d, dtype), params={},
                             layers=list(range(nl)), spec=spec)
    if run.status != "complete":
        lease = backend.acquire(run.id, wait=False)
        t = time.perf_counter()
        for lo in range(0, n, 8192):
            backend.write_block(run, lease, lo, {"cls": np.asarray(mm[:, lo : lo + 8192], dtype=np.float32)})
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        run = backend.complete(run, lease, {})
        print(f"sclstore write {t_write:.1f} s, consolidation {time.perf_counter() - t:.1f} s")
    return run


def table(title: str, names: list[str], rows: list[tuple[str, list[float], list[float]]], anchor: int) -> None:
    """Markdown: median seconds per reader, then each reader / the anchor (median; min / min)."""
    print(f"\n{title}\n")
    ratios = [f"{x} / {names[anchor]}" for i, x in enumerate(names) if i != anchor]
    print("| read | " + " | ".join(f"{x} s" for x in names) + " | " + " | ".join(ratios) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    for label, med, mins in rows:
        cells = [f"{m:.4f}" if m == m else "-" for m in med]
        ratios = [f"{med[i] / med[anchor]:.2f} ({mins[i] / mins[anchor]:.2f})" if med[i] == med[i] else "-"
                  for i in range(len(names)) if i != anchor]
        print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--s3", action="store_true", help="also build the run on S3 (moto on loopback) and time reads there")
    ap.add_argument("--no-local", action="store_true", help="with --s3: skip the local table")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time this process's CPU (user + system, all its threads) instead of wall time, "
                         "for a machine shared with other jobs (local table only; libtiledb's threads all count)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.s3:
            ap.error("--clock cpu measures only this process: the S3 server runs in another one")
        CLOCK = time.process_time
    n, nl, d = args.cells, args.layers, args.dim
    np_dtype = np.float16 if args.dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    work = Path(args.dir or tempfile.mkdtemp(prefix="sclstore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building {nl} layers x {n} cells x {d} ({args.dtype}) in {work}")

    anchor = work / "emb.npy"
    write_anchor(anchor, synthetic_layers(n, nl, d, np_dtype), (nl, n, d), np.dtype(np_dtype))
    mm = np.load(anchor, mmap_mode="r")
    layer_bytes = n * d * mm.itemsize
    offset = mm.offset + (nl // 2) * layer_bytes
    gbs_read, gbs_mm = page_cache_check(anchor, layer_bytes, offset, args.repeats)
    print(f"anchor file written with tofile(); one layer from the page cache: readinto {gbs_read:.2f} GB/s, "
          f"memmap copy {gbs_mm:.2f} GB/s")

    obs = pd.DataFrame({"grp": pd.Categorical(rng.choice(list("abcdefghij"), size=n))}, index=[f"c{i}" for i in range(n)])
    layer = nl // 2
    contiguous = np.arange(n // 2, n // 2 + n // 10)
    random10 = np.flatnonzero(obs["grp"].to_numpy() == "a")  # ~10%, scattered
    few = np.sort(rng.choice(n, size=100, replace=False))
    cases = [
        ("R1  one full layer", [layer], None),
        ("R2c layer x contiguous 10%", [layer], contiguous),
        ("R2  layer x random 10%", [layer], random10),
        ("R3  all layers x 100 cells", list(range(nl)), few),
    ]
    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if not args.no_local:
        local_bench(args, work, mm, obs, cases, load0)
    if args.s3:
        s3_bench(args, work, mm, obs, cases)


def local_bench(args: argparse.Namespace, work: Path, mm: np.ndarray, obs: pd.DataFrame, cases: list, load0: str) -> None:
    n, nl, d = args.cells, args.layers, args.dim
    import sclstore
    import sclstore.query.read as qread
    from sclstore.query.parse import _parse_cached, parse_query
    from sclstore.store import layout_cache
    from sclstore.store.arrays import ArrayReader

    backend = Backend.create(work / "store")
    run = build_run(backend, mm, args.dtype, n, nl, d, obs)

    h5 = work / "emb.h5ad"  # anndata's own writer: one contiguous obsm dataset per layer
    if not h5.exists():
        import anndata as ad

        adata = ad.AnnData(obs=obs)
        for s in range(nl):
            adata.obsm[f"X_L{s:02d}"] = np.asarray(mm[s])
        adata.write_h5ad(h5)
        del adata
    zpath = work / "emb.zarr"
    try:
        import zarr
    except ImportError:
        zarr = None
        print("zarr not installed (pip install 'sclstore[bench]'): no zarr column")
    if zarr is not None and not zpath.exists():
        tile = ArrayReader(run.array_uri).cell_tile
        z = zarr.create_array(zpath, shape=(nl, n, d), chunks=(1, tile, d), dtype=mm.dtype, compressors=None, zarr_format=3)
        for s in range(nl):
            z[s] = mm[s]

    with backend.open_reader(run.id) as rd:
        print(f"direct tile reads for this run: {rd.direct}")
    store = sclstore.Store(backend)

    def tdb(slots: list[int], cells: np.ndarray | None, *, direct: bool = True) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            with ArrayReader(run.array_uri, direct=direct) as rd:
                return rd.read(slots, cells, "cls")
        return fn

    kept = np.load(work / "emb.npy", mmap_mode="r")  # mapped once, for the 'memmap kept mapped' anchor

    def memmap(slots: list[int], cells: np.ndarray | None, *, keep: bool = False) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            m = kept if keep else np.load(work / "emb.npy", mmap_mode="r")
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

    def zarr_read(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            z = zarr.open_array(zpath, mode="r")
            if cells is None:
                return np.stack([z[s] for s in slots]).astype(np.float32)
            if cells.size and cells[-1] - cells[0] + 1 == cells.size:
                return np.stack([z[s, int(cells[0]) : int(cells[-1]) + 1] for s in slots]).astype(np.float32)
            return np.stack([z.oindex[s, cells] for s in slots]).astype(np.float32)
        return fn

    def query(label: str, slots: list[int], *, cold: bool = False) -> Callable[[], np.ndarray] | None:
        where = {"R1 ": "", "R2c": f" AND cell_idx BETWEEN {n // 2} AND {n // 2 + n // 10 - 1}", "R2 ": " AND grp = 'a'"}.get(label[:3])
        if where is None:
            return None
        sql = f"SELECT embedding.cls FROM embeddings WHERE run = {run.id} AND layer = {slots[0]}{where}"

        def fn() -> np.ndarray:
            if not cold:
                return store.query(sql).embeddings
            # what a new process pays: no kept names or selections, no cached layout, parse or model row;
            # the warm state is put back afterwards so the other readers' timings are not disturbed
            layouts, indexes = dict(layout_cache._entries), dict(backend.datasets._obs_indexes)
            layout_cache.clear()
            backend.datasets._obs_indexes.clear()
            backend.models._by_id.clear()
            qread.parse_query = _parse_cached.__wrapped__
            try:
                return store.query(sql).embeddings
            finally:
                qread.parse_query = parse_query
                layout_cache._entries.update(layouts)
                backend.datasets._obs_indexes.clear()
                backend.datasets._obs_indexes.update(indexes)
        return fn

    names = ["memmap", "memmap kept mapped", "sclstore direct", "store.query", "store.query, caches cleared", "via libtiledb",
             "h5py (h5ad)"]
    names += ["zarr v3"] if zarr is not None else []
    rows = []
    for label, slots, cells in cases:
        fns = [memmap(slots, cells), memmap(slots, cells, keep=True), tdb(slots, cells), query(label, slots),
               query(label, slots, cold=True), tdb(slots, cells, direct=False), h5ad(slots, cells)]
        if zarr is not None:
            fns.append(zarr_read(slots, cells))
        live = [f for f in fns if f is not None]
        res = iter(timed(live, args.repeats))
        out = [next(res) if f is not None else (float("nan"), float("nan"), None) for f in fns]
        ref = out[0][2]
        assert all(o[2] is None or np.array_equal(o[2], ref) for o in out), f"{label}: results differ"
        rows.append((label, [o[0] for o in out], [o[1] for o in out]))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table(f"{n} cells x {nl} layers x {d} dims, {args.dtype}; {args.clock} clock; warm, median of {args.repeats} round-robin repeats "
          f"(ratio of medians, in brackets of minima); results checked equal; load average at start {load0}, at end {load}",
          names, rows, anchor=0)
    print("\nagainst the memmap kept mapped: " + "; ".join(
        f"{label.split()[0]} direct {med[2] / med[1]:.2f} ({mins[2] / mins[1]:.2f})"
        + (f", store.query {med[3] / med[1]:.2f} ({mins[3] / mins[1]:.2f})" if med[3] == med[3] else "")
        for label, med, mins in rows))
    backend.close()


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 in a child process; yields ``127.0.0.1:PORT``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
            "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
            "while True: time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def s3_bench(args: argparse.Namespace, work: Path, mm: np.ndarray, obs: pd.DataFrame, cases: list) -> None:
    import boto3
    import tiledb

    from sclstore.store import StoreSettings
    from sclstore.store.arrays import ArrayReader, coalesce

    n, nl, d = args.cells, args.layers, args.dim
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with moto_server() as endpoint:
        key_id, secret = "bench-key", "bench-secret"
        client = boto3.client("s3", endpoint_url=f"http://{endpoint}", aws_access_key_id=key_id, aws_secret_access_key=secret,
                              region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        cfg = {"vfs.s3.endpoint_override": endpoint, "vfs.s3.scheme": "http", "vfs.s3.use_virtual_addressing": "false",
               "vfs.s3.region": "us-east-1", "vfs.s3.aws_access_key_id": key_id, "vfs.s3.aws_secret_access_key": secret}
        backend = Backend.create("s3://bench/store", f"sqlite:///{work / 's3-catalog.sqlite'}", settings=StoreSettings(tiledb_config=cfg))
        t0 = time.perf_counter()
        run = build_run(backend, mm, args.dtype, n, nl, d, obs)
        print(f"S3 run built in {time.perf_counter() - t0:.1f} s")
        ctx, plain_ctx = backend.location.ctx, tiledb.Ctx(tiledb.Config(cfg))
        frag = tiledb.array_fragments(run.array_uri, ctx=ctx)
        print(f"S3 array fragments: {len(frag)}")
        prefix = frag.uri[0].split("s3://bench/", 1)[1]
        key = f"{prefix}/a0.tdb"
        size = client.head_object(Bucket="bench", Key=key)["ContentLength"]
        with ArrayReader(run.array_uri, ctx=ctx) as rd:
            c = rd.cell_tile
            print(f"S3 direct ranged reads for this run: {rd.direct}")
        n_ct = -(-n // c)
        stride = size // (nl * n_ct)  # bytes per tile incl. its chunk headers (unfiltered, one fragment)

        # the store's settings, but every VFS read as one request (no split into parallel ranged GETs)
        one_request = dict(backend.location.settings.tiledb_config, **{"vfs.min_parallel_size": str(1 << 40)})
        one_ctx = tiledb.Ctx(tiledb.Config(one_request))

        def sclstore_read(slots: list[int], cells: np.ndarray | None, *, c: tiledb.Ctx = ctx,
                          direct: bool = True) -> Callable[[], np.ndarray]:
            def fn() -> np.ndarray:
                with ArrayReader(run.array_uri, ctx=c, direct=direct) as rd:
                    assert rd.direct == direct, "direct reads unavailable for this run"
                    return rd.read(slots, cells, "cls")
            return fn

        def plain(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
            def fn() -> np.ndarray:  # libtiledb, default settings, the coalesced ranges
                with tiledb.open(run.array_uri, ctx=plain_ctx) as arr:
                    ranges = [(0, n - 1)] if cells is None else coalesce(cells)
                    raw = arr.multi_index[coalesce(np.asarray(slots)), ranges, :]["cls"]
                return raw.view(np.float16).astype(np.float32) if args.dtype == "float16" else raw
            return fn

        def raw_get(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
            tiles = np.arange(n_ct) if cells is None else np.unique(cells // c)
            spans = []
            for s in slots:
                for a, b in coalesce(tiles):
                    spans.append(((s * n_ct + a) * stride, (s * n_ct + b + 1) * stride - 1))

            def fn() -> np.ndarray:  # the same tile bytes, one ranged GET per run of tiles (no decoding)
                parts = [client.get_object(Bucket="bench", Key=key, Range=f"bytes={a}-{b}")["Body"].read() for a, b in spans]
                return np.frombuffer(b"".join(parts), dtype=np.uint8)
            return fn

        settings = backend.location.settings.tiledb_config
        min_part = int(settings.get("vfs.min_parallel_size", 10 * 1024**2))
        max_ops = int(settings.get("vfs.s3.max_parallel_ops", 16))
        pool = ThreadPoolExecutor(max_ops)

        def raw_get_split(slots: list[int], cells: np.ndarray | None) -> Callable[[], np.ndarray]:
            """The same bytes requested as the store's settings make TileDB request them: each run of
            tiles of >= ``vfs.min_parallel_size`` bytes as ``size // min_parallel_size`` (at most
            ``vfs.s3.max_parallel_ops``) ranged GETs of equal size, all in flight together."""
            tiles = np.arange(n_ct) if cells is None else np.unique(cells // c)
            pieces = []
            for s in slots:
                for a, b in coalesce(tiles):
                    lo, hi = (s * n_ct + a) * stride, (s * n_ct + b + 1) * stride
                    k = max(1, min((hi - lo) // min_part, max_ops))
                    step = -(-(hi - lo) // k)
                    pieces += [(x, min(x + step, hi) - 1) for x in range(lo, hi, step)]

            def get(span: tuple[int, int]) -> bytes:
                return client.get_object(Bucket="bench", Key=key, Range=f"bytes={span[0]}-{span[1]}")["Body"].read()

            def fn() -> np.ndarray:
                return np.frombuffer(b"".join(pool.map(get, pieces)), dtype=np.uint8)
            return fn

        names = ["raw ranged GET", "raw ranged GETs, the store's split", "sclstore direct", "sclstore direct, unsplit reads",
                 "sclstore via libtiledb (tuned)", "libtiledb default settings"]
        rows = []
        for label, slots, cells in cases:
            out = timed([raw_get(slots, cells), raw_get_split(slots, cells), sclstore_read(slots, cells),
                         sclstore_read(slots, cells, c=one_ctx), sclstore_read(slots, cells, direct=False), plain(slots, cells)],
                        args.repeats)
            want = np.asarray(mm[slots] if cells is None else mm[slots][:, cells], dtype=np.float32)
            assert np.array_equal(out[0][2], out[1][2]), f"{label}: the two raw anchors fetched different bytes"
            assert all(np.array_equal(o[2], want) for o in out[2:]), f"{label}: results differ"
            rows.append((label, [o[0] for o in out], [o[1] for o in out]))
            print(f"  {label}: " + ", ".join(f"{name} {o[0]:.4f} s" for name, o in zip(names, out, strict=True)), flush=True)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        table(f"S3 (moto on loopback): {n} cells x {nl} layers x {d} dims, {args.dtype}; median of {args.repeats} round-robin "
              f"repeats (ratio of medians, in brackets of minima); load average at end {load}", names, rows, anchor=0)
        table("The same, against the raw GETs split as the store's settings split its reads", names, rows, anchor=1)
        pool.shutdown()
        backend.close()


if __name__ == "__main__":
    main()
