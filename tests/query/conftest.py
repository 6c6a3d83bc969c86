"""Fixtures for query tests (store and table builders live in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import ObsDB, make_obs_db, random_obs


@pytest.fixture(scope="module")
def obs_db() -> Iterator[ObsDB]:
    """A real in-memory SQLite obs table of 200 random cells (every column kind, NULLs)."""
    db = make_obs_db(random_obs(200, seed=7))
    yield db
    db.engine.dispose()
