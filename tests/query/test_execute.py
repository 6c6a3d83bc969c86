"""End to end on a real store (catalog + TileDB): results equal a pandas filter of obs plus
direct numpy indexing of the embeddings that were written (exact values, same order)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sclstore.query import execute_query, open_query
from sclstore.query.spec import Compare, IsNull, OrderItem, to_sql
from sclstore.store.errors import InvalidQueryError, NotFoundError, QueryTooLargeError, RunNotFoundError

from .helpers import BuiltStore, build_store, check_cells, expected_rows, frame_of, random_obs
from .oracle import predicates_for, selected


@pytest.fixture(scope="module")
def store60(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    """60 cells clustered by cell_type, layers (0, 2, 3, 5, 8) of L = 8, pools cls and mean."""
    b = build_store(tmp_path_factory.mktemp("q") / "store", obs=random_obs(60, seed=1))
    yield b
    b.backend.close()


def test_select_star_matches_pandas_and_numpy(store60: BuiltStore) -> None:
    b = store60
    res = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 3 AND cell_type = 'T'")
    rows = np.flatnonzero((b.obs.cell_type == "T").to_numpy())
    rows = rows[np.argsort(b.cell_idx_of_src[rows])]
    assert rows.size > 3
    check_cells(b, res, rows, (3,), "cls")
    # obs: original names, values and dtypes; categories are those present, sorted
    want = b.obs.iloc[rows].copy()
    want["cell_type"] = want["cell_type"].cat.remove_unused_categories()
    assert list(res.obs.columns) == list(b.obs.columns)
    pd.testing.assert_frame_equal(res.obs, want)
    both = execute_query(b.backend, f"SELECT cell_type, score FROM embeddings WHERE run = {b.run_id} AND layer = 0")
    assert list(both.obs.cell_type.cat.categories) == sorted(b.obs.cell_type.dropna().unique())
    assert both.obs.cell_type.isna().sum() == b.obs.cell_type.isna().sum() > 0
    assert both.obs.score.isna().sum() == b.obs.score.isna().sum() > 0
    assert res.obs["is_ctrl"].dtype == bool and res.obs["n_genes"].dtype == np.int64


def test_run_pinned_by_names_and_pool_and_layers(store60: BuiltStore) -> None:
    b = store60
    res = execute_query(
        b.backend,
        "SELECT cell, score, embedding.mean FROM embeddings WHERE dataset = 'toy' AND model = 'tiny-m' "
        "AND layer IN (8, 0) AND score > 0 ORDER BY layer DESC",
    )
    rows = expected_rows(b, Compare("score", ">", 0))
    check_cells(b, res, rows, (8, 0), "mean")
    assert list(res.obs.columns) == ["score"]


@pytest.mark.parametrize(
    ("cond", "layers"),
    [
        ("depth = 0.3", (2,)),
        ("depth = 0.3125", (2,)),  # tie between 0.25 and 0.375: the lower layer
        ("depth = 0.9", (8,)),
        ("depth IN (0, 1)", (0, 8)),
        ("depth BETWEEN 0.3 AND 0.7", (3, 5)),
        ("depth >= 0.5", (5, 8)),
        ("depth < 0.375", (0, 2)),
        ("depth != 0", (2, 3, 5, 8)),
        ("layer > 2 AND layer <= 5", (3, 5)),
        ("layer NOT IN (0, 8)", (2, 3, 5)),
        ("layer NOT BETWEEN 1 AND 7", (0, 8)),
        ("layer >= 3 AND depth <= 0.7", (3, 5)),
    ],
)
def test_layer_and_depth_selection(store60: BuiltStore, cond: str, layers: tuple[int, ...]) -> None:
    b = store60
    res = execute_query(b.backend, f"SELECT embedding FROM embeddings WHERE run = {b.run_id} AND {cond} AND cell_idx < 10")
    assert res.layers == layers
    assert res.depths == tuple(x / 8 for x in layers)
    rows = np.argsort(b.cell_idx_of_src)[:10]
    check_cells(b, res, rows, layers, "cls")


def test_order_by_and_limit(store60: BuiltStore) -> None:
    b = store60
    res = execute_query(
        b.backend,
        f'SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 5 ORDER BY "donor id" DESC, score NULLS LAST LIMIT 17',
    )
    rows = expected_rows(b, None, [OrderItem("donor id", True, False), OrderItem("score", False, False)], 17)
    check_cells(b, res, rows, (5,), "cls")
    empty = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer = 5 LIMIT 0")
    assert empty.embeddings.shape == (1, 0, 6) and empty.obs.shape[0] == 0


def test_all_cells_all_layers(store60: BuiltStore) -> None:
    b = store60
    res = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {b.run_id}")
    check_cells(b, res, np.argsort(b.cell_idx_of_src), b.layers, "cls")
    adata = res.to_anndata(order="store")
    assert list(adata.obsm) == [f"X_tiny-m_L0{x}_cls" for x in b.layers]
    np.testing.assert_array_equal(adata.obsm["X_tiny-m_L05_cls"], res.layer(5))
    assert adata.uns["sclstore"]["run"] == b.run_id
    assert list(adata.obs["cell_idx"]) == list(res.cell_idx)


def test_group_by_centroids_and_counts(store60: BuiltStore) -> None:
    b = store60
    res = execute_query(
        b.backend,
        f"SELECT cell_type, is_ctrl, layer, AVG(embedding.mean), COUNT(*) FROM embeddings WHERE run = {b.run_id} "
        "AND layer IN (2, 8) AND n_genes > 0 GROUP BY cell_type, is_ctrl, layer ORDER BY cell_type DESC",
    )
    assert res.grouped and res.cell_idx is None and res.layers == (2, 8)
    obs = b.obs[b.obs.n_genes > 0]
    keys = obs[["cell_type", "is_ctrl"]].astype(object).where(obs[["cell_type", "is_ctrl"]].notna(), None)
    groups = sorted({tuple(k) for k in keys.itertuples(index=False)}, key=lambda k: (k[0] is not None, k[0] or "", k[1]), reverse=False)
    # expected order: cell_type DESC (NULLs last), then is_ctrl ASC
    groups.sort(key=lambda k: k[1])
    groups.sort(key=lambda k: (k[0] is None, "" if k[0] is None else k[0]), reverse=False)
    nonnull = [g for g in groups if g[0] is not None]
    nonnull.sort(key=lambda k: k[0], reverse=True)
    groups = nonnull + [g for g in groups if g[0] is None]
    got = [(None if pd.isna(c) else c, bool(f)) for c, f in zip(res.obs.cell_type, res.obs.is_ctrl, strict=False)]
    assert got == groups
    for j, (ct, flag) in enumerate(groups):
        m = ((obs.cell_type.isna()) if ct is None else (obs.cell_type == ct)) & (obs.is_ctrl == flag)
        rows = np.flatnonzero(b.obs.index.isin(obs.index[m.to_numpy()]))
        assert res.obs["count"].iloc[j] == rows.size == res.counts[j]
        want = b.emb["mean"][[1, 4]][:, rows].astype(np.float64).mean(axis=1)
        np.testing.assert_allclose(res.embeddings[:, j], want, rtol=1e-6, atol=1e-6)


def test_group_by_edge_cases(store60: BuiltStore) -> None:
    b = store60
    one = execute_query(b.backend, f"SELECT AVG(embedding), COUNT(*) FROM embeddings WHERE run = {b.run_id} AND layer = 0")
    assert one.counts.tolist() == [60]
    np.testing.assert_allclose(one.embeddings[0, 0], b.emb["cls"][0].astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-6)
    counts = execute_query(b.backend, f'SELECT "donor id", COUNT(*) FROM embeddings WHERE run = {b.run_id} AND layer = 0 GROUP BY "donor id" LIMIT 2')
    assert counts.embeddings is None and len(counts.obs) == 2
    donors = [None if pd.isna(v) else v for v in b.obs["donor id"]]
    keys = sorted(set(donors), key=lambda v: (v is not None, v or ""))[:2]  # NULLs first, then code-point order
    assert [None if pd.isna(v) else v for v in counts.obs["donor id"]] == keys
    assert counts.obs["count"].tolist() == [donors.count(k) for k in keys]
    with pytest.raises(InvalidQueryError, match="grouped by layer"):
        execute_query(b.backend, f"SELECT cell_type, AVG(embedding) FROM embeddings WHERE run = {b.run_id} GROUP BY cell_type")
    with pytest.raises(InvalidQueryError, match="not in GROUP BY"):
        execute_query(b.backend, f"SELECT score, COUNT(*) FROM embeddings WHERE run = {b.run_id} AND layer = 0 GROUP BY cell_type")
    with pytest.raises(InvalidQueryError, match="returns groups, not cells"):
        execute_query(b.backend, f"SELECT *, COUNT(*) FROM embeddings WHERE run = {b.run_id} AND layer = 0")


@pytest.mark.parametrize(
    ("sql", "exc", "match"),
    [
        ("SELECT * FROM embeddings WHERE layer = 2", InvalidQueryError, r"must pin one run.*candidates: run 1 \(toy/tiny-m"),
        ("SELECT * FROM embeddings WHERE run = 99", RunNotFoundError, r"no run 99"),
        ("SELECT * FROM embeddings WHERE dataset = 'toy' AND model = 'other'", RunNotFoundError, r"no complete run of model 'other'.*run 1"),
        ("SELECT * FROM embeddings WHERE run = 1 AND dataset = 'nope'", InvalidQueryError, r"has dataset 'toy', not 'nope'"),
        ("SELECT * FROM embeddings WHERE run = 1 OR cell_type = 'T'", InvalidQueryError, r"top-level AND.*not under OR or NOT"),
        ("SELECT * FROM embeddings WHERE run = 1 AND (layer = 2 OR layer = 3)", InvalidQueryError, r"layer may only be constrained in top-level AND"),
        ("SELECT * FROM embeddings WHERE run = 1 AND NOT depth > 0.5", InvalidQueryError, r"depth may only"),
        ("SELECT * FROM embeddings WHERE run > 0", InvalidQueryError, r"run can only be pinned with `=`"),
        ("SELECT * FROM embeddings WHERE run = 1 AND layer = 4", NotFoundError, r"layer 4 is not stored in run 1; stored layers: \[0, 2, 3, 5, 8\]"),
        ("SELECT * FROM embeddings WHERE run = 1 AND layer > 8", InvalidQueryError, r"no stored layer"),
        ("SELECT * FROM embeddings WHERE run = 1 AND depth = 1.5", InvalidQueryError, r"depth is layer / L"),
        ("SELECT * FROM embeddings WHERE run = 1 AND layer = 'x'", InvalidQueryError, r"layer is a number"),
        ("SELECT embedding.max FROM embeddings WHERE run = 1", NotFoundError, r"pool 'max' is not stored.*cls"),
        ("SELECT layer, AVG(embedding.cls), AVG(embedding.mean) FROM embeddings WHERE run = 1 AND layer = 2 GROUP BY layer",
         InvalidQueryError, r"one pool per GROUP BY query"),
        ("SELECT nope FROM embeddings WHERE run = 1", InvalidQueryError, r"unknown column 'nope' in the select list"),
        ("SELECT * FROM embeddings WHERE run = 1 ORDER BY nope", InvalidQueryError, r"unknown column 'nope' in ORDER BY"),
        ("SELECT * FROM embeddings WHERE run = 1 AND embedding = 1", InvalidQueryError, r"embedding cannot be filtered"),
        ("SELECT * FROM embeddings WHERE run = 1 AND n_genes = 'many'", InvalidQueryError, r"'n_genes' is an integer column"),
        ("SELECT * FROM embeddings WHERE run = 1 AND sqlite_master = 1", InvalidQueryError, r"unknown column 'sqlite_master'"),
    ],
)
def test_planning_errors(store60: BuiltStore, sql: str, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        execute_query(store60.backend, sql)


def test_memory_budget_refuses_and_streaming_does_not(store60: BuiltStore, tmp_path: Path) -> None:
    b = store60
    sql = f"SELECT * FROM embeddings WHERE run = {b.run_id}"
    with pytest.raises(QueryTooLargeError, match=r"7\.0 KiB \(5 layers x 60 cells x 6 dims\).*budget of 1000 B.*layer = 8.*-o out\.npy"):
        execute_query(b.backend, sql, memory_budget=1000)
    stream = open_query(b.backend, sql, memory_budget=1000)
    with pytest.raises(QueryTooLargeError):
        stream.materialize()
    blocks = list(stream.iter_blocks(chunk_cells=7))
    assert len(blocks) == 5 * 9
    full = np.concatenate([np.concatenate([blk for i, _, blk in blocks if i == k]) for k in range(5)]).reshape(5, 60, 6)
    np.testing.assert_array_equal(full, b.emb["cls"][:, np.argsort(b.cell_idx_of_src)])
    ok = open_query(b.backend, sql).materialize()
    np.testing.assert_array_equal(ok.embeddings, full)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_queries_match_oracle(store60: BuiltStore, data: st.DataObject) -> None:
    b = store60
    pred = data.draw(predicates_for(frame_of(b), max_leaves=6))
    layers = tuple(sorted(data.draw(st.sets(st.sampled_from(b.layers), min_size=1, max_size=3))))
    pool = data.draw(st.sampled_from(["cls", "mean"]))
    order = data.draw(st.lists(st.sampled_from(["cell_type", "donor id", "score", "n_genes", "is_ctrl", "cell"]), max_size=2, unique=True))
    order_items = [OrderItem(c, data.draw(st.booleans()), None) for c in order]
    limit = data.draw(st.one_of(st.none(), st.integers(0, 30)))
    order_sql = " ORDER BY " + ", ".join(f'"{o.column}" {"DESC" if o.desc else "ASC"}' for o in order_items) if order_items else ""
    limit_sql = f" LIMIT {limit}" if limit is not None else ""
    sql = (
        f"SELECT *, embedding.{pool} FROM embeddings WHERE run = {b.run_id} AND layer IN ({', '.join(map(str, layers))}) "
        f"AND ({to_sql(pred)}){order_sql}{limit_sql}"
    )
    res = execute_query(b.backend, sql)
    fixed = [OrderItem(o.column, o.desc, not o.desc) for o in order_items]
    check_cells(b, res, expected_rows(b, pred, fixed, limit), layers, pool)


def test_float16_store_and_metadata_only_queries(tmp_path: Path) -> None:
    b = build_store(tmp_path / "h", obs=random_obs(25, seed=4), dtype="float16", consolidate=False, cluster_by=())
    try:
        res = execute_query(b.backend, "SELECT * FROM embeddings WHERE run = 1 AND depth = 0.6 AND \"donor id\" IS NOT NULL")
        rows = expected_rows(b, IsNull("donor id", negate=True))
        check_cells(b, res, rows, (5,), "cls")  # float16 values widened to float32 exactly
        meta = execute_query(b.backend, "SELECT cell, cell_idx, n_genes FROM embeddings WHERE run = 1 AND n_genes < 10")
        assert meta.embeddings is None and meta.pool is None and meta.nbytes == 0
        want = b.obs[b.obs.n_genes < 10]
        assert list(meta.obs.index) == list(want.index) and meta.obs["n_genes"].tolist() == want["n_genes"].tolist()
        assert meta.summary()["n_cells"] == len(want) and meta.summary()["shape"] is None
    finally:
        b.backend.close()


def test_incomplete_and_ambiguous_runs(tmp_path: Path) -> None:
    from sclstore.store import ArraySpec

    b = build_store(tmp_path / "r", obs=random_obs(12, seed=2), consolidate=False)
    try:
        ds = b.backend.get_dataset("toy")
        model = b.backend.list_models()[0]
        spec = ArraySpec(n_layers=2, n_cells=12, dim=6, pools=("cls",))
        running = b.backend.create_run(dataset=ds, model=model, key="f" * 64, params={}, layers=(0, 8), spec=spec)
        with pytest.raises(InvalidQueryError, match=rf"run {running.id} \(toy/tiny-m\) is queued, not complete"):
            execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {running.id}")
        # a running run is no candidate: the name pair still pins the complete run
        res = execute_query(b.backend, "SELECT * FROM embeddings WHERE dataset = 'toy' AND model = 'tiny-m' AND layer = 0")
        assert res.run == b.run_id
        # one complete run of the model (or dataset): naming it pins that run (issue 15.6)
        assert execute_query(b.backend, "SELECT cell FROM embeddings WHERE model = 'tiny-m'").run == b.run_id
        assert execute_query(b.backend, "SELECT cell FROM embeddings WHERE dataset = 'toy'").run == b.run_id
        # once both are complete, the name pair is ambiguous and the error lists both
        from unittest import mock

        lease = b.backend.acquire(running.id, wait=False)
        assert lease is not None
        b.backend.write_block(running, lease, 0, {"cls": np.zeros((2, 12, 6), dtype=np.float32)})
        with mock.patch("sclstore.store.arrays.consolidate", lambda *a, **k: None):
            b.backend.complete(running, lease, {})
        with pytest.raises(InvalidQueryError, match=rf"must pin one run.*candidates: run 1 .*; run {running.id} \(toy/tiny-m, 2 layers"):
            execute_query(b.backend, "SELECT * FROM embeddings WHERE dataset = 'toy' AND model = 'tiny-m'")
        with pytest.raises(InvalidQueryError, match=r"must pin one run"):
            execute_query(b.backend, "SELECT * FROM embeddings WHERE dataset = 'toy'")
        two = execute_query(b.backend, f"SELECT * FROM embeddings WHERE run = {running.id} AND depth = 1")
        assert two.layers == (8,) and not two.embeddings.any()
    finally:
        b.backend.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_group_by_matches_pandas(store60: BuiltStore, data: st.DataObject) -> None:
    b = store60
    pred = data.draw(predicates_for(frame_of(b), max_leaves=4))
    cols = data.draw(st.lists(st.sampled_from(["cell_type", "donor id", "is_ctrl", "n_genes"]), min_size=1, max_size=2, unique=True))
    quoted = ", ".join(f'"{c}"' for c in cols)
    res = execute_query(
        b.backend,
        f"SELECT {quoted}, layer, AVG(embedding.mean), COUNT(*) FROM embeddings WHERE run = {b.run_id} "
        f"AND layer IN (0, 5) AND ({to_sql(pred)}) GROUP BY {quoted}, layer",
    )
    mask = selected(pred, frame_of(b))
    sub = b.obs[mask]
    keys = [tuple(None if pd.isna(v) else v for v in row) for row in sub[cols].astype(object).itertuples(index=False)]
    want = sorted(set(keys), key=lambda k: tuple((v is not None, v if v is not None else 0) for v in k))
    got = [tuple(None if pd.isna(v) else v for v in row) for row in res.obs[cols].astype(object).itertuples(index=False)]
    assert got == want  # groups in ascending key order, NULLs first
    assert res.counts.sum() == mask.sum()
    src_rows = np.flatnonzero(mask)
    for j, key in enumerate(want):
        rows = src_rows[[k == key for k in keys]]
        assert res.counts[j] == rows.size
        np.testing.assert_allclose(res.embeddings[:, j], b.emb["mean"][[0, 3]][:, rows].astype(np.float64).mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "where",
    [
        "cell_type = 'T'",  # the clustering column: one run of cell_idx
        "cell_type IN ('B', 'T')",
        "score > 0",  # scattered
        "cell_idx BETWEEN 10 AND 19",
        "cell_idx IN (3, 5)",  # a gap
        "cell_type = 'no such type'",  # empty
        "",
    ],
)
def test_contiguous_range_matches_numpy(store60: BuiltStore, where: str) -> None:
    from sclstore.query import parse_query, plan_query
    from sclstore.query.read import contiguous_range

    b = store60
    sql = f"SELECT embedding FROM embeddings WHERE run = {b.run_id} AND layer = 2" + (f" AND {where}" if where else "")
    cells = np.sort(execute_query(b.backend, sql.replace("SELECT embedding ", "SELECT cell_idx ")).cell_idx)  # no array read
    contiguous = cells.size > 0 and cells[-1] - cells[0] + 1 == cells.size
    plan = plan_query(b.backend, parse_query(sql))
    assert contiguous_range(b.backend, plan) == ((int(cells[0]), int(cells[-1])) if contiguous else None)
    # ORDER BY another column or LIMIT: cells are not "first..last in order", never a range
    for tail in (" ORDER BY score", " LIMIT 5", " ORDER BY cell_idx DESC"):
        assert contiguous_range(b.backend, plan_query(b.backend, parse_query(sql + tail))) is None


@pytest.mark.parametrize(
    ("where", "mask"),
    [
        ("cell_type = 'T'", lambda obs: (obs.cell_type == "T").to_numpy()),
        ("cell_type = 'B'", lambda obs: (obs.cell_type == "B").to_numpy()),
        ("cell_idx BETWEEN 0 AND 59", lambda obs: np.ones(len(obs), dtype=bool)),
    ],
)
def test_range_path_equals_row_path(store60: BuiltStore, where: str, mask: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlapped range path (array read in a thread) returns exactly what the row path does."""
    import sclstore.query.read as read_mod

    b = store60
    sql = f"SELECT * FROM embeddings WHERE run = {b.run_id} AND layer IN (0, 5) AND {where}"
    plan = read_mod.plan_query(b.backend, read_mod.parse_query(sql))
    assert read_mod.contiguous_range(b.backend, plan) is not None
    calls: list[tuple[int, int]] = []
    real_select_range = read_mod.select_range

    def spy(backend, plan, first, last):
        calls.append((first, last))
        return real_select_range(backend, plan, first, last)

    monkeypatch.setattr(read_mod, "select_range", spy)
    fast = execute_query(b.backend, sql)
    assert len(calls) == 1
    monkeypatch.setattr(read_mod, "contiguous_range", lambda *_a, **_k: None)
    slow = execute_query(b.backend, sql)
    assert len(calls) == 1
    np.testing.assert_array_equal(fast.cell_idx, slow.cell_idx)
    np.testing.assert_array_equal(fast.embeddings, slow.embeddings)
    pd.testing.assert_frame_equal(fast.obs, slow.obs)
    rows = np.flatnonzero(mask(b.obs))
    rows = rows[np.argsort(b.cell_idx_of_src[rows])]  # numpy oracle, in cell_idx order
    check_cells(b, fast, rows, (0, 5), "cls")


def test_category_order_and_ordered_flag_survive_the_catalog(tmp_path: Path) -> None:
    from sclstore.store.obs import ObsColumn

    obs = random_obs(40, seed=3)
    stages = ["zygote", "blast", "adult", "never-used"]  # developmental order, not alphabetical
    obs["stage"] = pd.Categorical(np.random.default_rng(3).choice(stages[:3], size=40), categories=stages, ordered=True)
    b = build_store(tmp_path / "s", obs=obs, cluster_by=("stage",), consolidate=False)
    try:
        full = b.backend.read_obs(1)["stage"]
        assert list(full.cat.categories) == stages[:3] and full.cat.ordered  # present ones, in the AnnData's order
        res = execute_query(b.backend, f"SELECT stage FROM embeddings WHERE run = {b.run_id} AND layer = 0 AND stage IN ('adult', 'zygote')")
        got = res.obs["stage"]
        assert list(got.cat.categories) == ["zygote", "adult"] and got.cat.ordered
        want = obs["stage"].to_numpy()[np.argsort(b.cell_idx_of_src)][np.asarray(res.cell_idx)]  # by cell_idx
        assert list(got.astype(str)) == [str(x) for x in want]
        # catalogs written before categories were kept: code-point order, unordered
        old = ObsColumn.from_json({"name": "stage", "column": "c9", "kind": "category"})
        assert old.categories is None and not old.ordered
        assert ObsColumn.from_json(ObsColumn("s", "c0", "category", ("b", "a"), True).to_json()) == ObsColumn("s", "c0", "category", ("b", "a"), True)
    finally:
        b.backend.close()
