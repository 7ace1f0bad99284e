"""Rendering: the text report, JSON encoding, the gradient-flow figure and the run figures."""

from __future__ import annotations

import json

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from nndiag import examples, inspect_model
from nndiag.findings import Report
from nndiag.render.json import render_json
from nndiag.render.plots.gradient_flow import plot_gradient_flow
from nndiag.render.text import MAX_TABLE_ROWS, render_text


def text_of(report: Report, width: int = 200) -> str:
    console = Console(record=True, width=width, color_system=None)
    render_text(report, console)
    return console.export_text()


def test_text_report_has_status_findings_fixes_and_table():
    report = inspect_model(examples.dead_relu_mlp(), input_shape=(32, 32), try_fixes=True)
    text = text_of(report)
    lines = text.splitlines()
    assert lines[0].startswith("nndiag inspect Sequential")
    assert "ERROR" in lines[1] and "1 error" in lines[1]
    assert "[error] dead_relu" in text
    assert "1. bias_init" in text and "verified on a copy: resolved" in text
    assert "nn.init.zeros_(m.bias)" in text
    table = text[text.index("Per-layer measurements"):]
    assert "100% dead" in table and "Linear" in table


def test_long_models_get_a_compact_table():
    report = inspect_model(examples.deep_sigmoid_mlp(), input_shape=(16, 32))
    assert len(report.layers) > MAX_TABLE_ROWS
    table = text_of(report).split("Per-layer measurements")[1]
    assert "Sigmoid" not in table  # activation rows dropped, weight layers kept
    assert table.count("Linear") == 21


def test_healthy_report_says_so():
    text = text_of(inspect_model(examples.he_mlp(), input_shape=(16, 32)))
    assert "OK" in text and "no problem found" in text and "[error]" not in text


def test_json_round_trips_and_keeps_status():
    report = inspect_model(examples.saturated_tanh_mlp(), input_shape=(32, 32))
    data = json.loads(render_json(report))
    assert data["status"] == report.status == "error"
    assert [f["id"] for f in data["findings"]] == [f.id for f in report.findings]
    assert len(data["layers"]) == len(report.layers)


def test_gradient_flow_marks_flagged_layers_and_draws_on_given_axes():
    report = inspect_model(examples.xavier_relu_convnet(), input_shape=(4, 3, 8, 8))
    assert report.status == "error"
    fig = plot_gradient_flow(report)
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "log"
    assert len(top.lines) == 2 and len(bottom.lines) == 2
    assert any("flagged" in t.get_text() for t in bottom.get_legend().get_texts())
    own = Figure()
    axes = tuple(own.subplots(1, 2))
    assert plot_gradient_flow(report, axes) is own


def test_gradient_flow_shows_exact_zeros_and_shades_their_flagged_layers():
    report = inspect_model(examples.dead_relu_mlp(), input_shape=(32, 32))
    dead = [r for r in report.layers if r.get("std") == 0]
    assert dead and report.finding("dead_relu") is not None
    fig = plot_gradient_flow(report)
    _, bottom = fig.axes
    zeros = [line for line in bottom.lines if line.get_label().startswith("output exactly 0")]
    assert len(zeros) == 1
    assert sorted(zeros[0].get_xdata()) == sorted(r["index"] for r in dead)
    flagged = {name for f in report.findings if f.severity in ("warning", "error")
               for name in f.layers}
    shaded = [p for p in bottom.patches if p.get_alpha() == 0.15]
    assert len(shaded) == sum(r["name"] in flagged for r in report.layers)
    assert any(r["name"] in flagged for r in dead)  # a dead, flagged layer is shaded too


# ---------------------------------------------------------------------- run figures

def _run_and_findings(run_dir):
    from nndiag.run_check import check_run
    from nndiag.runlog import read_run

    log = read_run(run_dir)
    return log, check_run(log).findings


def _overlaps(a, b) -> bool:
    return a.width > 0 and b.width > 0 and a.overlaps(b)


def test_no_finding_label_overlaps_an_axis_label_or_title():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from nndiag.render.plots.run_figures import FIGURES
    from tests.test_html_report import RUNS

    log, findings = _run_and_findings(RUNS / "dying_relu")
    assert findings
    for name, plot in FIGURES.items():
        fig = plot(log, findings)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        legends = [leg.get_window_extent(renderer) for leg in fig.legends]
        assert legends, name  # findings are listed in a legend below the axes...
        ids = {f.id for f in findings}
        assert not [t for ax in fig.axes for t in ax.texts
                    if any(i in t.get_text() for i in ids)], name  # ...not written on the axes
        for ax in fig.axes:
            labels = [ax.xaxis.label, ax.yaxis.label, ax.title,
                      *ax.get_xticklabels(), *ax.get_yticklabels()]
            for label in labels:
                if not label.get_text() or not label.get_visible():
                    continue
                box = label.get_window_extent(renderer)
                assert not any(_overlaps(box, legend) for legend in legends), (
                    name, label.get_text())


def test_50_layer_run_is_a_named_heatmap_with_zero_gradients_in_their_own_colour(tmp_path):
    from matplotlib.colors import to_rgba

    from nndiag.render.plots.run_figures import (
        ZERO_COLOR,
        plot_activation_std,
        plot_grad_heatmap,
    )
    from tests.test_html_report import record_deep_run

    log, findings = _run_and_findings(record_deep_run(tmp_path / "run"))
    fig = plot_grad_heatmap(log, findings)
    heatmap = fig.axes[0]
    names = [t.get_text().split()[0] for t in heatmap.get_yticklabels()]
    assert names == [str(2 * i) for i in range(51)]  # every Linear, named, in forward order
    assert len(heatmap.images) == 1 and not heatmap.get_lines()[1:]  # one image, no curves
    cells = heatmap.images[0].get_array()
    zero = np.all(np.isclose(cells, to_rgba(ZERO_COLOR)), axis=-1)
    # Linear layers 20..22 feed dead ReLUs: they and every layer below get exactly no gradient,
    # and so does layer 23, whose input is all zero.
    assert zero[:24].all() and not zero[24:].any()
    legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any(t.startswith("exactly 0") for t in legend_texts)
    assert any("vanishing_gradients" in t for t in legend_texts)
    flagged = [t for t in heatmap.get_yticklabels() if t.get_color() != "black"]
    assert flagged and flagged[0].get_text().startswith("0 ")  # the weakest layer, in red

    std = plot_activation_std(log, findings)
    assert len(std.axes[0].images) == 1
    assert len(std.axes[0].get_yticklabels()) == 101  # 50 Linear + 50 ReLU + the head
