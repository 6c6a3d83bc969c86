"""`--threads`, `$SCLSTORE_THREADS` and `sclstore info` on the command line; the policy reaches torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.store import runtime

runner = CliRunner()


@pytest.mark.parametrize("bad", ["0", "-2", "abc", "1.5", ""])
def test_bad_threads_is_one_line_and_touches_nothing(tmp_path: Path, bad: str) -> None:
    store = tmp_path / "s"
    res = runner.invoke(app, ["ingest", str(tmp_path / "x.h5ad"), "--model", "sclstore-tiny", f"--threads={bad}", "--store", str(store)])
    if bad == "":  # empty means automatic: the command goes on and fails on the missing file instead
        assert res.exit_code == 1 and "--threads" not in res.stderr
        return
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --threads={bad!r}".replace("'-2'", "-2").replace("'0'", "0"))
    assert "whole number >= 1" in lines[0]
    assert not store.exists()


def test_bad_sclstore_threads_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["eval", "trajectory", "1", "--pseudotime-key", "t", "--store", str(tmp_path / "s")],
                        env={"SCLSTORE_THREADS": "abc"})
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: SCLSTORE_THREADS='abc' is not a thread count: give a whole number >= 1 (or auto)"


def _clean_env(**extra: str) -> dict[str, str]:
    drop = (*runtime.THREAD_VARS, "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "SCLSTORE_THREADS", "_SCLSTORE_SET_VARS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


WRAP = """
import json, os, sys
from sclstore.cli import main
sys.argv = ["sclstore", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
torch = sys.modules.get("torch")
sys.stderr.write("\\nSTATE " + json.dumps({"code": code, "torch": torch.get_num_threads() if torch else None,
                 "wait": os.environ.get("OMP_WAIT_POLICY"), "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
"""


def _cli(*args: str, env: dict[str, str]) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tempfile.gettempdir())  # outside the repo: its folders must not shadow the package
    state = [ln for ln in proc.stderr.splitlines() if ln.startswith("STATE ")]
    assert state, proc.stderr
    return proc.stdout, json.loads(state[-1][len("STATE "):]) | {"stderr": proc.stderr}


def test_info_reports_version_store_catalog_and_policy(tmp_path: Path) -> None:
    out, st = _cli("info", "--store", str(tmp_path / "s"), "--catalog", "postgresql://me:hunter2@127.0.0.1:1/x", "--json",
                   env=_clean_env(OMP_NUM_THREADS="3"))
    assert st["code"] == 0, st["stderr"]
    info = json.loads(out)
    assert info["version"] == "0.1.0" and info["store"]["exists"] is False
    assert "hunter2" not in out and info["catalog"]["url"] == "postgresql://me:***@127.0.0.1:1/x"
    pol = info["thread_policy"]
    assert pol["threads"] == 3 and pol["source"] == "OMP_NUM_THREADS" and pol["user_vars"] == {"OMP_NUM_THREADS": "3"}
    assert pol["allowance"]["cpus"] == runtime.detect_allowance().cpus
    assert st["torch"] is None  # info imports no torch
    out, st = _cli("info", "--threads", "2", "--store", str(tmp_path / "s"), env=_clean_env())
    assert "2 threads per worker set by --threads" in out and "limits: host" in out
    assert "OMP_WAIT_POLICY PASSIVE, OPENBLAS_THREAD_TIMEOUT 4" in out


def test_ingest_applies_and_reports_the_policy(tmp_path: Path) -> None:
    from sclstore.demo import bundled_pbmc

    data = tmp_path / "pbmc.h5ad"
    bundled_pbmc()[:60].copy().write_h5ad(data)
    out, st = _cli("ingest", str(data), "--model", "sclstore-tiny", "--workers", "0", "--threads", "1", "--store", str(tmp_path / "s"),
                   "--json", env=_clean_env())
    assert st["code"] == 0, st["stderr"]
    res = json.loads(out)
    assert res["cells"] == 60
    assert res["thread_policy"]["threads"] == 1 and res["thread_policy"]["source"] == "--threads"
    assert res["thread_policy"]["omp_wait_policy"] == "PASSIVE"
    assert (st["torch"], st["wait"], st["omp"]) == (1, "PASSIVE", "1")  # torch ran at the policy's thread count
    # the user's OMP_WAIT_POLICY and OMP_NUM_THREADS are kept; SCLSTORE_THREADS sets sclstore's pools
    out, st = _cli("ingest", str(data), "--model", "sclstore-tiny", "--workers", "0", "--store", str(tmp_path / "s"), "--json",
                   env=_clean_env(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2", SCLSTORE_THREADS="1"))
    res = json.loads(out)
    assert res["cache_hit"] and res["thread_policy"]["source"] == "SCLSTORE_THREADS"
    assert (st["torch"], st["wait"], st["omp"]) == (1, "ACTIVE", "2")


def test_eval_reports_the_policy(tmp_path: Path) -> None:
    from sclstore.eval.simulate import simulate_layers, simulate_trajectory
    from sclstore.ingest.source import CountsSource
    from sclstore.store import ArraySpec, Backend, cache_key

    adata = simulate_trajectory(n_cells=300, n_genes=200, seed=2)
    path = tmp_path / "traj.h5ad"
    adata.write_h5ad(path)
    t = adata.obs["latent_time"].to_numpy()
    layers = simulate_layers(np.column_stack([t, t ** 2]), n_layers=3, best_layer=1, seed=2)
    with Backend.create(tmp_path / "s") as b, CountsSource(path) as src:
        ds = b.register_dataset(name="traj", content_hash=src.scan(), obs=src.obs, n_vars=src.n_vars, source_path=str(path), cluster_by=())
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash=cache_key("m"), n_layers=2, d_model=layers.shape[2], config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1, 2],
                           spec=ArraySpec(n_layers=3, n_cells=300, dim=layers.shape[2], pools=("cls",)))
        order = b.cell_order(ds.id)
        lease = b.acquire(run.id, wait=False)
        b.write_block(run, lease, 0, {"cls": layers[:, order]})
        b.complete(run, lease, {})
    out, st = _cli("eval", "trajectory", str(run.id), "--pseudotime-key", "latent_time", "--bootstrap", "2", "--threads", "1",
                   "--store", str(tmp_path / "s"), "--json", env=_clean_env())
    assert st["code"] == 0, st["stderr"]
    res = json.loads(out)
    assert res["thread_policy"]["threads"] == 1 and res["thread_policy"]["source"] == "--threads"
    assert st["wait"] == "PASSIVE" and st["omp"] == "1"


def test_store_caps_parallel_evaluation_jobs_at_the_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sclstore
    from sclstore.eval import runner as runner_mod

    monkeypatch.setattr(runtime, "apply", lambda policy, **_k: policy)  # decide only: leave this process's pools alone
    seen: dict[str, object] = {}

    def fake(_backend: object, _run: object, **options: object) -> str:
        seen.update(options)
        return "ok"

    monkeypatch.setattr(runner_mod, "evaluate_perturbation", fake)
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        assert st.evaluate_perturbation(1, threads=2, n_jobs=64, perturbation_key="g") == "ok"
        assert seen["n_jobs"] == 2  # 64 processes on a 2-thread policy would oversubscribe 32x
        assert st.evaluate_perturbation(1, threads=3, n_jobs=2, perturbation_key="g") == "ok"
        assert seen["n_jobs"] == 2
