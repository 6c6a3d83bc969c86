"""eval diagnostics / celltype / run / show, ls evals and the HTML report, through the CLI."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.eval.simulate import simulate_layers
from sclstore.testing import store_with_layers

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_labelfree_cli_ls_show_and_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 500
    codes = rng.integers(0, 3, size=n)
    latent = rng.normal(scale=2.5, size=(3, 4))[codes] + rng.normal(size=(n, 4))
    obs = pd.DataFrame({"cell_type": [f"t<{c}>" for c in codes]}, index=[f"c{i}" for i in range(n)])  # markup in labels
    adata = ad.AnnData(rng.poisson(1.0, size=(n, 20)).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(20)]))
    layers = simulate_layers(latent, n_layers=6, best_layer=2, dim=12, width=1.0, noise=4.0, seed=3)
    backend, run_id = store_with_layers(tmp_path, adata, layers, name="cli")
    backend.close()
    store = str(tmp_path / "store")

    code, so, se = invoke("eval", "diagnostics", str(run_id), "--cka-map", str(tmp_path / "cka.png"), "--plot", str(tmp_path / "d.png"),
                          "--twonn-cells", "400", "--store", store, "--json")
    assert code == 0, se
    diag = json.loads(so)
    assert diag["task"] == "diagnostics" and len(diag["notes"]["cka_map"]["layers"]) == 6
    assert _png_size((tmp_path / "cka.png").read_bytes())[0] > 100 and _png_size((tmp_path / "d.png").read_bytes())[0] > 100

    code, so, se = invoke("eval", "celltype", str(run_id), "--label-key", "cell_type", "--bootstrap", "100", "--store", store, "--json")
    assert code == 0, se
    ct = json.loads(so)
    lr = [r for r in ct["table"] if r["metric"] == "logreg_f1"]
    best = max(lr, key=lambda r: r["score"])
    assert best["layer"] in (1, 2, 3) and best["diff_ci_low"] > 0

    code, so, se = invoke("eval", "celltype", str(run_id), "--label-key", "cell_type", "--bootstrap", "100", "--store", store)
    assert code == 0 and "logreg_f1" in so and "indistinguishable from the best" in so  # human table + claim headline
    code, so, _ = invoke("ls", "evals", "--store", store, "--json")
    evs = json.loads(so)
    assert [e["task"] for e in evs] == ["diagnostics", "celltype"] and all(e["run"] == run_id for e in evs)
    code, so, _ = invoke("eval", "show", str(evs[1]["id"]), "--store", store, "--json")
    shown = json.loads(so)
    assert shown["cached"] and shown["table"] == ct["table"]
    code, so, se = invoke("eval", "show", "999", "--store", store)
    assert code == 1 and "no cached evaluation 999" in se and "sclstore ls evals" in se
    code, so, se = invoke("eval", "run", "celltype", str(run_id), "-o", "label_key=cell_type", "-o", "n_boot=100", "--store", store, "--json")
    assert code == 0 and json.loads(so)["cached"]  # same config as above: the registry-generic command hits the cache
    code, so, se = invoke("eval", "run", "celltype", str(run_id), "-o", "bogus=1", "--store", store)
    assert code == 1 and "unknown option(s) bogus" in se

    out = tmp_path / "r" / "report.html"
    code, so, se = invoke("report", str(run_id), "-o", str(out), "--store", store, "--json")
    assert code == 0 and json.loads(so) == {"path": str(out), "evaluations": 2}
    text = out.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text and "src='data:image/png;base64," in text
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(imgs) == 3  # diagnostics panels, the CKA map, the celltype curve
    assert all(_png_size(base64.b64decode(i))[0] > 100 for i in imgs)
    # the recommendation states the planted layer with its numbers (from the JSON result), labels are escaped
    assert f"Use layer {best['layer']} (depth {best['depth']:.2f}): logreg_f1 {best['score']:.3f}" in text
    assert f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}]" in text and f"{best['diff_vs_final']:+.3f} over the final layer 5" in text
    final_cka = [r for r in diag["table"] if r["metric"] == "cka_final" and r["layer"] == 0][0]["score"]
    assert f"{final_cka:.3f}" in text
