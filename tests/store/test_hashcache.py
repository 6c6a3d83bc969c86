"""The persistent digest cache: hit only for an unchanged file, per digest scheme; never a failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sclstore.store import hashcache


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SCLSTORE_CACHE_DIR", str(folder))
    return folder


class Counter:
    def __init__(self, path: Path) -> None:
        self.path, self.calls = path, 0

    def __call__(self) -> str:
        self.calls += 1
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def test_unchanged_file_is_hashed_once(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    c = Counter(f)
    first = hashcache.cached_digest(f, "sha256", c)
    assert first == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert hashcache.cached_digest(f, "sha256", c) == first
    assert hashcache.cached_digest(tmp_path / "." / "w.bin", "sha256", c) == first  # same real path
    assert c.calls == 1


def test_rewrite_with_same_size_and_restored_mtime_is_rehashed(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    c = Counter(f)
    old = hashcache.cached_digest(f, "sha256", c)
    f.write_bytes(b"b" * 100)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: ctime still moves
    new = hashcache.cached_digest(f, "sha256", c)
    assert c.calls == 2 and new != old and new == hashlib.sha256(b"b" * 100).hexdigest()


def test_schemes_are_separate_and_rehash_forces(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    c = Counter(f)
    hashcache.cached_digest(f, "counts:X:v1", c)
    hashcache.cached_digest(f, "counts:raw:v1", c)
    assert c.calls == 2
    hashcache.cached_digest(f, "counts:X:v1", c, rehash=True)
    with hashcache.rehashing():
        hashcache.cached_digest(f, "counts:X:v1", c)
    assert c.calls == 4
    hashcache.cached_digest(f, "counts:X:v1", c)
    assert c.calls == 4


def test_a_failed_computation_is_not_cached(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")

    def broken() -> str:
        raise ValueError("invalid file")

    with pytest.raises(ValueError, match="invalid file"):
        hashcache.cached_digest(f, "s", broken)
    c = Counter(f)
    hashcache.cached_digest(f, "s", c)
    assert c.calls == 1


def test_unwritable_cache_folder_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file where the cache folder should be")
    monkeypatch.setenv("SCLSTORE_CACHE_DIR", str(blocker / "sub"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    c = Counter(f)
    assert hashcache.cached_digest(f, "s", c) == hashcache.cached_digest(f, "s", c)
    assert c.calls == 2
