"""The generic evaluation runner: one loop for every :class:`~sclstore.eval.tasks.Task`.

``run_task`` resolves the run and the pool, derives the cache key from the task's config, returns
the cached report when there is one (reading no embedding), otherwise prepares the task, streams
the stored layers one at a time through ``compute_layer`` (in ``n_jobs`` worker processes when
asked, never holding more than ``n_jobs`` layers), summarises, stores and returns the report.
A progress bar on stderr (layers done, ETA) is shown when ``progress`` is set; when stderr is
not a terminal a plain line is written every few seconds instead.

The shared plumbing of the built-in tasks (counts from the source file, cached intermediates,
identifier quoting for generated queries) lives here too. ``evaluate_trajectory`` and
``evaluate_perturbation`` are kept as thin wrappers of :func:`run_task`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time as _time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sclstore.store import Backend, DatasetInfo, RunInfo, cache_key
from sclstore.store.errors import EvaluationError, InvalidInputError

from .claims import layer_claims
from .report import EvalReport
from .results import LayerScore, apply_claim, claim_summary_row
from .tasks import (
    LAYER_THREADS,
    Task,
    TaskConfig,
    TaskContext,
    config_params,
    get_task,
    replace_config,
)

__all__ = ["EVAL_VERSION", "LayerProgress", "cpu_allowance", "evaluate_perturbation", "evaluate_trajectory", "run_task"]

logger = logging.getLogger(__name__)
EVAL_VERSION = "2"  # kept for compatibility; each task now has its own ``version``


# ----------------------------------------------------------------------------------- helpers
def _complete_run(backend: Backend, run: int | str) -> RunInfo:
    info = backend.get_run(run)
    if info.status != "complete":
        msg = f"run {info.id} is {info.status} ({info.watermark}/{info.n_cells} cells): finish it by rerunning the same ingest"
        raise EvaluationError(msg)
    return info


def _pool(info: RunInfo, pool: str | None) -> str:
    if pool is None:
        return info.pools[0]
    if pool not in info.pools:
        raise EvaluationError(f"run {info.id} has no pool {pool!r}; it stores: {', '.join(info.pools)} (pass --pool one of them)")
    return pool


def _counts(ds: DatasetInfo, counts_path: str | Path | None, obs: pd.DataFrame) -> tuple[sp.csr_matrix, np.ndarray]:
    """Raw counts of the dataset's cells in cell_idx order, and the gene names."""
    from sclstore.ingest.source import CountsSource

    path = Path(counts_path or ds.source_path or "")
    if not path.is_file():
        msg = (f"the raw counts of dataset {ds.name!r} are needed and its source file {str(path)!r} is not there: "
               "pass counts_path= (--counts PATH) with the .h5ad that was ingested")
        raise EvaluationError(msg)
    with CountsSource(path) as src:
        if src.scan() != ds.content_hash:
            raise EvaluationError(f"{path} is not the data of dataset {ds.name!r} (content hash differs): pass the ingested file")
        counts = src.rows(0, src.n_obs)[obs["src_idx"].to_numpy()]
        return counts.tocsr(), src.var_names


def _cached_intermediate(backend: Backend, kind: str, params: dict[str, Any], compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    key = cache_key(kind, params)
    blob = backend.get_intermediate(key)
    if blob is not None:
        logger.info("%s: cache hit", kind)
        return pd.read_parquet(io.BytesIO(blob))
    df = compute()
    buf = io.BytesIO()
    df.to_parquet(buf)
    backend.put_intermediate(kind, key, params, buf.getvalue())
    return df


def _finite(x: float | None) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


# ----------------------------------------------------------------------------------- claims
PROTOCOLS = ("default", "paper")


def _claimed_rows(rows: list[LayerScore], est: np.ndarray, resamples: np.ndarray, info: RunInfo, layers: Sequence[int], *,
                  scale: float, metric: str, seed: int, summary: list[dict[str, Any]], notes: dict[str, Any],
                  **keys: Any) -> list[LayerScore]:
    """Apply the shared claim logic to one group's rows; append its summary row."""
    depths = {int(li): info.depth(li) for li in layers}
    try:
        claim = layer_claims(est, resamples, list(layers), scale=scale, seed=seed, metric=metric,
                             depths=[depths[int(li)] for li in layers], final_layer=int(layers[-1]) if np.isfinite(est[-1]) else None)
    except InvalidInputError as exc:  # too few resamples or no finite score: report estimates, claim nothing
        notes.setdefault("claims_skipped", []).append(f"{keys}: {exc}")
        return rows
    summary.append(claim_summary_row(claim, depths=depths, metric=metric, **keys))
    return apply_claim(rows, claim)


def cpu_allowance() -> int:
    """CPUs this process may use: its affinity set (1 when unknown), capped by the thread policy in force.

    The policy (``--threads``, ``SCLSTORE_THREADS``, cgroup quota, Slurm: :mod:`sclstore.store.runtime`)
    is the one the ``Store`` methods apply before evaluating.
    """
    from sclstore.store import runtime

    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = max(1, os.cpu_count() or 1)
    policy = runtime.active_policy()
    if policy is not None and policy.enabled:
        cpus = min(cpus, max(1, policy.threads))
    return cpus


# ----------------------------------------------------------------------------------- progress
class LayerProgress:
    """Layers done and ETA on stderr: a rich bar on a terminal, a plain line every ``interval`` s otherwise.

    Parameters
    ----------
    total
        Layers to compute.
    label
        What is computed (e.g. ``"trajectory run 3"``).
    enabled
        Show anything at all.
    interval
        Seconds between plain lines when stderr is not a terminal.
    """

    def __init__(self, total: int, label: str, *, enabled: bool, interval: float = 10.0, stream: Any = None) -> None:
        self.total, self.label, self.enabled, self.interval = total, label, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = _time.monotonic()
        self._last = self.t0
        self._bar: Any = None
        self._task: Any = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def line(self) -> str:
        """The plain progress line (layers done, elapsed, ETA)."""
        el = _time.monotonic() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else float("nan")
        eta_s = f"{eta:.0f} s" if math.isfinite(eta) else "?"
        return f"{self.label}: {self.done}/{self.total} layers, {el:.0f} s elapsed, ETA {eta_s}"

    def advance(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(self._task)
            return
        now = _time.monotonic()
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ----------------------------------------------------------------------------------- workers
def _worker_compute(task: Task, config: TaskConfig, state: Any, threads: int, layer: int, data: Any) -> Any:
    from threadpoolctl import threadpool_limits

    token = LAYER_THREADS.set(threads)
    try:
        with threadpool_limits(limits=threads):
            return task.compute_layer(config, state, layer, data)
    finally:
        LAYER_THREADS.reset(token)


def _compute_layers(task: Task, ctx: TaskContext, config: TaskConfig, state: Any, layers: list[int],
                    progress: LayerProgress) -> dict[int, Any]:
    cpus = cpu_allowance()
    jobs = max(1, min(int(config.n_jobs), cpus, len(layers)))
    results: dict[int, Any] = {}
    if jobs == 1:
        token = LAYER_THREADS.set(cpus if task.threaded_layers else 1)
        try:
            for layer in layers:  # stream: one layer in memory at a time
                results[layer] = task.compute_layer(config, state, layer, task.layer_input(ctx, config, state, layer))
                progress.advance()
        finally:
            LAYER_THREADS.reset(token)
        return results
    # loky (joblib's) reusable executor: spawn-safe without re-running the caller's __main__, tasks and
    # configs pickled with cloudpickle (tasks registered in-process work too), and its workers stay warm
    # between evaluations (their imports and JIT compilation are paid once per session, not per call).
    from joblib.externals.loky import get_reusable_executor

    threads = max(1, cpus // jobs)  # processes x threads never exceed the CPUs we may use
    # a task that uses several threads per layer gets the last len % jobs layers (which would leave
    # workers idle) after the others, with every CPU shared among them
    tail = len(layers) % jobs if task.threaded_layers else 0
    rounds = [(layers[:len(layers) - tail], jobs, threads)] + ([(layers[len(layers) - tail:], tail, max(1, cpus // tail))] if tail else [])
    logger.info("%s: %d worker processes x %d threads over %d layers%s", task.name, jobs, threads, len(layers),
                f"; the last {tail} with {rounds[-1][2]} threads each" if tail else "")
    wstate = task.worker_state(state)
    pool = get_reusable_executor(max_workers=jobs, timeout=300)
    pending: dict[Future[Any], int] = {}
    try:
        for todo_layers, width, per_layer in rounds:
            todo = list(todo_layers)
            while todo or pending:
                while todo and len(pending) < width:  # at most `width` layers read and in flight
                    layer = todo.pop(0)
                    data = task.layer_input(ctx, config, state, layer)
                    pending[pool.submit(_worker_compute, task, config, wstate, per_layer, layer, data)] = layer
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    results[pending.pop(fut)] = fut.result()
                    progress.advance()
    finally:
        for fut in pending:
            fut.cancel()
    return {layer: results[layer] for layer in layers}


# ----------------------------------------------------------------------------------- generic runner
def run_task(
    backend: Backend,
    run: int | str,
    task: str | Task,
    config: TaskConfig | None = None,
    *,
    counts_path: str | Path | None = None,
    **options: Any,
) -> EvalReport:
    """Evaluate every stored layer of a run on one task, with the catalog as cache.

    Parameters
    ----------
    backend
        The open store.
    run
        Run id or ``dataset/model``.
    task
        A registered task name (``trajectory``, ``perturbation``, ``diagnostics``, ``celltype``,
        or a plugin's) or a :class:`Task`.
    config
        The task's config; or pass its fields as keyword ``options``.
    counts_path
        The ingested .h5ad when its recorded source path moved (tasks that need raw counts).

    Returns
    -------
    EvalReport
        ``cached=True`` when it came from the catalog.

    Raises
    ------
    EvaluationError
        Unknown task or pool, incomplete run, or whatever the task refuses.
    """
    task = get_task(task) if isinstance(task, str) else task
    if config is None:
        config = task.config_cls.from_options(options)
    elif options:
        config = replace_config(config, **options)
    info = _complete_run(backend, run)
    config = replace_config(config, pool=_pool(info, config.pool))
    params = config_params(task, config)
    phash = cache_key(params)
    stored = backend.get_evaluation(info.id, task.name, phash)
    if stored is not None:
        return EvalReport.from_json(stored, cached=True)
    ds = backend.get_dataset(info.dataset_id)
    obs = backend.read_obs(ds.id)
    skipped = np.asarray(info.unembeddable or (), dtype=np.int64)  # cells the model could not embed hold NaN
    if skipped.size:
        obs = obs[~np.isin(obs["cell_idx"].to_numpy(), skipped)]
    ctx = TaskContext(backend=backend, info=info, dataset=ds, obs=obs, pool=str(config.pool),
                      counts_path=counts_path, skipped_cells=skipped)
    state = task.prepare(ctx, config)
    layers = task.layers(ctx, config, state)
    progress = LayerProgress(len(layers), f"{task.name} run {info.id}", enabled=bool(config.progress))
    t0 = _time.perf_counter()
    try:
        results = _compute_layers(task, ctx, config, state, layers, progress)
    finally:
        progress.close()
    report = task.summarise(ctx, config, state, results, params)
    report.notes.setdefault("seconds", round(_time.perf_counter() - t0, 3))
    report.notes.setdefault("unembeddable_cells_skipped", int(skipped.size))
    backend.put_evaluation(info.id, task.name, phash, params, report.to_json())
    return report


def evaluate_trajectory(backend: Backend, run: int | str, *, counts_path: str | Path | None = None, **options: Any) -> EvalReport:
    """Trajectory inference per layer (see :class:`~sclstore.eval.task_trajectory.TrajectoryConfig`)."""
    return run_task(backend, run, "trajectory", counts_path=counts_path, **options)


def evaluate_perturbation(backend: Backend, run: int | str, *, counts_path: str | Path | None = None, **options: Any) -> EvalReport:
    """Perturbation response per layer and condition (see :class:`~sclstore.eval.task_perturbation.PerturbationConfig`)."""
    return run_task(backend, run, "perturbation", counts_path=counts_path, **options)
