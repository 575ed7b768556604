"""Progress of long work: a rich bar on a terminal, plain lines in a log, nothing when disabled.

The library takes a ``progress: bool`` and reports only when asked; the CLI asks unless
``--quiet``. Everything goes to stderr so that tables and JSON on stdout stay clean.

* On a terminal: a rich bar with the time left.
* Elsewhere (``nohup``, CI, a pipe to a log file): one line every :data:`LINE_SECONDS` seconds
  (``MODECONN_PROGRESS_SECONDS`` overrides it) with the step, the status (e.g. the loss) and
  the time left, and a last line when the work ends.
* Both: once the first steps have run, work that will take longer than
  :data:`ANNOUNCE_SECONDS` says how long it expects to take, once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

__all__ = ["ProgressBar", "progress_bar", "format_duration", "LINE_SECONDS", "ANNOUNCE_SECONDS"]

#: Seconds between two progress lines when stderr is not a terminal.
LINE_SECONDS = 15.0
#: Work expected to take longer than this says so once, after its first steps.
ANNOUNCE_SECONDS = 60.0
#: The estimate is made once this share of the work is done and this many seconds have passed.
_ESTIMATE_SHARE, _ESTIMATE_AFTER = 0.01, 3.0


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _status_text(status: dict[str, float | str]) -> str:
    return "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items()
    )


class ProgressBar:
    """A handle to advance the work by some steps and show a short status (e.g. the loss).

    This one shows nothing; :func:`progress_bar` returns the kind that suits stderr.
    """

    def advance(self, steps: int = 1, **status: float | str) -> None:
        """``steps`` more steps done (since the last call)."""

    def skip(self, steps: int) -> None:
        """``steps`` done before this run (a resumed fit): shown, but not timed."""


class _Reporting(ProgressBar):
    """Counts steps and time, and says once how long long work will take."""

    def __init__(self, total: int | None, description: str):
        self.total = total
        self.description = description
        self.done = 0
        self.skipped = 0
        self.status: dict[str, float | str] = {}
        self._started = time.monotonic()
        self._announced = False

    def advance(self, steps: int = 1, **status: float | str) -> None:
        self.done += steps
        self.status.update(status)
        self._show()
        if not self._announced:
            self._maybe_announce()

    def skip(self, steps: int) -> None:
        self.done += steps
        self.skipped += steps

    def _show(self) -> None:
        pass

    def _say(self, text: str) -> None:
        raise NotImplementedError

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def rate(self) -> float | None:
        """Seconds a step at the mean rate of this run so far, or None before any step."""
        timed = self.done - self.skipped
        return self.elapsed() / timed if timed > 0 else None

    def remaining(self) -> float | None:
        rate = self.rate()
        if not self.total or rate is None:
            return None
        return rate * max(self.total - self.done, 0)

    def _maybe_announce(self) -> None:
        if not self.total or self.elapsed() < _ESTIMATE_AFTER:
            return
        timed = self.done - self.skipped
        if timed < max(1, _ESTIMATE_SHARE * self.total):
            return
        self._announced = True
        left = self.remaining()
        if left is not None and left >= ANNOUNCE_SECONDS:
            self._say(
                f"{self.description}: about {format_duration(left)} left for the remaining "
                f"{self.total - self.done:,} of {self.total:,} (estimated from the first {timed:,})"
            )


class _RichBar(_Reporting):
    def __init__(self, progress, task, total: int | None, description: str):
        super().__init__(total, description)
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1, **status: float | str) -> None:
        self._progress.update(self._task, advance=steps, status=_status_text(status))
        super().advance(steps, **status)

    def skip(self, steps: int) -> None:
        self._progress.update(self._task, advance=steps)
        super().skip(steps)

    def _say(self, text: str) -> None:
        self._progress.console.print(text, highlight=False)


class _LineBar(_Reporting):
    """Plain lines on stderr, at most one every ``every`` seconds."""

    def __init__(self, total: int | None, description: str, every: float):
        super().__init__(total, description)
        self._every = every
        self._last = self._started
        self._lines = 0

    def _show(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._lines += 1
            self._say(self.line())

    def line(self, *, final: bool = False) -> str:
        of = f"/{self.total:,}" if self.total else ""
        parts = [f"{self.description}: {self.done:,}{of}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.status:
            parts.append(_status_text(self.status))
        parts.append(f"{format_duration(self.elapsed())} elapsed")
        left = self.remaining()
        if not final and left is not None:
            parts.append(f"about {format_duration(left)} left")
        return ", ".join(parts)

    def finish(self) -> None:
        if self._lines:  # work short enough to need no line in between needs no last line
            self._say(self.line(final=True) + " (done)")

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _line_seconds() -> float:
    value = os.environ.get("MODECONN_PROGRESS_SECONDS")
    if value is None:
        return LINE_SECONDS
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise ValueError(
            f"MODECONN_PROGRESS_SECONDS must be a number of seconds, got {value!r}"
        ) from None


@contextlib.contextmanager
def progress_bar(
    total: int | None, description: str, enabled: bool = True
) -> Iterator[ProgressBar]:
    """Progress over ``total`` steps; a silent handle when ``enabled`` is False."""
    if not enabled:
        yield ProgressBar()
        return
    if not sys.stderr.isatty():
        bar = _LineBar(total, description, _line_seconds())
        yield bar
        bar.finish()
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
        yield _RichBar(progress, task, total, description)
