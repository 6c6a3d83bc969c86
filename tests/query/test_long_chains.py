"""Long flat AND/OR chains: a list of 1,000 cell names written as ORs is an ordinary query.

sqlglot builds ``a OR b OR c ...`` as a left-deep tree, one level per term; the parser walks
such chains without recursion, so only real nesting (parentheses) is limited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sclstore.query import execute_query, parse_query
from sclstore.query.spec import And, Compare, Or
from sclstore.store import ArraySpec, Backend, cache_key
from sclstore.store.errors import InvalidQueryError


def test_flat_or_of_a_thousand_terms_parses_flat() -> None:
    terms = " OR ".join(f"cell = 'c{i:04d}'" for i in range(1000))
    q = parse_query(f"SELECT * FROM embeddings WHERE run = 1 AND ({terms})")
    assert isinstance(q.where, And)
    assert q.where.items[0] == Compare("run", "=", 1)
    ors = q.where.items[1]
    assert isinstance(ors, Or) and len(ors.items) == 1000
    assert ors.items[0] == Compare("cell", "=", "c0000") and ors.items[-1] == Compare("cell", "=", "c0999")
    ands = " AND ".join(f"cell != 'c{i:04d}'" for i in range(3000))
    q = parse_query(f"SELECT * FROM embeddings WHERE run = 1 AND {ands}")
    assert isinstance(q.where, And) and len(q.where.items) == 3001


def test_deep_parentheses_are_still_refused() -> None:
    with pytest.raises(InvalidQueryError, match=r"nested too deeply|cannot parse"):
        parse_query("SELECT * FROM embeddings WHERE " + "(" * 3000 + "run = 1" + ")" * 3000)


def test_flat_or_of_a_thousand_terms_selects_those_cells(tmp_path: Path) -> None:
    n, dim = 1500, 4
    rng = np.random.default_rng(3)
    obs = pd.DataFrame({"kind": pd.Categorical(rng.choice(["a", "b"], n))}, index=[f"c{i:04d}" for i in range(n)])
    values = rng.normal(size=(2, n, dim)).astype(np.float32)
    with Backend.create(tmp_path / "s") as b:
        ds = b.register_dataset(name="d", content_hash="o" * 64, obs=obs, n_vars=3, source_path=None)
        m = b.register_model(family="synthetic", name="m", checkpoint_hash="m" * 64, n_layers=1, d_model=dim, config={})
        run = b.create_run(dataset=ds, model=m, key=cache_key("or"), params={}, layers=[0, 1],
                           spec=ArraySpec(n_layers=2, n_cells=n, dim=dim, pools=("cls",)))
        lease = b.acquire(run.id, wait=False)
        assert lease is not None
        b.write_block(run, lease, 0, {"cls": values})
        b.complete(run, lease, {})
        wanted = sorted(rng.choice(n, size=1000, replace=False).tolist())
        terms = " OR ".join(f"cell = 'c{i:04d}'" for i in wanted)
        res = execute_query(b, f"SELECT cell, embedding FROM embeddings WHERE run = {run.id} AND layer = 1 AND ({terms})")
        assert list(res.obs.index) == [f"c{i:04d}" for i in wanted]
        np.testing.assert_array_equal(res.embeddings[0], values[1][wanted])
        # the negation keeps SQL's NULL-free meaning: every other cell
        res = execute_query(b, f"SELECT cell FROM embeddings WHERE run = {run.id} AND NOT ({terms})")
        assert list(res.obs.index) == [f"c{i:04d}" for i in sorted(set(range(n)) - set(wanted))]
