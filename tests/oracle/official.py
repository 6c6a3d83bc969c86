"""Import modules of an installed official package without running its package ``__init__`` files.

Some official packages import, at package import, heavy or unavailable dependencies that the
module under test never uses (``scgpt/__init__.py`` imports ``torchtext``, ``scvi-tools``,
``scib`` ...). :func:`import_modules` registers each parent package as an *empty* module whose
``__path__`` is the installed folder (nothing of the package is replaced or imitated; its
``__init__.py`` is simply not executed), then imports the requested modules from their real
files. :func:`forget` removes everything it registered, so no other test sees the half-imported
package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

__all__ = ["forget", "import_modules"]


def import_modules(
    package: str, modules: Iterable[str], *, install: str, package_attrs: Mapping[str, Any] | None = None
) -> dict[str, ModuleType]:
    """Import ``modules`` (dotted names under ``package``) from the installed ``package``.

    Skips the calling test (naming ``install``) when the package is not installed.
    ``package_attrs`` are set on the top-level package object (e.g. the package's own logger,
    which its ``__init__`` would have created and which a module imports by name).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"official package {package!r} is not installed; install it with: {install}")
    root = Path(next(iter(spec.submodule_search_locations)))
    forget(package)
    names = list(modules)
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in sys.modules:
                continue
            folder = root.joinpath(*parts[1:depth])
            pspec = importlib.util.spec_from_file_location(
                parent, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            assert pspec is not None
            sys.modules[parent] = importlib.util.module_from_spec(pspec)  # registered, not executed
    for key, value in (package_attrs or {}).items():
        setattr(sys.modules[package], key, value)
    return {name: importlib.import_module(name) for name in names}


def forget(package: str) -> None:
    """Remove ``package`` and its submodules from ``sys.modules``."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
