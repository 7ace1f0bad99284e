"""Figures: one module per figure, each ``fig = plot_x(data, ax=None)``."""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.files import write_atomic
from nndiag.findings import CheckpointReport, Report


def figure_and_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    """The axes to draw on and their figure: a new one-panel figure when ``ax`` is None."""
    if ax is None:
        fig = Figure(figsize=size)
        return fig, fig.subplots()
    return ax.get_figure(), ax  # type: ignore[return-value]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure atomically (a temporary file renamed into place: never half-written)."""
    target = Path(path)
    image_format = (target.suffix or ".png").lstrip(".")
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, lambda temp: fig.savefig(temp, dpi=120, bbox_inches="tight",
                                                         format=image_format))


def plot_report(report: Report) -> Figure:
    """The figure that fits a report: weight scales (data-free) or gradient flow (live)."""
    if isinstance(report, CheckpointReport):
        from nndiag.render.plots.weight_scales import plot_weight_scales

        return plot_weight_scales(report)
    from nndiag.render.plots.gradient_flow import plot_gradient_flow

    return plot_gradient_flow(report)
