"""Catalog edge cases a shared lab store meets: passwords kept out of messages and off the
command line, a locked SQLite file, a PostgreSQL that goes away, long category values, wide
obs tables, several processes creating one store at once."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import sclstore
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store import catalog as catalogdb
from sclstore.store.errors import (
    CatalogBusyError,
    CatalogConnectionError,
    DatasetError,
    InvalidInputError,
    SclstoreError,
)
from sclstore.testing import store_snapshot, toy_obs

SCLSTORE = str(Path(sys.executable).with_name("sclstore"))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SCLSTORE_THREADS": "1", **(env or {})}
    return subprocess.run([SCLSTORE, *args], capture_output=True, text=True, env=full, timeout=300, check=False)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _with_run(b: Backend, obs: pd.DataFrame, *, dim: int = 4) -> tuple[int, np.ndarray]:
    ds = b.register_dataset(name="d", content_hash=cache_key("d", len(obs.columns)), obs=obs, n_vars=3, source_path=None)
    m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=1, d_model=dim, config={})
    run = b.create_run(dataset=ds, model=m, key=cache_key("r", len(obs.columns)), params={}, layers=[0, 1],
                       spec=ArraySpec(n_layers=2, n_cells=len(obs), dim=dim, pools=("cls",)))
    values = np.arange(2 * len(obs) * dim, dtype=np.float32).reshape(2, len(obs), dim)
    lease = b.acquire(run.id, wait=False)
    assert lease is not None
    b.write_block(run, lease, 0, {"cls": values})
    b.complete(run, lease, {})
    return run.id, values


# ----------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("url", [
    "postgresql+psycopg://lab:s3cr3t-pw@db.example.org:port/lab",  # port is not a number
    "postgresql+psycopg://lab:s3cr3t-pw@db.example.org:54x2/lab",
    "://lab:s3cr3t-pw@db.example.org/lab",
])
def test_unparseable_url_never_shows_the_password(tmp_path: Path, url: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        sclstore.open_store(tmp_path / "s", url, create=True)
    assert "s3cr3t" not in str(info.value) and "cannot parse the catalog URL" in str(info.value)
    res = _cli("ls", "--store", str(tmp_path / "s"), "--catalog", url)
    assert res.returncode == 1 and "s3cr3t" not in res.stderr + res.stdout
    _one_line(res.stderr)
    assert not (tmp_path / "s").exists()


def test_redact_hides_a_password_holding_at_signs() -> None:
    text = catalogdb.redact("postgresql+psycopg://lab:p@ss@word@db.example.org/lab")
    assert "ss" not in text.replace("postgresql", "") and "word" not in text


def _owned_database(server, role: str) -> str:
    name = f"pw_{os.getpid()}_{time.time_ns() % 10**8}"
    admin = sa.create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" OWNER {role}'))
    admin.dispose()
    return name


def test_password_from_pgpass_file_and_catalog_from_environment(tmp_path: Path, postgres_server) -> None:
    if postgres_server.password_role is None:
        pytest.skip("external PostgreSQL: no password role to test with")
    role, password = postgres_server.password_role
    db = _owned_database(postgres_server, role)
    with_pw = sa.engine.make_url(postgres_server.url_for(user=role, password=password, database=db))
    no_pw = sa.engine.URL.create(with_pw.drivername, username=role, host=with_pw.host, port=with_pw.port, database=db,
                                 query=with_pw.query).render_as_string(hide_password=False)
    assert password not in no_pw
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:{db}:{role}:{password}\n")
    pgpass.chmod(0o600)
    store = str(tmp_path / "s")
    env = {"PGPASSFILE": str(pgpass), "SCLSTORE_CATALOG": no_pw, "SCLSTORE_STORE": store}
    # nothing secret on the command line (what `ps` shows): the URL comes from the environment
    res = _cli("init", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["schema"] == catalogdb.head_revision()
    res = _cli("ls", "runs", "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout) == []
    # the same passwordless URL without the password file is refused, in one line
    res = _cli("ls", "runs", "--json", env={**env, "PGPASSFILE": str(tmp_path / "missing")})
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert "cannot connect to catalog" in line and "pgpass" in line and password not in line


# ----------------------------------------------------------------------------------- locks
def test_locked_sqlite_catalog_is_a_short_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCLSTORE_BUSY_TIMEOUT", "1")
    Backend.create(tmp_path / "s").close()
    holder = sqlite3.connect(tmp_path / "s" / "catalog.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
        with sclstore.open_store(tmp_path / "s") as st:
            assert st.runs() == []  # readers are not blocked (WAL)
            t0 = time.monotonic()
            with pytest.raises(CatalogBusyError) as info:
                st.backend.register_model(family="f", name="m", checkpoint_hash="h" * 64, n_layers=1, d_model=2, config={})
            waited = time.monotonic() - t0
        text = str(info.value)
        assert "locked by another process (waited 1 s)" in text and "password" not in text and "\n" not in text
        assert 0.9 <= waited < 10
        holder.execute("ROLLBACK")
        # an exclusive holder blocks even opening: the same line, quickly
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("CREATE TABLE scratch (x)")
        res = _cli("ls", "--store", str(tmp_path / "s"), env={"SCLSTORE_BUSY_TIMEOUT": "1"})
        assert res.returncode == 1
        assert "is locked by another process" in _one_line(res.stderr)
    finally:
        holder.close()


# ----------------------------------------------------------------------------------- outage
def test_postgres_outage_is_one_line(tmp_path: Path, postgres_server, caplog: pytest.LogCaptureFixture) -> None:
    url = postgres_server.new_database()
    b = Backend.create(tmp_path / "s", url)
    ds = b.register_dataset(name="d", content_hash="o" * 64, obs=toy_obs(6), n_vars=3, source_path=None)
    m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=1, d_model=2, config={})
    run = b.create_run(dataset=ds, model=m, key=cache_key("o"), params={}, layers=[0, 1],
                       spec=ArraySpec(n_layers=2, n_cells=6, dim=2, pools=("cls",)))
    b.settings = type(b.settings)(heartbeat_s=0.05)
    lease = b.acquire(run.id, wait=False)
    assert lease is not None
    admin = sa.create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    with caplog.at_level(logging.WARNING, logger="sclstore"):
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{sa.engine.make_url(url).database}" WITH (FORCE)'))
        time.sleep(1.0)  # ~20 failed heartbeats
        lease.release()
    admin.dispose()
    beats = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(beats) == 1 and "\n" not in beats[0] and "retrying" in beats[0]
    releases = [r.getMessage() for r in caplog.records if "releasing lease" in r.getMessage()]
    assert all("\n" not in r for r in releases)
    with pytest.raises(CatalogConnectionError) as info:
        sclstore.Store(b).query(f"SELECT * FROM embeddings WHERE run = {run.id}")
    assert "\n" not in str(info.value)
    b.close()


# ----------------------------------------------------------------------------------- query layer
def test_catalog_failure_inside_a_query_is_one_line(tmp_path: Path) -> None:
    with Backend.create(tmp_path / "s") as b:
        run_id, _ = _with_run(b, toy_obs(10))
        table = b.list_datasets()[0].obs_table
    conn = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    conn.execute(f'DROP TABLE "{table}"')  # a damaged catalog
    conn.commit()
    conn.close()
    with sclstore.open_store(tmp_path / "s") as st, pytest.raises(SclstoreError) as info:
        st.query(f"SELECT * FROM embeddings WHERE run = {run_id} AND cell_type = 'T'")
    text = str(info.value)
    assert "no such table" in text and "SELECT" not in text and "\n" not in text
    res = _cli("query", f"SELECT * FROM embeddings WHERE run = {run_id} AND cell_type = 'T'", "--store", str(tmp_path / "s"))
    assert res.returncode == 1 and "no such table" in _one_line(res.stderr)


# ----------------------------------------------------------------------------------- obs edge cases
def test_long_category_values(tmp_path: Path, catalog_url: str | None) -> None:
    """Categories of 300 and 3,000 characters (free text stored as categorical) round-trip and filter."""
    obs = toy_obs(12)
    secret_like = "confidential-sample-" + "x" * 280
    very_long = "protocol: " + "y" * 3000
    obs["note"] = pd.Categorical([secret_like if i % 3 == 0 else very_long if i % 3 == 1 else "short" for i in range(12)])
    with Backend.create(tmp_path / "s", catalog_url) as b:
        run_id, values = _with_run(b, obs)
        st = sclstore.Store(b)
        for value, rows in ((secret_like, [0, 3, 6, 9]), (very_long, [1, 4, 7, 10])):
            res = st.query(f"SELECT cell, note, embedding FROM embeddings WHERE run = {run_id} AND layer = 1 AND note = '{value}'")
            assert sorted(res.obs.index) == [f"cell{i:03d}" for i in rows]
            assert set(res.obs["note"]) == {value}
            np.testing.assert_array_equal(res.embeddings[0], values[1][res.cell_idx])
        back = b.read_obs(b.list_datasets()[0].id)
        assert list(back["note"].astype(str)) == list(obs["note"].astype(str))


def test_empty_obs_column_name_is_refused(tmp_path: Path) -> None:
    Backend.create(tmp_path / "s").close()
    before = store_snapshot(tmp_path / "s")
    obs = toy_obs(5)
    obs[""] = pd.Categorical(list("abcab"))
    with Backend.open(tmp_path / "s") as b, pytest.raises(DatasetError, match="obs column 5 has an empty name ''.*rename"):
        b.register_dataset(name="d", content_hash="e" * 64, obs=obs, n_vars=3, source_path=None)
    assert store_snapshot(tmp_path / "s") == before


def test_wide_obs(tmp_path: Path, catalog_url: str | None) -> None:
    """2,000 obs columns exceed one catalog table: the right message, store unchanged; 1,000 work."""
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.normal(size=(6, 2000)), columns=[f"pc{i}" for i in range(2000)], index=[f"c{i}" for i in range(6)])
    Backend.create(tmp_path / "s", catalog_url).close()
    before = store_snapshot(tmp_path / "s", catalog_url)
    most = 1997 if catalog_url is None else 1597
    too_wide = rf"obs has 2000 columns; a (sqlite|postgresql) catalog holds at most {most} per dataset"
    with Backend.open(tmp_path / "s", catalog_url) as b, pytest.raises(DatasetError, match=too_wide):
        b.register_dataset(name="wide", content_hash="w" * 64, obs=wide, n_vars=3, source_path=None)
    assert store_snapshot(tmp_path / "s", catalog_url) == before
    with Backend.open(tmp_path / "s", catalog_url) as b:
        half = wide.iloc[:, :1000]
        run_id, _ = _with_run(b, half)
        res = sclstore.Store(b).query(f"SELECT cell, pc999 FROM embeddings WHERE run = {run_id} AND pc999 > 0")
        expected = sorted(half.index[half["pc999"] > 0])
        assert sorted(res.obs.index) == expected
        np.testing.assert_allclose(res.obs["pc999"].to_numpy(), half.loc[res.obs.index, "pc999"].to_numpy())


# ----------------------------------------------------------------------------------- concurrent create
CREATOR = """
import sys, time
import sclstore
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
url = sys.argv[2] if sys.argv[2] != "-" else None
with sclstore.open_store(sys.argv[1], url, create=True) as st:
    print(len(st.runs()))
"""


def test_four_processes_create_one_new_store(tmp_path: Path, catalog_url: str | None) -> None:
    script = tmp_path / "creator.py"
    script.write_text(CREATOR)
    store = tmp_path / "shared" / "store"
    start = time.time() + 4.0  # all four start creating at the same moment
    procs = [subprocess.Popen([sys.executable, str(script), str(store), catalog_url or "-", str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "0"
    assert json.loads((store / "sclstore.json").read_text())["format"] == "sclstore"
    assert not [p.name for p in store.iterdir() if p.name.startswith(".sclstore.json.")]  # no temporary markers left
    with sclstore.open_store(store, catalog_url) as st:
        assert catalogdb.current_revision(st.backend.engine) == catalogdb.head_revision()
