"""CLI row output (issue 15.4): --csv/--tsv/--nl on stdout, `-o -`, untruncated tables when piped,
several pools in one query, --into needing -o."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sclstore.cli import app
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.testing import toy_obs

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _store(root: Path) -> tuple[int, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(1)
    obs = toy_obs(30)
    with Backend.create(root) as b:
        ds = b.register_dataset(name="toy-with-a-rather-long-dataset-name-for-wide-tables", content_hash="t" * 64, obs=obs,
                                n_vars=5, source_path=None, cluster_by=("cell_type",))
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=4, d_model=3, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1, 2, 3, 4],
                           spec=ArraySpec(n_layers=5, n_cells=30, dim=3, pools=("cls", "mean")))
        order = b.cell_order(ds.id)
        values = rng.normal(size=(5, 30, 3)).astype(np.float32)  # truth in input (source row) order
        lease = b.acquire(run.id, wait=False)
        b.write_block(run, lease, 0, {"cls": values[:, order], "mean": -values[:, order]})
        b.complete(run, lease, {})
    assert not np.array_equal(order, np.arange(30))
    return run.id, values, obs


def test_ls_rows_are_whole_when_piped(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _store(root)
    code, stdout, _ = invoke("ls", "datasets", "--store", str(root), "--csv")
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert code == 0 and len(rows) == 1 and rows[0]["hash"] == "t" * 64
    assert rows[0]["name"] == "toy-with-a-rather-long-dataset-name-for-wide-tables"
    code, stdout, _ = invoke("ls", "runs", "--store", str(root), "--tsv")
    assert stdout.splitlines()[0].split("\t") == ["id", "dataset", "model", "status", "cells", "layers", "pools", "dtype"]
    code, stdout, _ = invoke("ls", "models", "--store", str(root), "--nl")
    (rec,) = [json.loads(line) for line in stdout.splitlines()]
    assert rec["checkpoint_hash"] == "s" * 64
    code, stdout, _ = invoke("ls", "runs", "--store", str(root))  # a table, not cut at 80 columns
    assert code == 0 and "toy-with-a-rather-long-dataset-name-for-wide-tables" in stdout
    code, _, stderr = invoke("ls", "runs", "--store", str(root), "--csv", "--nl")
    assert code == 1 and "choose one output format" in stderr


def test_query_rows_on_stdout_in_input_order(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id, values, obs = _store(root)
    sql = f"SELECT cell, cell_type, embedding FROM embeddings WHERE run = {run_id} AND layer = 2"
    code, stdout, stderr = invoke("query", sql, "--store", str(root), "--csv")
    df = pd.read_csv(io.StringIO(stdout))
    assert code == 0 and list(df["cell"]) == list(obs.index) and list(df["src_idx"]) == list(range(30))
    np.testing.assert_array_equal(df[["e0", "e1", "e2"]].to_numpy(np.float32), values[2])
    assert "30 rows" in stderr
    code, stdout2, _ = invoke("query", sql, "--store", str(root), "-o", "-", "--tsv")
    assert pd.read_csv(io.StringIO(stdout2), sep="\t").equals(df)
    code, stdout3, _ = invoke("query", sql, "--store", str(root), "-o", "-")  # csv by default
    assert stdout3 == stdout
    code, stdout, _ = invoke("query", sql, "--store", str(root), "--nl", "--order", "store")
    recs = [json.loads(line) for line in stdout.splitlines()]
    assert [r["cell"] for r in recs] != list(obs.index)  # the store's (clustered) order
    for r in recs:
        np.testing.assert_allclose(r["embedding"], values[2, r["src_idx"]], rtol=1e-7)


def test_several_pools_and_into_needs_output(tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id, values, _ = _store(root)
    sql = f"SELECT cell, embedding.cls, embedding.mean FROM embeddings WHERE run = {run_id} AND layer = 4"
    code, stdout, _ = invoke("query", sql, "--store", str(root), "--json")
    assert code == 0 and json.loads(stdout)["pools"] == ["cls", "mean"]
    code, stdout, _ = invoke("query", sql, "--store", str(root), "--csv")
    df = pd.read_csv(io.StringIO(stdout))
    mean = df[df["pool"] == "mean"]
    np.testing.assert_array_equal(mean[["e0", "e1", "e2"]].to_numpy(np.float32), -values[4][mean["src_idx"].to_numpy()])
    code, _, stderr = invoke("query", sql, "--store", str(root), "--into", str(tmp_path / "x.h5ad"))
    assert code == 1 and "--into needs -o" in stderr


def test_preview_table_shows_first_rows_in_input_order(tmp_path: Path) -> None:
    from rich.console import Console

    from sclstore.api import open_store
    from sclstore.cli_rows import preview_table

    root = tmp_path / "s"
    run_id, values, obs = _store(root)
    with open_store(root) as st:
        res = st.query(f"SELECT cell, cell_type, embedding FROM embeddings WHERE run = {run_id} AND layer = 1")
    table = preview_table(res, n=4, dims=2)
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "first 4 of 30 rows" in text and "L1 cls[0]" in text
    body = [ln.split("│")[1:-1] for ln in text.splitlines() if "│" in ln and any(n in ln for n in obs.index[:4])]
    assert [cells[0].strip() for cells in body] == list(obs.index[:4])
    for i, cells in enumerate(body):
        assert cells[1].strip() == str(i)  # src_idx
        assert float(cells[3]) == pytest.approx(values[1, i, 0], abs=1e-3 * max(1, abs(values[1, i, 0])))


def test_table_cells_show_users_text_verbatim(tmp_path: Path) -> None:
    """Obs names and values are data, not rich markup: ``[bold]`` and ``:smile:`` print as written."""
    from rich.console import Console

    from sclstore.api import open_store
    from sclstore.cli_rows import preview_table

    obs = pd.DataFrame({"[b]group": pd.Categorical(["[red]x[/red]", ":smile:", "a[1]"] * 4)},
                       index=[f"[i]c{i}" for i in range(12)])
    root = tmp_path / "s"
    with Backend.create(root) as b:
        ds = b.register_dataset(name="odd", content_hash="o" * 64, obs=obs, n_vars=5, source_path=None, cluster_by=())
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=1, d_model=2, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("odd"), params={}, layers=[0, 1],
                           spec=ArraySpec(n_layers=2, n_cells=12, dim=2, pools=("cls",)))
        lease = b.acquire(run.id, wait=False)
        b.write_block(run, lease, 0, {"cls": np.zeros((2, 12, 2), np.float32)})
        b.complete(run, lease, {})
    code, stdout, _ = invoke("ls", "datasets", "--store", str(root))
    assert code == 0 and "[b]group" in stdout, stdout
    with open_store(root) as st:
        res = st.query(f'SELECT cell, "[b]group", embedding FROM embeddings WHERE run = {run.id} AND layer = 0')
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(preview_table(res, n=3, dims=1))
    text = console.export_text()
    for shown in ("[b]group", "[i]c0", "[red]x[/red]", ":smile:", "a[1]"):
        assert shown in text, text
