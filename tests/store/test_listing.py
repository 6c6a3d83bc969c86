"""Listings read with sqlite3 (store/listing.py) equal the catalog repositories' listings."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from sclstore.store import ArraySpec, Backend
from sclstore.store.listing import JSON_COLUMNS, TIME_COLUMNS, quick_list
from sclstore.store.models import Base

from ..query.helpers import build_store, random_obs


def _store_with_every_status(root: Path) -> Backend:
    b = build_store(root, obs=random_obs(40, 1), consolidate=False)  # one complete run, obs with every kind
    backend = b.backend
    ds = backend.register_dataset(name="second", content_hash="e" * 64, obs=random_obs(12, 2), n_vars=3,
                                  source_path="/data/x.h5ad", cluster_by=("donor id",))
    m = backend.register_model(family="scgpt", name="other", checkpoint_hash="f" * 64, n_layers=4, d_model=6,
                               config={"nested": {"a": [1, 2.5, None]}, "unicode": "é"})
    spec = ArraySpec(n_layers=2, n_cells=12, dim=6, pools=("mean",), dtype="float16")
    for i, fate in enumerate(("queued", "failed", "running")):
        key = hashlib.sha256(f"k{i}".encode()).hexdigest()
        run = backend.create_run(dataset=ds, model=m, key=key, params={"seed": i, "x": [i]}, layers=(0, 4), spec=spec)
        if fate == "failed":
            backend.mark_failed(run.id, "boom: out of memory")
        elif fate == "running":
            assert backend.acquire(run.id, wait=False) is not None
    return backend


@pytest.mark.parametrize("what", ["datasets", "models", "runs"])
def test_quick_listing_equals_the_repositories(tmp_path: Path, what: str) -> None:
    backend = _store_with_every_status(tmp_path / "s")
    try:
        want = {"datasets": backend.list_datasets, "models": backend.list_models, "runs": backend.list_runs}[what]()
    finally:
        backend.close()
    got = quick_list(tmp_path / "s", what)  # type: ignore[arg-type]
    assert got is not None
    assert len(got) == len(want) > 0
    assert got == want  # frozen dataclasses: every field equal, types included
    assert [g.to_json() for g in got] == [w.to_json() for w in want]
    if what == "runs":
        assert {r.status for r in got} == {"complete", "queued", "failed", "running"}


def test_decoded_columns_match_the_orm_types() -> None:
    for table, names in JSON_COLUMNS.items():
        cols = Base.metadata.tables[table].columns
        assert names == {c.name for c in cols if isinstance(c.type, sa.JSON)}, table
        assert TIME_COLUMNS[table] == {c.name for c in cols if isinstance(c.type, sa.DateTime)}, table


def test_quick_listing_declines_what_it_cannot_read_the_same_way(tmp_path: Path) -> None:
    assert quick_list(tmp_path / "nothing", "runs") is None  # not a store: the store path says why
    assert quick_list("s3://bucket/store", "runs") is None  # remote
    backend = _store_with_every_status(tmp_path / "s")
    backend.close()
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as con:
        con.execute("UPDATE alembic_version SET version_num = 'ffff_future'")
    assert quick_list(tmp_path / "s", "runs") is None  # another schema: opening the store reports it
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as con:
        con.execute("DROP TABLE alembic_version")
    assert quick_list(tmp_path / "s", "runs") is None


def test_ls_reads_a_local_catalog_without_sqlalchemy(tmp_path: Path) -> None:
    _store_with_every_status(tmp_path / "s").close()
    code = (
        "import sys\n"
        "from sclstore.cli import main\n"
        f"sys.argv = ['sclstore', 'ls', 'runs', '--json', '--store', {str(tmp_path / 's')!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'numpy', 'pandas', 'tiledb', 'alembic'))\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr.rsplit("HEAVY=", 1)[1] == ""
    import json

    runs = json.loads(res.stdout)
    assert [r["status"] for r in runs] == ["complete", "queued", "failed", "running"]
