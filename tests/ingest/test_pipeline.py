"""The ingest pipeline end to end, against oracles: each cell embedded alone, an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import sqlalchemy as sa
import torch

import sclstore
from sclstore.ingest.models import load_adapter
from sclstore.ingest.models.tahoe import TahoeAdapter
from sclstore.ingest.source import CountsSource
from sclstore.store.errors import CheckpointError, DatasetError, DuplicateObsNamesError, InvalidInputError


def _write_h5ad(path: Path, counts: sp.csr_matrix, genes: list[str], *, seed: int = 0, **kw: object) -> Path:
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    obs = pd.DataFrame(
        {"condition": pd.Categorical(rng.choice(["Rest", "Stim8hr", "Stim48hr"], size=n)), "donor": rng.choice(["d1", "d2"], size=n)},
        index=[f"cell{i:04d}" for i in range(n)],
    )
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes), **kw)  # type: ignore[arg-type]
    adata.write_h5ad(path)
    return path


@pytest.fixture
def data(tmp_path: Path, random_counts: Callable[..., sp.csr_matrix], tiny_gene_ids: Callable[..., list[str]]) -> Path:
    return _write_h5ad(tmp_path / "data.h5ad", random_counts(150, 40, seed=3), tiny_gene_ids(40))


def _dump(st: sclstore.Store) -> dict[str, list[tuple]]:
    insp = sa.inspect(st.backend.engine)
    with st.backend.engine.connect() as conn:
        return {t: sorted(map(tuple, conn.execute(sa.text(f'SELECT * FROM "{t}"')).all()), key=repr) for t in insp.get_table_names()}


def _all_layers(st: sclstore.Store, run_id: int, pool: str) -> np.ndarray:
    run = st.run(run_id)
    with st.backend.open_reader(run_id) as rd:
        return rd.read(list(range(len(run.layers))), None, pool)


def test_stored_layers_equal_each_cell_embedded_alone(tmp_path: Path, data: Path, tiny_tahoe_hf: Path) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), pools=("cls", "mean", "max"), cluster_by=("condition",),
                        batch_size=16, chunk_cells=64, progress=False, workers=0)
        assert not res.cache_hit and res.cells == 150 and res.layers == (0, 1, 2)
        stored = {p: _all_layers(st, res.id, p) for p in ("cls", "mean", "max")}
        obs = st.backend.read_obs(st.run(res.id).dataset_id)
    # oracle: the adapter on one cell at a time, in file order, then permuted into the store's order
    adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
    with CountsSource(data) as src:
        mapping = adapter.map_genes(src.gene_ids)
        counts = src.rows(0, src.n_obs)[:, mapping.var_index].tocsr()
    adapter.load(torch.device("cpu"))
    src_idx = obs["src_idx"].to_numpy()
    assert list(obs["condition"].astype(str)) == sorted(obs["condition"].astype(str))  # clustered by condition
    for cell in range(0, 150, 7):
        row = src_idx[cell]
        rec = adapter.tokenizer.tokenize(counts[row : row + 1], np.array([cell]), seed=0)
        alone = adapter.embed(adapter.collate(rec), layers=[0, 1, 2], pools=["cls", "mean", "max"])
        for pool in ("cls", "mean", "max"):
            np.testing.assert_allclose(stored[pool][:, cell], alone[pool][:, 0].numpy(), atol=1e-5, rtol=0)
        official = adapter.official_embedding(adapter.collate(rec))[0]
        from_store = adapter.final_transform(torch.from_numpy(stored["cls"][-1, cell : cell + 1]))[0]
        np.testing.assert_allclose(from_store.numpy(), official.numpy(), atol=1e-5)


def test_identical_ingest_is_a_cache_hit_that_loads_no_weights(
    tmp_path: Path, data: Path, tiny_tahoe_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        first = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        before = _all_layers(st, first.id, "cls")

        def forbidden(*_a: object, **_k: object) -> None:
            raise AssertionError("a cache hit must not load weights")

        monkeypatch.setattr(TahoeAdapter, "load", forbidden)
        monkeypatch.setattr(TahoeAdapter, "embed", forbidden)
        again = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert again.cache_hit and again.id == first.id and len(st.runs()) == 1
        np.testing.assert_array_equal(_all_layers(st, first.id, "cls"), before)


def test_float16_run_is_the_float32_run_rounded(tmp_path: Path, data: Path, tiny_tahoe_hf: Path) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        a = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        b = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), dtype="float16", layers="0,2", progress=False, workers=0)
        assert b.id != a.id and st.run(b.id).layers == (0, 2)
        full = _all_layers(st, a.id, "cls")
        np.testing.assert_array_equal(_all_layers(st, b.id, "cls"), full[[0, 2]].astype(np.float16).astype(np.float32))


def test_worker_processes_give_the_same_result(tmp_path: Path, data: Path, tiny_tahoe_hf: Path) -> None:
    with sclstore.open_store(tmp_path / "a", create=True) as a, sclstore.open_store(tmp_path / "b", create=True) as b:
        ra = a.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0, chunk_cells=64)
        rb = b.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=2, chunk_cells=64)
        np.testing.assert_array_equal(_all_layers(a, ra.id, "mean"), _all_layers(b, rb.id, "mean"))


_CHILD = textwrap.dedent(
    """
    import sys, sclstore
    st = sclstore.open_store(sys.argv[1], create=True)
    st.ingest(sys.argv[2], "tahoe-x1", sys.argv[3], chunk_cells=32, batch_size=8, progress=False, workers=0)
    """
)


def _spawn(store: Path, data: Path, ckpt: Path) -> subprocess.Popen[bytes]:
    # cwd outside the repository: `python -c` puts the cwd on sys.path, and the repo's sclstore/
    # folder would shadow the installed package
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(store), str(data), str(ckpt)], stderr=subprocess.PIPE,
                            cwd=store.parent)


def _watermark(store: Path) -> int:
    db = store / "catalog.sqlite"
    if not db.exists():
        return 0
    eng = sa.create_engine(f"sqlite:///{db}")
    try:
        with eng.connect() as conn:
            return int(conn.execute(sa.text("SELECT coalesce(max(watermark), 0) FROM runs")).scalar_one())
    except sa.exc.OperationalError:
        return 0
    finally:
        eng.dispose()


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, random_counts, tiny_gene_ids, tiny_tahoe_factory) -> None:
    ckpt = tiny_tahoe_factory("hf", n_genes=60, d_model=32, n_layers=3, max_length=48)
    data = _write_h5ad(tmp_path / "big.h5ad", random_counts(1200, 60, seed=5), tiny_gene_ids(60))
    killed = tmp_path / "killed"
    child = _spawn(killed, data, ckpt)
    deadline = time.time() + 120
    while _watermark(killed) < 64 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, f"child ended before it could be killed: {child.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    mark = _watermark(killed)
    assert 0 < mark < 1200 and mark % 32 == 0
    with sclstore.open_store(killed) as st:
        (run,) = st.runs()
        assert run.status == "running" and run.watermark == mark
        res = st.ingest(data, "tahoe-x1", str(ckpt), chunk_cells=32, batch_size=8, progress=False, workers=0)
        assert not res.cache_hit and res.cells_embedded == 1200 - mark
        assert st.run(res.id).stats["resumed_from"] == mark
        resumed = {p: _all_layers(st, res.id, p) for p in ("cls", "mean")}
        assert st.verify()[0]["ok"]
    with sclstore.open_store(tmp_path / "clean", create=True) as st:
        res = st.ingest(data, "tahoe-x1", str(ckpt), chunk_cells=32, batch_size=8, progress=False, workers=0)
        for pool in ("cls", "mean"):
            np.testing.assert_array_equal(resumed[pool], _all_layers(st, res.id, pool))


def test_two_processes_ingesting_the_same_thing(tmp_path: Path, random_counts, tiny_gene_ids, tiny_tahoe_factory) -> None:
    ckpt = tiny_tahoe_factory("hf", n_genes=50)
    data = _write_h5ad(tmp_path / "d.h5ad", random_counts(400, 50, seed=8), tiny_gene_ids(50))
    store = tmp_path / "shared"
    sclstore.open_store(store, create=True).close()
    procs = [_spawn(store, data, ckpt) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    with sclstore.open_store(store) as st:
        (run,) = st.runs()
        assert run.status == "complete" and run.lease_owner is None
        assert len(list((store / "arrays").iterdir())) == 1
        assert st.verify()[0]["ok"]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda X: X.multiply(-1).tocsr(), DatasetError, "negative values"),
        (lambda X: X * 0.5, DatasetError, "non-integer values.*--counts-layer"),
        (lambda X: sp.csr_matrix(np.where(X.toarray() > 0, np.nan, 0)), DatasetError, "NaN"),
    ],
    ids=["negative", "non-integer", "nan"],
)
def test_bad_counts_leave_the_store_unchanged(tmp_path: Path, random_counts, tiny_gene_ids, tiny_tahoe_hf, mutate, error, match) -> None:
    path = _write_h5ad(tmp_path / "bad.h5ad", mutate(random_counts(20, 40)), tiny_gene_ids(40))
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        before = _dump(st)
        with pytest.raises(error, match=match):
            st.ingest(path, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert _dump(st) == before and not any((st.path / "arrays").iterdir())


def test_other_bad_inputs(tmp_path: Path, random_counts, tiny_gene_ids, tiny_tahoe_hf, tiny_tahoe_factory) -> None:
    good = _write_h5ad(tmp_path / "good.h5ad", random_counts(20, 40), tiny_gene_ids(40))
    symbols = _write_h5ad(tmp_path / "sym.h5ad", random_counts(20, 40), tiny_gene_ids(40, kind="symbol"))
    empty = tmp_path / "empty.h5ad"
    ad.AnnData(X=sp.csr_matrix((0, 40), dtype=np.float32), var=pd.DataFrame(index=tiny_gene_ids(40))).write_h5ad(empty)
    dup = tmp_path / "dup.h5ad"
    a = ad.read_h5ad(good)
    a.obs_names = ["same"] * 2 + list(a.obs_names[2:])
    a.write_h5ad(dup)
    broken = tiny_tahoe_factory("hf")
    (broken / "collator_config.yml").unlink()
    cases = [
        (symbols, {}, InvalidInputError, "look like gene symbols.*--gene-column"),
        (empty, {}, DatasetError, "empty"),
        (dup, {}, DuplicateObsNamesError, "not unique"),
        (good, {"layers": "0,7"}, InvalidInputError, "out of range.*layers 0..2"),
        (good, {"pools": ("cls", "median")}, InvalidInputError, "not available"),
        (tmp_path / "missing.h5ad", {}, InvalidInputError, "does not exist"),
        (good, {"counts_layer": "raw"}, InvalidInputError, "--counts-layer 'raw' not in the file"),
        (good, {"model_options": {"sub_model": "rde"}}, InvalidInputError, "option sub_model=rde is not one of 'tahoe-x1'"),
        (good, {"model_options": ("sub_model",)}, InvalidInputError, "not KEY=VALUE"),
        (good, {"model_options": ("sub_model=rde;drop",)}, InvalidInputError, "malformed"),
        (good, {"model_options": ("a=1", "a=2")}, InvalidInputError, "given twice"),
    ]
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        before = _dump(st)
        for path, opts, error, match in cases:
            with pytest.raises(error, match=match):
                st.ingest(path, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0, **opts)
        with pytest.raises(CheckpointError, match="collator_config.yml"):
            st.ingest(good, "tahoe-x1", str(broken), progress=False, workers=0)
        assert _dump(st) == before and not any((st.path / "arrays").iterdir())


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense", "layer"])
def test_counts_source_encodings(tmp_path: Path, random_counts, tiny_gene_ids, encoding: str) -> None:
    X = random_counts(50, 40, seed=2)
    genes = tiny_gene_ids(40)
    path = tmp_path / "x.h5ad"
    if encoding == "layer":
        _write_h5ad(path, sp.csr_matrix(np.log1p(X.toarray())), genes, layers={"counts": X})
    else:
        _write_h5ad(path, {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[encoding], genes)
    with CountsSource(path, counts_layer="counts" if encoding == "layer" else None) as src:
        np.testing.assert_array_equal(src.rows(0, 50).toarray(), X.toarray())
        rows = np.array([7, 3, 4, 40, 41, 0])
        np.testing.assert_array_equal(src.take(rows).toarray(), X.toarray()[rows])
        h = src.scan()
    with CountsSource(_write_h5ad(tmp_path / "y.h5ad", X, genes)) as src2:
        assert src2.scan() == h  # content hash ignores the storage encoding


def test_forked_workers_do_not_hang_after_torch_ran_in_parent(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, numpy as np, scipy.sparse as sp, torch
        from sclstore.ingest.models import TINY_CHECKPOINT, load_adapter
        from sclstore.ingest.embed import _tokenize, start_workers
        torch.set_num_threads(2)
        x = torch.randn(600, 600)
        for _ in range(5):
            x = torch.tanh(x @ x / 600)  # the parent's OpenMP pool is up and warm
        genes = [g for g in json.load(open(TINY_CHECKPOINT / "vocab.json")) if not g.startswith("<")]
        adapter = load_adapter("sclstore-tiny")
        adapter.map_genes(genes)
        counts = sp.random(64, len(genes), density=0.3, format="csr", random_state=0)
        counts.data = np.ceil(counts.data * 20).astype(np.float32)
        pool = start_workers(2)
        records = [r for f in [pool.submit(_tokenize, adapter.tokenizer, counts[i:i + 32], np.arange(i, i + 32), 0) for i in (0, 32)]
                   for r in f.result(timeout=60)]
        inline = _tokenize(adapter.tokenizer, counts, np.arange(64), 0)
        assert all(np.array_equal(a.values, b.values) and np.array_equal(a.gene_ids, b.gene_ids) for a, b in zip(records, inline))
        pool.shutdown()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unembeddable_cells_are_nan_recorded_and_explicit_zeros_are_tokens(
    tmp_path: Path, random_counts: Callable[..., sp.csr_matrix], tiny_gene_ids: Callable[..., list[str]],
    tiny_tahoe_hf: Path,
) -> None:
    counts = random_counts(40, 40, seed=8).tolil()
    counts[[3, 17], :] = 0  # two cells without any expressed gene
    counts = counts.tocsr()
    counts.eliminate_zeros()
    # cell 5: append two explicit zeros (stored entries upstream's CountDataset turns into tokens)
    rows = [counts[i] for i in range(40)]
    free = [c for c in range(40) if c not in set(rows[5].indices)][:2]
    rows[5] = sp.csr_matrix((np.concatenate([rows[5].data, [0.0, 0.0]]), np.concatenate([rows[5].indices, free]),
                             [0, rows[5].nnz + 2]), shape=(1, 40))
    raw = sp.vstack(rows, format="csr")
    assert (raw.data == 0).sum() == 2
    path = _write_h5ad(tmp_path / "d.h5ad", raw, tiny_gene_ids(40))
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        res = st.ingest(path, "tahoe-x1", str(tiny_tahoe_hf), pools=("cls", "mean"), chunk_cells=16, batch_size=8,
                        progress=False, workers=0)
        run = st.run(res.id)
        obs = st.backend.read_obs(run.dataset_id)
        stored = _all_layers(st, res.id, "cls")
        src_idx = obs["src_idx"].to_numpy()
        expect = sorted(int(np.flatnonzero(src_idx == r)[0]) for r in (3, 17))
        assert list(run.unembeddable) == expect and run.stats["unembeddable_cells"] == 2
        nan_rows = np.flatnonzero(np.isnan(stored).any(axis=(0, 2)))
        assert nan_rows.tolist() == expect and np.isnan(stored[:, expect]).all()
        # the cell with explicit zeros: as its stored row tokenized alone (zeros are tokens), not as the canonical row
        adapter = load_adapter("tahoe-x1", tiny_tahoe_hf)
        mapping = adapter.map_genes(tiny_gene_ids(40))
        adapter.load(torch.device("cpu"))
        cell = int(np.flatnonzero(src_idx == 5)[0])
        sub = raw[5][:, mapping.var_index]
        (rec,) = adapter.tokenizer.tokenize(sub, np.array([cell]), seed=0)
        assert len(rec) == rows[5].nnz + 1
        alone = adapter.embed(adapter.collate([rec]), layers=list(run.layers), pools=["cls"])["cls"][:, 0].numpy()
        np.testing.assert_allclose(stored[:, cell], alone, atol=1e-5, rtol=0)
        # the same counts without the stored zeros are another extraction (another cache key)
        canon = raw.copy()
        canon.eliminate_zeros()
        path2 = _write_h5ad(tmp_path / "d2.h5ad", canon, tiny_gene_ids(40))
        res2 = st.ingest(path2, "tahoe-x1", str(tiny_tahoe_hf), pools=("cls", "mean"), chunk_cells=16, batch_size=8,
                         progress=False, workers=0)
        assert not res2.cache_hit and "stored_layout" in run.params and "stored_layout" not in st.run(res2.id).params


def test_precision_auto_is_official_on_cuda_fp32_on_cpu_and_keys_the_run(tmp_path: Path, data: Path, tiny_tahoe_hf: Path) -> None:
    from sclstore.ingest.adapter import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", "bf16", cpu) == "fp32" and resolve_precision("auto", "bf16", cuda) == "bf16"
    assert resolve_precision("auto", "fp32", cuda) == "fp32" and resolve_precision("fp16", "fp32", cpu) == "fp16"
    # official precisions: Tahoe from model_config (amp_bf16), scGPT fp16 autocast, Geneformer/scFoundation fp32
    assert load_adapter("tahoe-x1", tiny_tahoe_hf).official_precision == "bf16"
    with pytest.raises(InvalidInputError, match="--precision 'fp64' is not one of auto, fp32, bf16, fp16"):
        sclstore.IngestConfig(model="sclstore-tiny", precision="fp64")  # type: ignore[arg-type]
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        kw = dict(pools=("cls",), chunk_cells=64, progress=False, workers=0)
        a = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), **kw)
        b = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), precision="bf16", **kw)
        c = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), precision="fp32", **kw)
        assert not b.cache_hit and c.cache_hit and c.run_id == a.run_id  # auto on the CPU is fp32
        assert st.run(a.id).params["precision"] == "fp32" and st.run(b.id).params["precision"] == "bf16"
        x, y = _all_layers(st, a.id, "cls"), _all_layers(st, b.id, "cls")
    assert not np.array_equal(x[1:], y[1:])
    np.testing.assert_allclose(y, x, atol=0.1, rtol=0.05)  # bf16 autocast: close, not equal


def test_repeated_ingest_reads_neither_data_nor_checkpoint_bytes(
    tmp_path: Path, data: Path, tiny_tahoe_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest cache: an unchanged file is not hashed again; --rehash (rehash=True) re-reads both."""
    from sclstore.ingest import adapter as adapter_mod

    monkeypatch.setenv("SCLSTORE_CACHE_DIR", str(tmp_path / "digests"))
    scans: list[str] = []
    reads: list[str] = []
    real_scan, real_open = CountsSource.scan, Path.open

    def counting_scan(self: CountsSource, *a: object, **k: object) -> str:
        scans.append(str(self.path))
        return real_scan(self, *a, **k)  # type: ignore[arg-type]

    def counting_open(self: Path, *a: object, **k: object):
        if self.parent == tiny_tahoe_hf:
            reads.append(self.name)
        return real_open(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(CountsSource, "scan", counting_scan)
    monkeypatch.setattr(adapter_mod.Path, "open", counting_open)
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        first = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert scans == [str(data)] and "model.safetensors" in reads
        scans.clear()
        reads.clear()
        again = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0)
        assert again.cache_hit and again.id == first.id
        assert scans == [] and "model.safetensors" not in reads
        forced = st.ingest(data, "tahoe-x1", str(tiny_tahoe_hf), progress=False, workers=0, rehash=True)
        assert forced.cache_hit and forced.id == first.id
        assert scans == [str(data)] and "model.safetensors" in reads
