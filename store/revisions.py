"""The newest catalog revision this sclstore knows, without importing SQLAlchemy or Alembic.

Opening a store checks the catalog's revision against it; read-only listings
(:mod:`sclstore.store.listing`) do the same before trusting the catalog's layout.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["head_revision"]

_REV = re.compile(r"^revision(?:\s*:[^=]*)?\s*=\s*['\"]([^'\"]+)['\"]", re.M)
_DOWN = re.compile(r"^down_revision(?:\s*:[^=]*)?\s*=\s*(.+)$", re.M)


@functools.cache
def head_revision() -> str:
    """The newest revision this sclstore knows.

    Read from the migration files' ``revision`` / ``down_revision`` lines (no Alembic import,
    so opening a store stays fast); anything but one linear head falls back to Alembic's
    ``ScriptDirectory`` (tests/store/test_catalog.py checks that both agree).
    """
    revs: set[str] = set()
    downs: set[str] = set()
    for f in (resources.files("sclstore.migrations") / "versions").iterdir():
        if not f.name.endswith(".py") or f.name.startswith("__"):
            continue
        text = f.read_text(encoding="utf-8")
        rev, down = _REV.search(text), _DOWN.search(text)
        if rev is None or down is None:
            return _alembic_head()
        revs.add(rev.group(1))
        downs.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    heads = revs - downs
    return heads.pop() if len(heads) == 1 else _alembic_head()


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory

    from .catalog import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
