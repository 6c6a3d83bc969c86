"""The import direction stays one-way: ``sclstore`` facade -> ``eval`` -> ``query``/``ingest`` -> ``store``.

Every module of the installed package is parsed (not imported) and each of its ``sclstore.*``
imports, module-level or inside a function, is checked against the floor it lives on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sclstore

PKG_ROOT = Path(sclstore.__file__).resolve().parent
# Each floor and the floors it may import from (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "store": set(),
    "migrations": {"store"},
    "ingest": {"store"},
    "query": {"store"},
    "eval": {"store", "query", "ingest"},
    "facade": {"store", "migrations", "ingest", "query", "eval"},
}
FLOORS = ("store", "migrations", "ingest", "query", "eval")


def _floor_of_module(name: str) -> str | None:
    """``sclstore.store.x`` -> ``store``; ``sclstore.api`` / ``sclstore`` -> ``facade``."""
    parts = name.split(".")
    if parts[0] != "sclstore":
        return None
    if len(parts) > 1 and parts[1] in FLOORS:
        return parts[1]
    return "facade"


def _modules() -> list[tuple[str, Path]]:
    """(dotted module name, file) for every module of the installed package."""
    import importlib.util

    out: list[tuple[str, Path]] = []
    for floor in ("", *FLOORS):
        name = "sclstore" if not floor else f"sclstore.{floor}"
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        for loc in spec.submodule_search_locations:
            base = Path(loc)
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(base).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                if not floor and parts and parts[0] in FLOORS:
                    continue  # belongs to a floor, listed under it
                out.append((".".join([name, *parts]), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, t) for line, t in found if t == "sclstore" or t.startswith("sclstore.")]


MODULES = _modules()


def test_every_floor_has_modules() -> None:
    floors = {_floor_of_module(m) for m, _ in MODULES}
    assert {"facade", "store", "ingest", "query", "eval", "migrations"} <= floors


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_flow_downwards(module: str, path: Path) -> None:
    floor = _floor_of_module(module)
    assert floor is not None
    bad = []
    for line, target in _imports(module, path):
        tfloor = _floor_of_module(target)
        if tfloor is None or tfloor == floor:
            continue
        if target == "sclstore" and floor != "facade":
            bad.append(f"{path.name}:{line} imports the facade package `sclstore`")
        elif tfloor not in ALLOWED[floor]:
            bad.append(f"{path.name}:{line} ({floor}) imports {target} ({tfloor})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import of the facade from the store floor is reported."""
    mod = tmp_path / "bad.py"
    mod.write_text("def f():\n    from sclstore.api import Store\n    from ..query import parse\n")
    found = _imports("sclstore.store.bad", mod)
    assert found == [(2, "sclstore.api"), (3, "sclstore.query")]
    assert _floor_of_module(found[0][1]) == "facade"
    assert "facade" not in ALLOWED["store"] and "query" not in ALLOWED["store"]
