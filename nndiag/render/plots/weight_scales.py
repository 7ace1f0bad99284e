"""Weight-scale figure for a data-free checkpoint report: per-layer He scale and its product."""

from __future__ import annotations

import math

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.findings import Report
from nndiag.render.plots import figure_and_axes


def plot_weight_scales(report: Report, ax: Axes | None = None) -> Figure:
    """Plot each Linear/conv layer's weight scale over He and the predicted signal scale.

    Bars: weight RMS / He std per layer (1 keeps a ReLU signal's scale). Line: the running
    product along each chain of layers with no normalization between them (log scale).
    Layers named by a warning or error finding are drawn in red.

    Args:
        report: A ``nndiag.inspect-checkpoint/1`` report.
        ax: Axes to draw on; a new figure is made when omitted.

    Returns:
        The figure.
    """
    fig, ax = figure_and_axes(ax, (11, 4.5))
    flagged = {name for f in report.findings if f.severity != "info" for name in f.layers}
    layers = [r for r in report.layers if r.get("init_scale_he")]
    xs = list(range(len(layers)))
    scales = [r["init_scale_he"] for r in layers]
    colors = ["tab:red" if r["name"] in flagged else "tab:blue" for r in layers]
    ax.bar(xs, scales, color=colors, alpha=0.6, label="weight RMS / He std")
    products, running, chain = [], 0.0, None
    for r in layers:
        if r.get("chain") != chain:
            running, chain = 0.0, r.get("chain")
        running += math.log(r["init_scale_he"])
        products.append(math.exp(min(max(running, -600.0), 600.0)))  # 1e+-260: drawable
    ax.plot(xs, products, "k.-", label="predicted signal scale (product along the chain)")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("Linear/conv layer (stored order)")
    ax.set_ylabel("scale")
    if len(layers) <= 40:
        ax.set_xticks(xs, [r["name"] for r in layers], rotation=60, ha="right", fontsize=7)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{report.summary.get('path')}: weight scales ({report.status.upper()})")
    fig.tight_layout()
    return fig
