"""Rendering: the text report, JSON encoding and the gradient-flow figure."""

from __future__ import annotations

import json

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
