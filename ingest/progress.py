"""Progress reporting on stderr (rich), with a null object for quiet runs."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

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

__all__ = ["CellProgress", "make_progress"]


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


def make_progress(description: str, *, total: int, done: int = 0, enabled: bool) -> CellProgress:
    """A rich progress bar on stderr (cells, cells/s, ETA), or a silent null object."""
    return _Rich(description, total, done) if enabled else _Null()
