"""Start-up: the CLI module and light commands import no heavy library (torch, scanpy, TileDB, ...).

Timings are in bench/contention.py (start-up section), not here; these tests guard what makes
start-up slow: the modules imported and the work typer repeats on every run.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store import catalog as catalogdb
from sclstore.testing import toy_obs

# Never needed to parse arguments, print help or list a store's contents.
HEAVY = ("torch", "scanpy", "pydeseq2", "anndata", "tiledb", "pandas", "matplotlib", "sqlglot", "alembic", "numpy", "scipy",
         "sklearn", "numba", "h5py", "pyarrow", "pynndescent", "safetensors", "psutil", "threadpoolctl", "zarr", "fsspec",
         "tiledbsoma", "umap")
# Not needed for help or a usage error either: the catalog (SQLAlchemy) and typer's rich help
# (rich.markdown pulls in pygments). Typer coerces every option through pydantic once a command
# (or its group's callback) runs, so only the top-level `--help` goes without pydantic.
NOT_FOR_HELP = (*HEAVY, "sqlalchemy", "typer.rich_utils", "rich.markdown", "pygments")

PROBE = """
import json, sys
{body}
heavy = {heavy!r}
sys.stderr.write("\\nLOADED " + json.dumps(sorted(m for m in heavy if m in sys.modules)) + "\\n")
"""


def _run(body: str, *args: str, env: dict[str, str] | None = None,
         heavy: tuple[str, ...] = HEAVY) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    code = PROBE.format(body=body, heavy=heavy)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                          env={**os.environ, **(env or {})})
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED ")]
    assert line, proc.stderr
    return proc, json.loads(line[-1][len("LOADED "):])


CLI = """
from sclstore.cli import main
sys.argv = ["sclstore", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    sys.stderr.write(f"\\nEXIT {exc.code}\\n")
"""


def test_importing_the_cli_loads_no_heavy_module() -> None:
    proc, loaded = _run("import sclstore.cli\nimport sclstore", heavy=(*NOT_FOR_HELP, "pydantic"))
    assert proc.returncode == 0, proc.stderr
    assert loaded == []


def test_help_works_without_heavy_modules() -> None:
    proc, loaded = _run(CLI, "--help", heavy=(*NOT_FOR_HELP, "pydantic"))
    assert "Usage" in proc.stdout and "ingest" in proc.stdout and "info" in proc.stdout
    assert "[tiledb] table" in proc.stdout  # plain help: no rich-markup escapes left in the text
    assert "EXIT 0" in proc.stderr and loaded == []
    proc, loaded = _run(CLI, "ingest", "--help", heavy=NOT_FOR_HELP)
    assert "--threads" in proc.stdout and loaded == []
    proc, loaded = _run(CLI, "ls", "--no-such-option", heavy=NOT_FOR_HELP)  # a usage error, too
    assert "EXIT 2" in proc.stderr and "No such option: --no-such-option" in proc.stderr and loaded == []


def _callbacks(app: object) -> list[object]:
    found = [c.callback for c in app.registered_commands]  # type: ignore[attr-defined]
    if app.registered_callback is not None:  # type: ignore[attr-defined]
        found.append(app.registered_callback.callback)  # type: ignore[attr-defined]
    for group in app.registered_groups:  # type: ignore[attr-defined]
        found += _callbacks(group.typer_instance)
    return [f for f in found if f is not None]


def test_command_annotations_are_objects_not_strings() -> None:
    """typer reads every command's annotations on every run, before it picks the command: written
    as strings (``from __future__ import annotations`` in a CLI module) they are compiled and
    evaluated twice per command per start (measured ~20 ms CPU of each `sclstore` call)."""
    from sclstore.cli import app

    callbacks = _callbacks(app)
    assert len(callbacks) >= 15  # every command module registered (ingest, query, eval, info, ...)
    for fn in callbacks:
        for f in (fn, getattr(fn, "__wrapped__", None)):
            if f is None:
                continue
            text = {k: v for k, v in inspect.get_annotations(f).items() if isinstance(v, str)}
            assert not text, f"{f.__module__}.{f.__qualname__} has string annotations {text}: drop `from __future__ import annotations`"


def _small_store(root: Path) -> int:
    with Backend.create(root) as b:
        ds = b.register_dataset(name="toy", content_hash="t" * 64, obs=toy_obs(30), n_vars=5, source_path=None, cluster_by=())
        m = b.register_model(family="synthetic", name="syn", checkpoint_hash="s" * 64, n_layers=2, d_model=4, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("r"), params={}, layers=[0, 1, 2],
                           spec=ArraySpec(n_layers=3, n_cells=30, dim=4, pools=("cls",)))
        return run.id


def test_ls_runs_on_a_small_store_loads_no_heavy_module(tmp_path: Path) -> None:
    run_id = _small_store(tmp_path / "s")
    proc, loaded = _run(CLI, "ls", "runs", "--store", str(tmp_path / "s"), "--json")
    assert "EXIT 0" in proc.stderr, proc.stderr
    runs = json.loads(proc.stdout)
    assert [r["id"] for r in runs] == [run_id] and runs[0]["dataset_name"] == "toy"
    assert loaded == []  # SQLAlchemy only: no Alembic, pandas, numpy or TileDB to list a catalog
    proc, loaded = _run(CLI, "ls", "datasets", "--store", str(tmp_path / "s"))
    assert "toy" in proc.stdout and loaded == []


def test_fast_schema_revisions_agree_with_alembic(tmp_path: Path) -> None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    assert catalogdb.head_revision() == ScriptDirectory.from_config(catalogdb.alembic_config()).get_current_head()
    engine = catalogdb.make_engine(f"sqlite:///{tmp_path / 'c.sqlite'}")
    try:
        assert catalogdb.current_revision(engine) is None
        catalogdb.upgrade(engine)
        with engine.connect() as conn:
            alembic_rev = MigrationContext.configure(conn).get_current_revision()
        assert catalogdb.current_revision(engine) == alembic_rev == catalogdb.head_revision()
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM alembic_version"))
        assert catalogdb.current_revision(engine) is None
    finally:
        engine.dispose()
