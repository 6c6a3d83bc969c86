"""The thread policy: how many threads this process may run, decided once, applied everywhere.

A shared lab machine rarely gives a process all of ``os.cpu_count()``: ``taskset``/Slurm pin it
to some cores, a container or systemd slice caps it with a cgroup CPU quota, a Slurm task was
granted ``--cpus-per-task``. Thread pools sized to the host and spin-waiting OpenMP threads then
fight the other load (measured: a forward pass 1-10x slower, erratic). This module

1. measures the **allowance**: the CPUs this process may use, the smallest of its affinity mask
   (``os.sched_getaffinity``), its cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
   ``cpu.cfs_period_us``, every ancestor cgroup too) and its Slurm allocation
   (``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE``);
2. chooses the **threads per local worker** (:func:`decide`): ``--threads N`` (``threads=``), else
   ``$SCLSTORE_THREADS``, else a thread count the user already set in ``OMP_NUM_THREADS`` /
   ``MKL_NUM_THREADS`` / ..., else the allowance divided among the local workers (at least 1);
3. **applies** it (:func:`apply`) before any pool starts: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP
   threads sleep instead of spinning against other processes) unless the user set it, and the
   same for OpenBLAS's own pthreads pool (numpy's and scipy's BLAS ignore ``OMP_WAIT_POLICY`` and
   spin ~0.1 s after every call): ``OPENBLAS_THREAD_TIMEOUT=4`` unless the user set it; the
   standard thread variables (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
   ``NUMEXPR_NUM_THREADS``, ``VECLIB_MAXIMUM_THREADS``, ``NUMBA_NUM_THREADS``, ``BLIS_NUM_THREADS``)
   unless the user set them (a variable the user set is never changed); and, for libraries
   already loaded, ``torch.set_num_threads`` / ``set_num_interop_threads``, threadpoolctl (BLAS
   and OpenMP pools) and ``numba.set_num_threads``. :func:`apply` is idempotent: call it before
   importing torch (so OpenMP starts passive and right-sized) and again after.

Parallel work inside one process divides the threads further: :meth:`ThreadPolicy.split` gives
the threads per job so that jobs x threads never exceeds the policy's threads, and
:meth:`ThreadPolicy.cap_jobs` caps a requested job count at the threads available.

``SCLSTORE_THREADS=off`` disables the policy (nothing is set; the libraries' own defaults, i.e.
the behaviour before this module existed). Bad values of ``--threads`` / ``$SCLSTORE_THREADS``
raise :class:`~sclstore.store.errors.InvalidInputError`. An unreadable or garbled cgroup file or
Slurm variable is **ignored with a logged warning** (that limit counts as absent) and never
crashes; a fractional cgroup quota rounds up (``150000 100000`` -> 2 CPUs: the whole cgroup is
throttled together, so the second thread adds throughput), with at least 1 CPU.

Worker processes: tokenizer workers forked by ingest run single-threaded (they set 1 thread
themselves); a future multi-process path passes ``workers=N`` so each gets ``allowance // N``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

__all__ = [
    "BLAS_WAIT_VAR",
    "THREAD_VARS",
    "CpuAllowance",
    "ThreadPolicy",
    "active_policy",
    "apply",
    "configure",
    "decide",
    "detect_allowance",
    "parse_threads",
]

logger = logging.getLogger(__name__)

#: Thread-count variables of the common native pools (OpenMP, MKL, OpenBLAS, numexpr, Accelerate,
#: numba, BLIS). A variable the user set wins and is never overwritten.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "BLIS_NUM_THREADS",
)
WAIT_VAR = "OMP_WAIT_POLICY"
#: OpenBLAS's own (pthreads) pool, numpy's and scipy's BLAS, ignores ``OMP_WAIT_POLICY``: its idle
#: threads spin for 2**28 cycles (~0.1 s) after every call before they sleep. ``4`` (2**4 cycles,
#: OpenBLAS's minimum) is its passive waiting; set with PASSIVE unless the user set a value.
BLAS_WAIT_VAR = "OPENBLAS_THREAD_TIMEOUT"
BLAS_PASSIVE_TIMEOUT = "4"
ENV_THREADS = "SCLSTORE_THREADS"
#: Names of the variables sclstore itself set (so a child process, or a second call, can tell
#: them from the user's).
_OWNED_VAR = "_SCLSTORE_SET_VARS"
_CGROUP_ROOT = "/sys/fs/cgroup"
_ACTIVE: ThreadPolicy | None = None


# ------------------------------------------------------------------------------ allowance
@dataclass(frozen=True)
class CpuAllowance:
    """The CPUs this process may use and which limit decided it.

    Attributes
    ----------
    cpus
        The allowance (>= 1): the smallest of the limits found.
    bound_by
        ``"affinity"``, ``"cgroup"``, ``"slurm"`` or ``"host"`` (no limit below the host's count).
    host
        ``os.cpu_count()``.
    affinity, cgroup, slurm
        Each limit in CPUs (``cgroup`` may be fractional, e.g. 1.5), or None where absent.
    cgroup_source
        The file the cgroup quota came from.
    warnings
        Limits that could not be read, and why (each was also logged).
    """

    cpus: int
    bound_by: str
    host: int
    affinity: int | None = None
    cgroup: float | None = None
    cgroup_source: str | None = None
    slurm: int | None = None
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        """e.g. ``2 CPUs (cgroup quota 1.5 CPUs in /sys/fs/cgroup/cpu.max; host has 16)``."""
        what = {
            "affinity": f"CPU affinity {self.affinity}",
            "cgroup": f"cgroup quota {self.cgroup:g} CPUs in {self.cgroup_source}" if self.cgroup is not None else "cgroup quota",
            "slurm": f"Slurm allocation {self.slurm}",
            "host": "no affinity, cgroup or Slurm limit",
        }[self.bound_by]
        return f"{self.cpus} CPU{'s' if self.cpus != 1 else ''} ({what}; host has {self.host})"


def _read_affinity() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return None
    try:
        return len(getter(0)) or None
    except OSError:
        return None


def _parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max``: ``"max 100000"`` -> None; ``"150000 100000"`` -> 1.5."""
    parts = text.split()
    if len(parts) not in (1, 2) or not parts[0]:
        raise ValueError(f"expected 'QUOTA PERIOD', got {text.strip()[:60]!r}")
    if parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) == 2 else 100000
    if quota <= 0 or period <= 0:
        raise ValueError(f"non-positive quota or period in {text.strip()[:60]!r}")
    return quota / period


def _parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` of -1 means no limit."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        raise ValueError(f"non-positive quota or period ({quota} / {period})")
    return quota / period


def _self_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) from ``/proc/self/cgroup``."""
    v2 = v1 = None
    for line in proc_cgroup.read_text().splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _ancestors(root: Path, rel: str) -> list[Path]:
    """The cgroup folder of ``rel`` under ``root`` and every parent up to ``root`` (existing ones)."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_cgroup(root: Path, proc_cgroup: Path, warns: list[str]) -> tuple[float | None, str | None]:
    """The tightest CPU quota over this process's cgroup and its ancestors (v2, else v1)."""
    try:
        v2, v1 = _self_cgroups(proc_cgroup) if proc_cgroup.exists() else ("/", None)
    except (OSError, UnicodeDecodeError) as exc:
        warns.append(f"cannot read {proc_cgroup} ({exc}); assuming the root cgroup")
        v2, v1 = "/", None
    best: tuple[float | None, str | None] = (None, None)

    def consider(value: float | None, src: Path) -> None:
        nonlocal best
        if value is not None and (best[0] is None or value < best[0]):
            best = (value, str(src))

    candidates: list[tuple[str, Path]] = []
    if v2 is not None:
        candidates += [("v2", d / "cpu.max") for d in _ancestors(root, v2)]
    if v1 is not None:
        for mount in (root / "cpu,cpuacct", root / "cpu", root / "cpuacct,cpu"):
            if mount.is_dir():
                dirs = _ancestors(mount, v1) or [mount]
                candidates += [("v1", d / "cpu.cfs_quota_us") for d in dirs]
                break
    for kind, path in candidates:
        if not path.exists():
            continue
        try:
            if kind == "v2":
                consider(_parse_cpu_max(path.read_text()), path)
            else:
                consider(_parse_cfs(path.read_text(), (path.parent / "cpu.cfs_period_us").read_text()), path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            msg = f"ignoring unreadable cgroup CPU quota {path}: {exc}"
            warns.append(msg)
    return best


def _read_slurm(env: Mapping[str, str], warns: list[str]) -> int | None:
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw.strip())
            if value <= 0:
                raise ValueError
        except ValueError:
            warns.append(f"ignoring {var}={raw!r}: not a positive whole number")
            continue
        return value
    return None


def detect_allowance(
    *,
    env: Mapping[str, str] | None = None,
    affinity: int | bool | None = True,
    cgroup_root: str | os.PathLike[str] = _CGROUP_ROOT,
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
    host: int | None = None,
) -> CpuAllowance:
    """The CPUs this process may use: affinity ∩ cgroup quota ∩ Slurm allocation.

    Parameters
    ----------
    env
        Environment to read Slurm variables from (default ``os.environ``).
    affinity
        CPUs in the affinity mask; ``True`` reads ``os.sched_getaffinity(0)``, None means unknown.
    cgroup_root, proc_cgroup
        The cgroup file system and this process's cgroup file (injectable for tests).
    host
        The host's CPU count (default ``os.cpu_count()``).

    Unreadable or garbled limits are skipped with a logged warning (listed in ``warnings``).
    """
    env = os.environ if env is None else env
    host_n = host if host is not None else (os.cpu_count() or 1)
    aff = _read_affinity() if affinity is True else (None if affinity is False else affinity)
    warns: list[str] = []
    quota, src = _read_cgroup(Path(cgroup_root), Path(proc_cgroup), warns)
    slurm = _read_slurm(env, warns)
    for w in warns:
        logger.warning("%s", w)
    limits: list[tuple[int, str]] = [(host_n, "host")]
    if aff is not None:
        limits.append((aff, "affinity"))
    if quota is not None:
        limits.append((max(1, math.ceil(quota - 1e-9)), "cgroup"))
    if slurm is not None:
        limits.append((slurm, "slurm"))
    # The smallest limit; on a tie the more specific one (affinity, cgroup, slurm) is named.
    order = {"affinity": 0, "cgroup": 1, "slurm": 2, "host": 3}
    cpus, bound = min(limits, key=lambda t: (t[0], order[t[1]]))
    return CpuAllowance(cpus=max(1, cpus), bound_by=bound, host=host_n, affinity=aff, cgroup=quota,
                        cgroup_source=src, slurm=slurm, warnings=tuple(warns))


# ------------------------------------------------------------------------------ policy
@dataclass(frozen=True)
class ThreadPolicy:
    """What sclstore runs each local worker's thread pools at, and why.

    Attributes
    ----------
    threads
        Threads per local worker (torch intra-op, OpenMP, BLAS, numba); >= 1.
    workers
        Local worker processes sharing the allowance (1 for one process).
    source
        What chose ``threads``: ``"--threads"``, ``"SCLSTORE_THREADS"``, the user's variable
        (e.g. ``"OMP_NUM_THREADS"``), ``"allowance"``, or ``"off"`` (policy disabled).
    allowance
        The measured :class:`CpuAllowance`.
    wait_policy
        The ``OMP_WAIT_POLICY`` in force (``PASSIVE`` unless the user set another); with
        ``PASSIVE``, OpenBLAS's pool waits passively too (``OPENBLAS_THREAD_TIMEOUT=4``, see
        :attr:`blas_wait`).
    user_vars
        Thread variables the user set (kept as they are).
    """

    threads: int
    workers: int
    source: str
    allowance: CpuAllowance
    wait_policy: str | None = "PASSIVE"
    user_vars: Mapping[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.source != "off"

    @property
    def blas_wait(self) -> str | None:
        """The ``OPENBLAS_THREAD_TIMEOUT`` in force: the user's, else ``4`` (sleep at once) with
        passive waiting, else None (OpenBLAS's default: spin ~0.1 s after every call)."""
        if BLAS_WAIT_VAR in self.user_vars:
            return self.user_vars[BLAS_WAIT_VAR]
        if self.enabled and (self.wait_policy or "").upper() == "PASSIVE":
            return BLAS_PASSIVE_TIMEOUT
        return None

    @property
    def reason(self) -> str:
        """One line: what bound the thread count."""
        if not self.enabled:
            return "policy disabled by SCLSTORE_THREADS=off: libraries use their own defaults"
        allowed = self.allowance.describe()
        if self.source == "allowance":
            share = f" shared by {self.workers} local workers" if self.workers > 1 else ""
            return f"{self.threads} thread{'s' if self.threads != 1 else ''} per worker: allowance {allowed}{share}"
        extra = ""
        if self.threads * self.workers > self.allowance.cpus:
            extra = f"; more than the allowance of {self.allowance.cpus}"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} per worker set by {self.source}{extra} (allowance {allowed})"

    def split(self, jobs: int) -> int:
        """Threads per job when ``jobs`` run in parallel inside one worker.

        ``jobs * split(jobs) <= threads`` whenever ``jobs <= threads``; cap ``jobs`` with
        :meth:`cap_jobs` first so the product never exceeds the allowance.
        """
        if jobs < 1:
            raise InvalidInputError(f"jobs={jobs} must be at least 1")
        return max(1, self.threads // jobs)

    def cap_jobs(self, jobs: int) -> int:
        """``jobs`` capped at this worker's threads (at least 1)."""
        if jobs < 1:
            raise InvalidInputError(f"jobs={jobs} must be at least 1")
        return max(1, min(jobs, self.threads))

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "workers": self.workers,
            "source": self.source,
            "enabled": self.enabled,
            "reason": self.reason,
            "omp_wait_policy": self.wait_policy,
            "openblas_thread_timeout": self.blas_wait,
            "user_vars": dict(self.user_vars),
            "allowance": asdict(self.allowance) | {"warnings": list(self.allowance.warnings)},
        }


def parse_threads(value: object, what: str = "--threads") -> int | None:
    """A thread count from an option or variable: None/``""``/``auto`` -> None; else an int >= 1.

    Raises
    ------
    InvalidInputError
        For 0, a negative or a non-integer value (one line naming the fix).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{what}={value!r} is not a thread count: give a whole number >= 1 (or auto)")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        if text == "" or text.lower() == "auto":
            return None
        try:
            n = int(text)
        except ValueError:
            raise InvalidInputError(f"{what}={text!r} is not a thread count: give a whole number >= 1 (or auto)") from None
    if n < 1:
        raise InvalidInputError(f"{what}={n} is not a thread count: give a whole number >= 1 (or auto)")
    return n


def _owned(env: Mapping[str, str]) -> set[str]:
    return {v for v in env.get(_OWNED_VAR, "").split(",") if v}


def _user_thread_vars(env: Mapping[str, str]) -> dict[str, str]:
    owned = _owned(env)
    return {v: env[v] for v in (*THREAD_VARS, WAIT_VAR, BLAS_WAIT_VAR) if v in env and v not in owned}


def _first_int(text: str) -> int | None:
    """``"4"`` -> 4; libgomp's nested list ``"4,2"`` -> 4; garbage -> None."""
    head = text.strip().split(",")[0].strip()
    try:
        n = int(head)
    except ValueError:
        return None
    return n if n >= 1 else None


def decide(
    threads: int | str | None = None,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    allowance: CpuAllowance | None = None,
) -> ThreadPolicy:
    """Choose the threads per local worker (see the module docstring for the order).

    Parameters
    ----------
    threads
        An explicit ``--threads`` value (int or text); None for automatic.
    workers
        Local worker processes that each run a thread pool at the same time.
    env
        Environment (default ``os.environ``).
    allowance
        A measured allowance (default :func:`detect_allowance` on ``env``).

    Raises
    ------
    InvalidInputError
        For a bad ``threads``, ``$SCLSTORE_THREADS`` or ``workers``.
    """
    env = os.environ if env is None else env
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers={workers!r} must be a whole number >= 1")
    explicit = parse_threads(threads, "--threads")
    raw_env = env.get(ENV_THREADS)
    off = raw_env is not None and raw_env.strip().lower() == "off" and explicit is None
    from_env = None if off or explicit is not None else parse_threads(raw_env, ENV_THREADS)
    allowance = allowance if allowance is not None else detect_allowance(env=env)
    user = _user_thread_vars(env)
    wait = env.get(WAIT_VAR) if WAIT_VAR in user or off else "PASSIVE"
    if off:
        return ThreadPolicy(threads=max(1, allowance.cpus // workers), workers=workers, source="off", allowance=allowance,
                            wait_policy=wait, user_vars=user)
    if explicit is not None:
        n, source = explicit, "--threads"
    elif from_env is not None:
        n, source = from_env, ENV_THREADS
    else:
        n, source = max(1, allowance.cpus // workers), "allowance"
        for var in THREAD_VARS:
            if var in user and (k := _first_int(user[var])) is not None:
                n, source = k, var
                break
    return ThreadPolicy(threads=n, workers=workers, source=source, allowance=allowance, wait_policy=wait, user_vars=user)


# ------------------------------------------------------------------------------ apply
def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime is mapped into this process already (Linux; else a guess)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return any(m in sys.modules for m in ("torch", "sklearn", "numba"))
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp"))


def apply(policy: ThreadPolicy, *, environ: MutableMapping[str, str] | None = None) -> ThreadPolicy:
    """Set the environment and the loaded libraries' pools to ``policy`` (idempotent).

    Variables the user set are left alone. Torch, threadpoolctl and numba are touched only when
    already imported (importing them here would cost every command their start-up time); call
    :func:`apply` again after importing torch. Returns ``policy`` and records it as the active one.
    """
    global _ACTIVE
    env = os.environ if environ is None else environ
    _ACTIVE = policy
    if not policy.enabled:
        return policy
    owned = _owned(env)
    wanted = {v: str(policy.threads) for v in THREAD_VARS} | {WAIT_VAR: "PASSIVE"}
    if policy.blas_wait == BLAS_PASSIVE_TIMEOUT:
        wanted[BLAS_WAIT_VAR] = BLAS_PASSIVE_TIMEOUT
    elif BLAS_WAIT_VAR in owned:  # the user chose active OpenMP waiting since: OpenBLAS's default too
        env.pop(BLAS_WAIT_VAR, None)
        owned.discard(BLAS_WAIT_VAR)
    for var, value in wanted.items():
        if var in env and var not in owned:
            continue  # the user's choice wins
        if var == WAIT_VAR and var not in env and _openmp_loaded():
            logger.info("OpenMP was loaded before sclstore set OMP_WAIT_POLICY=PASSIVE; it applies to child processes only")
        env[var] = value
        owned.add(var)
    env[_OWNED_VAR] = ",".join(sorted(owned))
    if environ is None:
        _apply_loaded(policy.threads)
    return policy


def _apply_loaded(n: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        try:
            if torch.get_num_interop_threads() != n:
                torch.set_num_interop_threads(n)
        except RuntimeError:  # only settable before the first inter-op parallel work
            logger.debug("torch inter-op threads already started; left at %d", torch.get_num_interop_threads())
    if any(m in sys.modules for m in ("numpy", "scipy", "sklearn", "torch")):
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=n)
        except Exception as exc:
            logger.debug("threadpoolctl could not set %d threads: %s", n, exc)
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "set_num_threads"):
        try:
            numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))
        except Exception as exc:
            logger.debug("numba could not set %d threads: %s", n, exc)


def configure(threads: int | str | None = None, *, workers: int = 1) -> ThreadPolicy:
    """:func:`decide` on this process's environment, then :func:`apply` it (the one entry point)."""
    return apply(decide(threads, workers=workers))


def active_policy() -> ThreadPolicy | None:
    """The policy last applied in this process (None before any)."""
    return _ACTIVE
