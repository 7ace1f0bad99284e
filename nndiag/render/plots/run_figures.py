"""Figures of a recorded run (``nndiag report``), each ``fig = plot_x(log, findings, ax=None)``.

Kept in one module because the five figures share the way they read samples and mark findings
(a dashed line at the first step of each finding, labelled with its id).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.findings import Finding
from nndiag.records import LayerRecord
from nndiag.render.plots import figure_and_axes
from nndiag.runlog import RunLog

_COLORS = {"error": "tab:red", "warning": "tab:orange", "info": "tab:gray"}


def _axes(ax: Axes | None, size: tuple[float, float] = (10, 4.5)) -> tuple[Figure, Axes]:
    return figure_and_axes(ax, size)


def _mark(ax: Axes, findings: list[Finding], ids: tuple[str, ...] | None = None) -> None:
    """A dashed line at the first step of each finding, ids of the same step in one label."""
    by_step: dict[int, list[Finding]] = {}
    for finding in findings:
        step = finding.evidence.get("first_step")
        if step is not None and (ids is None or finding.id in ids):
            by_step.setdefault(step, []).append(finding)
    for step, group in sorted(by_step.items()):
        worst = max(group, key=lambda f: ("info", "warning", "error").index(f.severity))
        ax.axvline(step, color=_COLORS[worst.severity], ls="--", lw=1)
        ax.annotate(", ".join(f.id for f in group), (step, 1),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize=7, color=_COLORS[worst.severity])


def _series(log: RunLog, stat: str, keep: Callable[[LayerRecord], bool] | None = None
            ) -> tuple[list[int], list[str], np.ndarray]:
    """A (layers x samples) matrix of one ``LayerRecord`` statistic (NaN where missing)."""
    names: list[str] = []
    for sample in log.samples:
        for layer in sample.layers:
            if layer.name not in names and getattr(layer, stat) is not None and (
                    keep is None or keep(layer)):
                names.append(layer.name)
    steps = [s.step for s in log.samples]
    matrix = np.full((len(names), len(steps)), np.nan)
    row = {name: i for i, name in enumerate(names)}
    for j, sample in enumerate(log.samples):
        for layer in sample.layers:
            value = getattr(layer, stat)
            if layer.name in row and value is not None:
                matrix[row[layer.name], j] = value
    return steps, names, matrix


def plot_loss_lr(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Loss per step (raw and running median) and the learning rate on a second axis."""
    from nndiag.rules.run import running_median

    fig, ax = _axes(ax)
    finite = [(s, v) for s, v in zip(log.steps, log.losses, strict=True) if math.isfinite(v)]
    if finite:
        steps, losses = zip(*finite, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, running_median(list(losses), max(5, len(losses) // 20)),
                color="tab:blue", lw=2, label="running median")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any(lr is not None for lr in log.lrs):
        twin = ax.twinx()
        twin.plot(log.steps, [lr if lr is not None else np.nan for lr in log.lrs],
                  color="tab:green", lw=1, label="learning rate")
        twin.set_ylabel("learning rate", color="tab:green")
    ax.legend(loc="upper right", fontsize=8)
    _mark(ax, findings)
    ax.set_title(f"{log.path.name}: loss and learning rate")
    fig.tight_layout()
    return fig


def _heatmap(log: RunLog, findings: list[Finding], stat: str, title: str,
             label: str, ax: Axes | None) -> Figure:
    steps, names, matrix = _series(log, stat)
    fig, ax = _axes(ax, (10, max(3.0, 0.25 * len(names) + 1.5)))
    if names and steps:
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log10(np.where(matrix > 0, matrix, np.nan))
        image = ax.imshow(logged, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(steps[0], steps[-1] + (steps[1] - steps[0] if len(steps) > 1
                                                         else 1), len(names), 0))
        fig.colorbar(image, ax=ax, label=f"log10 {label}")
        ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    _mark(ax, findings)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_grad_heatmap(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Per-layer gradient norm over sampled steps (log colour scale)."""
    return _heatmap(log, findings, "grad_norm", "gradient norm per layer",
                    "gradient norm", ax)


def plot_update_ratio(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Per-layer update-to-weight ratio over sampled steps (log colour scale)."""
    return _heatmap(log, findings, "update_ratio",
                    "update ratio ||dw|| / ||w|| per layer (rule of thumb ~1e-3)",
                    "update ratio", ax)


def _lines(log: RunLog, findings: list[Finding], stat: str, title: str, ylabel: str,
           log_scale: bool, ids: tuple[str, ...], ax: Axes | None,
           keep: Callable[[LayerRecord], bool] | None = None) -> Figure:
    steps, names, matrix = _series(log, stat, keep)
    fig, ax = _axes(ax)
    flagged = {name for f in findings if f.id in ids for name in f.layers}
    for name, row in zip(names, matrix, strict=True):
        style = dict(lw=2, color="tab:red") if name in flagged else dict(lw=1, alpha=0.7)
        ax.plot(steps, row, label=name if len(names) <= 12 or name in flagged else None, **style)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if any(h.get_label() and not h.get_label().startswith("_") for h in ax.get_lines()):
        ax.legend(fontsize=7, ncol=2, loc="best")
    _mark(ax, findings, ids)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_activation_std(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Output std of every measured layer over sampled steps."""
    return _lines(log, findings, "std", "activation std per layer", "output std", True,
                  ("vanishing_gradients", "exploding_gradients"), ax,
                  keep=lambda layer: layer.mean is not None)


def plot_dead_fraction(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Dead-unit fraction of every ReLU-family layer over sampled steps."""
    return _lines(log, findings, "dead_fraction", "dead ReLU units per layer", "dead fraction",
                  False, ("dead_relu",), ax)


FIGURES: dict[str, Callable[[RunLog, list[Finding]], Figure]] = {
    "loss_lr.png": plot_loss_lr,
    "grad_norm_heatmap.png": plot_grad_heatmap,
    "activation_std.png": plot_activation_std,
    "dead_fraction.png": plot_dead_fraction,
    "update_ratio.png": plot_update_ratio,
}
