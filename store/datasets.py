"""The dataset repository: ``datasets`` rows and each dataset's typed obs table.

A dataset is registered once (its obs table and its row in one transaction) and never changes
afterwards, so lookups are cached per repository. Cell selection over a dataset's obs goes
through its :class:`~sclstore.store.obs_index.ObsIndex`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import catalog as catalogdb
from ._lazy import lazy_module
from ._translate import translate_errors
from .config import validate_name
from .errors import DatasetError, NotFoundError
from .info import DatasetInfo
from .models import Dataset, utcnow
from .obs import build_obs_table, check_obs_width, infer_obs_schema, obs_table_name, unindexable_columns
from .obs_index import ObsIndex
from .obs_load import insert_obs

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:  # loaded on first use: listing datasets needs neither numpy nor pandas
    np = lazy_module("numpy")
    pd = lazy_module("pandas")

__all__ = ["DatasetRepository"]

logger = logging.getLogger(__name__)


class _AlreadyRegistered(Exception):
    """Internal: another process registered the same dataset first."""


@translate_errors
class DatasetRepository:
    """Datasets and their obs tables in one catalog.

    Parameters
    ----------
    engine
        The catalog engine (private to the store layer).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._obs_md = sa.MetaData()
        # registered datasets never change: look them up in the catalog once
        self._cache: dict[int | str, DatasetInfo] = {}
        self._obs_indexes: dict[int, ObsIndex] = {}

    def find(self, content_hash: str) -> DatasetInfo | None:
        """The dataset with this content hash, or ``None``."""
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Dataset).where(Dataset.content_hash == content_hash))
            return None if row is None else DatasetInfo.from_row(row)

    def register(
        self,
        *,
        name: str,
        content_hash: str,
        obs: pd.DataFrame,
        n_vars: int,
        source_path: str | None,
        cluster_by: Sequence[str] = (),
    ) -> DatasetInfo:
        """Register a dataset and its typed obs table in one transaction (or return the existing one).

        Cells are ordered by ``cluster_by`` columns (stable), so filters on them become few
        contiguous cell ranges; ``cell_idx`` is the position in that order.

        Raises
        ------
        DatasetError
            If the name is taken by other data, the same data was registered with another
            ``cluster_by``, a ``cluster_by`` column is missing, or obs is unusable.
        """
        validate_name(name, what="dataset")
        existing = self.find(content_hash)
        if existing is not None:
            if cluster_by and tuple(cluster_by) != existing.cluster_by:
                msg = (
                    f"this data is already registered as {existing.name!r} with cells ordered by "
                    f"{list(existing.cluster_by)}; omit --cluster-by or pass --cluster-by {','.join(existing.cluster_by) or '(none)'}"
                )
                raise DatasetError(msg)
            return existing
        if obs.shape[0] == 0:
            raise DatasetError("the dataset has no cells: nothing to ingest")
        schema = infer_obs_schema(obs)
        check_obs_width(len(schema), self.engine.dialect.name)
        missing = [c for c in cluster_by if c not in set(map(str, obs.columns))]
        if missing:
            msg = f"--cluster-by column(s) {missing} not in obs; obs columns are: {', '.join(map(str, obs.columns))}"
            raise DatasetError(msg)
        if cluster_by:
            keys = pd.DataFrame({c: obs[c].to_numpy() for c in cluster_by})
            order = keys.reset_index(drop=True).sort_values(list(cluster_by), kind="mergesort", na_position="last").index.to_numpy()
        else:
            order = np.arange(obs.shape[0])
        tname = obs_table_name(content_hash)
        table = build_obs_table(tname, schema, sa.MetaData(), unindexed=unindexable_columns(obs, schema))
        try:
            with catalogdb.write_tx(self.engine) as conn:
                if conn.execute(sa.select(Dataset.id).where(Dataset.content_hash == content_hash)).first() is not None:
                    raise _AlreadyRegistered
                taken = conn.execute(sa.select(Dataset.id).where(Dataset.name == name)).first()
                if taken is not None:
                    msg = f"dataset name {name!r} is already used by other data: pass another --name"
                    raise DatasetError(msg)
                insert_obs(conn, table, obs, schema, order)
                conn.execute(
                    sa.insert(Dataset).values(
                        name=name,
                        content_hash=content_hash,
                        n_obs=int(obs.shape[0]),
                        n_vars=int(n_vars),
                        source_path=source_path,
                        obs_table=tname,
                        obs_schema=[c.to_json() for c in schema],
                        cluster_by=list(cluster_by),
                        created_at=utcnow(),
                    )
                )
        except (_AlreadyRegistered, sa.exc.IntegrityError, sa.exc.ProgrammingError):
            again = self.find(content_hash)  # a concurrent registration won
            if again is None:
                raise
            return again
        info = self.find(content_hash)
        assert info is not None
        logger.info("registered dataset %s (%d cells, %d obs columns)", name, info.n_obs, len(schema))
        return info

    def get(self, dataset: int | str) -> DatasetInfo:
        """A dataset by id or name.

        Raises
        ------
        NotFoundError
            Listing the datasets that exist.
        """
        cached = self._cache.get(dataset)
        if cached is not None:
            return cached
        with Session(self.engine) as s:
            cond = Dataset.id == dataset if isinstance(dataset, int) else Dataset.name == str(dataset)
            row = s.scalar(sa.select(Dataset).where(cond))
            if row is None:
                names = s.scalars(sa.select(Dataset.name).order_by(Dataset.id)).all()
                raise NotFoundError(f"no dataset {dataset!r}; datasets: {', '.join(names) or '(none: ingest one first)'}")
            info = DatasetInfo.from_row(row)
        self._cache[info.id] = self._cache[info.name] = info
        return info

    def list_all(self) -> list[DatasetInfo]:
        """Every dataset, oldest first."""
        with Session(self.engine) as s:
            return [DatasetInfo.from_row(r) for r in s.scalars(sa.select(Dataset).order_by(Dataset.id))]

    def obs_index(self, dataset: int | DatasetInfo) -> ObsIndex:
        """The obs index of a dataset (cell selection; cached, datasets are immutable)."""
        info = dataset if isinstance(dataset, DatasetInfo) else self.get(dataset)
        index = self._obs_indexes.get(info.id)
        if index is None:
            index = self._obs_indexes[info.id] = ObsIndex(self.engine, info, ObsIndex.build_table(info, self._obs_md))
        return index
