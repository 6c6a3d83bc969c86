"""The model repository: one ``models`` row per checkpoint (family + checkpoint hash)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import catalog as catalogdb
from ._translate import translate_errors
from .errors import NotFoundError
from .info import ModelInfo
from .models import Model, utcnow

__all__ = ["ModelRepository"]


@translate_errors
class ModelRepository:
    """Registered model checkpoints in one catalog."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._by_id: dict[int, ModelInfo] = {}  # model rows never change

    def get(self, model_id: int) -> ModelInfo:
        """A model by id (cached).

        Raises
        ------
        NotFoundError
            If no model has this id.
        """
        cached = self._by_id.get(int(model_id))
        if cached is not None:
            return cached
        with Session(self.engine) as s:
            row = s.get(Model, int(model_id))
            if row is None:
                raise NotFoundError(f"no model {model_id}; list them with `sclstore ls models`")
            info = ModelInfo.from_row(row)
        self._by_id[info.id] = info
        return info

    def register(
        self, *, family: str, name: str, checkpoint_hash: str, n_layers: int, d_model: int, config: dict[str, Any]
    ) -> ModelInfo:
        """Register a model checkpoint (idempotent on family + checkpoint hash)."""
        cond = sa.and_(Model.family == family, Model.checkpoint_hash == checkpoint_hash)
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Model).where(cond))
            if row is not None:
                return ModelInfo.from_row(row)
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(
                    sa.insert(Model).values(
                        family=family, name=name, checkpoint_hash=checkpoint_hash, n_layers=n_layers,
                        d_model=d_model, config=config, created_at=utcnow(),
                    )
                )
        except sa.exc.IntegrityError:
            pass  # registered concurrently
        with Session(self.engine) as s:
            return ModelInfo.from_row(s.scalars(sa.select(Model).where(cond)).one())

    def list_all(self) -> list[ModelInfo]:
        """Every model, oldest first."""
        with Session(self.engine) as s:
            return [ModelInfo.from_row(r) for r in s.scalars(sa.select(Model).order_by(Model.id))]
