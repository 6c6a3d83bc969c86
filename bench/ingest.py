"""Ingest benchmark: sclstore's one-pass ingest vs a bare forward pass and vs one pass per layer.

Writes a random-init Tahoe-X1 checkpoint (default: the 70M architecture, 12 blocks x 512,
8 heads, reduced vocabulary) in the official HF layout, simulates counts over its genes, then
measures in the same run, on the same cells, batches and tokens:

  (a) ``Store.ingest`` end to end (read h5ad, tokenize, forward with hooks, pool, write TileDB)
      vs the bare forward pass of the same model over the same batches (no hooks, no writes);
  (b) vs the naive approach: one forward pass per stored layer, keeping that layer only;
  (c) peak RSS of an ingest of N1 vs N2 cells (separate processes).

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
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.tahoe_model import TahoeConfig
from sclstore.ingest.models.train_tiny import TahoePretrainModel, model_configs
from sclstore.ingest.pipeline import _embed_chunk
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
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--only-rss", action="store_true", help="skip (a) and (b)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sclstore-bench-ingest-"))
    ckpt = work / "tx1-70m-random"
    genes = write_checkpoint(ckpt, n_genes=args.genes, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    data = work / "cells.h5ad"
    write_data(data, genes, args.cells, nnz=args.nnz)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    print(f"model: Tahoe-X1 architecture, {args.layers} blocks x d={args.d_model}, random init; {args.cells} cells, "
          f"<= {args.max_genes} tokens each; device {device}; torch threads {torch.get_num_threads()}")

    if not args.only_rss:
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
        # interleaved, so a change of machine load hits anchor and measurement alike
        t_bare1 = timed(bare)
        t_ingest = timed(ingest)
        t_bare2 = timed(bare)
        t_hooked = timed(hooked)
        t_bare = (t_bare1 + t_bare2) / 2
        t_naive = timed(naive)
        res = ingest()  # cache hit: for the layer count only
        print(f"\nbare forward passes {t_bare1:.2f} s and {t_bare2:.2f} s (mean used); load average "
              + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
        print("\n| measurement | seconds | cells/s | / bare forward |")
        print("|---|---|---|---|")
        for name, secs in (("bare forward pass (no hooks, no writes)", t_bare), ("forward + hooks + pooling (no I/O)", t_hooked),
                           (f"sclstore ingest end to end ({len(res.layers)} layers x 2 pools, TileDB)", t_ingest),  # type: ignore[attr-defined]
                           (f"naive: one pass per layer ({len(layers)} passes)", t_naive)):
            print(f"| {name} | {secs:.2f} | {args.cells / secs:.1f} | {secs / t_bare:.2f} |")

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
