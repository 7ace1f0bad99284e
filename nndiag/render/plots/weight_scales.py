"""Weight-scale figure for a data-free checkpoint report: per-layer scale and chain products."""

from __future__ import annotations

import math
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nndiag.findings import Report
from nndiag.records.checkpoint import canonical_key
from nndiag.render.plots import figure_and_axes


def _gain(row: dict[str, Any]) -> float | None:
    value = row.signal_gain
    return value if value is not None else row.init_scale_he


def plot_weight_scales(report: Report, ax: Axes | None = None) -> Figure:
    """Plot each layer's weight scale and the predicted signal scale along its chain.

    Bars: for a transformer, weight RMS over the std its family initializes it with (1 is the
    family's init); for other networks, weight RMS over the He std (1 keeps a ReLU signal's
    scale). Line: the running product of the signal gains along each chain of layers in series
    (a transformer's residual branches), log scale. Layers are in canonical name order, the
    same for every checkpoint format. Layers named by a warning or error finding are red.

    Args:
        report: A ``nndiag.inspect-checkpoint/1`` report.
        ax: Axes to draw on; a new figure is made when omitted.

    Returns:
        The figure.
    """
    fig, ax = figure_and_axes(ax, (11, 4.5))
    flagged = {name for f in report.findings if f.severity != "info" for name in f.layers}
    by_family = any(r.init_ratio for r in report.layers)
    key = "init_ratio" if by_family else "init_scale_he"
    layers = sorted((r for r in report.layers if r.get(key) or
                     (r.chain is not None and _gain(r))),
                    key=lambda r: canonical_key(r.name, r.kind))
    xs = list(range(len(layers)))
    scales = [r.get(key) or math.nan for r in layers]
    colors = ["tab:red" if r.name in flagged else "tab:blue" for r in layers]
    label = ("weight RMS / the family's init std" if by_family else "weight RMS / He std")
    ax.bar(xs, scales, color=colors, alpha=0.6, label=label)
    products: list[float] = []
    running: dict[int, float] = {}
    for r in layers:
        chain, gain = r.chain, _gain(r)
        if chain is None or not gain or not math.isfinite(gain) or gain <= 0:
            products.append(math.nan)
            continue
        running[chain] = running.get(chain, 0.0) + math.log(gain)
        products.append(math.exp(min(max(running[chain], -600.0), 600.0)))  # 1e+-260: drawable
    ax.plot(xs, products, "k.-", label="predicted signal scale (product along the chain)")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("layer (canonical order)")
    ax.set_ylabel("scale")
    if len(layers) <= 40:
        ax.set_xticks(xs, [r.name for r in layers], rotation=60, ha="right", fontsize=7)
    ax.legend(loc="best", fontsize=8)
    family = (report.summary.get("architecture") or {}).get("family")
    what = f"{family} weight scales" if family else "weight scales"
    ax.set_title(f"{report.summary.get('path')}: {what} ({report.status.upper()})")
    fig.tight_layout()
    return fig
