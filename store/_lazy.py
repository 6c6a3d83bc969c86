"""A module imported on first attribute access, so that light commands skip heavy imports.

``pd = lazy_module("pandas")`` at module level costs nothing; the first ``pd.DataFrame`` imports
pandas (once; later accesses are a dictionary lookup). Used where a module needs a heavy
library only in some functions (``sclstore ls runs`` must not pay for pandas or TileDB).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        value = getattr(module, attr)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports ``name`` on first attribute access."""
    return _LazyModule(name)
