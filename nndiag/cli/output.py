"""Output sink: data to stdout (rich text or JSON), messages and errors to stderr.

stdout carries nndiag's data and nothing else. While a command runs (``data_stdout_only``),
Python-level writes to ``sys.stdout`` -- the ``print`` calls of the user's spec modules, models,
losses and data, and of the libraries they use -- go to stderr, and ``Output`` writes its data
to the stream that was stdout before. This does not cover writes that bypass ``sys.stdout``:
to file descriptor 1 directly (C/C++ extensions' ``printf``, ``os.write(1, ...)``), child
processes (subprocesses, DataLoader workers started with ``spawn``) and objects that kept a
reference to the old stream (``sys.__stdout__``, a ``logging.StreamHandler(sys.stdout)``
configured before the command started).

Nothing a user controls reaches the terminal raw: reports are rendered by
``nndiag.render.text`` (every string through its ``inert``), and the lines ``Output`` prints
itself (messages, written paths, errors) go through it too; the consoles read no markup and no
emoji codes from a plain string.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

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

from nndiag.errors import NndiagError, UsageError, describe_exception
from nndiag.render.safe import printable
from nndiag.render.text import inert

PIPED_WIDTH = 120
# Exit code for a bug in nndiag itself (not part of the findings/usage/user-code contract).
INTERNAL_ERROR = 4
USER_CODE_ERROR = 3

# Where data goes while ``data_stdout_only`` is active: the stdout of before the redirection.
_data_stream: TextIO | None = None


@contextmanager
def data_stdout_only() -> Iterator[None]:
    """Keep stdout for nndiag's data: Python-level ``sys.stdout`` writes go to stderr meanwhile.

    ``Output`` objects made inside write their data to the original stdout.
    """
    global _data_stream
    previous = _data_stream
    _data_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _data_stream = previous


def data_stream() -> TextIO:
    """The stream nndiag's data is written to (stdout, even while it is redirected)."""
    return _data_stream if _data_stream is not None else sys.stdout


class _DataConsole(Console):
    """The console of a command's data: a reader that stops reading does not stop the command."""

    def on_broken_pipe(self) -> None:
        """The reader closed the pipe (``nndiag inspect ... | head``): the rest goes nowhere.

        The command goes on and ends with its own exit code (rich's default would exit 1, and
        nndiag maps an unexpected ``SystemExit`` to 3). The pipe's descriptor is pointed at
        the null device, so that no later write or flush at exit raises again.
        """
        self.quiet = True
        try:
            descriptor = self.file.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file: nothing to redirect
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, descriptor)
        finally:
            os.close(devnull)


class Output:
    """Where a command writes.

    Attributes:
        stdout: Console for the report (plain when piped).
        stderr: Console for progress, messages and errors.
        debug: Show tracebacks of errors.

    """

    def __init__(self, debug: bool = False) -> None:
        stream = data_stream()
        # Piped or logged output (CI) gets 120 columns rather than rich's default 80.
        piped = not stream.isatty() and "COLUMNS" not in os.environ
        self.stdout = _DataConsole(file=stream, soft_wrap=False,
                                   width=PIPED_WIDTH if piped else None, markup=False, emoji=False)
        self.stderr = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)
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
                       TimeRemainingColumn(), console=self.stderr, transient=True,
                       disable=not self.stderr.is_terminal)  # else it leaves an empty line
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with bar:
            yield advance

    def message(self, text: str) -> None:
        """A status message on stderr (inert: names in it print as they are, escaped)."""
        self.stderr.print(inert(text, style="dim"))

    def line(self, text: str) -> None:
        """A line of data on stdout, such as a path written: inert, as ``message``.

        Never wrapped: a path cut in two lines is another path.
        """
        self.stdout.print(inert(text), soft_wrap=True)

    def fail(self, exc: BaseException) -> int:
        """Report an error on stderr and return the exit code it maps to.

        ``NndiagError`` carries its code; a file-system ``OSError`` naming a file (a checkpoint
        shard that cannot be read, a directory that cannot be written) is unusable input or
        output, exit code 2; anything else is a bug of nndiag, exit code 4.
        """
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        if isinstance(exc, OSError) and exc.filename is not None:
            exc = file_error(exc)
        if isinstance(exc, NndiagError):
            self.stderr.print(f"[bold red]error:[/] {_safe(exc)}", highlight=False, markup=True)
            hint = "" if self.debug or exc.exit_code != 3 else " (--debug shows the traceback)"
            if hint:
                self.stderr.print(hint.strip(), style="dim")
            return exc.exit_code
        self.stderr.print(f"[bold red]internal error:[/] {_safe(type(exc).__name__)}: "
                          f"{_safe(exc)}", highlight=False, markup=True)
        self.stderr.print("this is a bug in nndiag; rerun with --debug and report the traceback",
                          style="dim")
        return INTERNAL_ERROR


def file_error(exc: OSError, what: str = "cannot access") -> UsageError:
    """A ``UsageError`` naming the file an ``OSError`` is about and the system's reason."""
    reason = exc.strerror or describe_exception(exc)
    return UsageError(f"{what} {str(exc.filename)!r}: {reason}")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` for a relative path with none)."""
    current = path
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_writable_parent(path: Path, option: str) -> None:
    """The directory that will hold ``path``: a writable directory, or creatable in one."""
    existing = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r}: cannot write in {str(existing)!r} "
                         "(permission denied)")


def validate_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a file the command could not write.

    A regular file (or a new one) is written beside its target and renamed over it, so its
    directory must be writable; a FIFO or a device is written in place.

    Raises:
        UsageError: ``path`` is a directory, or its directory is not one or is not writable.

    """
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {str(path)!r}: cannot overwrite it (permission denied)")
    if path.exists() and not path.is_file():
        return  # a FIFO or a device (/dev/null): written in place (``write_atomic``)
    # A regular file is replaced by one written beside it; a symlink's target is.
    _check_writable_parent(Path(os.path.realpath(path)), option)


def validate_output_dir(path: Path, option: str) -> None:
    """Refuse, before any work, a directory the command could not create or write in.

    Raises:
        UsageError: ``path`` names a file, or cannot be created or written in.

    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file; give a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {str(path)!r}: cannot write in it (permission denied)")
        return
    _check_writable_parent(path, option)


def write_output(option: str, path: Path, write: Callable[[], object]) -> None:
    """Write an output file after the work; a failure is a ``UsageError`` naming the option.

    Commands call this after printing their report, so the report is never lost to a figure
    or JUnit file that could not be written (the command then exits 2).

    Raises:
        UsageError: Writing raised ``OSError``.

    """
    try:
        write()
    except OSError as exc:
        raise UsageError(f"{option} {str(path)!r}: could not write it "
                         f"({exc.strerror or describe_exception(exc)}); the report was printed "
                         "to stdout") from exc


def _safe(text: object) -> str:
    """An error message as inert markup: names from files carry no markup or terminal escapes."""
    return escape(printable(text))
