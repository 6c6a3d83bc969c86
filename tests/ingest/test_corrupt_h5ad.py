"""Issue 10 items 3 and 9: a corrupt or odd .h5ad is refused with one line, before the store is touched.

The user runs ``sclstore ingest`` on a file whose counts were damaged (column numbers out of
range, a decreasing ``indptr``, arrays of inconsistent length, 4 KiB of random bytes written
over the stored indices, ``X`` without ``indptr``), or whose counts are all zero. The command
exits 1 with a single ``error:`` line (never a crash or a traceback), every catalog table and
the arrays folder are exactly as before, and re-running with the good file works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import sclstore

from .trust_helpers import snapshot, write_h5ad


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        arr = fn(f[name][()].copy())
        attrs = dict(f[name].attrs)
        del f[name]
        f.create_dataset(name, data=arr)
        for k, v in attrs.items():
            f[name].attrs[k] = v

    return edit


def _swap(a: np.ndarray) -> np.ndarray:
    a[10], a[11] = a[11] + 5, a[10]
    return a


def _garbage_chunk(name: str) -> Callable[[Path], None]:
    """Overwrite the first stored chunk of ``name`` with 4 KiB of random bytes (in the file itself)."""

    def damage(path: Path) -> None:
        with h5py.File(path, "r") as f:
            info = f[name].id.get_chunk_info(0)
        with path.open("r+b") as fh:
            fh.seek(info.byte_offset)
            fh.write(np.random.default_rng(7).bytes(min(4096, info.size)))

    return damage


EDITS: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "index-out-of-range": (_set("X/indices", lambda a: np.where(np.arange(a.size) == 17, 40 + 1000, a)), r"index 1040, outside 0\.\.39"),
    "negative-index": (_set("X/indices", lambda a: np.where(np.arange(a.size) == 3, -2, a)), r"index -2, outside"),
    "indptr-decreasing": (_set("X/indptr", _swap), r"indptr decreases at row 10"),
    "indptr-short": (_set("X/indptr", lambda a: a[:-3]), r"indptr has 298 entries .* needs 301"),
    "indptr-end": (_set("X/indptr", lambda a: np.where(np.arange(a.size) == a.size - 1, a[-1] + 7, a)),
                   r"indptr runs from 0 to \d+, expected 0 to"),
    "data-short": (_set("X/data", lambda a: a[:-5]), r"data has \d+ entries but indices"),
    "no-indptr": (lambda f: f.__delitem__("X/indptr"), r"csr_matrix without indptr"),
    "no-indices": (lambda f: f.__delitem__("X/indices"), r"csr_matrix without indices"),
    "indices-float": (_set("X/indices", lambda a: a.astype(np.float32)), r"indices has dtype float32"),
}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # a subprocess: a crash (exit 139) must show as such, not take pytest down
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sclstore.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.fixture
def good(tmp_path: Path, random_counts: Callable[..., Any], tiny_gene_ids: Callable[..., list[str]]) -> Path:
    return write_h5ad(tmp_path / "good.h5ad", random_counts(300, 40, seed=11), tiny_gene_ids(40))


def _assert_one_line_and_unchanged(res: subprocess.CompletedProcess[str], store: Path, before: dict[str, Any], match: str) -> None:
    import re

    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(store) == before


def _ingest_args(data: Path, ckpt: Path, store: Path) -> list[str]:
    return ["ingest", str(data), "--model", "tahoe-x1", "--checkpoint", str(ckpt), "--name", "d", "--workers", "0",
            "--store", str(store)]


@pytest.mark.parametrize("case", sorted(EDITS))
def test_structurally_corrupt_counts_are_refused_before_writing(tmp_path: Path, good: Path, tiny_tahoe_hf: Path, case: str) -> None:
    edit, match = EDITS[case]
    bad = tmp_path / "bad.h5ad"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        edit(f)
    store = tmp_path / "s"
    sclstore.open_store(store, create=True).close()
    before = snapshot(store)
    with sclstore.open_store(store) as st, pytest.raises(sclstore.DatasetError, match=match) as info:
        st.ingest(bad, "tahoe-x1", str(tiny_tahoe_hf), name="d", progress=False, workers=0)
    assert "\n" not in str(info.value)
    assert snapshot(store) == before


@pytest.mark.parametrize(("member", "match"), [("X/indices", r"outside 0\.\.39 \(genes\)"), ("X/indptr", r"indptr runs from"),
                                              ("X/data", r"NaN or infinite|negative|non-integer")])
def test_random_bytes_inside_the_file_give_one_line_then_good_file_works(
    tmp_path: Path, good: Path, tiny_tahoe_hf: Path, member: str, match: str
) -> None:
    bad = tmp_path / "bad.h5ad"
    shutil.copy(good, bad)
    _garbage_chunk(member)(bad)
    store = tmp_path / "s"
    sclstore.open_store(store, create=True).close()
    before = snapshot(store)
    res = _cli(*_ingest_args(bad, tiny_tahoe_hf, store), cwd=tmp_path)
    _assert_one_line_and_unchanged(res, store, before, match)
    assert "Traceback" not in res.stderr
    ok = _cli(*_ingest_args(good, tiny_tahoe_hf, store), "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with sclstore.open_store(store) as st:
        (run,) = st.runs()
        assert run.status == "complete" and run.n_cells == 300 and st.verify()[0]["ok"]


def test_all_zero_counts_are_refused(tmp_path: Path, tiny_tahoe_hf: Path, tiny_gene_ids: Callable[..., list[str]]) -> None:
    data = write_h5ad(tmp_path / "zero.h5ad", sp.csr_matrix((20, 40), dtype=np.float32), tiny_gene_ids(40))
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        before = snapshot(st.path)
        with pytest.raises(sclstore.DatasetError, match=r"holds no non-zero count.*--counts-layer"):
            st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert snapshot(st.path) == before


def test_some_empty_cells_are_accepted_with_a_warning_and_stored_as_unembeddable(
    tmp_path: Path, tiny_tahoe_hf: Path, random_counts: Callable[..., Any], tiny_gene_ids: Callable[..., list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = random_counts(20, 40, seed=2).tolil()
    counts[[3, 7], :] = 0
    data = write_h5ad(tmp_path / "some.h5ad", counts.tocsr(), tiny_gene_ids(40))
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        with caplog.at_level("WARNING", logger="sclstore.ingest.source"):
            res = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), pools=("cls", "mean"), progress=False, workers=0)
        assert "2 of 20 cells of some.h5ad have no counts at all" in caplog.text
        run = st.run(res.id)
        obs = st.backend.read_obs(run.dataset_id)
        with st.backend.open_reader(res.id) as rd:
            mean = rd.read([0, 1, 2], None, "mean")
    empty = [i for i, src in enumerate(obs["src_idx"]) if src in (3, 7)]
    assert sorted(run.unembeddable) == sorted(empty)  # no gene token: recorded as unembeddable ...
    assert np.all(np.isnan(mean[:, empty]))  # ... and stored as NaN
    others = np.setdiff1d(np.arange(20), empty)
    assert np.all(np.isfinite(mean[:, others]))


def test_duplicate_gene_ids_are_refused(tmp_path: Path, tiny_tahoe_hf: Path, random_counts: Callable[..., Any],
                                        tiny_gene_ids: Callable[..., list[str]]) -> None:
    genes = tiny_gene_ids(40)
    genes[5] = genes[30]
    import pandas as pd

    data = write_h5ad(tmp_path / "dup.h5ad", random_counts(20, 40), genes, var=pd.DataFrame(index=pd.Index(genes)))
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        before = snapshot(st.path)
        with pytest.raises(sclstore.InvalidInputError, match=rf"gene id {genes[30]!r} .* columns 5 and 30") as info:
            st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert "\n" not in str(info.value)
        assert snapshot(st.path) == before
