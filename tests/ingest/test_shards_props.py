"""Sharded ingest under adversity (issue 13): random shard orders, 1-4 worker processes, SIGKILLs at
random moments, on SQLite, PostgreSQL and an ``s3://`` store: always byte-identical to the oracle,
a plain single-process ``Store.ingest`` of the same data and parameters (fixture ``shard_oracle``).

Each example is a few real processes, so there are few examples (``SCLSTORE_TEST_SHARD_EXAMPLES``,
default 1 per catalog besides the explicit one); hypothesis draws the seed that decides the worker count, each worker's kind
(``sclstore work`` or a ``python -c`` child calling ``work``) and shard order, and when whom is killed.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as hst

import sclstore
from sclstore.ingest.worker import work
from sclstore.store.config import StoreSettings

from .conftest import SHARD_CELLS, SHARD_KW
from .shard_helpers import assert_same_bytes, child_env, layer_bytes, no_orphans, spawn_worker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for orphans")]

EXAMPLES = int(os.environ.get("SCLSTORE_TEST_SHARD_EXAMPLES", "1"))


def sharded_run(world: dict[str, Path], oracle: dict[str, bytes], *, store: str, catalog: str | None, seed: int, logs: Path,
                tiledb: dict[str, str] | None = None, n_workers: int | None = None, kills: int | None = None) -> dict[str, Any]:
    """Submit, run random workers with random SIGKILLs, finish with a fresh worker; check against the oracle."""
    rng = random.Random(seed)
    n_workers = n_workers or rng.randint(1, 4)
    kills = rng.randint(0, min(2, n_workers)) if kills is None else kills
    thresholds = sorted(rng.randrange(0, SHARD_CELLS - 8) for _ in range(kills))
    kinds = [rng.choice(["cli", "py"]) for _ in range(n_workers)]
    mark = f"sclstore-shard-test-{uuid.uuid4().hex}"
    env = child_env(mark, catalog=catalog, tiledb=tiledb)
    cfg = StoreSettings(tiledb_config=tiledb or {})
    logs.mkdir(parents=True, exist_ok=True)
    with sclstore.open_store(store, catalog, create=True, settings=cfg) as st:
        sub = st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), shard_cells=256, device="cpu", **SHARD_KW)
        assert (sub.shards, sub.cells, sub.cache_hit) == (3, SHARD_CELLS, False)
        procs = [spawn_worker(k, store, catalog, sub.id, rng.randrange(1 << 30), env, logs / f"w{i}.log") for i, k in enumerate(kinds)]
        killed: list[int] = []
        try:
            for th in thresholds:
                wait_for(lambda th=th: st.run(sub.id).watermark >= th or all(p.poll() is not None for p in procs), 600,
                         f"run watermark {th}")
                time.sleep(rng.uniform(0, 1.5))  # mid-chunk, mid-write, mid-claim...
                live = [i for i, p in enumerate(procs) if p.poll() is None and i not in killed]
                if live:
                    victim = rng.choice(live)
                    os.killpg(procs[victim].pid, signal.SIGKILL)  # the worker and its tokenizer processes
                    killed.append(victim)
            for p in procs:
                p.wait(timeout=600)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for i, p in enumerate(procs):
            if i not in killed:
                assert p.returncode == 0, (logs / f"w{i}.log").read_text()[-3000:]
        rest = None
        if st.run(sub.id).status != "complete":  # every worker was killed: a fresh one takes over the dead ones' shards
            assert killed
            rest = work(st.backend, runs=[sub.id], device="cpu", workers=0, shuffle=rng, poll_s=0.05)
        run = st.run(sub.id)
        assert run.status == "complete", st.status(sub.id)
        assert run.watermark == SHARD_CELLS
        assert [s.status for s in st.backend.shards.shards(sub.id)] == ["done"] * 3
        assert_same_bytes(layer_bytes(st, sub.id), oracle)
        no_orphans(mark)
        return {"workers": n_workers, "kinds": kinds, "killed": killed, "rest": rest, "stats": run.stats}


_PROP = settings(max_examples=EXAMPLES, deadline=None, phases=(Phase.explicit, Phase.generate), database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("catalog_kind", ["sqlite", "postgresql"])
@_PROP
@given(seed=hst.integers(0, 2**31))
@example(seed=12)  # 4 workers (sclstore work and python -c), one SIGKILLed at cell 358
def test_any_workers_orders_and_kills_equal_one_ingest(shard_world, shard_oracle, tmp_path_factory, request, catalog_kind: str,
                                                       seed: int) -> None:
    catalog = request.getfixturevalue("postgres_server").new_database() if catalog_kind == "postgresql" else None
    root = tmp_path_factory.mktemp("prop")
    out = sharded_run(shard_world, shard_oracle, store=str(root / "s"), catalog=catalog, seed=seed, logs=root / "logs")
    assert out["stats"]["shards"] == 3


def test_s3_store_with_kills_equals_one_ingest(shard_world, shard_oracle, tmp_path, s3, postgres_server) -> None:
    out = sharded_run(shard_world, shard_oracle, store=s3.uri("sharded"), catalog=postgres_server.new_database(), seed=5,
                      logs=tmp_path / "logs", tiledb=s3.server.tiledb_config(), n_workers=2, kills=1)
    assert len(out["killed"]) == 1
