"""Process lifecycle of an ingest: workers die with their parent; signals end a run cleanly.

Worker side (:func:`worker_setup`, the tokenizer pool's initializer): on Linux the kernel sends
``SIGKILL`` to the worker when its parent dies by any means (``PR_SET_PDEATHSIG``), and a
watchdog thread also exits the worker as soon as its parent pid changes (re-parenting), so no
worker outlives its parent by more than a second and none keeps the caller's stdout/stderr
pipes open. Workers ignore ``SIGINT`` and ``SIGTERM``: a Ctrl-C reaches the whole process group,
and so does a Slurm or ``kill -- -PGID`` SIGTERM; the parent gets the same signal and shuts its
workers down. A worker that died of the signal could die between the two writes of a large reply
(its length, then its bytes), and the pool's result reader in the parent would then wait forever
for the missing bytes: the parent would never exit (CPython's ``ProcessPoolExecutor``).

Parent side (:func:`signals_as_exceptions`, used by the CLI): the first ``SIGTERM``/``SIGINT``
raises :class:`Interrupted` in the main thread, so the pipeline's cleanup runs (writer stopped
after the chunk in flight, run marked failed = resumable, lease released, workers shut down);
further signals are ignored until the cleanup is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

__all__ = ["Interrupted", "die_with_parent", "exit_code", "signals_as_exceptions", "signals_as_stop", "signals_blocked", "worker_setup"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The process received SIGTERM or SIGINT (a ``BaseException``: ``except Exception`` lets it through)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum`` (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


def die_with_parent(parent_pid: int, *, poll_s: float = 0.5) -> None:
    """Make the calling (child) process exit when ``parent_pid`` stops being its parent.

    ``PR_SET_PDEATHSIG(SIGKILL)`` on Linux, plus a daemon thread that polls ``os.getppid()``
    (every platform; also covers a parent that died before the ``prctl``).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:  # pragma: no cover - exotic libc
            logger.debug("prctl unavailable: %s", exc)
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="sclstore-parent-watch", daemon=True).start()


def worker_setup(parent_pid: int) -> None:
    """Initializer of a tokenizer worker: die with the parent, leave SIGINT and SIGTERM to the parent.

    The worker starts with both signals blocked (:func:`signals_blocked` around the fork), so the
    parent's handlers it inherits never run in it; they are ignored, then unblocked.
    """
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT and SIGTERM pending in the calling thread (and in processes it forks) for the block.

    A signal that arrives meanwhile is delivered when the block ends. A no-op where signal masks
    do not exist (Windows).
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def signals_as_exceptions(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn the first of ``signums`` into :class:`Interrupted` in the main thread; ignore the rest.

    Outside the main thread this does nothing (Python delivers signals to the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_as_stop(
    stop: threading.Event, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[list[int]]:
    """Drain on the first of ``signums``: set ``stop`` (a worker finishes the chunk in flight and
    releases its shard); a second signal raises :class:`Interrupted`. Yields the signals received."""
    fired: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        fired.append(signum)
        if len(fired) == 1:
            logger.warning("%s: finishing the chunk in flight, then releasing the shard (again to stop now)",
                           signal.Signals(signum).name)
            stop.set()
            return
        if len(fired) == 2:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield fired
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
