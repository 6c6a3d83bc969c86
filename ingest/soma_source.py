"""Cells of a SOMA Experiment (CELLxGENE Census style) as an AnnData to ingest.

``obs_filter`` is a SOMA value filter on ``obs`` (``"cell_type == 'B cell' and donor_id in
['d1', 'd2']"``), the way Census users slice data; only the matching cells are read. Requires
the optional extra ``sclstore[soma]`` (tiledbsoma).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sclstore.store.errors import InvalidInputError

__all__ = ["is_soma_uri", "read_soma", "soma_label"]


def is_soma_uri(data: Any) -> bool:
    """A ``*.soma`` path, a folder holding a TileDB group, or a ``tiledb://``/``s3://`` URI ending in ``.soma``."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    text = str(data)
    if re.match(r"^(tiledb|s3|gs|azure)://", text):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and (text.rstrip("/").endswith(".soma") or (path / "__group").is_dir() or (path / "__tiledb_group.tdb").exists())


def soma_label(uri: str, obs_filter: str | None) -> str:
    """What the catalog records as the dataset's source."""
    return f"soma:{uri}" + (f" obs[{obs_filter}]" if obs_filter else "")


def read_soma(uri: str | os.PathLike[str], *, obs_filter: str | None = None, measurement: str = "RNA", x_name: str | None = None) -> Any:
    """The cells of ``uri`` matching ``obs_filter`` as an in-memory AnnData (raw counts in ``X``).

    ``x_name`` picks the X layer (default: ``raw``, else ``counts``, else ``data``, else the only one).

    Raises
    ------
    InvalidInputError
        If tiledbsoma is missing, ``uri`` is not a SOMA Experiment, the measurement or X layer
        does not exist, the filter is invalid, or it selects no cell.
    """
    try:
        import tiledbsoma
    except ImportError:
        raise InvalidInputError("ingesting SOMA needs tiledbsoma: pip install 'sclstore[soma]' (or pip install tiledbsoma)") from None
    text = str(uri)
    try:
        exp = tiledbsoma.Experiment.open(text)
    except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError, TypeError) as exc:
        raise InvalidInputError(f"{text} is not a SOMA Experiment: {exc}") from None
    with exp:
        if measurement not in exp.ms:
            raise InvalidInputError(f"SOMA experiment {text} has no measurement {measurement!r}; it has: {', '.join(exp.ms.keys())}")
        layers = list(exp.ms[measurement].X.keys())
        if x_name is None:
            x_name = next((k for k in ("raw", "counts", "data") if k in layers), layers[0] if len(layers) == 1 else None)
        if x_name not in layers:
            have = ", ".join(layers) or "(none)"
            raise InvalidInputError(f"pick the X layer with raw counts (--soma-x NAME); {measurement} has X layers: {have}")
        try:
            query = exp.axis_query(measurement, obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter) if obs_filter else None)
            adata = query.to_anndata(X_name=x_name)
        except (tiledbsoma.SOMAError, ValueError) as exc:
            raise InvalidInputError(f"obs filter {obs_filter!r} failed on {text}: {exc}") from None
    if adata.n_obs == 0:
        raise InvalidInputError(f"obs filter {obs_filter!r} selects no cell of {text}: check the column names and values")
    return adata
