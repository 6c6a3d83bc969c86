"""Error hints on the query side (issue 15.6): unquoted values, case-mismatched values, --store
one folder too high."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from sclstore.query import execute_query, open_query, parse_query
from sclstore.query.hints import near_values
from sclstore.store import Backend
from sclstore.store.errors import InvalidQueryError, StoreExistsError, StoreNotFoundError

from .helpers import BuiltStore, build_store, random_obs


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    built = build_store(tmp_path_factory.mktemp("hints") / "lab" / "store", obs=random_obs(40, seed=4), consolidate=False)
    yield built
    built.backend.close()


@pytest.mark.parametrize("where", ["donor = d1", 'donor = "d1"', "d1 = donor"])
def test_unquoted_value_says_did_you_mean(where: str) -> None:
    want = r"Did you mean the value '(d1|donor)'\? Quote values with single quotes: `\w+ = '(d1|donor)'`"
    with pytest.raises(InvalidQueryError, match=want):
        parse_query(f"SELECT * FROM embeddings WHERE run = 1 AND {where}")


def test_near_values_case_first_then_spelling() -> None:
    assert near_values("t", ["T", "B", "NK"]) == ["T"]
    assert near_values("CD4 t", ["CD4 T", "CD8 T"]) == ["CD4 T"]
    assert near_values("monocyte", ["monocytes", "B"]) == ["monocytes"]
    assert near_values("zzz", ["T", "B"]) == []


def test_case_mismatch_hint_on_category_and_text(b: BuiltStore, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sclstore.query.hints"):
        res = execute_query(b.backend, f"SELECT cell FROM embeddings WHERE run = {b.run_id} AND cell_type = 'nk'")
    assert res.n_rows == 0
    assert res.summary()["hints"] == ["cell_type has no value 'nk'; did you mean 'NK'? (comparisons are case-sensitive)"]
    assert "did you mean 'NK'" in caplog.text
    # a text (non-categorical) column: checked when nothing matched
    stream = open_query(b.backend, f"SELECT cell FROM embeddings WHERE run = {b.run_id} AND \"donor id\" IN ('X*Y')")
    assert stream.n_rows == 0
    assert stream.summary()["hints"] == ["donor id has no value 'X*Y'; did you mean 'x*y'? (comparisons are case-sensitive)"]
    ok = execute_query(b.backend, f"SELECT cell FROM embeddings WHERE run = {b.run_id} AND cell_type = 'NK'")
    assert ok.n_rows > 0 and "hints" not in ok.summary()
    # NOT / != terms are not equality claims: no hint
    neg = execute_query(b.backend, f"SELECT cell FROM embeddings WHERE run = {b.run_id} AND cell_type != 'nk'")
    assert "hints" not in neg.summary()


def test_store_one_folder_too_high_says_where(b: BuiltStore) -> None:
    above = b.root.parent
    with pytest.raises(StoreNotFoundError, match=rf"{above} is not an sclstore store, but {b.root} is: pass --store {b.root}"):
        Backend.open(above)
    with pytest.raises(StoreNotFoundError, match=r"run `sclstore init"):
        Backend.open(above / "elsewhere")
    with pytest.raises(StoreExistsError, match=rf"but {b.root} is: pass --store {b.root}"):  # ingest creates stores
        Backend.create(above)


def test_cli_prints_the_hint_on_stderr(b: BuiltStore, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sclstore.cli import app

    res = CliRunner().invoke(app, ["query", f"SELECT cell FROM embeddings WHERE run = {b.run_id} AND cell_type = 'nk'",
                                   "--store", str(b.root), "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and "did you mean 'NK'" in res.stderr
    res = CliRunner().invoke(app, ["ls", "--store", str(b.root.parent)], catch_exceptions=False)
    assert res.exit_code == 1 and f"pass --store {b.root}" in res.stderr
