"""Sharded ingest: submit once, workers claim shards; any worker count, order or kill gives the same bytes.

The oracle of every test is a plain single-process ``ingest`` of the same data and parameters.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import sclstore
from sclstore.ingest.worker import work
from sclstore.store.errors import InvalidInputError
from sclstore.store.shards import split_cells

from .shard_helpers import layer_bytes, write_shard_data

KW = {"chunk_cells": 32, "batch_size": 8, "pools": ("cls", "mean")}
N_CELLS = 600
# d_model 512 in float32 gives 256-cell array tiles: shards of 200 cells round up to 256 (chunks of 32)
SHARDS = [(0, 256), (256, 512), (512, 600)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, random_counts, tiny_gene_ids, tiny_tahoe_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("shards")
    ckpt = tiny_tahoe_factory("hf", n_genes=60, d_model=512, n_layers=2, n_heads=4, max_length=32)
    data = write_shard_data(tmp / "d.h5ad", random_counts(N_CELLS, 60, seed=4), tiny_gene_ids(60))
    return {"data": data, "ckpt": ckpt, "tmp": tmp}


@pytest.fixture
def world(shared: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {**shared, "tmp": tmp_path}


@pytest.fixture(scope="module")
def reference(shared: dict[str, Path]) -> dict[str, bytes]:
    """The oracle: one plain single-process ingest."""
    with sclstore.open_store(shared["tmp"] / "ref", create=True) as st:
        res = st.ingest(shared["data"], "tahoe-x1", str(shared["ckpt"]), progress=False, workers=0, **KW)
        assert st.backend.shards.counts(res.id)["done"] == 1  # a plain ingest is one shard
        return layer_bytes(st, res.id)


def test_split_cells_aligns_every_boundary() -> None:
    assert split_cells(300, 100, 32) == [(0, 128), (128, 256), (256, 300)]
    assert split_cells(10, 100, 4) == [(0, 10)]
    with pytest.raises(InvalidInputError, match="--shard-cells"):
        split_cells(10, 0, 4)


def test_submit_then_workers_in_random_order_equal_one_ingest(world, reference, catalog_url, monkeypatch) -> None:
    import torch

    from sclstore.ingest import worker

    opened, switched = [], []
    real_open = worker.open_context
    monkeypatch.setattr(worker, "open_context", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    with sclstore.open_store(world["tmp"] / "s", catalog_url, create=True) as st:
        sub = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), shard_cells=200, device="cpu", **KW)
        assert (sub.shards, sub.shard_cells, sub.cache_hit) == (3, 256, False)
        assert st.run(sub.id).status == "queued"
        assert [(s.lo, s.hi) for s in st.backend.shards.shards(sub.id)] == SHARDS
        # planned under this process's thread policy, so the worker embeds with its own count
        assert st.run(sub.id).params["cpu_threads"] == torch.get_num_threads()
        monkeypatch.setattr(torch, "set_num_threads", lambda n: switched.append(n))
        first = work(st.backend, runs=[sub.id], device="cpu", workers=0, shuffle=random.Random(7), poll_s=0.05)
        monkeypatch.undo()
        assert first.shards == 3 and first.cells == N_CELLS and first.runs_finalised == [sub.id]
        # per worker and run, not per shard: the model, data file and mapping are opened once; no thread switches
        assert (len(opened), switched) == (1, [])
        split = first.to_json()  # the worker's own time split: start-up + embedding + coordination = its seconds
        assert split["startup_seconds"] > 0 and split["embedding_seconds"] > 0 and split["coordination_seconds"] >= 0
        assert split["startup_seconds"] + split["embedding_seconds"] + split["coordination_seconds"] == pytest.approx(split["seconds"], abs=0.003)
        run = st.run(sub.id)
        assert run.status == "complete" and run.stats["shards"] == 3
        assert layer_bytes(st, sub.id) == reference
        again = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), device="cpu", **KW)
        assert again.cache_hit and again.id == sub.id


def test_submit_defaults_to_shards_of_16_chunks(world) -> None:
    with sclstore.open_store(world["tmp"] / "s", create=True) as st:
        sub = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), device="cpu", **KW)  # chunks of 32, tiles of 256
        assert [(s.lo, s.hi) for s in st.backend.shards.shards(sub.id)] == [(0, 16 * 32), (16 * 32, N_CELLS)]


@pytest.mark.parametrize("how", ["--threads", "SCLSTORE_THREADS"])
def test_cli_submit_pins_the_thread_policy_count_the_workers_use(world, how: str) -> None:
    """`sclstore submit` applies the thread policy before planning, as `ingest` does: a CPU run is
    pinned to the count the workers are given, not to torch's default on the submitting machine
    (which made every `--threads 1` worker switch torch to the machine's core count per shard).
    3 is no machine's default here, so the pinned value can only come from the policy."""
    store = world["tmp"] / "s"
    argv = [sys.executable, "-m", "sclstore.cli", "submit", str(world["data"]), "--model", "tahoe-x1", "--checkpoint", str(world["ckpt"]),
            "--device", "cpu", "--store", str(store), "--chunk-cells", "32", "--batch-size", "8", "--shard-cells", "200", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "SCLSTORE_THREADS"}
    if how == "--threads":
        argv += ["--threads", "3"]
    else:
        env["SCLSTORE_THREADS"] = "3"
    res = subprocess.run(argv, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["thread_policy"]["threads"] == 3 and out["shards"] == 3
    with sclstore.open_store(store) as st:
        assert st.run(out["run_id"]).params["cpu_threads"] == 3
        assert [s.cpu_threads for s in st.backend.shards.shards(out["run_id"])] == [3, 3, 3]
