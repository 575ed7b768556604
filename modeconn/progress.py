"""Progress bars for long work: rich bars on a terminal, nothing when disabled.

The library takes a ``progress: bool`` and shows bars only when asked; the CLI asks unless
``--quiet``. Bars go to stderr so that tables and JSON on stdout stay clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """A handle to advance one bar and show a short status (e.g. the current loss)."""

    def __init__(self, progress=None, task=None):
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1, **status: float | str) -> None:
        if self._progress is None:
            return
        text = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items()
        )
        self._progress.update(self._task, advance=steps, status=text)


@contextlib.contextmanager
def progress_bar(
    total: int | None, description: str, enabled: bool = True
) -> Iterator[ProgressBar]:
    """A bar of ``total`` steps; a no-op handle when ``enabled`` is False."""
    if not enabled:
        yield ProgressBar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, status="")
        yield ProgressBar(progress, task)
