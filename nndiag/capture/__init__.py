"""Capture: hooks that measure a model while it runs. Capture measures; it never decides.

- ``sites``: the measurement core (call sites, naming, activation statistics), shared by the
  probe and ``Monitor``;
- ``probe``: forward and backward on a few batches (``nndiag inspect``, the CI gate);
- ``state``: leaving the user's model, optimizer and RNG as found;
- ``layers``: which modules and functions are measured, and what kind each one is.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProbeConfig", "run_probe"]


def __getattr__(name: str) -> Any:
    """Load the probe on first use (``nndiag.capture.state`` alone should not import it)."""
    if name in __all__:
        from nndiag.capture import probe

        return getattr(probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
