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
    import shlex

    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quick", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    steps = report["steps"]
    assert steps["pbmc"]["cells"] == 700 and steps["pbmc"]["slice_shape"] == [1, 129, 64]
    for task in ("trajectory", "perturbation"):
        assert Path(steps[task]["plot"]).stat().st_size > 10_000
        assert steps[task]["summary"] and steps[task]["headline"]
    assert {r["condition"] for r in steps["perturbation"]["summary"]} == {"Rest", "Stim8hr", "Stim48hr"}
    assert len(report["reports"]) == 3
    for path in report["reports"]:
        text = Path(path).read_text()
        assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text
    assert all(s["seconds"] >= 0 and s["cpu_seconds"] >= 0 for s in steps.values())
    verify = runner.invoke(app, ["verify", "--store", report["store"], "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"]
    # every printed command reproduces its step: ingests are cache hits of the demo's runs, and each
    # evaluation command finds the demo's cached result (same settings) and gives the same answer
    commands = report["commands"]
    assert all(c.startswith("sclstore ") and c.endswith(f"--store {report['store']}") for c in commands)
    runs = {steps[k]["run"] for k in ("pbmc", "trajectory", "perturbation")}
    evals = {"trajectory": steps["trajectory"]["summary"], "perturbation": steps["perturbation"]["summary"],
             "celltype": steps["celltype"]["summary"]}
    seen = set()
    for line in commands:
        args = shlex.split(line)[1:]
        if args[0] in ("ingest", "eval", "report") or "-o" in args:
            args = [*args, "--json"]
        again = runner.invoke(app, args, catch_exceptions=False)
        assert again.exit_code == 0, (line, again.stderr)
        if args[0] == "ingest":
            doc = json.loads(again.stdout)
            assert doc["cache_hit"] and doc["run_id"] in runs
        elif args[0] == "eval":
            doc = json.loads(again.stdout)
            assert doc["cached"], line  # the CLI settings are the demo's
            if args[1] in evals:
                assert doc["summary"] == evals[args[1]]
            seen.add(args[1])
        elif args[0] == "report":
            assert json.loads(again.stdout)["evaluations"] >= 1
        elif "--csv" in args:
            rows = again.stdout.splitlines()
            assert rows[0].startswith("layer,depth,group,") and len(rows) == 1 + 7 * 10  # 7 layers x 10 bulk labels
    assert seen == {"diagnostics", "celltype", "trajectory", "perturbation"}
