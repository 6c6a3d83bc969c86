"""The whole pipeline on an ``s3://`` store (moto on loopback) with a PostgreSQL catalog gives
the results of a local store: init, ingest, query, exports, eval, verify, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import tiledb
from typer.testing import CliRunner

import sclstore
from sclstore.cli import app
from sclstore.demo import bundled_pbmc
from sclstore.eval.simulate import simulate_trajectory
from sclstore.store.config import StoreSettings

runner = CliRunner()
pytestmark = pytest.mark.slow


def _options(cfg: dict[str, str]) -> list[str]:
    return [x for k, v in cfg.items() for x in ("--tiledb-config", f"{k}={v}")]


def _layers(st: sclstore.Store, run: int, pool: str) -> np.ndarray:
    return st.query(f"SELECT embedding.{pool} FROM embeddings WHERE run = {run} ORDER BY cell_idx").embeddings


def test_pipeline_on_s3_equals_local(tmp_path: Path, s3, postgres_server) -> None:
    pbmc = tmp_path / "pbmc.h5ad"
    bundled_pbmc()[:240].copy().write_h5ad(pbmc)
    traj = tmp_path / "traj.h5ad"
    simulate_trajectory(n_cells=300, n_genes=200, seed=0).write_h5ad(traj)
    cfg = s3.server.tiledb_config()
    uri, catalog = s3.uri("lab"), postgres_server.new_database()

    res = runner.invoke(app, [*_options(cfg), "init", "--store", uri, "--catalog", catalog, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["store"] == uri
    assert s3.server.secret_key not in res.stdout + res.stderr

    opts = {"progress": False, "workers": 0, "chunk_cells": 64}
    remote = sclstore.open_store(uri, catalog, settings=StoreSettings(tiledb_config=cfg))
    local = sclstore.open_store(tmp_path / "local", create=True)
    with remote, local:
        ids = {}
        for name, st in (("remote", remote), ("local", local)):
            a = st.ingest(pbmc, "sclstore-tiny", name="pbmc", cluster_by=("bulk_labels",), **opts)
            b = st.ingest(traj, "sclstore-tiny", name="traj", **opts)
            ids[name] = (a.id, b.id)
        (ra, rb), (la, lb) = ids["remote"], ids["local"]
        run = remote.run(ra)
        assert run.array_uri.startswith(uri + "/arrays/run-")
        assert len(tiledb.array_fragments(run.array_uri, ctx=remote.backend.location.ctx)) == 1  # consolidated
        for pool in ("cls", "mean"):
            np.testing.assert_array_equal(_layers(remote, ra, pool), _layers(local, la, pool))
            np.testing.assert_array_equal(_layers(remote, rb, pool), _layers(local, lb, pool))
        sql = "SELECT * FROM embeddings WHERE run = {} AND layer = 3 AND bulk_labels = 'CD14+ Monocyte'"
        qr, ql = remote.query(sql.format(ra)), local.query(sql.format(la))
        np.testing.assert_array_equal(qr.embeddings, ql.embeddings)
        pd.testing.assert_frame_equal(qr.obs, ql.obs)
        group = "SELECT bulk_labels, layer, AVG(embedding), COUNT(*) FROM embeddings WHERE run = {} GROUP BY bulk_labels, layer"
        gr, gl = remote.query(group.format(ra)), local.query(group.format(la))
        np.testing.assert_array_equal(gr.embeddings, gl.embeddings)
        er = remote.evaluate_trajectory(rb, pseudotime_key="latent_time", n_subsamples=3, n_neighbors=10, reference=False)
        el = local.evaluate_trajectory(lb, pseudotime_key="latent_time", n_subsamples=3, n_neighbors=10, reference=False)
        assert er.to_json()["summary"] == el.to_json()["summary"]
        pd.testing.assert_frame_equal(er.table, el.table)
        assert [r["ok"] for r in remote.verify()] == [True, True]

    # exports and verify through the CLI, settings from --tiledb-config
    for suffix in (".npz", ".h5ad"):
        outs = {}
        for name, store, cat, run in (("remote", uri, catalog, ra), ("local", str(tmp_path / "local"), None, la)):
            out = tmp_path / f"{name}{suffix}"
            args = [*_options(cfg), "query", f"SELECT * FROM embeddings WHERE run = {run} AND depth = 0.5", "-o", str(out),
                    "--store", store, "--json"]
            res = runner.invoke(app, args + (["--catalog", cat] if cat else []))
            assert res.exit_code == 0, res.stderr
            outs[name] = out
        if suffix == ".npz":
            with np.load(outs["remote"]) as zr, np.load(outs["local"]) as zl:
                assert sorted(zr.files) == sorted(zl.files)
                for k in zr.files:
                    np.testing.assert_array_equal(zr[k], zl[k])
        else:
            ar, al = ad.read_h5ad(outs["remote"]), ad.read_h5ad(outs["local"])
            np.testing.assert_array_equal(ar.X, al.X)
            pd.testing.assert_frame_equal(ar.obs, al.obs)
    res = runner.invoke(app, [*_options(cfg), "verify", "--store", uri, "--catalog", catalog, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"]


_CHILD = textwrap.dedent(
    """
    import sys, sclstore
    st = sclstore.open_store(sys.argv[1], sys.argv[2], create=True)
    st.ingest(sys.argv[3], "sclstore-tiny", chunk_cells=32, batch_size=8, progress=False, workers=0)
    """
)


def _watermark(catalog: str) -> int:
    eng = sa.create_engine(catalog)
    try:
        with eng.connect() as conn:
            return int(conn.execute(sa.text("SELECT coalesce(max(watermark), 0) FROM runs")).scalar_one())
    except sa.exc.ProgrammingError:  # no runs table yet
        return 0
    finally:
        eng.dispose()


def test_sigkill_then_resume_on_s3(tmp_path: Path, s3, postgres_server) -> None:
    data = tmp_path / "traj.h5ad"
    simulate_trajectory(n_cells=1200, n_genes=200, seed=1).write_h5ad(data)
    uri, catalog = s3.uri("lab"), postgres_server.new_database()
    # the child finds the endpoint in sclstore.toml beside the store (its working folder) and the
    # credentials in the AWS environment variables
    work = tmp_path / "work"
    work.mkdir()
    endpoint = s3.server.tiledb_config(credentials=False)
    (work / "sclstore.toml").write_text("[tiledb]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in endpoint.items()))
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3.server.access_key, AWS_SECRET_ACCESS_KEY=s3.server.secret_key)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, uri, catalog, str(data)], cwd=work, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while _watermark(catalog) < 64 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, f"child ended before it could be killed: {child.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    mark = _watermark(catalog)
    assert 0 < mark < 1200 and mark % 32 == 0
    settings = StoreSettings(tiledb_config=s3.server.tiledb_config())
    with sclstore.open_store(uri, catalog, settings=settings) as st:
        (run,) = st.runs()
        assert run.status == "running" and run.watermark == mark
        res = st.ingest(data, "sclstore-tiny", chunk_cells=32, batch_size=8, progress=False, workers=0)
        assert not res.cache_hit and res.cells_embedded == 1200 - mark
        assert st.run(res.id).stats["resumed_from"] == mark
        assert len(tiledb.array_fragments(st.run(res.id).array_uri, ctx=st.backend.location.ctx)) == 1
        resumed = {p: _layers(st, res.id, p) for p in ("cls", "mean")}
        assert st.verify()[0]["ok"]
    with sclstore.open_store(tmp_path / "clean", create=True) as st:
        res = st.ingest(data, "sclstore-tiny", chunk_cells=32, batch_size=8, progress=False, workers=0)
        for pool in ("cls", "mean"):
            np.testing.assert_array_equal(resumed[pool], _layers(st, res.id, pool))
