"""Gradient-flow figure: gradient norms and activation std through depth, problems marked."""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.findings import Report

_FLAG_COLOR = {"error": "tab:red", "warning": "tab:orange"}


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _mark_zeros(ax: Axes, points: list[tuple[Any, Any]], label: str, color: str) -> None:
    """Values of exactly 0, which a log axis cannot show: an x at the bottom of the axes."""
    zeros = [x for x, value in points if isinstance(value, int | float) and value == 0]
    if zeros:
        ax.plot(zeros, [0.03] * len(zeros), "x", color=color, markersize=7, mew=2,
                transform=ax.get_xaxis_transform(), label=label)


def plot_gradient_flow(report: Report, axes: tuple[Axes, Axes] | None = None) -> Figure:
    """Plot per-layer gradient norm and activation std across depth (log scale).

    Top: the weight-gradient norm of each layer with weights and the gradient norm at its
    output relative to the model output ("grad gain"). Bottom: the output std of every
    measured layer. Values of exactly 0 (a dead layer, a gradient that never arrives), which a
    log axis cannot show, are crosses at the bottom of their panel. Layers named by a warning
    or error finding are shaded.

    Args:
        report: An inspect report (only its ``layers`` and ``findings`` are read).
        axes: Two axes to draw on; a new figure is made when omitted.

    Returns:
        The figure.

    """
    if axes is None:
        fig = Figure(figsize=(11, 6.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
    else:
        top, bottom = axes
        fig = top.get_figure()  # type: ignore[assignment]
    flagged: dict[str, str] = {}
    for finding in report.findings:
        for name in finding.layers:
            if flagged.get(name) != "error":
                flagged[name] = finding.severity
    layers = report.layers
    weights = [r for r in layers if r.weight_norm is not None]

    xs = [r.index for r in weights]
    grad = [_positive(r.grad_norm) for r in weights]
    gain = [_positive(r.depth_gain) for r in weights]
    top.plot(xs, [g if g else float("nan") for g in grad], "o-", color="tab:blue",
             label="weight gradient norm ||g||")
    top.plot(xs, [g if g else float("nan") for g in gain], "s--", color="tab:green",
             label="grad gain (output-gradient norm / model output's)")
    _mark_zeros(top, [(x, r.grad_norm) for x, r in zip(xs, weights, strict=True)],
                "gradient exactly 0", "tab:blue")
    top.set_yscale("log")
    top.set_ylabel("gradient")
    top.grid(True, which="major", alpha=0.3)

    stds = [(r.index, _positive(r.std), r) for r in layers]
    stds = [(x, s, r) for x, s, r in stds if s is not None]
    for label, style, color, keep in (
        ("weight-layer output std", "o-", "tab:purple", lambda r: r.weight_norm is not None),
        ("activation output std", "^:", "tab:gray", lambda r: r.activation is not None),
    ):
        series = [(x, s) for x, s, r in stds if keep(r)]
        if series:
            bottom.plot([x for x, _ in series], [s for _, s in series], style, color=color,
                        label=label, markersize=4)
    _mark_zeros(bottom, [(r.index, r.std) for r in layers], "output exactly 0 (dead)",
                "tab:purple")
    bottom.set_yscale("log")
    bottom.set_ylabel("activation std")
    bottom.set_xlabel("layer (forward order)")
    bottom.grid(True, which="major", alpha=0.3)

    marked: set[str] = set()
    for r in layers:  # every flagged layer, including those with nothing to plot on a log axis
        x, severity = r.index, flagged.get(r.name)
        if severity in _FLAG_COLOR:
            label = f"flagged ({severity})" if severity not in marked else None
            marked.add(severity)
            for ax in (top, bottom):
                ax.axvspan(x - 0.4, x + 0.4, color=_FLAG_COLOR[severity], alpha=0.15,
                           label=label if ax is bottom else None)
    if len(weights) <= 30:
        bottom.set_xticks(xs, [r.name for r in weights], rotation=60, ha="right",
                          fontsize=7)
    top.legend(loc="best", fontsize=8)
    bottom.legend(loc="best", fontsize=8)
    status = report.status.upper()
    ids = ", ".join(f.id for f in report.findings) or "no findings"
    top.set_title(f"{report.summary.get('model', 'model')}: gradient flow ({status}: {ids})")
    fig.tight_layout()
    return fig
