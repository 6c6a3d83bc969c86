"""Issue 10 item 2: a killed ingest leaves no orphan, and SIGTERM/SIGINT end it cleanly.

The user runs ``sclstore ingest`` with tokenizer worker processes under
``subprocess.run(capture_output=True)`` (or ``| tail``, or Slurm) and the ingest is killed
mid-run: by SIGKILL (only the parent), by SIGTERM (the parent, or the whole process group as
Slurm does), or by Ctrl-C (SIGINT to the group). Then:

* ``subprocess.run`` returns (no worker keeps the pipes open) and, a few seconds later, no
  process carrying the run's environment marker is alive;
* SIGTERM/SIGINT: exit status 143/130, one ``error:`` line on stderr, no traceback from any
  process, the run marked failed (resumable) with its lease released;
* the same command then resumes the run, which ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sclstore
from sclstore.demo import bundled_pbmc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for orphans")

N_CELLS = 700  # every bundled cell: the ingest must still be running when the test's signal lands, under CI load too
ARGS = ["--model", "sclstore-tiny", "--layers", "0,1,2", "--pool", "cls,mean", "--max-genes", "96", "--chunk-cells", "32",
        "--batch-size", "8", "--workers", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    bundled_pbmc()[:N_CELLS].copy().write_h5ad(path)
    return path


def _cmd(data: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "sclstore.cli", "ingest", str(data), *ARGS, "--store", str(store)]


def _embeddings(store: Path) -> dict[str, np.ndarray]:
    with sclstore.open_store(store) as st:
        (run,) = st.runs()
        assert run.status == "complete"
        with st.backend.open_reader(run.id) as rd:
            return {p: rd.read([0, 1, 2], None, p) for p in ("cls", "mean")}


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    store = tmp_path_factory.mktemp("ref") / "s"
    res = subprocess.run(_cmd(data, store), capture_output=True, text=True, timeout=900, cwd=store.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return _embeddings(store)


def _marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries ``mark`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _runs(store: Path) -> list[tuple[Any, ...]]:
    db = store / "catalog.sqlite"
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT id, status, watermark, lease_owner, error FROM runs").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


CASES = {
    "SIGKILL-parent": (signal.SIGKILL, False, -signal.SIGKILL),
    "SIGTERM-parent": (signal.SIGTERM, False, 143),
    "SIGTERM-group": (signal.SIGTERM, True, 143),
    "SIGINT-group": (signal.SIGINT, True, 130),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_killed_ingest_leaves_no_orphan_and_resumes_bit_identical(
    tmp_path: Path, data: Path, reference: dict[str, np.ndarray], case: str
) -> None:
    signum, group, expected_rc = CASES[case]
    store = tmp_path / "s"
    mark = f"sclstore-test-{uuid.uuid4().hex}"
    env = {**os.environ, "SCLSTORE_TEST_MARK": mark}
    box: dict[str, Any] = {}

    def run() -> None:  # what a caller does; it must return once the ingest is killed
        box["res"] = subprocess.run(_cmd(data, store), capture_output=True, text=True, env=env, cwd=tmp_path,
                                    start_new_session=True)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    deadline = time.time() + 600
    while time.time() < deadline and caller.is_alive():
        rows = _runs(store)
        if rows and rows[0][2] >= 64 and len(_marked(mark)) >= 3:  # mid-run, with its two workers
            break
        time.sleep(0.2)
    parent = [p for p in _marked(mark) if int((Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split())[1]) == os.getpid()]
    assert caller.is_alive() and len(parent) == 1, f"not mid-run: {_runs(store)}"
    if group:
        os.killpg(parent[0], signum)
    else:
        os.kill(parent[0], signum)
    caller.join(timeout=120)
    assert not caller.is_alive(), "subprocess.run(capture_output=True) did not return: something holds the pipes"
    res: subprocess.CompletedProcess[str] = box["res"]
    t0 = time.time()
    while _marked(mark) and time.time() - t0 < 5:
        time.sleep(0.1)
    assert _marked(mark) == [], "processes of the killed ingest outlived it"
    assert res.returncode == expected_rc, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    (run_row,) = _runs(store)
    if signum != signal.SIGKILL:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and res.stderr.rstrip().splitlines()[-1] == errors[0]
        name = signal.Signals(signum).name
        assert errors[0] == f"error: interrupted by {name}: the run keeps its finished chunks; rerun the same command to resume it"
        assert run_row[1] == "failed" and run_row[3] is None  # resumable, lease released
    assert 0 < run_row[2] < N_CELLS and run_row[2] % 32 == 0
    again = subprocess.run(_cmd(data, store), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    got = _embeddings(store)
    for pool in ("cls", "mean"):
        np.testing.assert_array_equal(got[pool], reference[pool])
