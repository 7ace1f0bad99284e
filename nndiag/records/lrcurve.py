"""What a learning-rate range test showed: the context lr-find's rules read (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nndiag.records.rows import Row


@dataclass
class LRCurveRecord:
    """The shape of a range test's loss curve, measured once by ``suggest_lr``.

    Attributes:
        points: Finite loss values before the curve ended.
        min_points: Fewest points a learning rate can be read from.
        drop: Fall of the smoothed loss from its start to its minimum (``None``: too short).
        noise: Robust spread of the raw loss around the smoothed curve.
        flat: The loss barely falls over the whole range (within its own noise, or 1%).
        rises: On a flat curve, the loss rises above its start somewhere.
        narrow: The minimum sits at the end of a sweep that ran to its end.
        end_lr: The last learning rate with a finite loss.
    """

    points: int
    min_points: int
    drop: float | None = None
    noise: float | None = None
    flat: bool = False
    rises: bool = False
    narrow: bool = False
    end_lr: float | None = None


@dataclass
class TrialsRecord:
    """The short trial trainings of lr-find's second stage.

    Attributes:
        candidates: The learning rates tried, highest first.
        scores: The loss after each trial (``inf`` or NaN: diverged).
    """

    candidates: list[float]
    scores: list[float] = field(default_factory=list)


@dataclass
class Trial(Row):
    """One trial training of lr-find's second stage: a row of its report's ``trials``.

    Attributes:
        lr: The constant learning rate trained at.
        steps: Steps run (fewer than asked when the loss diverged).
        loss: Loss on the fixed batches after the trial (``None``: diverged).
        diverged: The training loss or the scored loss stopped being finite.
    """

    lr: float
    steps: int
    loss: float | None
    diverged: bool
