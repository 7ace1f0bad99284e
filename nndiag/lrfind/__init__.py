"""Learning-rate range test: an exponential sweep, and a suggestion read from the curve.

Two concerns, one module each:

- ``sweep``: ``lr_find`` trains with the learning rate growing exponentially, records the loss
  and returns an ``LRFindResult`` (a ``Report`` carrying the curve); the model, optimizer and
  RNG are restored afterwards.
- ``suggestion``: ``suggest_lr``, a pure function of the recorded curve (no torch), documented
  step by step in its module and testable on synthetic curves.

Example:
    >>> from nndiag.lrfind import lr_find  # doctest: +SKIP
    >>> result = lr_find(model, loader, optimizer="adamw", steps=100)  # doctest: +SKIP
    >>> result.suggested_lr, result.reason, result.status  # doctest: +SKIP
"""

from __future__ import annotations

from nndiag.lrfind.suggestion import MIN_POINTS, Suggestion, smooth_curve, suggest_lr
from nndiag.lrfind.sweep import SCHEMA, LRFindResult, cycle_batches, lr_find

__all__ = ["MIN_POINTS", "SCHEMA", "LRFindResult", "Suggestion", "cycle_batches", "lr_find",
           "smooth_curve", "suggest_lr"]
