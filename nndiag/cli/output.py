"""Output sink: data to stdout (rich text or JSON), messages and errors to stderr."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from nndiag.errors import NndiagError
from nndiag.render.safe import printable

PIPED_WIDTH = 120
# Exit code for a bug in nndiag itself (not part of the findings/usage/user-code contract).
INTERNAL_ERROR = 4


class Output:
    """Where a command writes.

    Attributes:
        stdout: Console for the report (plain when piped).
        stderr: Console for progress, messages and errors.
        debug: Show tracebacks of errors.

    """

    def __init__(self, debug: bool = False) -> None:
        # Piped or logged output (CI) gets 120 columns rather than rich's default 80.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        self.stdout = Console(soft_wrap=False, width=PIPED_WIDTH if piped else None)
        self.stderr = Console(stderr=True, soft_wrap=True)
        self.debug = debug

    @contextmanager
    def progress(self, description: str,
                 min_bytes: int = 64 * 1024 * 1024) -> Iterator[Callable[[int, int], None]]:
        """A byte progress bar on stderr, shown once the work is over ``min_bytes``."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TimeRemainingColumn(), console=self.stderr, transient=True)
        task = bar.add_task(description, total=None)
        started = False

        def advance(done: int, total: int) -> None:
            nonlocal started
            if not started and total >= min_bytes:
                bar.start()
                started = True
            bar.update(task, completed=done, total=total)

        try:
            yield advance
        finally:
            if started:
                bar.stop()

    @contextmanager
    def steps(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A step-count progress bar on stderr (hidden when stderr is not a terminal)."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=self.stderr, transient=True)
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with bar:
            yield advance

    def message(self, text: str) -> None:
        """A status message on stderr."""
        self.stderr.print(text, style="dim", highlight=False)

    def fail(self, exc: BaseException) -> int:
        """Report an error on stderr and return the exit code it maps to."""
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        if isinstance(exc, NndiagError):
            self.stderr.print(f"[bold red]error:[/] {_safe(exc)}", highlight=False, markup=True)
            hint = "" if self.debug or exc.exit_code != 3 else " (--debug shows the traceback)"
            if hint:
                self.stderr.print(hint.strip(), style="dim")
            return exc.exit_code
        self.stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {_safe(exc)}",
                          highlight=False)
        self.stderr.print("this is a bug in nndiag; rerun with --debug and report the traceback",
                          style="dim")
        return INTERNAL_ERROR


def _safe(exc: BaseException) -> str:
    """An error message as inert text: names from files carry no markup or terminal escapes."""
    return escape(printable(exc))
