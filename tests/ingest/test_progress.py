"""Progress (issue 15.5): per-batch advances, plain lines on a non-terminal stderr every N
seconds, and the CLI keeps progress on stderr with --json."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclstore
from sclstore.ingest.models import TINY_CHECKPOINT
from sclstore.ingest.progress import PlainProgress, make_progress

LINE = re.compile(r"^ingest (\S+): ([\d,]+)/([\d,]+) cells \(([\d.]+)%\), ([\d,]+) cells/s, elapsed \d+:\d\d:\d\d, ETA (\S+)$")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_every_interval_with_rate_and_eta() -> None:
    clock, buf = FakeClock(), io.StringIO()
    with PlainProgress("ingest x", total=100, done=20, interval=5.0, stream=buf, clock=clock) as p:
        for _ in range(8):  # 8 batches of 10 cells, 2 s apart: lines at t=+6 s (3 batches) and t=+12 s (6 batches)
            clock.t += 2.0
            p.advance(10)
    lines = buf.getvalue().splitlines()
    got = [LINE.match(line).groups() for line in lines]  # type: ignore[union-attr]
    assert [g[1] for g in got] == ["20", "50", "80", "100"]  # start, two intervals, the last line at exit
    assert got[1][4] == "5" and got[1][5] == "0:00:10"  # 30 cells in 6 s; 50 left at 5/s
    assert got[3][3] == "100.0" and got[3][5] == "0:00:00"


def test_make_progress_is_plain_when_stderr_is_not_a_terminal() -> None:
    buf = io.StringIO()
    assert isinstance(make_progress("ingest y", total=3, enabled=True, stream=buf), PlainProgress)
    assert type(make_progress("ingest y", total=3, enabled=False)).__name__ == "_Null"


@pytest.fixture
def h5ad(tmp_path: Path) -> Path:
    genes = [g for g in json.loads((TINY_CHECKPOINT / "vocab.json").read_text()) if not g.startswith("<")][:60]
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, size=(37, 60)).astype(np.float32))
    path = tmp_path / "p.h5ad"
    ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(37)]), var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def test_ingest_reports_every_batch(
    h5ad: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCLSTORE_PROGRESS_INTERVAL", "0")  # a line per batch
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        st.ingest(h5ad, "sclstore-tiny", batch_size=8, chunk_cells=16, workers=0)
    lines = [m.groups() for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    # start line, then one per batch: chunks of 16, 16, 5 cells in batches of 8 -> 8, 8, 8, 8, 5
    assert [int(g[1]) for g in lines] == [0, 8, 16, 24, 32, 37]
    assert all(g[2] == "37" for g in lines)


def test_cli_json_keeps_progress_on_stderr(h5ad: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sclstore.cli import app

    monkeypatch.setenv("SCLSTORE_PROGRESS_INTERVAL", "0")
    res = CliRunner().invoke(app, ["ingest", str(h5ad), "--model", "sclstore-tiny", "--batch-size", "16", "--workers", "0",
                                   "--store", str(tmp_path / "s"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.stdout)["cells"] == 37
    counts = [int(m.group(2)) for m in map(LINE.match, res.stderr.splitlines()) if m]
    assert counts == [0, 16, 32, 37]
