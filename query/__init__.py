"""The SQL-style slice language over the ``embeddings`` virtual table.

``parse_query`` (sqlglot + whitelist) -> ``plan_query`` (pin one run, layers, pool, columns) ->
``execute_query`` / ``open_query`` (obs predicates in the catalog, embeddings from the run's
array) -> ``QueryResult`` / ``QueryStream`` -> ``write_result`` (.h5ad .npy .npz .parquet .csv).
"""

from __future__ import annotations

from .export import FORMATS, query_to_file, write_result
from .parse import parse_query
from .plan import QueryPlan, plan_query
from .read import execute_query, open_query
from .result import QueryResult, QueryStream, obsm_key
from .slices import cells_query, centroids_query
from .spec import SliceQuery

execute = execute_query
"""Run a :class:`SliceQuery` (or SQL text): ``execute(backend, cells_query(run, layers=[3], where={...}))``."""

__all__ = [
    "FORMATS",
    "QueryPlan",
    "QueryResult",
    "QueryStream",
    "SliceQuery",
    "cells_query",
    "centroids_query",
    "execute",
    "execute_query",
    "obsm_key",
    "open_query",
    "parse_query",
    "plan_query",
    "query_to_file",
    "write_result",
]
