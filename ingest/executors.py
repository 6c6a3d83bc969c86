"""Executors for ``sclstore ingest --devices``: one worker per device, one progress bar over all shards.

``local`` starts one ``sclstore work RUN`` process per device, each seeing only its GPU
(``CUDA_VISIBLE_DEVICES``) and its share of this process's CPUs (``--threads``); the processes die
with this one (``PR_SET_PDEATHSIG``) and get SIGTERM when it is interrupted, so they release their
shards at the next chunk boundary. ``ray`` places one worker actor per GPU on a Ray cluster
(:mod:`.ray_executor`). Either way the workers run the same claim loop (:func:`.worker.work`), and
this process plans the run, watches the catalog and reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from sclstore.store import Backend, IngestConfig, runtime
from sclstore.store.errors import IngestError, InvalidInputError

from .anndata_source import is_anndata
from .lifecycle import die_with_parent
from .plan import plan_run
from .progress import make_progress

__all__ = ["ingest_on_devices", "normalise_devices", "worker_command"]

logger = logging.getLogger(__name__)


def normalise_devices(devices: Sequence[str]) -> list[str]:
    """Validate ``--devices``: all CPU or all CUDA (``cuda:N`` or ``cuda``), since precision follows the device.

    >>> normalise_devices(["cuda:0", "cuda:1"])
    ['cuda:0', 'cuda:1']
    """
    out = [d.strip() for d in devices if d.strip()]
    if not out:
        raise InvalidInputError("--devices is empty: name devices, e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu")
    for d in out:
        if d != "cpu" and d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise InvalidInputError(f"--devices entry {d!r} is not cpu, cuda or cuda:N")
    if len({d == "cpu" for d in out}) > 1:
        raise InvalidInputError("--devices mixes cpu and cuda: their precisions differ, so a run uses one kind; use one kind")
    return out


def worker_command(backend: Backend, run_id: int, device: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of a local worker process for ``device``.

    The catalog URL and TileDB settings (which may hold credentials) go through the environment,
    not the command line other users can read.
    """
    env = dict(os.environ)
    env["SCLSTORE_CATALOG"] = backend.catalog_url
    tdb = backend.settings.tiledb_config
    if tdb:
        env["SCLSTORE_TILEDB_CONFIG"] = " ".join(f"{k}={v}" for k, v in tdb.items())
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    argv = [sys.executable, "-m", "sclstore.cli", "work", str(run_id), "--store", backend.location.uri, "--device", device,
            "--threads", str(threads), "--no-progress"]
    return argv, env


def _preexec() -> None:  # pragma: no cover - runs in the child
    die_with_parent(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the group; the parent sends SIGTERM


def ingest_on_devices(
    backend: Backend, path: Any, config: IngestConfig, *, devices: Sequence[str], executor: str, ray_address: str | None,
    source_label: str | None, t0: float, ray_cpus: float = 1.0,
) -> Any:
    """Plan the run, run one worker per device until it is complete, return its ``IngestResult``."""
    from .pipeline import _result

    devices = normalise_devices(devices)
    if is_anndata(path):
        raise InvalidInputError("--devices needs a .h5ad path every worker can open (an in-memory AnnData lives in this process)")
    policy = runtime.active_policy()
    if policy is None or not policy.enabled:
        threads = max(1, (os.cpu_count() or 1) // len(devices))
    else:  # the allowance is shared by the workers; a number the user chose applies to each
        threads = policy.split(len(devices)) if policy.source == "allowance" else policy.threads
    chosen = policy is not None and policy.enabled and policy.source != "allowance"
    # a CPU run pins its threads per batch (one); each worker runs as many batches at once as its
    # threads (on a joined Ray cluster: the CPUs Ray reserves for an actor, unless the user chose)
    with contextlib.ExitStack() as stack:
        plan = plan_run(backend, path, config, stack=stack, source_label=source_label, device=devices[0], shared=True,
                        min_shards=4 * len(devices))
    run = plan.run
    if plan.cache_hit:
        return _result(run, cache_hit=True, embedded=0, t0=t0, device=",".join(devices), mapping=plan.mapping)
    start = run.watermark
    if executor == "ray":
        from .ray_executor import run_ray_workers

        with make_progress(f"ingest {run.dataset_name}", total=run.n_cells, done=start, enabled=config.progress) as progress:
            run_ray_workers(backend, run.id, n_workers=len(devices), gpu=devices[0] != "cpu",
                            threads=threads if ray_address is None or chosen else None, address=ray_address, num_cpus=ray_cpus,
                            workers=config.workers, progress=progress)
    else:
        _run_local(backend, run.id, devices, threads, progress=config.progress, start=start, label=run.dataset_name)
    run = backend.get_run(run.id)
    if run.status != "complete":
        raise IngestError(f"run {run.id} is {run.status} after its workers ended ({run.error or 'see sclstore status'}): "
                          "rerun the same command to resume it")
    return _result(run, cache_hit=False, embedded=run.n_cells - start, t0=t0, device=",".join(devices), mapping=plan.mapping)


def _run_local(backend: Backend, run_id: int, devices: Sequence[str], threads: int, *, progress: bool, start: int, label: str) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    run = backend.get_run(run_id)
    try:
        for device in devices:
            argv, env = worker_command(backend, run_id, device, threads)
            procs.append(subprocess.Popen(argv, env=env, preexec_fn=_preexec, stdout=subprocess.DEVNULL))
        logger.info("run %s: %d local workers on %s", run_id, len(procs), ",".join(devices))
        with make_progress(f"ingest {label}", total=run.n_cells, done=start, enabled=progress) as bar:
            seen = start
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                now = backend.get_run(run_id).watermark
                if now > seen:
                    bar.advance(now - seen)
                    seen = now
            now = backend.get_run(run_id).watermark  # what the workers did after the last look
            if now > seen:
                bar.advance(now - seen)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        logger.warning("%d of %d workers exited with status %s", len(failed), len(procs), failed)
