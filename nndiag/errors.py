"""Error types that carry nndiag's exit-code contract, and the argument checks they serve.

The library raises these; only the CLI turns them into messages and exit codes
(2: bad usage or unusable input, 3: the user's own model or loss code raised).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager

# The seeds a torch.Generator accepts: any 64-bit integer, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


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


class UserExit(UserCodeError):
    """The user's code called ``sys.exit()`` (raised ``SystemExit``) while nndiag ran it.

    ``SystemExit`` is not an ``Exception``: left alone it would end nndiag with the user's exit
    code and no message. Converted where nndiag enters user code, it is a ``UserCodeError``
    like any other (exit code 3).

    Attributes:
        code: The code passed to ``sys.exit``.

    """

    def __init__(self, code: object) -> None:
        self.code = code
        super().__init__(f"the user's code called sys.exit({'' if code is None else repr(code)})")


class UserAbort(UserCodeError):
    """The user's code raised a ``BaseException`` that is not an ``Exception``.

    ``GeneratorExit``, ``asyncio.CancelledError`` or a ``BaseExceptionGroup`` raised by the
    user's code would otherwise go past every handler and end nndiag with a traceback.
    ``KeyboardInterrupt`` is never converted: it still stops nndiag.

    Attributes:
        original: The exception the user's code raised.

    """

    def __init__(self, original: BaseException) -> None:
        self.original = original
        super().__init__(f"the user's code raised {describe_exception(original)}")


def describe_exception(exc: BaseException) -> str:
    """Return a one-line ``Type: message`` description of an exception."""
    if isinstance(exc, UserAbort):
        return describe_exception(exc.original)
    if isinstance(exc, UserExit | SystemExit):
        return f"SystemExit({'' if exc.code is None else repr(exc.code)}) (sys.exit was called)"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def validate_seed(seed: int, option: str = "seed") -> int:
    """Return ``seed`` as an ``int`` if a ``torch.Generator`` accepts it.

    Any integer type is accepted (a NumPy integer too); ``bool`` is not.

    Raises:
        UsageError: Not an integer, or outside the 64-bit range.

    """
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise UsageError(f"{option} {seed!r}: must be an integer that fits in 64 bits "
                         f"({SEED_RANGE[0]} .. {SEED_RANGE[1]})")
    return value


def _as_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (a NumPy scalar too), else ``None``."""
    if isinstance(value, bool | str | bytes):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def validate_positive(value: float, option: str) -> float:
    """Return ``value`` if it is a positive finite number (a learning rate, a scale).

    Raises:
        UsageError: Zero, negative, NaN, infinite or not a number.

    """
    number = _as_number(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise UsageError(f"{option} {value!r}: must be a positive finite number")
    return value


def validate_non_negative(value: float, option: str) -> float:
    """Return ``value`` if it is a finite number ``>= 0`` (a momentum, a weight decay).

    Raises:
        UsageError: Negative, NaN, infinite or not a number.

    """
    number = _as_number(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise UsageError(f"{option} {value!r}: must be a finite number >= 0")
    return value


@contextmanager
def user_code() -> Iterator[None]:
    """Run a piece of the user's code: a ``SystemExit`` it raises becomes ``UserExit``.

    Every place nndiag enters user code goes through here (importing a spec, calling a
    factory, the model's forward, iterating the data, a loss or optimizer factory of the
    user's), so ``sys.exit()`` in that code is exit code 3 with a message instead of ending
    nndiag silently with the user's code. Other exceptions that are not an ``Exception``
    (``GeneratorExit``...) become ``UserAbort``; ``KeyboardInterrupt`` goes through. Its
    standard output is the CLI's business: the command layer sends it to stderr
    (``nndiag.cli.output``).

    Raises:
        UserExit: The code raised ``SystemExit``.
        UserAbort: The code raised another ``BaseException`` but ``KeyboardInterrupt``.

    """
    try:
        yield
    except SystemExit as exc:
        raise UserExit(exc.code) from exc
    except (KeyboardInterrupt, Exception):
        raise
    except BaseException as exc:  # noqa: BLE001 - GeneratorExit and kin: the user's code raised
        raise UserAbort(exc) from exc
