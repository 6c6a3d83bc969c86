"""The catalog database: engine creation, schema versioning (Alembic) and error translation.

SQLite (default, a file inside the store) runs in WAL mode with a busy timeout; write
transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing.
PostgreSQL is used through psycopg 3 for a shared lab store.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .errors import CatalogBusyError, CatalogConnectionError, InvalidInputError, SchemaVersionError
from .readonly import READ_ONLY_OPTION, refuse_write, sqlite_read_only_url
from .revisions import head_revision

if TYPE_CHECKING:  # Alembic loads only to migrate or on a schema mismatch (opening a store skips it)
    from alembic.config import Config

__all__ = [
    "BUSY_TIMEOUT_S",
    "alembic_config",
    "busy_timeout_s",
    "check_models_match",
    "check_schema",
    "current_revision",
    "downgrade",
    "first_line",
    "head_revision",
    "is_locked",
    "locked_message",
    "make_engine",
    "parse_url",
    "redact",
    "upgrade",
    "write_tx",
]

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
"""Default wait for another process's SQLite write lock (``$SCLSTORE_BUSY_TIMEOUT`` overrides)."""


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages (never the text of an unparseable URL)."""
    try:
        u = make_url(url)
        if u.host and "@" in u.host:  # an '@' inside the password: part of it parsed as the host
            u = u.set(host="***")
        return u.render_as_string(hide_password=True)
    except Exception:
        return "<catalog url>"


def parse_url(url: str) -> URL:
    """Parse and check a catalog URL (``postgresql://`` becomes ``postgresql+psycopg://``).

    Raises
    ------
    InvalidInputError
        If it does not parse (the text is not echoed: it may hold a password) or names an
        unsupported database.
    """
    return _normalise(url)


def _normalise(url: str) -> URL:
    try:
        u = make_url(url)
    except Exception:
        scheme = url.split("://", 1)[0] if "://" in url and len(url.split("://", 1)[0]) < 40 else "?"
        msg = (
            f"cannot parse the catalog URL (scheme {scheme!r}; the URL is not shown as it may hold a password): "
            "use sqlite:///path or postgresql+psycopg://user@host:5432/db, with the password in ~/.pgpass or "
            "$PGPASSFILE rather than in the URL"
        )
        raise InvalidInputError(msg) from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        msg = f"catalog backend {u.get_backend_name()!r} is not supported: use sqlite or postgresql"
        raise InvalidInputError(msg)
    return u


def busy_timeout_s() -> float:
    """How long an SQLite catalog waits for another process's write lock
    (``$SCLSTORE_BUSY_TIMEOUT`` seconds, default :data:`BUSY_TIMEOUT_S`)."""
    text = os.environ.get("SCLSTORE_BUSY_TIMEOUT", "").strip()
    try:
        value = float(text) if text else BUSY_TIMEOUT_S
    except ValueError:
        raise InvalidInputError(f"SCLSTORE_BUSY_TIMEOUT={text!r} is not a number of seconds: set e.g. 30") from None
    return max(0.0, value)


def locked_message(url: str | URL, waited_s: float) -> str:
    """The one line for an SQLite catalog that stayed locked for the whole busy timeout."""
    return (
        f"catalog {redact(url)} is locked by another process (waited {waited_s:g} s): another sclstore command "
        "is writing to it, or a program holds it open in a transaction (e.g. an sqlite3 shell); retry when it "
        "finishes, or raise $SCLSTORE_BUSY_TIMEOUT"
    )


def make_engine(url: str, *, read_only: str | None = None) -> Engine:
    """Create an engine for a catalog URL and check that it answers.

    Parameters
    ----------
    url
        SQLAlchemy URL of the catalog.
    read_only
        Why the store is read-only for this process (``None``: writable). An SQLite catalog is
        then opened read-only (see :mod:`sclstore.store.readonly`) and :func:`write_tx` refuses.

    Raises
    ------
    CatalogConnectionError
        If the database cannot be reached or refuses the credentials.
    CatalogBusyError
        If an SQLite catalog stays locked by another process for the whole busy timeout.
    """
    u = _normalise(url)
    # hide_parameters: a failing statement's message never shows bound values (users' obs values)
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if read_only is not None:
        kwargs["execution_options"] = {READ_ONLY_OPTION: read_only}
    timeout = busy_timeout_s()
    if u.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": timeout, "check_same_thread": False}
        if read_only is not None and u.database not in (None, "", ":memory:"):
            u = sqlite_read_only_url(u)
        engine = sa.create_engine(u, **kwargs)
        writable = read_only is None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            if writable:  # changing the journal mode writes the file: never on a read-only store
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            if writable:
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
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        engine.dispose()
        reason = first_line(exc)
        if u.get_backend_name() == "sqlite":
            if is_locked(exc):
                raise CatalogBusyError(locked_message(u, timeout)) from None
            msg = f"cannot open catalog {redact(url)}: {reason}; check that the file exists and is readable by you"
        else:
            msg = (
                f"cannot connect to catalog {redact(u)}: {reason}; check the host, database name, "
                "user and password (--catalog / $SCLSTORE_CATALOG, password in ~/.pgpass or $PGPASSFILE)"
            )
        raise CatalogConnectionError(msg) from None
    return engine


def first_line(exc: BaseException) -> str:
    """The first non-empty line of a driver error (no SQL, no parameters)."""
    orig = getattr(exc, "orig", None) or exc
    for line in str(orig).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(orig).__name__


def is_locked(exc: BaseException) -> bool:
    """Whether a driver error is SQLite's "database is locked" / "database table is locked"."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "database is locked" in text or "database table is locked" in text


@contextlib.contextmanager
def write_tx(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success.

    ``durable=False`` (PostgreSQL) commits without waiting for the WAL flush
    (``synchronous_commit = off`` for this transaction only): a server crash may lose the last
    such commits, never make the catalog inconsistent, and the next durable commit flushes them.
    For writes whose loss only costs repeated work (shard claims, heartbeats, a shard marked
    done: its lease then expires and a worker finds nothing left past its durable watermark);
    a commit per claim was a disk flush per claim.

    Raises
    ------
    ReadOnlyStoreError
        If the engine belongs to a store this process may only read.
    """
    reason = engine.get_execution_options().get(READ_ONLY_OPTION)
    if reason is not None:
        raise refuse_write(reason)
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            if not durable and conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            yield conn


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration pointing at the migrations shipped inside the package.

    Alembic's own messages go to a private buffer, never to ``sys.stdout``: its default stream is
    bound when alembic is first imported (under pytest, a capture file that is later closed), and
    a command's stdout must stay clean for ``--json``.
    """
    from alembic.config import Config

    cfg = Config(stdout=io.StringIO())
    cfg.set_main_option("script_location", str(resources.files("sclstore.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


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
    """Upgrade the catalog schema to ``revision`` (serialised across processes on PostgreSQL)."""
    from alembic import command

    from .creating import migration_lock

    with engine.connect() as conn:
        migration_lock(conn)
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
