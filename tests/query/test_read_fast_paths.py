"""Fast paths of the query reader: integer ``cell_idx`` bounds need no catalog scan, and give the
same cells as the scan. Oracles: hand-computed bounds and the embeddings written by the build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sclstore.query import execute_query
from sclstore.query.parse import parse_query
from sclstore.query.plan import split_where
from sclstore.query.read import _cell_idx_bounds

from .helpers import build_store, random_obs


def _obs_pred(where: str):
    _, _, pred = split_where(parse_query(f"SELECT * FROM embeddings WHERE run = 1 AND {where}").where)
    return pred


@pytest.mark.parametrize(
    ("where", "bounds"),
    [
        ("cell_idx BETWEEN 5 AND 30", (5, 30)),
        ("cell_idx >= 3 AND cell_idx < 9", (3, 8)),
        ("cell_idx > 3 AND cell_idx <= 9", (4, 9)),
        ("cell_idx = 7", (7, 7)),
        ("cell_idx BETWEEN 5 AND 30 AND cell_idx < 10", (5, 9)),
        ("cell_idx BETWEEN 30 AND 5", (30, 5)),  # empty
        ("cell_idx != 3", None),
        ("cell_idx NOT BETWEEN 1 AND 3", None),
        ("cell_idx BETWEEN 1.5 AND 3", None),  # not integers: left to the catalog
        ("cell_idx < 9 AND n_genes > 2", None),
        ("(cell_idx < 3 OR cell_idx > 9)", None),
    ],
)
def test_cell_idx_bounds(where: str, bounds: tuple[int, int] | None) -> None:
    assert _cell_idx_bounds(_obs_pred(where)) == bounds


def test_bounded_queries_equal_the_written_cells(tmp_path: Path) -> None:
    obs = random_obs(50, seed=4, with_nulls=False)
    b = build_store(tmp_path / "s", obs=obs, consolidate=False)
    for where, lo, hi in [("cell_idx BETWEEN 10 AND 24", 10, 24), ("cell_idx >= 45", 45, 49), ("cell_idx < -1", 0, -1),
                          ("cell_idx BETWEEN -5 AND 3", 0, 3), ("cell_idx > 48 AND cell_idx <= 1000", 49, 49)]:
        res = execute_query(b.backend, f"SELECT embedding.mean FROM embeddings WHERE run = {b.run_id} AND layer = 5 AND {where}")
        np.testing.assert_array_equal(res.cell_idx, np.arange(lo, hi + 1))
        np.testing.assert_array_equal(res.embeddings, b.emb["mean"][[3]][:, b.order[lo : hi + 1]])  # slot 3 is layer 5
        assert list(res.obs.index) == list(obs.index[b.order[lo : hi + 1]])
    b.backend.close()
