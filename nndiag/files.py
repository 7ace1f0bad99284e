"""Files nndiag writes: whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], object], *,
                 prefix: str = ".nndiag-") -> Path:
    """Write a file whole or not at all.

    ``write`` fills a temporary file beside ``path`` (same directory, so the rename is atomic),
    which is then made readable by all (0644, as a file opened normally would be; a temporary
    file is created 0600) and renamed into place. If ``write`` raises, nothing is left behind
    and an existing file at ``path`` is untouched.

    Args:
        path: The file to write; its directory must exist.
        write: Called with the temporary file's path.
        prefix: Prefix of the temporary file's name.

    Returns:
        ``path``.
    """
    target = Path(path)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=target.suffix)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target
