"""The command line: exit codes, one-line errors, machine-clean --json, help on every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store import catalog as catalogdb
from sclstore.testing import toy_obs

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _synthetic_store(root: Path) -> tuple[int, np.ndarray]:
    """A store with one complete run whose values are known."""
    rng = np.random.default_rng(0)
    with Backend.create(root) as b:
        ds = b.register_dataset(name="toy", content_hash="t" * 64, obs=toy_obs(30), n_vars=5, source_path=None, cluster_by=("cell_type",))
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=4, d_model=6, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1, 2, 3, 4],
                           spec=ArraySpec(n_layers=5, n_cells=30, dim=6, pools=("cls", "mean")))
        values = rng.normal(size=(5, 30, 6)).astype(np.float32)
        lease = b.acquire(run.id, wait=False)
        b.write_block(run, lease, 0, {"cls": values, "mean": -values})
        b.complete(run, lease, {})
        return run.id, values


def test_every_command_has_help() -> None:
    root = get_command(app)
    assert hasattr(root, "commands")
    names = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            assert c.help, f"{name} {sub or ''} has no help"
            names.append(f"{name} {sub}" if sub else name)
    assert {"init", "ls", "verify", "ingest", "query", "demo", "db upgrade", "db current", "eval trajectory", "eval perturbation"} <= set(names)


def test_init_ls_verify_json_are_clean(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    code, stdout, _ = invoke("init", "--store", store, "--json")
    head = catalogdb.head_revision()
    assert code == 0 and json.loads(stdout)["schema"] == head
    code, stdout, _ = invoke("db", "current", "--store", store, "--json")
    assert code == 0 and json.loads(stdout) == {"current": head, "head": head, "up_to_date": True}
    for what in ("datasets", "models", "runs"):
        code, stdout, _ = invoke("ls", what, "--store", store, "--json")
        assert code == 0 and json.loads(stdout) == []
    code, stdout, _ = invoke("verify", "--store", store, "--json")
    assert code == 0 and json.loads(stdout) == {"ok": True, "runs": []}


def test_ls_and_verify_a_run(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id, _ = _synthetic_store(root)
    code, stdout, _ = invoke("ls", "runs", "--store", str(root), "--json")
    (run,) = json.loads(stdout)
    assert code == 0 and run["id"] == run_id and run["status"] == "complete" and run["layers"] == [0, 1, 2, 3, 4]
    code, stdout, _ = invoke("ls", "datasets", "--store", str(root))
    assert code == 0 and "toy" in stdout and "cell_type" in stdout
    shutil.rmtree(Path(run["array_uri"]))
    code, stdout, _ = invoke("verify", "--store", str(root), "--json")
    report = json.loads(stdout)
    assert code == 1 and not report["ok"] and "array missing" in report["runs"][0]["problems"][0]


def test_query_json_and_output(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id, values = _synthetic_store(root)
    sql = f"SELECT * FROM embeddings WHERE run = {run_id} AND layer = 2 AND cell_type = 'T'"
    code, stdout, _ = invoke("query", sql, "--store", str(root), "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["layers"] == [2] and summary["pool"] == "cls"
    out = tmp_path / "slice.npy"
    code, stdout, _ = invoke("query", sql, "-o", str(out), "--store", str(root), "--json")
    assert code == 0 and json.loads(stdout)["path"] == str(out)
    with Backend.open(root) as b:
        obs = b.read_obs(1)
    cells = obs.loc[obs["cell_type"] == "T", "cell_idx"].to_numpy()
    np.testing.assert_array_equal(np.load(out), values[[2]][:, cells])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ls", "--store", "{tmp}/nostore"], "is not an sclstore store"),
        (["ls", "--store", "{tmp}/s", "--catalog", "postgresql+psycopg://u:secret@127.0.0.1:1/x"], "cannot connect to catalog"),
        (["query", "DROP TABLE runs", "--store", "{tmp}/s"], "DROP"),
        (["query", "SELECT * FROM embeddings", "--store", "{tmp}/s"], "no complete run"),
        (["ingest", "{tmp}/missing.h5ad", "--model", "nope", "--store", "{tmp}/s"], "unknown model family 'nope'"),
        (["ingest", "{tmp}/x.h5ad", "--model", "sclstore-tiny", "--model-option", "sub_model=rde", "--store", "{tmp}/s"],
         "option sub_model=rde is not one of 'sclstore-tiny'"),
        (["ingest", "{tmp}/x.h5ad", "--model", "sclstore-tiny", "--model-option", "rde", "--store", "{tmp}/s"], "not KEY=VALUE"),
        (["ingest", "{tmp}/x.h5ad", "--model", "sclstore-tiny", "--max-genes", "1", "--store", "{tmp}/s"], "max_genes must be >= 2"),
    ],
)
def test_errors_are_one_line_with_exit_1(tmp_path: Path, args: list[str], needle: str) -> None:
    invoke("init", "--store", str(tmp_path / "s"))
    code, stdout, stderr = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle.lower() in lines[0].lower(), stderr
    assert "secret" not in stderr


def test_usage_error_exit_2(tmp_path: Path) -> None:
    code, _, _ = invoke("ls", "bananas", "--store", str(tmp_path))
    assert code == 2
