"""Files nndiag reads and writes: plain files only read, whole or not at all written.

Reading: a path that names a FIFO, a device or a socket (``/dev/zero``, ``/dev/urandom``, a
named pipe) would hang nndiag or fill its memory; ``open_regular`` refuses anything but a
regular file before reading a byte, and ``read_lines`` and ``read_bounded`` bound what one
line or one file may hold.

Writing: ``write_atomic`` replaces a regular file (or creates one) atomically; anything else
the path names (a FIFO, a terminal, ``/dev/null``, a symlink to ``/proc/self/fd/1``) is written
in place, never replaced by a file.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from nndiag.errors import UsageError

# The longest line nndiag reads from a run log (a sampled step of a model of 10,000 layers is
# about 5 MiB): a longer line is corrupt, skipped without being held in memory.
MAX_LINE_BYTES = 32 * 2**20
_CHUNK_BYTES = 2**20
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ("a regular file", "a named pipe"...)."""
    return next((name for test, name in _KINDS if test(mode)),
                "a regular file" if stat.S_ISREG(mode) else "not a regular file")


def _refuse(path: Path, mode: int) -> UsageError:
    return UsageError(f"{str(path)!r} is {file_kind(mode)}, not a regular file: nndiag reads "
                      "only plain files there")


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading in binary mode; refuse anything else before reading.

    The file is looked at (``os.stat``, following symlinks) before it is opened, so that a
    device is never opened, then opened non-blocking (a FIFO put in its place meanwhile does
    not wait for a writer) and checked again.

    Raises:
        UsageError: ``path`` is a FIFO, device, socket or directory.
        OSError: It cannot be opened (missing, permission denied).
    """
    target = Path(path)
    mode = os.stat(target).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(target, mode)
    descriptor = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(target, mode)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_bounded(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises:
        UsageError: Not a regular file, or a larger one (``what`` names it in the message).
        OSError: It cannot be read.
    """
    chunks: list[bytes] = []
    size = 0
    with open_regular(path) as handle:
        while chunk := handle.read(_CHUNK_BYTES):  # read(max_bytes) would allocate max_bytes
            size += len(chunk)
            if size > max_bytes:
                raise UsageError(f"{str(path)!r} is over {max_bytes // 2**20} MiB: too large "
                                 f"to be {what}")
            chunks.append(chunk)
    return b"".join(chunks)


def read_lines(path: str | Path, max_bytes: int | None = None) -> Iterator[str | None]:
    """The lines of a regular file as text (UTF-8, bad bytes replaced), without line ends.

    A line longer than ``max_bytes`` (``None``: ``MAX_LINE_BYTES``) is yielded as ``None``: it
    is never held whole in memory.

    Raises:
        UsageError: Not a regular file.
        OSError: It cannot be read.
    """
    max_bytes = MAX_LINE_BYTES if max_bytes is None else max_bytes
    with open_regular(path) as handle:
        partial = bytearray()  # the start of a line that the next chunk continues
        skipping = False  # the line in progress is over the bound: its bytes are dropped
        while chunk := handle.read(_CHUNK_BYTES):
            *ended, rest = chunk.split(b"\n")
            for line in ended:
                if skipping or len(partial) + len(line) > max_bytes:
                    yield None
                else:
                    yield (partial + line if partial else line).decode("utf-8", "replace")
                partial.clear()
                skipping = False
            if not skipping:
                skipping = len(partial) + len(rest) > max_bytes
                if skipping:
                    partial.clear()
                else:
                    partial += rest
        if skipping:
            yield None
        elif partial:
            yield partial.decode("utf-8", "replace")


def _regular_or_absent(path: Path) -> Path | None:
    """The regular file ``path`` names (symlinks resolved), or ``None`` if it names another kind.

    A path that does not exist (or a symlink to nowhere) is written as a new regular file at the
    place it names.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return Path(os.path.realpath(path))
    if not stat.S_ISREG(mode):
        return None
    resolved = Path(os.path.realpath(path))
    try:  # a link whose target is not a path (/proc/self/fd/N of a deleted file): in place
        return resolved if os.path.samestat(os.stat(resolved), os.stat(path)) else None
    except OSError:
        return None


def write_atomic(path: str | Path, write: Callable[[str], object], *,
                 prefix: str = ".nndiag-") -> Path:
    """Write a file whole or not at all; write anything that is not a regular file in place.

    Over a regular file, or where nothing exists, ``write`` fills a temporary file beside it
    (same directory, so the rename is atomic), which is then made readable by all (0644, as a
    file opened normally would be; a temporary file is created 0600) and renamed into place.
    If ``write`` raises, nothing is left behind and an existing file is untouched. A symlink is
    followed: its target is replaced, the link kept.

    A path that names something else (a FIFO, ``/dev/null``, a terminal, ``/proc/self/fd/1``)
    is written in place: ``write`` fills a temporary file elsewhere, which is then copied into
    it, so the pipe or device is never replaced by a regular file.

    Args:
        path: The file to write; its directory must exist.
        write: Called with the temporary file's path.
        prefix: Prefix of the temporary file's name.

    Returns:
        ``path``.
    """
    given = Path(path)
    target = _regular_or_absent(given)
    if target is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            temp = os.path.join(scratch, "output" + given.suffix)
            write(temp)
            with open(temp, "rb") as source, open(given, "wb") as sink:
                shutil.copyfileobj(source, sink)
        return given
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=given.suffix)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return given
