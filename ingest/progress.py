"""Progress reporting on stderr: a rich bar in a terminal, one plain line every few seconds
otherwise (batch jobs, log files), and a null object for quiet runs.

The pipeline advances it once per model batch, so a small ingest moves too. The interval of
plain lines is ``$SCLSTORE_PROGRESS_INTERVAL`` seconds (default 10; 0 = a line per batch).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["CellProgress", "PlainProgress", "make_progress", "progress_interval"]

DEFAULT_INTERVAL_S = 10.0


class CellProgress(Protocol):
    def __enter__(self) -> CellProgress: ...
    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...
    def advance(self, n: int) -> None: ...


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def advance(self, n: int) -> None:
        return None


class _CellsPerSecond(TextColumn):
    def __init__(self, start: int) -> None:
        super().__init__("")
        self._start = start

    def render(self, task):  # type: ignore[no-untyped-def]
        elapsed = task.finished_time if task.finished else task.elapsed
        done = task.completed - self._start
        return "" if not elapsed or done <= 0 else f"{done / elapsed:,.0f} cells/s"


class _Rich:
    def __init__(self, description: str, total: int, done: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            _CellsPerSecond(done),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=done)

    def __enter__(self) -> _Rich:
        self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$SCLSTORE_PROGRESS_INTERVAL`` or 10."""
    raw = os.environ.get("SCLSTORE_PROGRESS_INTERVAL", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


class PlainProgress:
    """One line per ``interval`` seconds (and a last one at the end) on a text stream.

    ``ingest pbmc: 1,024/5,000 cells (20.5%), 87 cells/s, elapsed 0:00:12, ETA 0:00:46``.
    Thread-safe; the clock starts when the context is entered.
    """

    def __init__(self, description: str, total: int, done: int = 0, *, interval: float | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.start, self.done = description, int(total), int(done), int(done)
        self.interval = progress_interval() if interval is None else float(interval)
        self._stream = stream
        self._clock = clock
        self._t0 = self._last = 0.0
        self._lock = threading.Lock()
        self._printed = -1

    def __enter__(self) -> PlainProgress:
        self._t0 = self._clock()
        self._line(self._t0)  # a log shows the job started (and where a resumed run starts)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.done != self._printed:
            self._line(self._clock(), final=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += int(n)
            now = self._clock()
            if now - self._last >= self.interval:
                self._line(now)

    def _line(self, now: float, *, final: bool = False) -> None:
        self._last, self._printed = now, self.done
        elapsed = now - self._t0
        new = self.done - self.start
        rate = new / elapsed if elapsed > 0 and new > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = _clock(left / rate) if rate > 0 and left > 0 else ("0:00:00" if left <= 0 else "?")
        line = (f"{self.description}: {self.done:,}/{self.total:,} cells ({pct:.1f}%), {rate:,.0f} cells/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def make_progress(description: str, *, total: int, done: int = 0, enabled: bool, stream: TextIO | None = None) -> CellProgress:
    """Progress on stderr: a rich bar (cells, cells/s, ETA) when stderr is a terminal, plain
    lines every :func:`progress_interval` seconds otherwise, or a silent null object."""
    if not enabled:
        return _Null()
    target = stream if stream is not None else sys.stderr
    if getattr(target, "isatty", lambda: False)():
        return _Rich(description, total, done)
    return PlainProgress(description, total, done, stream=stream)
