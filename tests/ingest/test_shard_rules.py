"""The shard queue's rules (issue 13), on SQLite and PostgreSQL: exactly one finaliser, atomic claims,
refused numerics, stale-lease takeover resuming at the watermark, status, and "planned once".

Results are checked against the oracle (fixture ``shard_oracle``: a plain single-process ingest of the
same data and parameters), byte for byte.
"""

from __future__ import annotations

import collections
import importlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app
from sclstore.ingest import adapter as adapter_mod
from sclstore.ingest.embed import embed_shard
from sclstore.ingest.plan import open_context
from sclstore.ingest.source import CountsSource
from sclstore.ingest.worker import work
from sclstore.store import hashcache
from sclstore.store.backend import Backend
from sclstore.store.errors import InvalidInputError
from sclstore.store.models import RunShard

from .conftest import SHARD_CELLS, SHARD_KW
from .shard_helpers import array_files, assert_same_bytes, catalog_rows, layer_bytes

runner = CliRunner()
tahoe_adapter = importlib.import_module("sclstore.ingest.models.tahoe.adapter")


def _submit(st: sclstore.Store, world: dict[str, Path], **kw: Any) -> Any:
    return st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), shard_cells=kw.pop("shard_cells", 256),
                     device=kw.pop("device", "cpu"), **{**SHARD_KW, **kw})


def _py(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tempfile.gettempdir())


# ------------------------------------------------------------------------------------------ single finaliser
_FINALISE = """
import json, sys, time
import sclstore
st = sclstore.open_store(sys.argv[1], sys.argv[2] or None)
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
print(json.dumps(st.backend.finalise_run(int(sys.argv[3])) is not None))
"""


def test_exactly_one_of_racing_finalisers_completes_the_run(shard_world, tmp_path, catalog_url) -> None:
    root = tmp_path / "s"
    with sclstore.open_store(root, catalog_url, create=True) as st:
        sub = _submit(st, shard_world)
        assert st.backend.finalise_run(sub.id) is None  # shards left: nobody finalises
        run = st.run(sub.id)
        for s in st.backend.shards.shards(sub.id):  # every shard written and done, as its workers leave it (no model needed)
            block = {p: np.full((len(run.layers), s.hi - s.lo, run.dim), s.idx, dtype=np.float32) for p in run.pools}
            st.backend.array_store.write(run, s.lo, block)
        with st.backend.engine.begin() as conn:
            conn.execute(sa.update(RunShard).where(RunShard.run_id == sub.id)
                         .values(status="done", watermark=RunShard.hi, claimed_at=time.time(), finished_at=time.time()))
        assert st.backend.shards.finishable_runs([sub.id]) == [sub.id]
        go = time.time() + 12  # the children import sclstore (no torch) meanwhile
        procs = [_py(_FINALISE, str(root), catalog_url or "", str(sub.id), str(go)) for _ in range(3)]
        won: list[bool] = []

        def finalise() -> None:
            time.sleep(max(0.0, go - time.time()))
            won.append(st.backend.finalise_run(sub.id) is not None)

        threads = [threading.Thread(target=finalise) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            won.append(json.loads(out.strip().splitlines()[-1]))
        assert time.time() > go
        assert len(won) == 7 and sum(won) == 1, won
        run = st.run(sub.id)
        assert run.status == "complete" and run.stats["shards"] == 3 and run.watermark == SHARD_CELLS
        assert st.backend.finalise_run(sub.id) is None  # and never again
        with st.backend.open_reader(sub.id) as rd:  # the shards' blocks, consolidated once
            got = rd.read(list(range(len(run.layers))), None, "cls")
        assert np.array_equal(got[:, :, 0], np.repeat([0.0, 1.0, 2.0], [256, 256, 8])[None, :].repeat(len(run.layers), 0))


# ------------------------------------------------------------------------------------------ atomic claims
_CLAIM = """
import json, sys, time
import sclstore
st = sclstore.open_store(sys.argv[1], sys.argv[2] or None)
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
got = []
while True:
    lease = st.backend.shards.claim(runs=[int(sys.argv[3])], device="proc")
    if lease is None:
        break
    got.append(lease.shard.idx)
    assert st.backend.shards.done(lease)
print(json.dumps(got))
"""


def test_concurrent_claims_get_distinct_shards_each_exactly_once(shard_world, tmp_path, catalog_url) -> None:
    root = tmp_path / "s"
    n = 40
    with sclstore.open_store(root, catalog_url, create=True) as st:
        sub = _submit(st, shard_world)
        with st.backend.engine.begin() as conn:  # many small shards (claims only: nothing is embedded)
            conn.execute(sa.delete(RunShard).where(RunShard.run_id == sub.id))
        st.backend.shards.create(sub.id, [(i * 13, (i + 1) * 13) for i in range(n)])
        go = time.time() + 12
        procs = [_py(_CLAIM, str(root), catalog_url or "", str(sub.id), str(go)) for _ in range(3)]
        got: dict[str, list[int]] = collections.defaultdict(list)
        errors: list[BaseException] = []

        def claimer(name: str) -> None:
            time.sleep(max(0.0, go - time.time()))
            try:
                while (lease := st.backend.shards.claim(runs=[sub.id], device=name)) is not None:
                    got[name].append(lease.shard.idx)
                    assert st.backend.shards.done(lease)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=claimer, args=(f"t{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            got[f"p{i}"] = json.loads(out.strip().splitlines()[-1])
        assert not errors, errors
        claims = [idx for v in got.values() for idx in v]
        assert sorted(claims) == list(range(n)), collections.Counter(claims).most_common(3)
        shards = st.backend.shards.shards(sub.id)
        assert {s.status for s in shards} == {"done"} and {s.attempts for s in shards} == {1}
        assert sum(1 for v in got.values() if v) >= 2  # the claims really were concurrent


# ------------------------------------------------------------------------------------------ numerics
def test_worker_with_other_numerics_refuses_and_leaves_the_store_unchanged(shard_world, tmp_path) -> None:
    root = tmp_path / "s"
    with sclstore.open_store(root, create=True) as st:
        cpu = _submit(st, shard_world)
        cuda = _submit(st, shard_world, device="cuda")  # planned for GPUs: pinned to the model's bf16
        assert st.run(cuda.id).params["precision"] == "bf16" and st.run(cpu.id).params["precision"] == "fp32"
        before = (catalog_rows(st), array_files(root))
        cases = [(cpu.id, {"batch_size": 16}, r"pinned to --batch-size 8 .* asked for 16"),
                 (cpu.id, {"precision": "bf16"}, r"pinned to fp32 precision"),
                 (cuda.id, {}, r"pinned to bf16 precision; on cpu this worker would run fp32")]
        for run_id, kw, match in cases:
            with pytest.raises(InvalidInputError, match=match) as info:
                st.work(run_id, device="cpu", **kw)
            assert "\n" not in str(info.value)
            assert (catalog_rows(st), array_files(root)) == before, kw
    res = runner.invoke(app, ["work", str(cpu.id), "--store", str(root), "--device", "cpu", "--batch-size", "16"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run ") and "--batch-size" in lines[0], res.stderr
    with sclstore.open_store(root) as st:
        assert (catalog_rows(st), array_files(root)) == before


# ------------------------------------------------------------------------------------------ takeover, status, planned once
class _StopAfter:
    """A progress object that asks the worker to stop once ``n`` cells are embedded."""

    def __init__(self, n: int, stop: threading.Event) -> None:
        self.n, self.done, self.stop = n, 0, stop

    def advance(self, k: int) -> None:
        self.done += k
        if self.done >= self.n:
            self.stop.set()


def _status_json(root: Path, run_id: int) -> dict[str, Any]:
    res = runner.invoke(app, ["status", str(run_id), "--store", str(root), "--json"])
    assert res.exit_code == 0, res.stderr
    (doc,) = json.loads(res.stdout)  # one clean JSON document
    return doc


def test_stale_lease_is_taken_over_at_its_watermark_without_rehashing(shard_world, shard_oracle, tmp_path, monkeypatch, caplog) -> None:
    root = tmp_path / "s"
    with sclstore.open_store(root, create=True) as st:
        sub = _submit(st, shard_world)
        ttl = st.backend.settings.lease_ttl_s
        # a worker on another host embeds two chunks of shard 0, then its host vanishes
        lease = st.backend.shards.claim(runs=[sub.id], device="cuda:3")
        assert lease is not None and lease.shard.idx == 0
        ctx = open_context(st.backend, st.run(sub.id), device="cpu")
        stop = threading.Event()
        cells = embed_shard(st.backend, ctx.run, lease, adapter=ctx.adapter, source=ctx.source, mapping=ctx.mapping, layers=ctx.layers,
                            pools=ctx.pools, batch_size=ctx.batch_size, chunk_cells=ctx.chunk_cells, seed=ctx.seed, device=ctx.device,
                            workers=0, progress=_StopAfter(64, stop), stop=stop)
        ctx.close()
        lease.stop()
        assert cells == 64
        with st.backend.engine.begin() as conn:
            conn.execute(sa.update(RunShard).where(RunShard.id == lease.shard.id)
                         .values(lease_host="node-b", lease_pid=4242, lease_boot_id="other-boot", heartbeat_at=time.time()))
        (shard0,) = [s for s in st.backend.shards.shards(sub.id) if s.idx == 0]
        assert (shard0.status, shard0.watermark) == ("claimed", 64)

        # a fresh lease elsewhere is respected: claims get the other shards only
        doc = _status_json(root, sub.id)
        assert doc["shards"] == {"queued": 2, "claimed": 1, "done": 0, "failed": 0, "cancelled": 0}
        assert doc["cells_done"] == 64 and doc["stale_leases"] == []
        (w,) = doc["workers"]
        assert (w["shard"], w["host"], w["pid"], w["device"], w["cell"], w["of"]) == (0, "node-b", 4242, "cuda:3", 64, [0, 256])
        assert w["cells_per_s"] > 0 and doc["cells_per_s"] == round(w["cells_per_s"], 2)
        assert doc["eta_s"] == pytest.approx((SHARD_CELLS - 64) / doc["cells_per_s"], abs=0.1)
        others = [st.backend.shards.claim(runs=[sub.id], device="cpu") for _ in range(3)]
        assert [o.shard.idx if o else None for o in others] == [1, 2, None]
        for o in others[:2]:
            assert o is not None and st.backend.shards.release(o) == "queued"

        # the heartbeat gets old: the lease is stale, the next worker takes the shard over at cell 64
        with st.backend.engine.begin() as conn:
            conn.execute(sa.update(RunShard).where(RunShard.id == lease.shard.id).values(heartbeat_at=time.time() - ttl - 5))
        doc = _status_json(root, sub.id)
        assert doc["workers"] == [] and [(s["shard"], s["host"], s["stale"]) for s in doc["stale_leases"]] == [(0, "node-b", True)]
        text = runner.invoke(app, ["status", str(sub.id), "--store", str(root)])
        assert "STALE lease of node-b pid 4242" in text.stdout

        ranges: list[tuple[int, int]] = []

        def range_spy(self: Backend, dataset_id: int, lo: int, hi: int) -> Any:
            ranges.append((lo, hi))
            return real_range(self, dataset_id, lo, hi)

        def forbidden(*_a: Any, **_k: Any) -> Any:
            raise AssertionError("a worker re-hashed the input or read the whole cell order")

        real_range = Backend.cell_order_range
        monkeypatch.setattr(Backend, "cell_order_range", range_spy)
        monkeypatch.setattr(Backend, "cell_order", forbidden)
        monkeypatch.setattr(CountsSource, "content_hash", forbidden)
        monkeypatch.setattr(CountsSource, "scan", forbidden)
        monkeypatch.setattr(adapter_mod, "hash_files", forbidden)
        monkeypatch.setattr(tahoe_adapter, "hash_files", forbidden)
        caplog.set_level("INFO", logger="sclstore.store.shards")
        report = work(st.backend, runs=[sub.id], device="cpu", workers=0, poll_s=0.05)
        assert report.shards == 3 and report.cells == SHARD_CELLS - 64 and report.runs_finalised == [sub.id]
        assert sorted(ranges) == [(64, 256), (256, 512), (512, 520)]  # resumed at the watermark; only each shard's rows
        assert any("took over shard 0" in r.getMessage() and "resuming at cell 64" in r.getMessage() for r in caplog.records)
        run = st.run(sub.id)
        assert run.status == "complete" and run.stats["shards"] == 3
        assert_same_bytes(layer_bytes(st, sub.id), shard_oracle)
        assert _status_json(root, sub.id)["status"] == "complete"

        # a repeated identical submit is a cache hit that loads no weights and hashes nothing
        monkeypatch.undo()
        computed: list[str] = []
        real_cached = hashcache.cached_digest

        def cached_spy(path: Path, what: str, compute: Any, **kw: Any) -> str:
            return real_cached(path, what, lambda: computed.append(what) or compute(), **kw)

        for mod in (hashcache, adapter_mod, tahoe_adapter, sys.modules[CountsSource.__module__]):
            if hasattr(mod, "cached_digest"):
                monkeypatch.setattr(mod, "cached_digest", cached_spy)
        monkeypatch.setattr(adapter_mod.ModelAdapter, "load", forbidden)
        monkeypatch.setattr(adapter_mod.ModelAdapter, "build_model", forbidden, raising=False)
        again = _submit(st, shard_world)
        assert again.cache_hit and again.id == sub.id and computed == []


def test_a_worker_serving_any_run_skips_the_runs_it_would_change(shard_world, shard_oracle, tmp_path, caplog) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        gpu = _submit(st, shard_world, device="cuda")  # pinned to bf16: a CPU worker must not embed it
        cpu = _submit(st, shard_world)
        caplog.set_level("WARNING", logger="sclstore.ingest.worker")
        rep = work(st.backend, runs=None, device="cpu", workers=0, poll_s=0.05)  # any shared run; returns when idle
        assert rep.shards == 3 and rep.runs_finalised == [cpu.id]
        assert_same_bytes(layer_bytes(st, cpu.id), shard_oracle)
        run = st.run(gpu.id)
        assert run.status in ("queued", "running") and run.error is None  # not failed: a CUDA worker can still do it
        shards = st.backend.shards.shards(gpu.id)
        assert [(s.status, s.watermark, s.lease_owner) for s in shards] == [("queued", s.lo, None) for s in shards]
        assert sum("skipping run" in r.getMessage() for r in caplog.records) == 1  # said once
