"""Issue 10 item 5: the run's cache key is derived from every field that changes the numbers.

The user re-ingests the same file changing one option at a time. Exactly the options that can
change the stored numbers (those marked ``numerics`` in ``IngestConfig``) give a new run; the
others are cache hits. ``--gene-column`` is one of them. A run resumed with another batch size
keeps the batch size it started with and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import sclstore
import sclstore.ingest.embed as pipeline
from sclstore.store import IngestConfig
from sclstore.store.config import NUMERICS, PINNED, fields_marked

from .trust_helpers import load_test_module, write_h5ad

MARKED = {"model", "checkpoint", "pools", "layers", "dtype", "counts_layer", "gene_column", "seed", "max_genes", "precision", "model_options"}
"""The oracle: the fields that can change the stored numbers, decided by reading the pipeline."""


def test_the_marked_fields_are_the_numerics_fields() -> None:
    assert set(fields_marked(IngestConfig, NUMERICS)) == MARKED
    assert set(fields_marked(IngestConfig, PINNED)) == {"batch_size", "chunk_cells"}


@pytest.fixture
def world(tmp_path: Path, write_tiny_tahoe: Callable[..., Path], random_counts: Callable[..., Any],
          tiny_gene_ids: Callable[..., list[str]]) -> dict[str, Any]:
    genes = tiny_gene_ids(40)
    rng = np.random.default_rng(3)
    var = pd.DataFrame({"alt": list(rng.permutation(genes))}, index=pd.Index(genes))
    counts = random_counts(24, 40, seed=1)
    import anndata as ad

    data = write_h5ad(tmp_path / "d.h5ad", counts, genes, var=var)
    adata = ad.read_h5ad(data)
    adata.layers["counts"] = random_counts(24, 40, seed=2)
    adata.write_h5ad(data)
    return {"data": data, "ckpt": write_tiny_tahoe(tmp_path / "a", "hf", seed=0),
            "other_ckpt": write_tiny_tahoe(tmp_path / "b", "hf", seed=1), "store": tmp_path / "s"}


def test_every_field_one_at_a_time(world: dict[str, Any], tmp_path: Path) -> None:
    base: dict[str, Any] = {"model": "tahoe-x1", "checkpoint": str(world["ckpt"]), "pools": ("cls", "mean"), "workers": 0,
                            "progress": False}
    table: dict[str, Any] = {
        "model": "sclstore-tiny",  # the same checkpoint folder, another family
        "checkpoint": str(world["other_ckpt"]),
        "name": "renamed",
        "pools": ("cls", "max"),
        "layers": "0,2",
        "dtype": "float16",
        "batch_size": 5,
        "device": "cpu",
        "counts_layer": "counts",
        "gene_column": "alt",
        "cluster_by": ("condition",),
        "seed": 9,
        "max_genes": 12,
        "precision": "bf16",
        "model_options": None,  # tahoe-x1 has none: covered on scFoundation below
        "chunk_cells": 7,
        "memory_mb": 1,
        "shard_cells": 8,
        "workers": 1,
        "progress": True,
        "wait": False,
        "rehash": True,
    }
    assert set(table) == {f.name for f in dataclasses.fields(IngestConfig)}  # a new field must be added here
    changed = set()
    with sclstore.open_store(world["store"], create=True) as st:
        first = st.ingest(world["data"], **base)
        for name, value in table.items():
            if value is None:
                continue
            # other counts are other data: they need their own dataset name (name alone is a cache hit)
            extra = {"name": "d-counts"} if name == "counts_layer" else {}
            res = st.ingest(world["data"], **(base | extra | {name: value}))
            if not res.cache_hit:
                assert res.id != first.id
                changed.add(name)
            else:
                assert res.id == first.id
    assert changed == MARKED - {"model_options"}
    # the options an adapter takes: scFoundation's sub_model and tgthighres
    sf = load_test_module("test_scfoundation_model")
    folder = sf.write_tiny_scfoundation(tmp_path / "sf" / "models", seed=3)
    genes = sf.dataset_genes()
    data = write_h5ad(tmp_path / "f.h5ad", sf.random_counts(10, len(genes)), genes)
    with sclstore.open_store(tmp_path / "s2", create=True) as st:
        kw = {"progress": False, "workers": 0}
        a = st.ingest(data, "scfoundation", str(folder), **kw)
        b = st.ingest(data, "scfoundation", str(folder), model_options={"sub_model": "rde"}, **kw)
        c = st.ingest(data, "scfoundation", str(folder), model_options={"tgthighres": "t5"}, **kw)
        d = st.ingest(data, "scfoundation", str(folder), model_options={"sub_model": "cell"}, **kw)  # the default, spelled out
    assert len({a.id, b.id, c.id}) == 3 and d.cache_hit and d.id == a.id


def test_gene_column_gives_another_run_with_other_numbers(world: dict[str, Any]) -> None:
    kw = {"pools": ("mean",), "workers": 0, "progress": False}
    with sclstore.open_store(world["store"], create=True) as st:
        a = st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), **kw)
        b = st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), gene_column="alt", **kw)
        assert not b.cache_hit and b.id != a.id
        with st.backend.open_reader(a.id) as ra, st.backend.open_reader(b.id) as rb:
            ea, eb = ra.read([2], None, "mean"), rb.read([2], None, "mean")
    assert np.abs(ea - eb).max() > 1e-3  # really other numbers: the stale hit would have served ea


def test_resume_keeps_the_batch_size_it_started_with(world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    kw = {"pools": ("cls", "mean"), "workers": 0, "progress": False, "chunk_cells": 4}
    real = pipeline._embed_chunk
    calls = iter(range(100))

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 3:  # the 4th chunk: chunks 1-2 are durably written by now
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_embed_chunk", flaky)
    with sclstore.open_store(world["store"], create=True) as st:
        with pytest.raises(RuntimeError, match="node lost"):
            st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), batch_size=3, **kw)
        (run,) = st.runs()
        assert run.status == "failed" and run.watermark >= 8 and run.params["batch_size"] == 3
        monkeypatch.setattr(pipeline, "_embed_chunk", real)
        with caplog.at_level("WARNING", logger="sclstore.ingest.run_key"):
            res = st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), batch_size=16, **kw)
        assert res.id == run.id and res.cells_embedded == 24 - run.watermark
        assert "batch_size=3, as it started (not 16)" in caplog.text
        with st.backend.open_reader(res.id) as rd:
            resumed = {p: rd.read([0, 1, 2], None, p) for p in ("cls", "mean")}
    with sclstore.open_store(tmp_path / "clean", create=True) as st:
        ref = st.ingest(world["data"], "tahoe-x1", str(world["ckpt"]), batch_size=3, **kw)
        with st.backend.open_reader(ref.id) as rd:
            for p in ("cls", "mean"):
                np.testing.assert_array_equal(resumed[p], rd.read([0, 1, 2], None, p))
