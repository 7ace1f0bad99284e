"""LR range-test figure: raw and smoothed loss against the learning rate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.render.plots import figure_and_axes

if TYPE_CHECKING:
    from nndiag.lrfind import LRFindResult


def plot_lr_curve(result: LRFindResult, ax: Axes | None = None) -> Figure:
    """Plot raw and smoothed loss against the learning rate (log x) with the suggestion marked.

    The trials' learning rates (dotted, their loss after the trial in the legend) and the
    curve's own reading (dashed) are drawn when the result has trials. The y axis is cut a
    little above the starting loss so that a diverging tail does not squash the valley; the
    useful range (``lr_low`` .. ``lr_high``) is shaded.

    Args:
        result: A range-test result.
        ax: Axes to draw on; a new figure is made when omitted.

    Returns:
        The figure.
    """
    fig, ax = figure_and_axes(ax, (9, 5))
    lrs, losses = result.lrs, result.losses
    smoothed = [v for v in result.smoothed if v is not None and math.isfinite(v)]
    ax.plot(lrs, losses, ".", color="tab:blue", alpha=0.35, ms=4, label="loss at each step")
    ax.plot(lrs[: len(result.smoothed)], result.smoothed, "-", color="tab:blue", lw=2,
            label="smoothed")
    if result.lr_low and result.lr_high:
        ax.axvspan(result.lr_low, result.lr_high, color="tab:green", alpha=0.12,
                   label=f"useful range {result.lr_low:.1e} .. {result.lr_high:.1e}")
    if result.suggested_lr:
        ax.axvline(result.suggested_lr, color="tab:red", lw=1.5,
                   label=f"suggested {result.suggested_lr:.2e}")
    if result.trials and result.curve_lr:
        ax.axvline(result.curve_lr, color="0.4", lw=1, ls="--",
                   label=f"the curve's own reading {result.curve_lr:.2e}")
    for trial in result.trials:  # the candidates trained from the same start, and their loss
        outcome = "diverged" if trial.loss is None else f"loss {trial.loss:.3g}"
        ax.axvline(trial.lr, color="tab:orange", lw=1, ls=":",
                   label=f"trial {trial.lr:.2e} ({trial.steps} steps): {outcome}")
    if smoothed:
        low, start = min(smoothed), smoothed[0]
        span = max(start - low, 1e-12)
        finite = [v for v in losses if math.isfinite(v)]
        top = min(max(finite), start + 0.75 * span) if finite else start + span
        ax.set_ylim(low - 0.1 * span, max(top, start + 0.1 * span))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"LR range test ({result.summary.get('optimizer', '')}, "
                 f"{len(lrs)} steps, stopped: {result.stopped_because})")
    fig.tight_layout()
    return fig
