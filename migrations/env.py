"""Alembic environment for the sclstore catalog.

sclstore builds the Alembic ``Config`` in code (``sclstore.store.catalog``) and passes an open
connection in ``config.attributes["connection"]``; there is no alembic.ini.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from sclstore.store.models import Base

config = context.config
target_metadata = Base.metadata


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Per-dataset obs tables are data built at registration, not schema: leave them alone."""
    if type_ == "table" and name is not None and name.startswith("obs_"):
        return False
    return not (type_ == "index" and name is not None and name.startswith("ix_obs_"))


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # pragma: no cover - sclstore always passes a connection
        raise RuntimeError("sclstore migrations must be run through `sclstore db upgrade`")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        include_object=include_object,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():  # pragma: no cover
    raise RuntimeError("offline (--sql) migrations are not supported; use `sclstore db upgrade`")
run_migrations_online()
