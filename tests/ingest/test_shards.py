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
from typing import Any

import pytest

import sclstore
from sclstore.ingest.embed import stream_count
from sclstore.ingest.plan import CPU_THREADS_PER_BATCH
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
        # a CPU run pins one torch thread per batch; the worker runs as many batches at once as it has threads
        assert st.run(sub.id).params["cpu_threads"] == CPU_THREADS_PER_BATCH == 1
        threads = torch.get_num_threads()
        real_set, real_embed = torch.set_num_threads, worker.embed_shard
        real_set(2)  # a two-thread process (the oracle ran with this machine's count): two streams
        monkeypatch.setattr(torch, "set_num_threads", lambda n: switched.append(n) or real_set(n))
        monkeypatch.setattr(worker, "embed_shard", lambda *a, **k: streams.append(k["streams"]) or real_embed(*a, **k))
        streams: list[int] = []
        first = work(st.backend, runs=[sub.id], device="cpu", workers=0, shuffle=random.Random(7), poll_s=0.05)
        monkeypatch.undo()
        assert torch.get_num_threads() == 2  # restored
        real_set(threads)
        assert first.shards == 3 and first.cells == N_CELLS and first.runs_finalised == [sub.id]
        # per worker and run, not per shard: the model, data file and mapping are opened once
        assert len(opened) == 1
        # each shard: batches on one thread each, as many at once as this process has threads, then the count restored
        assert streams == [stream_count(2, 1)] * 3 == [2] * 3
        assert set(switched) <= {1, 2}
        split = first.to_json()  # the worker's own time split: start-up + embedding + coordination = its seconds
        assert split["startup_seconds"] > 0 and split["embedding_seconds"] > 0 and split["coordination_seconds"] >= 0
        assert split["startup_seconds"] + split["embedding_seconds"] + split["coordination_seconds"] == pytest.approx(split["seconds"], abs=0.003)
        run = st.run(sub.id)
        assert run.status == "complete" and run.stats["shards"] == 3
        assert layer_bytes(st, sub.id) == reference
        again = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), device="cpu", **KW)
        assert again.cache_hit and again.id == sub.id


def test_cpu_streams_give_the_bytes_of_one_batch_at_a_time(world, reference, monkeypatch) -> None:
    """Batches side by side on three stream threads (a three-thread process) store exactly the bytes
    of a one-thread process that runs one batch after another (a fresh run here, and the oracle
    fixture's run)."""
    import threading

    import torch

    from sclstore.ingest.adapter import ModelAdapter

    ran: list[str] = []
    real_embed = ModelAdapter.embed
    monkeypatch.setattr(ModelAdapter, "embed", lambda self, *a, **k: ran.append(threading.current_thread().name) or real_embed(self, *a, **k))
    from sclstore.store import runtime

    before, policy = torch.get_num_threads(), runtime.active_policy()
    got, where = {}, {}
    try:
        for threads in (1, 3):
            ran.clear()
            with sclstore.open_store(world["tmp"] / f"s{threads}", create=True) as st:
                res = st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), progress=False, workers=0, threads=threads, **KW)
                got[threads] = layer_bytes(st, res.id)
            where[threads] = set(ran)
            assert len(ran) == -(-N_CELLS // KW["batch_size"])  # every batch once
    finally:  # this process's policy as it was
        if policy is not None:
            runtime.apply(policy)
        torch.set_num_threads(before)
    assert where[1] == {threading.main_thread().name}
    assert len(where[3]) == 3 and all(name.startswith("sclstore-stream") for name in where[3])
    assert got[1] == got[3] == reference


def test_a_worker_waits_while_another_process_finalises_the_run(world, reference) -> None:
    """Every shard done while another process holds the run's lease (it is consolidating the array):
    the worker neither returns (a plain `ingest` would then find its run unfinished: two processes
    ingesting the same data raced on this) nor finalises; once the finaliser lets go without
    finishing, the worker finalises the run itself."""
    import threading
    import time

    from sclstore.store.lease import try_acquire

    with sclstore.open_store(world["tmp"] / "s", create=True) as st:
        b = st.backend
        sub = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), shard_cells=200, device="cpu", **KW)
        finaliser = try_acquire(b.engine, sub.id, ttl_s=b.settings.lease_ttl_s, heartbeat_s=b.settings.heartbeat_s)
        assert finaliser is not None
        box: dict[str, Any] = {}
        worker_thread = threading.Thread(target=lambda: box.setdefault("report", work(b, runs=[sub.id], device="cpu", workers=0,
                                                                                        poll_s=0.02)))
        worker_thread.start()
        deadline = time.time() + 300
        while time.time() < deadline and b.shards.counts(sub.id)["done"] < len(SHARDS):
            time.sleep(0.05)
        time.sleep(1.0)  # ~50 polls with nothing to claim
        assert worker_thread.is_alive() and st.run(sub.id).status == "running"
        finaliser.release()
        worker_thread.join(timeout=120)
        assert not worker_thread.is_alive() and box["report"].runs_finalised == [sub.id]
        assert st.run(sub.id).status == "complete"
        assert layer_bytes(st, sub.id) == reference


def test_submit_defaults_to_shards_of_16_chunks(world) -> None:
    with sclstore.open_store(world["tmp"] / "s", create=True) as st:
        sub = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), device="cpu", **KW)  # chunks of 32, tiles of 256
        assert [(s.lo, s.hi) for s in st.backend.shards.shards(sub.id)] == [(0, 16 * 32), (16 * 32, N_CELLS)]


@pytest.mark.parametrize("how", ["--threads", "SCLSTORE_THREADS"])
def test_cli_submit_applies_the_thread_policy_and_pins_one_thread_per_batch(world, how: str) -> None:
    """`sclstore submit` applies the thread policy before planning, as `ingest` does (3 is no
    machine's default here, so the reported count can only come from the policy); the CPU run it
    plans pins one torch thread per batch whatever that count, so workers with any allowance give
    the same numbers (each runs as many batches at once as it has threads)."""
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
    with sclstore.open_store(store) as st:  # the run pins threads per batch, whatever the submitting process's count
        assert st.run(out["run_id"]).params["cpu_threads"] == CPU_THREADS_PER_BATCH
        assert [s.cpu_threads for s in st.backend.shards.shards(out["run_id"])] == [CPU_THREADS_PER_BATCH] * 3
