"""Figures of a recorded run (``nndiag report``), each ``fig = plot_x(log, findings, ax=None)``.

Kept in one module because the five figures share the way they read samples and mark findings.
Per-layer statistics are heatmaps (a row per layer, named, in forward order; a column per
sampled step), so that a run of 50 or 500 layers stays readable where 50 lines in one axes
do not; beside each heatmap a profile through depth shows the first and last sampled step.
Cells have three kinds of "no colour on the scale": an exact zero (no gradient reached the
layer, the weights did not move, the output is constant) has its own colour, ``ZERO_COLOR``,
and a layer not recorded at a step is grey, ``MISSING_COLOR``; neither is left blank. Findings
are dashed vertical lines at the step each first appeared, coloured by severity, listed in a
legend below the axes (never as text over them); layers a finding names have their labels in
the finding's colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from nndiag.findings import Finding, FindingId, severity_rank
from nndiag.records import LayerRecord
from nndiag.runlog import RunLog

SEVERITY_COLORS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
ZERO_COLOR = "#ff2bd6"  # magenta: in none of the colour maps used
MISSING_COLOR = "#d9d9d9"
# Inches per heatmap row, and the figure width.
ROW_HEIGHT, WIDTH = 0.16, 12.0


def _own_figure(size: tuple[float, float]) -> Figure:
    return Figure(figsize=size, layout="constrained")


def _series(log: RunLog, stat: str, keep: Callable[[LayerRecord], bool] | None = None
            ) -> tuple[list[int], list[str], np.ndarray]:
    """A (layers x samples) matrix of one ``LayerRecord`` statistic (NaN where missing)."""
    names = _rows(log, stat, keep)
    steps = [s.step for s in log.samples]
    matrix = np.full((len(names), len(steps)), np.nan)
    for j, sample in enumerate(log.samples):
        for layer in sample.layers:
            value = getattr(layer, stat)
            row = names.get(layer.name)
            if row is not None and value is not None:
                matrix[row, j] = value
    return steps, list(names), matrix


def _rows(log: RunLog, stat: str, keep: Callable[[LayerRecord], bool] | None
          ) -> dict[str, int]:
    """The layers with a value of ``stat``, in order of appearance: name -> row."""
    names: dict[str, int] = {}
    for sample in log.samples:
        for layer in sample.layers:
            if layer.name not in names and getattr(layer, stat) is not None and (
                    keep is None or keep(layer)):
                names[layer.name] = len(names)
    return names


def _kinds(log: RunLog) -> dict[str, str]:
    """Layer name -> its kind (``Linear``, ``relu()``), for row labels."""
    kinds: dict[str, str] = {}
    for sample in log.samples[:1] + log.samples[-1:]:
        for layer in sample.layers:
            if layer.kind:
                kinds.setdefault(layer.name, layer.kind)
    return kinds


def _first_steps(findings: list[Finding], ids: tuple[str, ...] | None
                 ) -> list[tuple[int, list[Finding]]]:
    by_step: dict[int, list[Finding]] = {}
    for finding in findings:
        step = finding.evidence.get("first_step")
        if isinstance(step, int | float) and (ids is None or finding.id in ids):
            by_step.setdefault(int(step), []).append(finding)
    return sorted(by_step.items())


def _mark(ax: Axes, findings: list[Finding], ids: tuple[str, ...] | None = None
          ) -> list[Artist]:
    """A dashed line at the first step of each finding; returns their legend entries."""
    handles: list[Artist] = []
    for step, group in _first_steps(findings, ids):
        worst = max(group, key=lambda f: severity_rank(f.severity))
        color = SEVERITY_COLORS[worst.severity]
        ax.axvline(step, color=color, ls="--", lw=1.2)
        handles.append(Line2D([], [], color=color, ls="--", lw=1.2,
                              label=f"step {step}: " + ", ".join(
                                  f"{f.id} ({f.severity})" for f in group)))
    return handles


def _legend(fig: Figure, ax: Axes, handles: list[Artist], own: bool) -> None:
    """Findings and cell colours in one legend below the figure (own figure) or in ``ax``."""
    if not handles:
        return
    if own:
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False,
                   ncols=min(3, len(handles)))
    else:
        ax.legend(handles=handles, fontsize=7, loc="best")


def _flagged(findings: list[Finding], ids: tuple[str, ...] | None) -> dict[str, str]:
    """Layer name -> the worst severity of the findings (of ``ids``) that name it."""
    flagged: dict[str, str] = {}
    for finding in findings:
        if ids is not None and finding.id not in ids:
            continue
        for name in finding.layers:
            if name not in flagged or severity_rank(finding.severity) > severity_rank(
                    flagged[name]):
                flagged[name] = finding.severity
    return flagged


def _step_label(log: RunLog) -> str:
    every = log.meta.get("every")
    return f"step (sampled every {every})" if every else "step"


def plot_loss_lr(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Loss per step (raw and running median) and the learning rate on a second axis."""
    from nndiag.rules.run import running_median

    own = ax is None
    if ax is None:
        fig = _own_figure((WIDTH, 4.8))
        ax = fig.subplots()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    finite = [(s, v) for s, v in zip(log.steps, log.losses, strict=True) if math.isfinite(v)]
    if finite:
        steps, losses = zip(*finite, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, running_median(list(losses), max(5, len(losses) // 20)),
                color="tab:blue", lw=2, label="running median")
    else:
        ax.text(0.5, 0.5, "no finite loss recorded", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lines = list(ax.get_lines())
    if any(lr is not None for lr in log.lrs):
        twin = ax.twinx()
        lines += twin.plot(log.steps, [lr if lr is not None else np.nan for lr in log.lrs],
                           color="tab:green", lw=1, label="learning rate")
        twin.set_ylabel("learning rate", color="tab:green")
    if lines:
        ax.legend(handles=lines, loc="upper right", fontsize=8)
    _legend(fig, ax, _mark(ax, findings), own)
    ax.set_title(f"{log.path.name}: loss and learning rate")
    return fig  # type: ignore[return-value]


def _norm(values: np.ndarray, center: float | None) -> Normalize:
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if center is not None:
        return TwoSlopeNorm(vcenter=center, vmin=min(low, center - 0.5),
                            vmax=max(high, center + 0.5))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    return Normalize(low, high)


def _heatmap(log: RunLog, findings: list[Finding], ax: Axes | None, *, stat: str, title: str,
             label: str, log_scale: bool = True, cmap: str = "viridis",
             center: float | None = None, limits: tuple[float, float] | None = None,
             zero_means: str | None = None, ids: tuple[str, ...] | None = None,
             keep: Callable[[LayerRecord], bool] | None = None) -> Figure:
    """A layers x steps heatmap of ``stat``, a profile through depth beside it."""
    steps, names, matrix = _series(log, stat, keep)
    own = ax is None
    rows = len(names)
    if ax is None:
        fig = _own_figure((WIDTH, max(3.6, ROW_HEIGHT * rows + 2.4)))
        if rows >= 2:
            ax, profile = fig.subplots(1, 2, sharey=True, width_ratios=(4, 1))
        else:
            ax, profile = fig.subplots(), None
        fig.suptitle(title)
    else:
        fig, profile = ax.get_figure(), None  # type: ignore[assignment]
        ax.set_title(title)
    ax.set_xlabel(_step_label(log))
    if not names or not steps:
        ax.text(0.5, 0.5, f"no {label} recorded", ha="center", transform=ax.transAxes)
        _legend(fig, ax, _mark(ax, findings), own)  # type: ignore[arg-type]
        return fig  # type: ignore[return-value]
    zero = matrix == 0
    missing = np.isnan(matrix)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(np.where(matrix > 0, matrix, np.nan)) if log_scale else matrix
    norm = Normalize(*limits) if limits is not None else _norm(values, center)
    colormap = colormaps[cmap]
    rgba = colormap(norm(np.nan_to_num(values, nan=norm.vmin or 0.0)))
    rgba[missing] = to_rgba(MISSING_COLOR)
    if zero_means:
        rgba[zero] = to_rgba(ZERO_COLOR)
    infinite = np.isinf(matrix)
    rgba[infinite] = to_rgba("black")
    spacing = steps[1] - steps[0] if len(steps) > 1 else 1
    ax.imshow(rgba, aspect="auto", interpolation="nearest",
              extent=(steps[0] - spacing / 2, steps[-1] + spacing / 2, rows, 0))
    fig.colorbar(ScalarMappable(norm, colormap), ax=profile if profile is not None else ax,
                 label=f"log10 {label}" if log_scale else label, shrink=0.9,
                 aspect=max(20, rows // 2), pad=0.02)
    _layer_labels(ax, names, _kinds(log), _flagged(findings, ids))
    handles = _mark(ax, findings)
    if zero.any() and zero_means:
        handles.append(Patch(color=ZERO_COLOR, label=f"exactly 0: {zero_means}"))
    if missing.any():
        handles.append(Patch(color=MISSING_COLOR, label="not recorded at that step"))
    if infinite.any():
        handles.append(Patch(color="black", label="inf"))
    if profile is not None:
        _profile(profile, steps, matrix, label, log_scale)
    _legend(fig, ax, handles, own)
    return fig  # type: ignore[return-value]


def _layer_labels(ax: Axes, names: list[str], kinds: dict[str, str],
                  flagged: dict[str, str]) -> None:
    """Every layer named with its kind (every k-th beyond 200 rows), flagged ones coloured."""
    rows = len(names)
    size = 8 if rows <= 30 else 7 if rows <= 60 else 6 if rows <= 120 else 5
    stride = max(1, math.ceil(rows / 200))
    shown = [i for i in range(rows) if i % stride == 0 or names[i] in flagged]
    labels = [_short(names[i]) + (f"  {kinds[names[i]]}" if names[i] in kinds else "")
              for i in shown]
    ax.set_yticks([i + 0.5 for i in shown], labels, fontsize=size)
    for tick, i in zip(ax.get_yticklabels(), shown, strict=True):
        severity = flagged.get(names[i])
        if severity is not None:
            tick.set_color(SEVERITY_COLORS[severity])
            tick.set_fontweight("bold")
    ax.set_ylim(rows, 0)


def _short(name: str, limit: int = 48) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def _profile(ax: Axes, steps: list[int], matrix: np.ndarray, label: str,
             log_scale: bool) -> None:
    """The statistic through depth at the first and the last sampled step."""
    rows = np.arange(matrix.shape[0]) + 0.5
    zeros = False
    for column, color, name in ((0, "#9ecae1", f"step {steps[0]}"),
                                (-1, "#08519c", f"step {steps[-1]}")):
        values = matrix[:, column].astype(float)
        if log_scale:  # an exact zero has no place on a log axis: marked at its left edge
            zero = values == 0
            if zero.any():
                zeros = True
                ax.plot(np.full(int(zero.sum()), 0.015), rows[zero], "|", color=ZERO_COLOR,
                        ms=6, mew=2, transform=ax.get_yaxis_transform())
            values = np.where(values > 0, values, np.nan)
        ax.plot(values, rows, "o-", color=color, ms=2.5, lw=1, label=name)
    if zeros:
        ax.plot([], [], "|", color=ZERO_COLOR, ms=6, mew=2, label="exactly 0")
    if log_scale and np.nanmax(np.where(matrix > 0, matrix, np.nan), initial=0) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_title("through depth", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(axis="y", left=False, labelleft=False)
    ax.legend(fontsize=7, loc="best")


def plot_grad_heatmap(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Per-layer gradient norm over sampled steps (log colour scale)."""
    return _heatmap(log, findings, ax, stat="grad_norm", title="gradient norm per layer",
                    label="gradient norm", zero_means="no gradient reached the layer",
                    ids=(FindingId.VANISHING_GRADIENTS, FindingId.EXPLODING_GRADIENTS,
                         FindingId.DEAD_RELU),
                    keep=lambda layer: layer.has_weights)


def plot_update_ratio(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Per-layer update-to-weight ratio over sampled steps (log colours centred on 1e-3)."""
    return _heatmap(log, findings, ax, stat="update_ratio",
                    title="update ratio ||dw|| / ||w|| per layer (blue: below the rule of thumb "
                          "~1e-3, red: above)",
                    label="update ratio", cmap="RdBu_r", center=-3.0,
                    zero_means="the weights did not move",
                    ids=(FindingId.UPDATE_RATIO_HIGH, FindingId.UPDATE_RATIO_LOW),
                    keep=lambda layer: layer.has_weights)


def plot_activation_std(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Output std of every measured layer over sampled steps."""
    return _heatmap(log, findings, ax, stat="std", title="activation std per layer (output)",
                    label="output std", cmap="cividis", zero_means="constant output",
                    ids=(FindingId.VANISHING_GRADIENTS, FindingId.EXPLODING_GRADIENTS,
                         FindingId.POOR_INITIALIZATION, FindingId.SATURATED_ACTIVATIONS,
                         FindingId.DEAD_RELU),
                    keep=lambda layer: layer.mean is not None)


def plot_dead_fraction(log: RunLog, findings: list[Finding], ax: Axes | None = None) -> Figure:
    """Dead-unit fraction of every ReLU-family layer over sampled steps."""
    return _heatmap(log, findings, ax, stat="dead_fraction",
                    title="dead ReLU units per layer (share of units that never fired)",
                    label="dead fraction", log_scale=False, cmap="YlOrRd", limits=(0.0, 1.0),
                    ids=(FindingId.DEAD_RELU,))


FIGURES: dict[str, Callable[[RunLog, list[Finding]], Figure]] = {
    "loss_lr.png": plot_loss_lr,
    "grad_norm_heatmap.png": plot_grad_heatmap,
    "update_ratio.png": plot_update_ratio,
    "activation_std.png": plot_activation_std,
    "dead_fraction.png": plot_dead_fraction,
}
# Each figure's heading and what it shows (the HTML report's captions).
FIGURE_TEXT: dict[str, tuple[str, str]] = {
    "loss_lr.png": ("Loss and learning rate",
                    "Loss of every step (faint), its running median, and the learning rate. "
                    "Dashed lines: the step each finding first appeared."),
    "grad_norm_heatmap.png": ("Gradient norm per layer",
                              "Norm of each layer's weight gradient at each sampled step, "
                              "after accumulation and before clipping. A gradient that fades "
                              "through depth shows as rows darkening towards the input; "
                              "magenta: exactly zero, no gradient reached the layer."),
    "update_ratio.png": ("Update ratio per layer",
                         "||w_after - w_before|| / ||w_before|| of each optimizer step: about "
                         "1e-3 (white) is the rule of thumb; blue layers barely move, red ones "
                         "move a large share of their norm each step."),
    "activation_std.png": ("Activation std per layer",
                           "Standard deviation of each layer's output at each sampled step; "
                           "healthy networks keep it of the same order through depth. "
                           "Magenta: a constant output."),
    "dead_fraction.png": ("Dead ReLU units per layer",
                          "Share of each ReLU layer's units that never fired on the sampled "
                          "batch."),
}


def describe(name: str) -> tuple[str, str]:
    """The heading and caption of a figure of ``FIGURES``."""
    return FIGURE_TEXT.get(name, (name.removesuffix(".png").replace("_", " "), ""))
