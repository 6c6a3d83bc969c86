"""Helpers of the sharded-ingest tests: worker processes, orphan scans, catalog snapshots, oracle bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import sclstore

CHILD_WORKER = """
import json, os, random, sys
from sclstore.store import runtime
runtime.apply(runtime.decide(1))
import sclstore
from sclstore.store.config import StoreSettings
from sclstore.ingest.worker import work
store, catalog, run, seed = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
cfg = json.loads(os.environ.get("SHARD_TEST_TILEDB") or "{}")
with sclstore.open_store(store, catalog, settings=StoreSettings(tiledb_config=cfg)) as st:
    rep = work(st.backend, runs=[run], device="cpu", workers=0, shuffle=random.Random(seed), poll_s=0.1)
print(json.dumps(rep.to_json()))
"""
"""A ``python -c`` worker: :func:`sclstore.ingest.worker.work` on one run, claiming its shards in a random order."""


def write_shard_data(path: Path, counts: Any, genes: list[str]) -> Path:
    """An .h5ad of ``counts`` with a ``donor`` obs column (the sharded-ingest tests' data)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    n = counts.shape[0]
    obs = pd.DataFrame({"donor": np.random.default_rng(1).choice(["d1", "d2"], size=n)}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def layer_bytes(st: sclstore.Store, run_id: int) -> dict[str, bytes]:
    """Every layer of every pool of a run, as raw bytes (the oracle comparison)."""
    run = st.run(run_id)
    with st.backend.open_reader(run_id) as rd:
        return {p: rd.read(list(range(len(run.layers))), None, p).tobytes() for p in run.pools}


def assert_same_bytes(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Byte-for-byte equality of every pool, failing with where they differ (not the bytes)."""
    import numpy as np

    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for pool in want:
        if got[pool] != want[pool]:
            a, b = np.frombuffer(got[pool], np.uint8), np.frombuffer(want[pool], np.uint8)
            if a.size != b.size:
                raise AssertionError(f"pool {pool}: {a.size} bytes, the oracle has {b.size}")
            diff = np.flatnonzero(a != b)
            raise AssertionError(f"pool {pool}: {diff.size} of {a.size} bytes differ from the oracle, the first at byte {diff[0]}")


def marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries ``mark`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def no_orphans(mark: str, timeout: float = 15.0) -> None:
    """Wait until no process carries ``mark``; fail naming the survivors."""
    deadline = time.time() + timeout
    while marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    left = marked(mark)
    if left:
        cmds = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for p in left if Path(f"/proc/{p}").exists()]
        raise AssertionError(f"orphan processes left: {left} {cmds}")


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    """Poll ``pred`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def child_env(mark: str, *, catalog: str | None = None, tiledb: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SCLSTORE_TEST_MARK": mark, "SCLSTORE_PROGRESS_INTERVAL": "0", **extra}
    env.pop("SCLSTORE_CATALOG", None)
    if catalog:
        env["SCLSTORE_CATALOG"] = catalog
    if tiledb:
        env["SCLSTORE_TILEDB_CONFIG"] = " ".join(f"{k}={v}" for k, v in tiledb.items())
        env["SHARD_TEST_TILEDB"] = json.dumps(tiledb)
    return env


def spawn_worker(kind: str, store: str, catalog: str | None, run_id: int, seed: int, env: dict[str, str], log: Path,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """A worker process: ``kind`` ``cli`` (``sclstore work RUN``) or ``py`` (``python -c`` calling ``work``)."""
    if kind == "cli":
        argv = [sys.executable, "-m", "sclstore.cli", "work", str(run_id), "--store", store, "--device", "cpu", "--threads", "1",
                *extra]
    else:
        argv = [sys.executable, "-c", CHILD_WORKER, store, catalog or "", str(run_id), str(seed)]
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                start_new_session=True)


def catalog_rows(st: sclstore.Store, tables: tuple[str, ...] = ("runs", "run_shards", "datasets", "models", "leases")) -> dict[str, list[Any]]:
    """Every row of the named catalog tables (those that exist), sorted: a store-unchanged check."""
    eng = st.backend.engine
    names = set(sa.inspect(eng).get_table_names())
    out: dict[str, list[Any]] = {}
    with eng.connect() as conn:
        for t in tables:
            if t in names:
                out[t] = sorted(repr(tuple(r)) for r in conn.execute(sa.text(f'SELECT * FROM "{t}"')))
    return out


def array_files(root: Path) -> list[tuple[str, int]]:
    arrays = root / "arrays"
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in arrays.rglob("*")) if arrays.exists() else []


class CatalogProxy:
    """A byte-forwarding proxy in front of a PostgreSQL server (unix socket or TCP): ``cut()`` makes
    the catalog unreachable (every connection dropped, new ones refused) until ``restore()``."""

    def __init__(self, url: str) -> None:
        import socket
        import threading

        u = sa.engine.make_url(url)
        host = str(u.query.get("host") or u.host or "localhost")
        port = int(u.port or u.query.get("port") or 5432)
        self._unix = host.startswith("/")
        if self._unix:
            self._dir = tempfile.mkdtemp(prefix="pgp", dir="/tmp")
            self._target: Any = f"{host}/.s.PGSQL.{port}"
            self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listen.bind(f"{self._dir}/.s.PGSQL.{port}")
            self.url = u.update_query_dict({"host": self._dir}).render_as_string(hide_password=False)
        else:
            self._target = (host, port)
            self._listen = socket.socket()
            self._listen.bind(("127.0.0.1", 0))
            self.url = u.set(host="127.0.0.1", port=self._listen.getsockname()[1]).render_as_string(hide_password=False)
        self._listen.listen(64)
        self.up = True
        self.accepted = 0
        self._socks: list[Any] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.socket(socket.AF_UNIX if self._unix else socket.AF_INET, socket.SOCK_STREAM)
                server.connect(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: Any, b: Any) -> None:
        import contextlib
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        import contextlib
        import socket

        self.up = False
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self._listen.close()
