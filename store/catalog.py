"""The catalog database: engine creation, schema versioning (Alembic) and error translation.

SQLite (default, a file inside the store) runs in WAL mode with a busy timeout; write
transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing.
PostgreSQL is used through psycopg 3 for a shared lab store.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .errors import CatalogConnectionError, InvalidInputError, SchemaVersionError

if TYPE_CHECKING:  # Alembic loads only to migrate or on a schema mismatch (opening a store skips it)
    from alembic.config import Config

__all__ = [
    "make_engine",
    "alembic_config",
    "upgrade",
    "downgrade",
    "current_revision",
    "head_revision",
    "check_schema",
    "check_models_match",
    "write_tx",
    "redact",
]

logger = logging.getLogger(__name__)


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<catalog url>"


def _normalise(url: str) -> URL:
    try:
        u = make_url(url)
    except sa.exc.ArgumentError as exc:
        msg = f"cannot parse catalog URL {url!r}: use sqlite:///path or postgresql+psycopg://user:pass@host/db"
        raise InvalidInputError(msg) from exc
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        msg = f"catalog backend {u.get_backend_name()!r} is not supported: use sqlite or postgresql"
        raise InvalidInputError(msg)
    return u


def make_engine(url: str) -> Engine:
    """Create an engine for a catalog URL and check that it answers.

    Raises
    ------
    CatalogConnectionError
        If the database cannot be reached or refuses the credentials.
    """
    u = _normalise(url)
    kwargs: dict[str, Any] = {"future": True}
    if u.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        engine = sa.create_engine(u, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    else:
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"connect_timeout": 10}
        engine = sa.create_engine(u, **kwargs)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        msg = (
            f"cannot connect to catalog {redact(u)}: {reason}; check the host, database name, "
            "user and password in --catalog / $SCLSTORE_CATALOG"
        )
        raise CatalogConnectionError(msg) from None
    return engine


@contextlib.contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            yield conn


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration pointing at the migrations shipped inside the package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("sclstore.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


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

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the catalog is at (None if it was never initialised)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(rows) <= 1:
            return rows[0] if rows else None
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()  # raises its own multiple-heads error


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the catalog schema to ``revision``."""
    from alembic import command

    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the catalog schema to ``revision`` (``"base"`` drops everything)."""
    from alembic import command

    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), revision)
        conn.commit()


def check_models_match(engine: Engine) -> None:
    """Raise if the ORM models and the migrations disagree (``alembic check``)."""
    from alembic import command

    with engine.connect() as conn:
        command.check(alembic_config(conn))


def check_schema(engine: Engine, url_text: str) -> None:
    """Fail unless the catalog is exactly at this code's head revision.

    Raises
    ------
    SchemaVersionError
        With the command to run: ``sclstore init`` (never initialised), ``sclstore db upgrade``
        (older) or an sclstore upgrade (newer than this code).
    """
    cur = current_revision(engine)
    head = head_revision()
    if cur == head:
        return
    if cur is None:
        msg = f"catalog {redact(url_text)} has no sclstore schema: run `sclstore init` first"
        raise SchemaVersionError(msg)
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if cur not in known:
        msg = (
            f"catalog {redact(url_text)} is at schema revision {cur}, newer than this sclstore "
            f"(head {head}): upgrade sclstore (pip install -U sclstore)"
        )
        raise SchemaVersionError(msg)
    msg = f"catalog {redact(url_text)} is at schema revision {cur}, older than {head}: run `sclstore db upgrade`"
    raise SchemaVersionError(msg)
