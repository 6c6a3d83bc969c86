"""Catalog schema: migrations on both backends, schema-version guards, connection errors."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

import sclstore
from sclstore.store import catalog as catalogdb
from sclstore.store.backend import Backend
from sclstore.store.errors import CatalogConnectionError, SchemaVersionError, StoreNotFoundError
from sclstore.store.models import Base

TABLES = {"datasets", "models", "runs", "run_shards", "evaluations", "intermediates"}


def _url(tmp_path: Path, catalog_url: str | None) -> str:
    return catalog_url or f"sqlite:///{tmp_path / 'cat.sqlite'}"


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade_and_models_match(tmp_path: Path, catalog_url: str | None) -> None:
    engine = catalogdb.make_engine(_url(tmp_path, catalog_url))
    try:
        catalogdb.upgrade(engine)
        assert _tables(engine) == TABLES
        assert catalogdb.current_revision(engine) == catalogdb.head_revision()
        catalogdb.check_models_match(engine)  # the alembic-check equivalent: models == migrations
        catalogdb.downgrade(engine, "base")
        assert _tables(engine) == set()
        assert catalogdb.current_revision(engine) is None
        catalogdb.upgrade(engine)
        assert _tables(engine) == TABLES
        catalogdb.check_models_match(engine)
    finally:
        engine.dispose()


def test_migrations_write_nothing_to_stdout(tmp_path: Path) -> None:
    # Alembic prints to the stdout it saw when first imported; a migration or model check must
    # neither write there (it would break ``--json``) nor fail once that stream is closed.
    code = (
        "import sys, io; import alembic.config; sys.stdout.close(); sys.stdout = io.StringIO()\n"
        "from sclstore.store import catalog as c\n"
        f"e = c.make_engine('sqlite:///{tmp_path / 'c.sqlite'}')\n"
        "c.upgrade(e); c.check_models_match(e); c.downgrade(e, 'base'); c.upgrade(e)\n"
        "sys.stderr.write('ok')\n"
    )
    # from outside the checkout: the repository's folders must not shadow the installed package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    assert out.stderr.endswith("ok")
    assert out.stdout == ""


def test_models_and_migrations_cover_the_same_tables() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_catalog_newer_than_code_is_refused(tmp_path: Path, catalog_url: str | None) -> None:
    st = sclstore.open_store(tmp_path / "s", catalog_url, create=True)
    with st.backend.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    url = st.catalog_url
    st.close()
    with pytest.raises(SchemaVersionError, match="newer than this sclstore.*upgrade sclstore"):
        sclstore.open_store(tmp_path / "s", url)


def test_catalog_older_than_code_says_db_upgrade(tmp_path: Path, catalog_url: str | None) -> None:
    st = sclstore.open_store(tmp_path / "s", catalog_url, create=True)
    url = st.catalog_url
    catalogdb.downgrade(st.backend.engine, "base")
    st.close()
    with pytest.raises(SchemaVersionError, match="sclstore init"):
        sclstore.open_store(tmp_path / "s", url)
    # `sclstore init` / `db upgrade` repairs it
    Backend.create(tmp_path / "s", url).close()
    sclstore.open_store(tmp_path / "s", url).close()


def test_path_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f.txt").write_text("x")
    with pytest.raises(StoreNotFoundError, match="not an sclstore store.*sclstore init"):
        sclstore.open_store(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["f.txt"]


def test_unreachable_catalog(tmp_path: Path) -> None:
    url = "postgresql+psycopg://nobody:pw@127.0.0.1:1/none"
    with pytest.raises(CatalogConnectionError, match="cannot connect to catalog .*check the host"):
        sclstore.open_store(tmp_path / "s", url, create=True)
    assert not (tmp_path / "s" / "sclstore.json").exists()


def test_wrong_password_is_one_clear_error(tmp_path: Path, postgres_server) -> None:
    if postgres_server.password_role is None:
        pytest.skip("external PostgreSQL: password policy unknown")
    role, password = postgres_server.password_role
    bad = postgres_server.url_for(user=role, password="wrong")
    with pytest.raises(CatalogConnectionError) as info:
        sclstore.open_store(tmp_path / "s", bad, create=True)
    text = str(info.value)
    assert "password" in text and ":wrong@" not in text  # the password is never echoed
    assert "\n" not in text
    assert not (tmp_path / "s" / "sclstore.json").exists()
    # the same role with the right password connects: the failure was the password alone
    catalogdb.make_engine(postgres_server.url_for(user=role, password=password)).dispose()


def test_catalog_lost_mid_session_is_a_clear_error(tmp_path: Path, postgres_server) -> None:
    url = postgres_server.new_database()
    st = sclstore.open_store(tmp_path / "s", url, create=True)
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
    with pytest.raises(CatalogConnectionError, match="catalog database error: .*check that the catalog database is up"):
        st.runs()
    st.close()


def test_non_durable_write_skips_only_its_own_wal_flush(tmp_path: Path, catalog_url: str | None) -> None:
    engine = catalogdb.make_engine(_url(tmp_path, catalog_url))
    try:
        if engine.dialect.name != "postgresql":
            with catalogdb.write_tx(engine, durable=False) as conn:  # SQLite: an ordinary write transaction
                conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
                conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT x FROM t")).scalar_one() == 1
            return
        setting = sa.text("SHOW synchronous_commit")
        with catalogdb.write_tx(engine, durable=False) as conn:
            assert conn.execute(setting).scalar_one() == "off"
        for _ in range(3):  # pooled connections come back with the server's setting (SET LOCAL ends with the transaction)
            with catalogdb.write_tx(engine) as conn:
                assert conn.execute(setting).scalar_one() == "on"
    finally:
        engine.dispose()
