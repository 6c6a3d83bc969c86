"""Ingest error hints (issue 15.6): --gene-column names real var columns; non-count X points at a
counts layer or .raw. Messages stay one line and the store stays empty."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclstore
from sclstore.ingest.hints import gene_column_candidates
from sclstore.ingest.models import TINY_CHECKPOINT
from sclstore.store.errors import DatasetError, InvalidInputError

SYMBOLS = [g for g in json.loads((TINY_CHECKPOINT / "vocab.json").read_text()) if not g.startswith("<")][:40]
ENSEMBL = [f"ENSG{i:011d}" for i in range(1, 41)]


def _adata(var_index: list[str], var: dict[str, object] | None = None, x: np.ndarray | None = None) -> ad.AnnData:
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(12, 40)).astype(np.float32) if x is None else x
    return ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(12)]),
                      var=pd.DataFrame(var or {}, index=var_index))


def test_candidates_are_existing_columns_of_the_right_kind() -> None:
    var = pd.DataFrame({"symbol": SYMBOLS, "feature_types": ["Gene Expression"] * 40, "n_cells": np.arange(40),
                        "gene_ids": ENSEMBL}, index=ENSEMBL)
    assert gene_column_candidates(var, want_ensembl=False) == ["symbol"]
    assert gene_column_candidates(var, want_ensembl=True) == ["gene_ids"]


def test_gene_column_hint_names_real_columns(tmp_path: Path) -> None:
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        a = _adata(ENSEMBL, {"gene_name": SYMBOLS, "chrom": ["1"] * 40})
        with pytest.raises(InvalidInputError) as info:
            st.ingest(a, "sclstore-tiny", progress=False, workers=0)
        msg = str(info.value)
        assert "var columns that look like gene symbols: gene_name, e.g. --gene-column gene_name" in msg
        assert "gene_symbols" not in msg and "\n" not in msg
        b = _adata(ENSEMBL, {"chrom": ["1"] * 40})
        with pytest.raises(InvalidInputError, match=r"no var column looks like gene symbols; var columns: chrom"):
            st.ingest(b, "sclstore-tiny", progress=False, workers=0)
        ok = st.ingest(a, "sclstore-tiny", progress=False, workers=0, gene_column="gene_name")  # the hint works
        assert ok.gene_mapping["n_matched"] == 40


def test_non_count_x_points_at_counts_layer_and_raw(tmp_path: Path) -> None:
    a = _adata(SYMBOLS)
    counts = a.X.copy()
    a.layers["counts"] = counts
    a.raw = a.copy()
    a.X = sp.csr_matrix(np.log1p(counts.toarray()))
    path = tmp_path / "norm.h5ad"
    a.write_h5ad(path)
    with sclstore.open_store(tmp_path / "s", create=True) as st:
        for data in (path, a):
            with pytest.raises(DatasetError) as info:
                st.ingest(data, "sclstore-tiny", progress=False, workers=0)
            msg = str(info.value)
            assert "non-integer" in msg and "try --counts-layer counts" in msg and "adata.raw.to_adata()" in msg, msg
        assert st.datasets() == []
        run = st.ingest(path, "sclstore-tiny", progress=False, workers=0, counts_layer="counts")
        assert run.cells == 12
