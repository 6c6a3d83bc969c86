"""``sclstore ingest --executor ray``: one worker actor per GPU on a Ray cluster, the same claim loop.

Each actor (``num_gpus=1`` for a GPU run; ``num_cpus`` small by default so it never starves a small
node) opens the store itself -- store URI, catalog URL and TileDB settings come from the parent's
:class:`~sclstore.store.Backend` as actor arguments, never through the command line, the runtime
environment or a log line -- and runs :func:`sclstore.ingest.worker.work` on the run until no shard
is left: no Ray Data, no per-batch tasks. Ray only places the processes; the catalog stays the queue.

Failure model: an actor that dies (its node lost, its process killed) loses nothing. Its shard's
watermark holds the last chunk that is durably in the array, and the other actors take the shard
over: at once on the same host (the dead pid is detected), after the lease TTL across hosts. The
parent polls the catalog for one progress bar and returns when the run is complete; if every actor
has ended and the run is not complete it raises :class:`~sclstore.store.errors.IngestError` naming
what happened to each actor. ``Ctrl-C``/``SIGTERM`` of the parent drains: each actor releases its
shard at the next chunk boundary.

Ray is imported only inside :func:`run_ray_workers` (``pip install 'sclstore[ray]'``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from sclstore.store import Backend, StoreSettings, runtime
from sclstore.store.errors import IngestError, InvalidInputError

__all__ = ["ActorFate", "RayWorker", "run_ray_workers"]

logger = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
"""Object store of a local Ray instance: actors only exchange small reports (Ray's floor is 75 MiB)."""
ACTOR_NAMESPACE = "sclstore"


class RayWorker:
    """The body of a worker actor (wrapped by ``ray.remote`` in :func:`run_ray_workers`).

    Runs as a threaded actor (two slots): :meth:`run` holds one, :meth:`stop` and :meth:`whoami`
    answer on the other while it embeds.
    """

    def __init__(self, uri: str, catalog_url: str, settings: StoreSettings, *, device: str, threads: int | None,
                 workers: int) -> None:
        self._uri = uri
        self._catalog = catalog_url
        self._settings = settings
        self._device = device
        self._threads = threads
        self._workers = workers
        self._stop = threading.Event()

    def whoami(self) -> dict[str, Any]:
        """Host, pid and Ray node of this actor (for logs and tests)."""
        import ray

        return {"host": socket.gethostname(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self) -> None:
        """Drain: release the shard in progress at its next chunk boundary, then return from :meth:`run`."""
        self._stop.set()

    def run(self, run_id: int, poll_s: float) -> dict[str, Any]:
        """Claim and embed shards of ``run_id`` until none is queued or held; return the worker's report."""
        runtime.apply(runtime.decide(self._threads))  # torch is not loaded yet in a fresh actor
        _log_to_stderr()
        from sclstore.store.backend import Backend as _Backend

        from .worker import work

        backend = _Backend.open(self._uri, self._catalog, settings=self._settings)
        try:
            report = work(backend, runs=[run_id], device=self._device, workers=self._workers, stop=self._stop, poll_s=poll_s)
        finally:
            backend.close()
        return report.to_json() | self.whoami()


def _log_to_stderr() -> None:
    """One line per shard in the actor's log (Ray keeps a worker's stderr in its session logs)."""
    for name in ("sclstore.ingest.worker", "sclstore.store.shards"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            lg.addHandler(handler)
        lg.setLevel(logging.INFO)


@dataclass
class ActorFate:
    """What became of one actor."""

    index: int
    state: str = "running"
    """``running``, ``ended`` (returned), ``died`` (process or node lost), ``failed`` (raised)."""
    detail: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.state == "ended":
            r = self.report
            return f"actor {self.index} ended after {r.get('shards', 0)} shard(s), {r.get('cells', 0)} cells on {r.get('host')}"
        return f"actor {self.index} {self.state}" + (f": {self.detail}" if self.detail else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidInputError("--executor ray needs Ray: pip install 'sclstore[ray]' (or use --executor local)") from None
    return ray


def _python_handlers() -> dict[int, Any]:
    """This process's Python-level SIGTERM/SIGINT handlers (main thread only: elsewhere none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    out: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if handler is not None:
            out[signum] = handler
    return out


def _local_init_args(n_workers: int, num_cpus: float, gpu: bool) -> dict[str, Any]:
    """A local Ray instance sized to this process's CPU allowance (never less than the actors reserve)."""
    policy = runtime.active_policy()
    allowance = policy.allowance.cpus if policy is not None else runtime.detect_allowance().cpus
    cpus = max(int(allowance), math.ceil(num_cpus * n_workers), 1)
    args: dict[str, Any] = {"num_cpus": cpus, "object_store_memory": LOCAL_OBJECT_STORE_BYTES, "include_dashboard": False}
    if not gpu:
        args["num_gpus"] = 0
    return args


def run_ray_workers(
    backend: Backend, run_id: int, *, n_workers: int, gpu: bool, threads: int | None, address: str | None = None,
    num_cpus: float = 1.0, device: str | None = None, workers: int = 1, progress: Any = None, poll_s: float = 0.5,
    drain_s: float = 60.0,
) -> list[ActorFate]:
    """Run ``n_workers`` worker actors on ``run_id`` until the run is complete; return each actor's fate.

    Parameters
    ----------
    backend
        The parent's open store: actors open the same URI, catalog and TileDB settings.
    run_id
        A planned (shared) run.
    n_workers
        Worker actors, one per GPU for a GPU run.
    gpu
        Request ``num_gpus=1`` per actor (Ray sets its ``CUDA_VISIBLE_DEVICES``).
    threads
        Torch/BLAS threads per actor; ``None``: as many as the actor's ``num_cpus`` (at least 1).
    address
        The Ray cluster to join (``auto``, ``ray://host:10001``, ``host:6379``); default ``$RAY_ADDRESS``,
        else start a new local Ray instance sized to this process's CPU allowance and shut it down
        afterwards. A process already connected to Ray keeps its connection.
    num_cpus
        CPUs Ray reserves per actor (``--ray-cpus``); small by default so GPU actors fit on any node.
    device
        The device each actor embeds on; default ``cuda`` for a GPU run, else ``cpu``. It is chosen
        independently of the resource request: a cluster with fake GPU resources can run CPU actors.
        It must give the run's pinned precision (an actor refuses otherwise).
    workers
        Tokenizer processes per actor (0: in the actor).
    progress
        Object with ``advance(n)``: fed from the run's watermark in the catalog (one bar for all actors).
    poll_s
        How often the parent reads the catalog and the actors poll for claimable shards.
    drain_s
        On interrupt, how long actors get to release their shards before they are killed.

    Raises
    ------
    IngestError
        If every actor ended (died, failed, or found nothing to claim) and the run is not complete,
        or if the run failed or was cancelled meanwhile.
    InvalidInputError
        If Ray is not installed, or a GPU run is asked of a local Ray instance without GPUs.
    """
    ray = _import_ray()
    if n_workers < 1:
        raise InvalidInputError(f"n_workers={n_workers} must be at least 1")
    if num_cpus < 0:
        raise InvalidInputError(f"--ray-cpus {num_cpus} must be >= 0")
    device = device or ("cuda" if gpu else "cpu")
    owns = not ray.is_initialized()
    local = False
    handlers = _python_handlers()
    signalled: list[int] = []
    if owns:
        address = address or os.environ.get("RAY_ADDRESS") or None  # a Ray job's driver joins its cluster
        # "local": a new instance even when another runs on this machine (plain ray.init() would join that one)
        local = not address
        kwargs = {"address": address} if address else {"address": "local", **_local_init_args(n_workers, num_cpus, gpu)}
        try:
            ray.init(log_to_driver=False, namespace=ACTOR_NAMESPACE, **kwargs)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
            raise IngestError(f"could not {where} ({_first_line(exc)}): check --ray-address; the run {run_id} is planned and "
                              "`sclstore work` anywhere can embed it") from None
    # Ray's core worker installs a C handler that aborts on SIGTERM, and an exception raised by a
    # Python handler inside ray.wait surfaces as a SystemError: note the signal, drain, then deliver it
    _note_signals(handlers, signalled)
    try:
        return _drive(ray, backend, run_id, n_workers=n_workers, gpu=gpu, threads=threads, num_cpus=num_cpus, device=device,
                      workers=workers, progress=progress, poll_s=poll_s, drain_s=drain_s, signalled=signalled, local=local)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if owns:
            ray.shutdown()  # a local instance stops; a joined cluster is only disconnected from
        if signalled:
            _deliver(signalled[0], handlers)


class _Signalled(BaseException):
    """SIGTERM/SIGINT reached the parent: drain the actors, then deliver it to the previous handler."""


def _note_signals(handlers: dict[int, Any], signalled: list[int]) -> None:
    def note(signum: int, frame: Any) -> None:
        signalled.append(signum)

    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is signal.SIG_IGN else note)


def _deliver(signum: int, handlers: dict[int, Any]) -> None:
    """Hand a noted signal to the handler that was in force (the CLI's raises ``Interrupted``)."""
    handler = handlers.get(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action, now that the actors have drained


def _drive(
    ray: Any, backend: Backend, run_id: int, *, n_workers: int, gpu: bool, threads: int | None, num_cpus: float, device: str,
    workers: int, progress: Any, poll_s: float, drain_s: float, signalled: list[int], local: bool,
) -> list[ActorFate]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpu and gpus < 1 and local:
        raise InvalidInputError("this machine's local Ray instance has no GPU: use --devices cpu,... or join a GPU cluster "
                                "with --ray-address")
    if gpu and gpus < 1:  # an autoscaling cluster may add GPU nodes when the actors ask
        logger.warning("the Ray cluster has no GPU now: the %d GPU actors wait for one (Ctrl-C to stop)", n_workers)
    elif gpu and gpus < n_workers:
        logger.warning("%d GPU actors asked for, the Ray cluster has %g GPUs: the others wait for one", n_workers, gpus)
    actor_threads = threads if threads is not None else max(1, int(num_cpus))
    actor_cls = ray.remote(num_gpus=1 if gpu else 0, num_cpus=num_cpus, max_concurrency=2, max_restarts=0)(RayWorker)
    actors = [actor_cls.options(name=f"run{run_id}-worker{i}-{os.getpid()}").remote(
                  backend.location.uri, backend.catalog_url, backend.settings, device=device, threads=actor_threads, workers=workers)
              for i in range(n_workers)]
    refs = {actor.run.remote(run_id, poll_s): i for i, actor in enumerate(actors)}
    fates = [ActorFate(i) for i in range(n_workers)]
    logger.info("run %s: %d Ray worker actors (num_gpus=%d, num_cpus=%g, %d threads) embedding on %s", run_id, n_workers,
                1 if gpu else 0, num_cpus, actor_threads, device)
    seen = backend.get_run(run_id).watermark
    try:
        pending = list(refs)
        while True:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s) if pending else ([], [])
            if signalled:
                raise _Signalled()
            for ref in ready:
                _settle(ray, ref, fates[refs[ref]])
            run = backend.get_run(run_id)
            if progress is not None and run.watermark > seen:
                progress.advance(run.watermark - seen)
                seen = run.watermark
            if run.status in ("complete", "failed", "cancelled"):
                break
            if not pending:
                what = "; ".join(f.describe() for f in fates)
                raise IngestError(f"run {run_id} is {run.status} at {run.watermark}/{run.n_cells} cells but every Ray worker "
                                  f"actor has ended ({what}): rerun the same command to resume it")
        # the run is settled: the other actors see nothing left and return within a poll
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=max(10.0, 5 * poll_s)) if pending else ([], [])
        for ref in ready:
            _settle(ray, ref, fates[refs[ref]])
    except _Signalled:
        logger.warning("run %s: draining %d Ray worker actors (each releases its shard at its next chunk)", run_id, len(actors))
        _drain(ray, actors, list(refs), drain_s)
        return fates
    except BaseException:
        _drain(ray, actors, list(refs), drain_s)
        raise
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception as exc:  # already gone
                logger.debug("ray.kill: %s", exc)
    for f in fates:
        logger.info("run %s: %s", run_id, f.describe())
    return fates


def _settle(ray: Any, ref: Any, fate: ActorFate) -> None:
    try:
        fate.report = ray.get(ref)
        fate.state = "ended"
    except ray.exceptions.RayActorError as exc:  # the process or its node is gone
        fate.state, fate.detail = "died", _first_line(exc)
        logger.warning("Ray worker actor %d died (%s); the other actors take over its shard", fate.index, fate.detail)
    except ray.exceptions.RayTaskError as exc:  # work() raised
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        fate.state, fate.detail = "failed", f"{type(cause).__name__}: {_first_line(cause)}"
        logger.warning("Ray worker actor %d failed: %s", fate.index, fate.detail)
    except ray.exceptions.RayError as exc:  # e.g. its owner or object lost
        fate.state, fate.detail = "died", f"{type(exc).__name__}: {_first_line(exc)}"
        logger.warning("Ray worker actor %d lost: %s", fate.index, fate.detail)


def _drain(ray: Any, actors: list[Any], refs: list[Any], drain_s: float) -> None:
    """Ask every actor to release its shard at the next chunk boundary; wait up to ``drain_s``."""
    for actor in actors:
        try:
            actor.stop.remote()
        except Exception as exc:
            logger.debug("stop: %s", exc)
    try:
        ray.wait(refs, num_returns=len(refs), timeout=drain_s)
    except Exception as exc:
        logger.debug("drain: %s", exc)
