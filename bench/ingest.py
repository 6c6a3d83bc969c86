"""Ingest benchmark: sclstore's one-pass ingest vs a bare forward pass and vs one pass per layer.

Writes a random-init Tahoe-X1 checkpoint (default: the 70M architecture, 12 blocks x 512,
8 heads, reduced vocabulary) in the official HF layout, simulates counts over its genes, then
measures in the same run, on the same cells, batches and tokens:

  (a) ``Store.ingest`` end to end (read h5ad, tokenize, forward with hooks, pool, write TileDB)
      vs the bare forward pass of the same model over the same batches (no hooks, no writes);
  (b) vs the naive approach: one forward pass per stored layer, keeping that layer only;
  (c) peak RSS of an ingest of N1 vs N2 cells (separate processes);
  (d) the pipeline's own ceiling: a full ingest of ``--ceiling-cells`` cells (h5ad reading,
      tokenizer workers, batching, the writer thread, TileDB writes with fsync, consolidation)
      with the model's forward replaced by zeros of the right shape -- the rate above which a
      GPU would wait for the CPU side. Compare it with the model's own cells/s on your device.

Usage::

    python bench/ingest.py [--cells 512] [--genes 2000] [--max-genes 256] [--batch-size 32]
                           [--rss-cells 10000 50000] [--rss-d-model 512] [--rss-max-genes 16]

On a 2-core CPU the full 70M model runs at a few cells/s, so (c) defaults to short sequences;
on a GPU pass ``--device cuda`` and larger sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml

import sclstore
from sclstore.ingest.embed import _embed_chunk
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.tahoe.model import TahoeConfig
from sclstore.ingest.models.train_tiny import TahoePretrainModel, model_configs
from sclstore.ingest.source import CountsSource


def write_checkpoint(folder: Path, *, n_genes: int, d_model: int, n_layers: int, n_heads: int, seed: int = 0) -> list[str]:
    from safetensors.torch import save_file

    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    vocab = {g: i for i, g in enumerate(genes)}
    for tok in ("<pad>", "<cls>", "<eoc>"):
        vocab[tok] = len(vocab)
    model_cfg, collator_cfg = model_configs(len(vocab), vocab["<pad>"], d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    collator_cfg["max_length"] = 2048
    torch.manual_seed(seed)
    model = TahoePretrainModel(TahoeConfig.from_dicts(model_cfg, collator_cfg))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model_config.yml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (folder / "collator_config.yml").write_text(yaml.safe_dump(collator_cfg, sort_keys=False))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return genes


def write_data(path: Path, genes: list[str], n_cells: int, *, nnz: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        k = int(rng.integers(nnz // 2, nnz + 1))
        c = rng.choice(len(genes), size=k, replace=False)
        rows.append(np.full(k, i))
        cols.append(c)
        vals.append(rng.negative_binomial(2, 0.3, size=k) + 1)
    X = sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))), shape=(n_cells, len(genes)))
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(["a", "b", "c"], size=n_cells))}, index=[f"c{i}" for i in range(n_cells)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)


def _child_rss(store: Path, data: Path, ckpt: Path, device: str, batch_size: int, max_genes: int) -> float:
    code = (
        "import sys, sclstore\n"
        f"st = sclstore.open_store({str(store)!r}, create=True)\n"
        f"st.ingest({str(data)!r}, 'tahoe-x1', {str(ckpt)!r}, device={device!r}, batch_size={batch_size}, "
        f"max_genes={max_genes}, progress=False, workers=1)\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec)
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=store.parent)
    return float(out.stdout.strip().splitlines()[-1]) / 1024.0  # MB (VmHWM is in kB)


def pipeline_ceiling(work: Path, ckpt: Path, genes: list[str], args: argparse.Namespace) -> None:
    """(d): ingest end to end with the forward pass replaced by zeros (same shapes, same writes)."""
    from sclstore.ingest.pipeline import ingest as run_ingest
    from sclstore.store import Backend, IngestConfig

    data = work / "ceiling.h5ad"
    write_data(data, genes, args.ceiling_cells, nnz=args.nnz, seed=11)
    adapter = load_adapter("tahoe-x1", ckpt, max_genes=args.max_genes)
    adapter.load("cpu")

    def no_forward(batch: object, *, layers: list[int], pools: list[str]) -> dict[str, torch.Tensor]:
        b = int(batch.gene_ids.shape[0])  # type: ignore[attr-defined]
        return {p: torch.zeros((len(layers), b, adapter.d_model)) for p in pools}

    adapter.embed = no_forward  # type: ignore[method-assign]
    config = IngestConfig(model="tahoe-x1", checkpoint=str(ckpt), max_genes=args.max_genes, batch_size=args.batch_size,
                          device="cpu", progress=False, workers=args.workers)
    with Backend.create(work / "ceiling-store") as backend:
        t = time.perf_counter()
        res = run_ingest(backend, data, config, adapter=adapter)
        secs = time.perf_counter() - t
        with backend.open_reader(res.run_id) as rd:
            assert not rd.read([len(res.layers) - 1], np.arange(10), "cls").any()  # the zeros were written
    n_bytes = args.ceiling_cells * len(res.layers) * len(res.pools) * adapter.d_model * 4
    print(f"\npipeline ceiling (forward replaced by zeros; {args.ceiling_cells} cells, {len(res.layers)} layers x "
          f"{len(res.pools)} pools x {adapter.d_model}, {n_bytes / 2**20:.0f} MiB written, {args.workers} tokenizer worker(s)): "
          f"{secs:.1f} s, {args.ceiling_cells / secs:.0f} cells/s; load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--nnz", type=int, default=400, help="max expressed genes per cell")
    ap.add_argument("--max-genes", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer worker processes of the ingest")
    ap.add_argument("--rss-cells", type=int, nargs=2, default=[10_000, 50_000])
    ap.add_argument("--rss-d-model", type=int, default=512)
    ap.add_argument("--rss-max-genes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of bare / ingest / hooked")
    ap.add_argument("--skip-naive", action="store_true", help="skip (b), which costs one pass per layer")
    ap.add_argument("--ceiling-cells", type=int, default=0, help="(d): cells of the pipeline-ceiling ingest (0: skip)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--only-rss", action="store_true", help="skip (a) and (b)")
    ap.add_argument("--only-ceiling", action="store_true", help="skip (a) and (b); run (d)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sclstore-bench-ingest-"))
    ckpt = work / "tx1-70m-random"
    genes = write_checkpoint(ckpt, n_genes=args.genes, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    data = work / "cells.h5ad"
    write_data(data, genes, args.cells, nnz=args.nnz)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    print(f"model: Tahoe-X1 architecture, {args.layers} blocks x d={args.d_model}, random init; {args.cells} cells, "
          f"<= {args.max_genes} tokens each; device {device}; torch threads {torch.get_num_threads()}")

    if not args.only_rss and not args.only_ceiling:
        # the exact tokens and batches ingest uses (one chunk of all cells)
        adapter = load_adapter("tahoe-x1", ckpt, max_genes=args.max_genes)
        with CountsSource(data) as src:
            mapping = adapter.map_genes(src.gene_ids)
            counts = src.rows(0, src.n_obs)[:, mapping.var_index].tocsr()
        records = adapter.tokenizer.tokenize(counts, np.arange(args.cells), seed=0)
        adapter.load(device)
        lengths = np.array([adapter.tokenizer.seq_len(r) for r in records])
        order = np.lexsort((np.arange(len(records)), lengths))
        batches = [adapter.collate([records[i] for i in order[b : b + args.batch_size]]).to(device) for b in range(0, len(records), args.batch_size)]
        layers = list(range(args.layers + 1))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare() -> None:
            with torch.no_grad():
                for b in batches:
                    adapter._encode(b)
            sync()

        def naive() -> None:
            for layer in layers:
                for b in batches:
                    adapter.embed(b, layers=[layer], pools=["cls", "mean"])
            sync()

        def hooked() -> None:
            _embed_chunk(adapter, records, layers=layers, pools=["cls", "mean"], batch_size=args.batch_size, device=device)
            sync()

        def timed(fn: Callable[[], object]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def ingest() -> object:
            with sclstore.open_store(work / f"store-{time.time_ns()}", create=True) as st:
                return st.ingest(data, "tahoe-x1", str(ckpt), max_genes=args.max_genes, batch_size=args.batch_size,
                                 device=str(device), progress=False, workers=args.workers)

        bare()  # warm-up
        # interleaved rounds, so a change of machine load hits anchor and measurements alike
        times: dict[str, list[float]] = {"bare": [], "ingest": [], "hooked": [], "naive": []}
        for _ in range(args.repeats):
            times["bare"].append(timed(bare))
            times["ingest"].append(timed(ingest))
            times["hooked"].append(timed(hooked))
        times["bare"].append(timed(bare))
        if not args.skip_naive:
            times["naive"].append(timed(naive))
        res = ingest()  # cache hit: for the layer count only
        med = {k: float(np.median(v)) for k, v in times.items() if v}
        print(f"\n{args.repeats} interleaved rounds; bare forward passes " + ", ".join(f"{t:.2f}" for t in times["bare"])
              + " s (median used); load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
        print("\n| measurement | median s | all s | cells/s | / bare forward |")
        print("|---|---|---|---|---|")
        rows = [("bare forward pass (no hooks, no writes)", "bare"), ("forward + hooks + pooling (no I/O)", "hooked"),
                (f"sclstore ingest end to end ({len(res.layers)} layers x 2 pools, TileDB)", "ingest"),  # type: ignore[attr-defined]
                (f"naive: one pass per layer ({len(layers)} passes)", "naive")]
        for name, key in rows:
            if key in med:
                secs = med[key]
                print(f"| {name} | {secs:.2f} | {', '.join(f'{t:.2f}' for t in times[key])} | {args.cells / secs:.1f} | {secs / med['bare']:.2f} |")

    if args.ceiling_cells:
        pipeline_ceiling(work, ckpt, genes, args)

    if not args.skip_rss:
        ck2 = work / "rss-model"
        g2 = write_checkpoint(ck2, n_genes=args.genes, d_model=args.rss_d_model, n_layers=args.layers, n_heads=args.heads)
        rss = {}
        for n in args.rss_cells:
            d = work / f"rss{n}.h5ad"
            write_data(d, g2, n, nnz=args.rss_max_genes * 2, seed=n)
            rss[n] = _child_rss(work / f"rss-store-{n}", d, ck2, str(device), args.batch_size, args.rss_max_genes)
        (a, b) = args.rss_cells
        print(f"\npeak RSS (separate processes, d_model {args.rss_d_model}, <= {args.rss_max_genes} tokens/cell): "
              f"{a} cells {rss[a]:.0f} MB, {b} cells {rss[b]:.0f} MB, growth {rss[b] - rss[a]:.0f} MB")
    print(f"\n(work folder {work}; this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
