"""Learning-rate range test: an exponential sweep, and a suggestion read from the curve.

Two concerns, one module each:

- ``sweep``: ``lr_find`` trains with the learning rate growing exponentially, records the loss,
  then trains the curve's candidate learning rates briefly from the same start (``trials``),
  and returns an ``LRFindResult`` (a ``Report`` carrying the curve and the trials); the model,
  optimizer, RNG and data order are restored afterwards.
- ``suggestion``: ``suggest_lr`` and ``choose_lr``, pure functions of the recorded curve and of
  the trials' losses (no torch), documented step by step in their module and testable on
  synthetic curves.

Example:
    >>> from nndiag.lrfind import lr_find  # doctest: +SKIP
    >>> result = lr_find(model, loader, optimizer="adamw", steps=100)  # doctest: +SKIP
    >>> result.suggested_lr, result.reason, result.status  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from nndiag.lrfind.suggestion import (
    MIN_POINTS,
    RULE,
    Choice,
    Rule,
    Suggestion,
    budget_trial_steps,
    choose_lr,
    eval_scatter,
    plateau_candidates,
    smooth_curve,
    snap_lr,
    suggest_lr,
)
from nndiag.lrfind.sweep import (
    SCHEMA,
    LRFindResult,
    cycle_batches,
    holds_out,
    lr_find,
    train_trial,
    trial_baseline,
)

__all__ = ["MIN_POINTS", "RULE", "SCHEMA", "BatchSource", "Choice", "LRFindResult", "Rule",
           "Suggestion", "budget_trial_steps", "choose_lr", "cycle_batches",
           "eval_scatter", "holds_out", "lr_find",
           "plateau_candidates", "smooth_curve", "snap_lr", "suggest_lr", "train_trial",
           "trial_baseline"]


def __getattr__(name: str) -> Any:
    """``BatchSource`` now lives in ``nndiag.batches`` (imported on use: it needs torch)."""
    if name == "BatchSource":
        from nndiag.batches import BatchSource

        return BatchSource
    raise AttributeError(f"module 'nndiag.lrfind' has no attribute {name!r}")
