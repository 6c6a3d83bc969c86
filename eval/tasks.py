"""The evaluation task abstraction: a registry of :class:`Task` objects run by one generic runner.

A task is three things:

* a **frozen config dataclass** (a subclass of :class:`TaskConfig`) whose fields are the task's
  parameters. The cache key is *derived* from it (:func:`config_params`): every field is part of
  the key unless its metadata says ``key=False`` (e.g. ``n_jobs``, ``counts_path``: they change
  how fast a result is computed, never the result). Validation lives in ``__post_init__``.
* ``prepare`` (once per evaluation: columns, references, DE...), ``compute_layer`` (one stored
  layer at a time; it must be a picklable, side-effect-free call so that ``--jobs`` can run it in
  worker processes) and ``summarise`` (all layer results -> an :class:`~sclstore.eval.report.EvalReport`).
* ``plot`` (the report's figure; default: score vs depth).

Built-in tasks (trajectory, perturbation, diagnostics, celltype) register themselves here; other
packages add tasks through the ``sclstore.tasks`` entry-point group, whose entry points name a
:class:`Task` instance (or a zero-argument callable returning one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from sclstore.store.errors import EvaluationError, InvalidInputError

if TYPE_CHECKING:
    from sclstore.store import Backend, DatasetInfo, RunInfo

    from .report import EvalReport

__all__ = [
    "ENTRY_POINT_GROUP",
    "Task",
    "TaskConfig",
    "TaskContext",
    "config_params",
    "get_task",
    "layer_threads",
    "nokey",
    "register_task",
    "task_names",
]

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "sclstore.tasks"
#: CPU threads the runner gives the layer being computed (set around each ``compute_layer`` call).
LAYER_THREADS: ContextVar[int] = ContextVar("sclstore_layer_threads", default=1)


def layer_threads() -> int:
    """CPU threads ``compute_layer`` may use for the layer it computes (see ``Task.threaded_layers``)."""
    return LAYER_THREADS.get()


def nokey(default: Any = None, **kw: Any) -> Any:
    """A config field that does not change the result (excluded from the cache key)."""
    return field(default=default, metadata={"key": False}, **kw)


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Base of every task config: the pooling to score and the seed.

    Attributes
    ----------
    pool
        Pooling to score (``None``: the run's first; resolved before the key is derived).
    seed
        Seed of every random choice of the task.
    n_jobs
        Worker processes over layers (not part of the cache key).
    progress
        Show a progress bar on stderr (not part of the cache key).
    """

    pool: str | None = None
    seed: int = 0
    n_jobs: int = nokey(1)
    progress: bool = nokey(False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int | np.integer):
            raise InvalidInputError(f"seed must be an integer, got {self.seed!r}")
        if int(self.n_jobs) < 1:
            raise InvalidInputError(f"n_jobs must be >= 1, got {self.n_jobs}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TaskConfig:
        """Build the config from keyword options, naming any unknown option and the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InvalidInputError(f"unknown option(s) {', '.join(unknown)} for this task; valid: {', '.join(sorted(names))}")
        return cls(**options)


def config_params(task: Task, config: TaskConfig) -> dict[str, Any]:
    """The cache-key parameters of ``config``: every field without ``key=False``, plus task and version.

    Paths and tuples are normalised to JSON types so the same parameters always hash alike.
    """
    out: dict[str, Any] = {"task": task.name, "version": task.version}
    for f in fields(config):
        if not f.metadata.get("key", True):
            continue
        v = getattr(config, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    out.update(task.derived_params(config))
    out["primary_metric"] = task.primary_metric(config)
    return out


@dataclass
class TaskContext:
    """What ``prepare`` may use: the store, the run, its dataset and obs, the resolved pool.

    ``read_layer`` and ``query`` go through the slice language (never SQL text of the user).
    """

    backend: Backend
    info: RunInfo
    dataset: DatasetInfo
    obs: pd.DataFrame
    pool: str
    counts_path: str | Path | None = None
    skipped_cells: np.ndarray | None = None
    """``cell_idx`` of cells the model could not embed (stored as NaN): left out of ``obs`` and of every layer."""

    def read_layer(self, layer: int, where: dict[str, Any] | None = None) -> np.ndarray:
        """One stored layer as a (cells x dim) float matrix in ``cell_idx`` order.

        ``where`` maps obs columns to values (ANDed equalities), passed to the programmatic slice
        API as bound values: no SQL text is generated.
        """
        from sclstore.query import cells_query, execute

        res = execute(self.backend, cells_query(self.info.id, layers=[int(layer)], pool=self.pool, where=where))
        if self.skipped_cells is None or not len(self.skipped_cells) or res.cell_idx is None:
            return res.embeddings[0]
        return res.embeddings[0][~np.isin(np.asarray(res.cell_idx), self.skipped_cells)]

    def column(self, key: str, what: str) -> pd.Series:
        """An obs column, or an error naming the columns the dataset has."""
        if key not in self.obs.columns or key in ("cell_idx", "src_idx"):
            have = ", ".join(c.name for c in self.dataset.obs_schema) or "(none)"
            raise EvaluationError(f"{what} column {key!r} is not in the obs of dataset {self.dataset.name!r}; it has: {have}")
        return self.obs[key]


class Task:
    """One evaluation task (subclass and register an instance).

    Class attributes: ``name`` (the CLI/API name and the catalog's task column), ``version``
    (bump when a metric changes so cached results are not reused), ``config_cls``, ``title``,
    ``threaded_layers`` (``compute_layer`` uses :func:`layer_threads` CPUs: the runner then gives
    the last layers, which would leave worker processes idle, every CPU between them).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    title: ClassVar[str] = ""
    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    threaded_layers: ClassVar[bool] = False

    def primary_metric(self, config: TaskConfig) -> str:
        """The metric the headline and the plot use."""
        return "score"

    def derived_params(self, config: TaskConfig) -> dict[str, Any]:
        """Facts computed from the config that a reader of the parameters should see (e.g. a protocol's root rule)."""
        return {}

    def layers(self, ctx: TaskContext, config: TaskConfig, state: Any) -> list[int]:
        """Layers to compute (default: every stored layer)."""
        return list(ctx.info.layers)

    def prepare(self, ctx: TaskContext, config: TaskConfig) -> Any:
        """Everything that is not per layer (validation, references, DE); returns the task state."""
        return None

    def layer_input(self, ctx: TaskContext, config: TaskConfig, state: Any, layer: int) -> Any:
        """What ``compute_layer`` gets for one layer (default: the layer's matrix)."""
        return ctx.read_layer(layer)

    def compute_layer(self, config: TaskConfig, state: Any, layer: int, data: Any) -> Any:
        """Score one layer (pure; may run in a worker process)."""
        raise NotImplementedError

    def summarise(self, ctx: TaskContext, config: TaskConfig, state: Any, results: dict[int, Any], params: dict[str, Any]) -> EvalReport:
        """Turn the per-layer results into a report."""
        raise NotImplementedError

    def worker_state(self, state: Any) -> Any:
        """The part of ``state`` that ``compute_layer`` needs in a worker process (default: all)."""
        return state

    def plot(self, report: EvalReport, out_png: str | Path) -> Path:
        """The report's figure (default: score vs depth)."""
        return report.plot(out_png)


_REGISTRY: dict[str, Task] = {}
_LOADED = {"entry_points": False}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add a task to the registry (``replace=True`` to override one of the same name)."""
    if not task.name or not isinstance(task, Task):
        raise InvalidInputError(f"{task!r} is not a named Task instance")
    if task.name in _REGISTRY and not replace and type(_REGISTRY[task.name]) is not type(task):
        raise InvalidInputError(f"a task named {task.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[task.name] = task
    return task


def _load() -> None:
    from . import task_labelfree, task_perturbation, task_trajectory  # noqa: F401  (built-ins register on import)

    if _LOADED["entry_points"]:
        return
    _LOADED["entry_points"] = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            task = obj() if callable(obj) and not isinstance(obj, Task) else obj
            if task.name not in _REGISTRY:
                register_task(task)
        except Exception as exc:  # a broken plugin must not break the built-in tasks
            logger.warning("task plugin %s could not be loaded: %s", ep.name, exc)


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    _load()
    if name not in _REGISTRY:
        raise EvaluationError(f"unknown evaluation task {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    """Names of every registered task."""
    _load()
    return sorted(_REGISTRY)


def replace_config(config: TaskConfig, **changes: Any) -> TaskConfig:
    """``dataclasses.replace`` that keeps validation."""
    return dataclasses.replace(config, **changes)
