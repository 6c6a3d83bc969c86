"""The ingest service (issue 13): cancel, heartbeats from a thread, ``sclstore work --forever`` through
catalog outages and SIGTERM, and ``sclstore ingest --devices cpu,cpu``.

Every finished run is compared byte for byte with the oracle (fixture ``shard_oracle``: a plain
single-process ingest of the same data and parameters).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app
from sclstore.ingest import embed as embed_mod
from sclstore.ingest.worker import work
from sclstore.store import shards as shards_mod
from sclstore.store.config import StoreSettings
from sclstore.store.models import RunShard
from sclstore.store.shards import ShardQueue

from .conftest import SHARD_CELLS, SHARD_KW
from .shard_helpers import CatalogProxy, assert_same_bytes, child_env, cmdline, layer_bytes, marked, no_orphans, wait_for

runner = CliRunner()
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for orphans")


def _submit(st: sclstore.Store, world: dict[str, Path], **kw: Any) -> Any:
    return st.submit(world["data"], "tahoe-x1", str(world["ckpt"]), shard_cells=kw.pop("shard_cells", 256), device="cpu",
                     **{**SHARD_KW, **kw})


def _catalog_args(catalog: str | None) -> list[str]:
    return ["--catalog", catalog] if catalog else []


# ------------------------------------------------------------------------------------------ cancel
def test_cancel_stops_the_worker_at_its_next_chunk_and_an_identical_ingest_resumes(shard_world, shard_oracle, tmp_path,
                                                                                   catalog_url, monkeypatch) -> None:
    root = tmp_path / "s"
    starts: list[float] = []
    real_chunk = embed_mod._embed_chunk

    def chunk_spy(*a: Any, **k: Any) -> Any:
        starts.append(time.time())
        return real_chunk(*a, **k)

    monkeypatch.setattr(embed_mod, "_embed_chunk", chunk_spy)
    with sclstore.open_store(root, catalog_url, create=True) as st:
        sub = _submit(st, shard_world)
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(rep=work(st.backend, runs=[sub.id], device="cpu", workers=0, poll_s=0.05)))
        worker.start()
        wait_for(lambda: st.run(sub.id).watermark >= 64, 600, "two chunks written")
        t_cancel = time.time()
        res = runner.invoke(app, ["cancel", str(sub.id), "--store", str(root), *_catalog_args(catalog_url)])
        at_cancel = st.run(sub.id).watermark
        assert res.exit_code == 0, res.stderr
        assert re.fullmatch(rf"run {sub.id} cancelled: 3 shard\(s\) cancelled\n", res.stderr)
        worker.join(300)
        assert not worker.is_alive(), "the worker did not stop after the cancel"
        rep = box["rep"]
        assert rep.shards == 0 and rep.runs_finalised == []
        assert st.run(sub.id).watermark == at_cancel < SHARD_CELLS  # nothing recorded after the cancel
        assert sum(t > t_cancel for t in starts) <= 2  # it stopped at its next chunk (one may have been under way)
        (doc,) = st.status(sub.id)
        assert doc["status"] == "cancelled" and doc["shards"]["cancelled"] == 3 and doc["workers"] == []
        assert all(s.lease_owner is None for s in st.backend.shards.shards(sub.id))
        assert work(st.backend, runs=[sub.id], device="cpu", workers=0, poll_s=0.05).shards == 0  # nobody takes a cancelled run
        done_before = doc["cells_done"]
        again = st.ingest(shard_world["data"], "tahoe-x1", str(shard_world["ckpt"]), progress=False, workers=0, **SHARD_KW)
        assert again.id == sub.id and not again.cache_hit
        assert again.cells_embedded == SHARD_CELLS - done_before
        assert st.run(sub.id).status == "complete"
        assert_same_bytes(layer_bytes(st, sub.id), shard_oracle)


# ------------------------------------------------------------------------------------------ heartbeat thread
def test_a_chunk_slower_than_the_lease_ttl_keeps_its_shard(shard_world, shard_oracle, tmp_path, monkeypatch) -> None:
    ttl, beat, slow = 2.0, 0.25, 5.0
    calls = [0]
    real_chunk = embed_mod._embed_chunk

    def slow_chunk(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            time.sleep(slow)
        return real_chunk(*a, **k)

    monkeypatch.setattr(embed_mod, "_embed_chunk", slow_chunk)
    settings = StoreSettings(lease_ttl_s=ttl, heartbeat_s=beat)
    real_host = shards_mod.HOSTNAME
    with sclstore.open_store(tmp_path / "s", create=True, settings=settings) as st:
        sub = _submit(st, shard_world, shard_cells=1024)  # one shard
        # the worker claims as if on another host: only its heartbeats keep the thief (this host) off its shard
        monkeypatch.setattr(shards_mod, "HOSTNAME", "node-a")
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(rep=work(st.backend, runs=[sub.id], device="cpu", workers=0, poll_s=0.05)))
        worker.start()
        wait_for(lambda: st.backend.shards.shards(sub.id)[0].lease_host == "node-a", 300, "the worker's claim")
        monkeypatch.setattr(shards_mod, "HOSTNAME", real_host)
        thief = ShardQueue(st.backend.engine, ttl_s=ttl, heartbeat_s=beat)
        stolen: list[int] = []
        ages: list[float] = []
        while worker.is_alive():
            lease = thief.claim(runs=[sub.id], device="thief")
            if lease is not None:
                stolen.append(lease.shard.idx)
                lease.stop()
                break
            with st.backend.engine.connect() as conn:
                hb = conn.execute(sa.select(RunShard.heartbeat_at).where(RunShard.run_id == sub.id, RunShard.status == "claimed"))
                ages += [time.time() - h for (h,) in hb if h is not None]
            time.sleep(0.1)
        worker.join(600)
        rep = box["rep"]
        assert calls[0] >= 3 and stolen == [] and rep.shards == 1 and rep.cells == SHARD_CELLS
        assert ages and max(ages) < ttl
        assert st.run(sub.id).status == "complete"
        assert_same_bytes(layer_bytes(st, sub.id), shard_oracle)

        # the control: without heartbeats, the same wait loses the shard to the thief
        other = _submit(st, shard_world, seed=1, shard_cells=1024)
        monkeypatch.setattr(shards_mod, "HOSTNAME", "node-a")
        silent = ShardQueue(st.backend.engine, ttl_s=ttl, heartbeat_s=60.0).claim(runs=[other.id], device="cpu")
        monkeypatch.setattr(shards_mod, "HOSTNAME", real_host)
        assert silent is not None and thief.claim(runs=[other.id], device="thief") is None
        time.sleep(ttl + 0.5)
        taken = thief.claim(runs=[other.id], device="thief")
        assert taken is not None and taken.shard.idx == 0
        taken.stop()
        silent.stop()


# ------------------------------------------------------------------------------------------ service mode
def _lines(log: Path, pattern: str) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if re.search(pattern, ln)]


def _service(root: Path, url: str, mark: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "sclstore.cli", "work", "--forever", "--device", "cpu", "--threads", "1",
                                 "--store", str(root)], env=child_env(mark, catalog=url), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=tempfile.gettempdir(), start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    os.kill(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=180)


@linux_only
@pytest.mark.slow
def test_work_forever_survives_catalog_outages_and_drains_on_sigterm(shard_world, shard_oracle, tmp_path, postgres_server) -> None:
    catalog = postgres_server.new_database()
    root = tmp_path / "s"
    proxy = CatalogProxy(catalog)
    mark = f"sclstore-service-{uuid.uuid4().hex}"
    log1, log2 = tmp_path / "service1.log", tmp_path / "service2.log"
    procs: list[subprocess.Popen[bytes]] = []
    with sclstore.open_store(root, catalog, create=True) as st:
        try:
            # service 1: an outage while idle, then a run; SIGTERM mid-shard drains it
            procs.append(_service(root, proxy.url, mark, log1))
            wait_for(lambda: proxy.accepted > 0 or procs[0].poll() is not None, 300, "the service to connect")
            time.sleep(2)
            proxy.cut()
            wait_for(lambda: _lines(log1, "catalog unreachable"), 60, "the outage line")
            time.sleep(5)
            proxy.restore()
            wait_for(lambda: _lines(log1, "catalog reachable again"), 120, "the recovery line")
            assert procs[0].poll() is None, log1.read_text()[-3000:]
            sub = _submit(st, shard_world)

            def in_progress(idx: int, done: int) -> bool:
                sh = st.backend.shards.shards(sub.id)
                return sum(s.status == "done" for s in sh) >= done and sh[idx].status == "claimed" and sh[idx].watermark >= sh[idx].lo + 32

            wait_for(lambda: in_progress(1, 1), 600, "shard 0 done and shard 1 under way")
            rc1 = _stop(procs[0])
            sh = st.backend.shards.shards(sub.id)
            assert [s.status for s in sh] == ["done", "queued", "queued"] and sh[1].lease_owner is None  # released ...
            assert sh[1].watermark > 256 and sh[1].watermark % SHARD_KW["chunk_cells"] == 0  # ... at a chunk boundary
            drained_at = sh[1].watermark

            # service 2 resumes shard 1 there; an outage mid-shard: its release fails, yet it takes the shard back at once
            procs.append(_service(root, proxy.url, mark, log2))
            wait_for(lambda: in_progress(1, 1) and st.backend.shards.shards(sub.id)[1].watermark > drained_at, 600, "service 2 on shard 1")
            proxy.cut()
            wait_for(lambda: _lines(log2, "catalog unreachable"), 120, "the mid-shard outage line")
            time.sleep(3)
            proxy.restore()
            wait_for(lambda: _lines(log2, "catalog reachable again"), 120, "the second recovery line")
            wait_for(lambda: st.run(sub.id).status == "complete", 600, "the run to complete")
            rc2 = _stop(procs[1])
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            proxy.close()
        text1, text2 = log1.read_text(errors="replace"), log2.read_text(errors="replace")
        assert (rc1, rc2) == (143, 143), text1[-2000:] + text2[-2000:]
        for text in (text1, text2):  # one line per outage and back, one per shard, no traceback
            assert len(re.findall("catalog unreachable", text)) == 1 and len(re.findall("catalog reachable again", text)) == 1, text[-3000:]
            assert "Traceback" not in text, text[-3000:]
        assert len(re.findall(rf"shard \d+ of run {sub.id} done", text1)) == 1, text1[-3000:]
        assert len(re.findall(rf"shard \d+ of run {sub.id} done", text2)) == 2, text2[-3000:]
        sh = st.backend.shards.shards(sub.id)
        # service 2 did shard 2 after the outage, then took its own shard 1 back without waiting for the lease TTL
        assert sh[1].claimed_at - sh[2].finished_at < st.backend.settings.lease_ttl_s / 2, (sh[1], sh[2])
        no_orphans(mark)
        assert st.run(sub.id).status == "complete"
        assert_same_bytes(layer_bytes(st, sub.id), shard_oracle)


# ------------------------------------------------------------------------------------------ --devices
@linux_only
@pytest.mark.slow
def test_ingest_on_two_cpu_devices_equals_one_ingest_and_sigterm_leaves_it_resumable(shard_world, shard_oracle, tmp_path) -> None:
    root = tmp_path / "s"
    mark = f"sclstore-devices-{uuid.uuid4().hex}"
    # a 2-CPU allowance (as a Slurm task would have): each of the two workers gets one thread
    env = child_env(mark, SLURM_CPUS_PER_TASK="2")
    env.pop("SCLSTORE_THREADS", None)
    cmd = [sys.executable, "-m", "sclstore.cli", "ingest", str(shard_world["data"]), "--model", "tahoe-x1", "--checkpoint",
           str(shard_world["ckpt"]), "--chunk-cells", "32", "--batch-size", "8", "--pool", "cls,mean", "--devices", "cpu,cpu",
           "--store", str(root)]
    first_err = tmp_path / "first.err"
    with open(first_err, "wb") as fh:
        parent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=fh, cwd=tempfile.gettempdir(), start_new_session=True)
    try:
        def workers() -> list[int]:
            return [p for p in marked(mark) if "work" in cmdline(p)]

        kids = wait_for(lambda: len(workers()) == 2 and workers(), 600, "two worker processes")
        for pid in kids:
            argv = cmdline(pid)
            assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--device") + 1] == "cpu", argv
            assert "--no-progress" in argv
        wait_for(lambda: (root / "catalog.sqlite").exists() and _watermark(root) >= 64, 600, "the workers to embed")
        parent.send_signal(signal.SIGTERM)
        rc = parent.wait(timeout=300)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert rc == 143, first_err.read_text()[-3000:]
    no_orphans(mark)
    with sclstore.open_store(root) as st:
        (run,) = st.runs()
        assert run.status != "complete"
        assert all(s.status in ("queued", "done") and s.lease_owner is None for s in st.backend.shards.shards(run.id))
        partial = run.watermark
    # the same command resumes it
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with sclstore.open_store(root) as st:
        assert res.stdout.strip() == str(run.id)
        assert st.run(run.id).status == "complete"
        assert_same_bytes(layer_bytes(st, run.id), shard_oracle)
    bars = [ln for ln in res.stderr.splitlines() if re.search(r"[\d,]+/[\d,]+ cells \(", ln)]
    assert bars and all(ln.startswith("ingest d: ") for ln in bars), res.stderr[-3000:]  # one progress bar, the parent's
    counts = [int(re.search(r": ([\d,]+)/", ln).group(1).replace(",", "")) for ln in bars]  # type: ignore[union-attr]
    assert counts[0] == partial and counts[-1] == SHARD_CELLS and counts == sorted(counts)
    no_orphans(mark)


def _watermark(root: Path) -> int:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            row = con.execute("SELECT max(watermark) FROM runs").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0] or 0)
