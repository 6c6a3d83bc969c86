"""``sclstore info``: version, store, catalog (password hidden) and the thread policy."""

import platform
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sclstore.api import default_catalog, default_store_path
from sclstore.cli import CatalogOpt, JsonOpt, StoreOpt, VerboseOpt, app, emit_json, handled, out
from sclstore.store import runtime
from sclstore.store.errors import SclstoreError

__all__: list[str] = []

_PACKAGES = ("torch", "tiledb", "numpy", "sqlalchemy", "scanpy")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_info(store: str, catalog: str | None, threads: int | None) -> dict[str, Any]:
    """What ``sclstore info`` reports (a plain dict; nothing is created or changed)."""
    from sclstore import __version__
    from sclstore.store import catalog as catalogdb
    from sclstore.store.backend import MARKER, Backend

    root = Path(store)
    is_store = (root / MARKER).is_file()
    url = catalog or default_catalog() or (Backend.default_catalog(root) if is_store else None)
    info: dict[str, Any] = {
        "version": __version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "store": {"path": str(root.resolve()), "exists": is_store},
        "catalog": {"url": catalogdb.redact(url) if url else None, "schema": None, "head": catalogdb.head_revision(), "problem": None},
        "thread_policy": runtime.decide(threads).to_json(),
    }
    if is_store:
        try:
            engine = catalogdb.make_engine(url)  # type: ignore[arg-type]
            try:
                info["catalog"]["schema"] = catalogdb.current_revision(engine)
            finally:
                engine.dispose()
        except SclstoreError as exc:
            info["catalog"]["problem"] = str(exc)
    return info


@app.command()
@handled
def info(
    preview: Annotated[str | None, typer.Option("--threads", help="Show the policy as `--threads N` would set it.")] = None,
    store: StoreOpt = default_store_path(),
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Show the version, the store, its catalog (password hidden) and the thread policy."""
    data = collect_info(store, catalog, runtime.parse_threads(preview))
    if json_out:
        emit_json(data)
        return
    pol, cat = data["thread_policy"], data["catalog"]
    allowance = pol["allowance"]
    pkgs = ", ".join(f"{k} {v}" for k, v in data["packages"].items() if v)
    lines = [
        f"sclstore {data['version']} (Python {data['python']}; {pkgs})",
        f"store    {data['store']['path']}" + ("" if data["store"]["exists"] else " (not created yet: `sclstore init`)"),
        f"catalog  {cat['url'] or '(SQLite inside the store, once created)'}"
        + (f" at schema {cat['schema'] or '(empty)'}, head {cat['head']}" if data["store"]["exists"] and not cat["problem"] else "")
        + (f"; problem: {cat['problem']}" if cat["problem"] else ""),
        f"threads  {pol['reason']}",
        f"         limits: host {allowance['host']}, affinity {allowance['affinity']}, cgroup {allowance['cgroup']}, "
        f"Slurm {allowance['slurm']}; OMP_WAIT_POLICY {pol['omp_wait_policy']}, "
        f"OPENBLAS_THREAD_TIMEOUT {pol['openblas_thread_timeout'] or '(OpenBLAS default)'}",
    ]
    if pol["user_vars"]:
        lines.append("         set by you: " + ", ".join(f"{k}={v}" for k, v in pol["user_vars"].items()))
    lines += [f"         warning: {w}" for w in allowance["warnings"]]
    for line in lines:
        out.print(line, markup=False, highlight=False)
    sys.stdout.flush()
