"""Capture: hooks that measure a model while it runs. Capture measures; it never decides."""

from nndiag.capture.probe import ProbeConfig, run_probe

__all__ = ["ProbeConfig", "run_probe"]
