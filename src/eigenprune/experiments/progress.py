"""A rich progress bar (one line per chunk: epochs done and the current mean loss), or nothing."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    """Context manager; `add(description, epochs)` -> task id; `update(task, epochs_done, loss)`."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._remote = {}
        self._bar = None if quiet else _RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True),
        )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: int) -> int:
        return -1 if self._bar is None else self._bar.add_task(description, total=total, loss="-")

    def update(self, task: int, done: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(task, completed=done, loss=f"{loss:.4g}")

    def finish(self, task: int) -> None:
        """Mark a task complete without a loss (work whose progress was not streamed back)."""
        if self._bar is not None:
            total = next(t.total for t in self._bar.tasks if t.id == task)
            self._bar.update(task, completed=total)

    def relay(self, message: tuple) -> None:
        """Apply a message sent by a `QueueProgress` in a worker process."""
        kind, key, *args = message
        if kind == "add":
            self._remote[key] = self.add(*args)
        else:
            self.update(self._remote[key], *args)


class QueueProgress:
    """The `Progress` interface for worker processes: forwards every call through a queue."""

    def __init__(self, queue, key: str) -> None:
        self.queue, self.key = queue, key

    def add(self, description: str, total: int) -> int:
        self.queue.put(("add", self.key, description, total))
        return 0

    def update(self, task: int, done: int, loss: float) -> None:
        self.queue.put(("update", self.key, done, loss))
