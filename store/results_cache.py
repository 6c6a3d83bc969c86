"""The result cache: stored evaluation results and intermediates (neighbour graphs, ...).

Both tables are append-only caches keyed by hashes of their inputs: a concurrent identical
insert is harmless, and a read-only store still computes results, it only cannot cache them.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import catalog as catalogdb
from ._translate import translate_errors
from .errors import NotFoundError
from .models import Evaluation, Intermediate, utcnow

__all__ = ["ResultCache"]

logger = logging.getLogger(__name__)


@translate_errors
class ResultCache:
    """Evaluation and intermediate caches in one catalog.

    Parameters
    ----------
    engine
        The catalog engine (private to the store layer).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.read_only: str | None = None
        """Why results cannot be cached (``None``: they can); puts are then skipped with a log line."""

    # ------------------------------------------------------------------ evaluations
    def get_evaluation(self, run_id: int, task: str, params_hash: str) -> dict[str, Any] | None:
        """The cached result of ``task`` on a run with these parameters, or ``None``."""
        with Session(self.engine) as s:
            row = s.scalar(sa.select(Evaluation).where(Evaluation.run_id == run_id, Evaluation.task == task, Evaluation.params_hash == params_hash))
            return None if row is None else dict(row.result)

    def put_evaluation(self, run_id: int, task: str, params_hash: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        """Cache an evaluation result (skipped, with a warning, on a read-only store)."""
        if self.read_only is not None:  # the result is still returned; only its cache entry is lost
            logger.warning("%s: %s result not cached", self.read_only, task)
            return
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(sa.insert(Evaluation).values(run_id=run_id, task=task, params_hash=params_hash,
                                                          params=params, result=result, created_at=utcnow()))
        except sa.exc.IntegrityError:
            pass  # stored concurrently by an identical evaluation

    def list_evaluations(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Cached evaluations (without their results), oldest first."""
        cols = (Evaluation.id, Evaluation.run_id, Evaluation.task, Evaluation.params_hash, Evaluation.params, Evaluation.created_at)
        stmt = sa.select(*cols).order_by(Evaluation.id)
        if run_id is not None:
            stmt = stmt.where(Evaluation.run_id == run_id)
        with Session(self.engine) as s:
            return [{"id": r.id, "run": r.run_id, "task": r.task, "params_hash": r.params_hash, "params": dict(r.params),
                     "created_at": r.created_at.isoformat() if r.created_at else None} for r in s.execute(stmt)]

    def get_evaluation_by_id(self, evaluation_id: int) -> dict[str, Any]:
        """The stored result of one evaluation; NotFoundError names how to list them."""
        with Session(self.engine) as s:
            row = s.get(Evaluation, int(evaluation_id))
            if row is None:
                raise NotFoundError(f"no cached evaluation {evaluation_id}; list them with `sclstore ls evals`")
            return dict(row.result)

    # ------------------------------------------------------------------ intermediates
    def get_intermediate(self, key_hash: str) -> bytes | None:
        """A cached intermediate's payload, or ``None``."""
        with Session(self.engine) as s:
            return s.scalar(sa.select(Intermediate.payload).where(Intermediate.key_hash == key_hash))

    def put_intermediate(self, kind: str, key_hash: str, params: dict[str, Any], payload: bytes) -> None:
        """Cache an intermediate (skipped on a read-only store)."""
        if self.read_only is not None:
            logger.info("%s: %s intermediate not cached", self.read_only, kind)
            return
        try:
            with catalogdb.write_tx(self.engine) as conn:
                conn.execute(sa.insert(Intermediate).values(kind=kind, key_hash=key_hash, params=params,
                                                            payload=payload, created_at=utcnow()))
        except sa.exc.IntegrityError:
            pass
