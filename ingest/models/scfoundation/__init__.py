"""The scfoundation model family: adapter (``adapter``), checkpoint reading (``checkpoint``), data path
(``data``) and encoder (``model``). The package re-exports the adapter module's public names."""

from .adapter import *  # noqa: F403
from .adapter import __all__ as __all__
