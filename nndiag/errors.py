"""Error types that carry nndiag's exit-code contract.

The library raises these; only the CLI turns them into messages and exit codes
(2: bad usage or unusable input, 3: the user's own model or loss code raised).
"""

from __future__ import annotations


class NndiagError(Exception):
    """Base class of every error nndiag reports to its user.

    Attributes:
        exit_code: The process exit code the CLI uses for this error.

    """

    exit_code: int = 2


class UsageError(NndiagError):
    """Bad usage or unusable input: an unknown spec, a wrong batch shape, NaNs in the data."""

    exit_code = 2


class UserCodeError(NndiagError):
    """The user's own model, data or loss code raised; the original exception is the cause."""

    exit_code = 3


def describe_exception(exc: BaseException) -> str:
    """Return a one-line ``Type: message`` description of an exception."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
