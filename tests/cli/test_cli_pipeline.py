"""The command line end to end with the built-in model: ingest --json, query, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.demo import bundled_pbmc

runner = CliRunner()


def test_ingest_json_then_query(tmp_path: Path) -> None:
    adata = bundled_pbmc()[:120].copy()
    data = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(data)
    store = str(tmp_path / "s")
    res = runner.invoke(app, ["ingest", str(data), "--model", "sclstore-tiny", "--cluster-by", "bulk_labels", "--workers", "0",
                              "--store", store, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)  # stdout is one JSON document and nothing else
    assert summary["cells"] == 120 and summary["layers"] == list(range(7)) and summary["pools"] == ["cls", "mean"]
    assert summary["gene_mapping"]["n_matched"] == 765 and not summary["cache_hit"]
    again = json.loads(runner.invoke(app, ["ingest", str(data), "--model", "sclstore-tiny", "--workers", "0", "--store", store,
                                           "--json"]).stdout)
    assert again["cache_hit"] and again["run_id"] == summary["run_id"]
    capped = json.loads(runner.invoke(app, ["ingest", str(data), "--model", "sclstore-tiny", "--workers", "0", "--max-genes", "32",
                                            "--store", store, "--json"]).stdout)
    assert not capped["cache_hit"] and capped["run_id"] != summary["run_id"]  # --max-genes changes the numbers
    out = tmp_path / "slice.npz"
    sql = f"SELECT * FROM embeddings WHERE run = {summary['run_id']} AND depth = 0.5 AND bulk_labels = 'Dendritic'"
    res = runner.invoke(app, ["query", sql, "-o", str(out), "--store", store, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    q = json.loads(res.stdout)
    n_dendritic = int((adata.obs["bulk_labels"] == "Dendritic").sum())
    assert q["layers"] == [3] and q["n_cells"] == n_dendritic
    with np.load(out, allow_pickle=False) as z:
        emb = z[next(k for k in z.files if k.startswith("emb"))] if "embeddings" not in z.files else z["embeddings"]
    assert emb.shape == (1, n_dendritic, 64) and np.isfinite(emb).all()


def test_demo_quick(tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quick", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["pbmc"]["cells"] == 700 and report["pbmc"]["slice_shape"] == [1, 129, 64]
    for task in ("trajectory", "perturbation"):
        assert Path(report[task]["plot"]).stat().st_size > 10_000
        assert report[task]["summary"]
    assert {r["condition"] for r in report["perturbation"]["summary"]} == {"Rest", "Stim8hr", "Stim48hr"}
    verify = runner.invoke(app, ["verify", "--store", report["store"], "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"]
    # the printed commands reproduce the steps: each ingest is a cache hit of the demo's run
    import shlex

    commands = report["commands"]
    assert len(commands) == 7 and all(c.startswith("sclstore ") and c.endswith(f"--store {report['store']}") for c in commands)
    ingests = [shlex.split(c)[1:] for c in commands if c.startswith("sclstore ingest ")]
    runs = {report["pbmc"]["run"], report["trajectory"]["run"], report["perturbation"]["run"]}
    for args in ingests:
        again = runner.invoke(app, [*args, "--json"], catch_exceptions=False)
        assert again.exit_code == 0, again.stderr
        assert json.loads(again.stdout)["cache_hit"] and json.loads(again.stdout)["run_id"] in runs
    centroids = next(shlex.split(c)[1:] for c in commands if "--csv" in c)
    rows = runner.invoke(app, centroids, catch_exceptions=False).stdout.splitlines()
    assert rows[0].startswith("layer,depth,group,") and len(rows) == 1 + 7 * 10  # 7 layers x 10 bulk labels
