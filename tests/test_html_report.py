"""The HTML report: one self-contained page, opened in headless Chromium; Jupyter's _repr_html_."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from torch import nn
from typer.testing import CliRunner

from nndiag import check_run, examples, inspect_model, lr_find
from nndiag.cli.app import app
from nndiag.monitor import Monitor
from nndiag.render.html import run_report_page
from nndiag.render.plots.run_figures import FIGURES

RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def record_deep_run(directory: Path, depth: int = 50, steps: int = 16) -> Path:
    """A 50-layer ReLU MLP whose three ReLUs in the middle are dead: the layers below get
    exactly zero gradient, the ones above train."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(16, 16)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        if depth // 2 - 5 <= i < depth // 2 - 2:
            nn.init.constant_(linear.bias, -10.0)
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, optimizer, every=2, log_dir=directory) as monitor:
        for _ in range(steps):
            x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return directory


def _report(run: Path, out: Path) -> str:
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code in (0, 1), result.stderr  # 1: an error finding (the page is written)
    assert result.stdout.splitlines()[0] == str(out / "index.html")
    return (out / "index.html").read_text(encoding="utf-8")


def _self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), \
        [s[:40] for s in sources if not s.startswith("data:")]
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_report_page_has_findings_advice_and_every_figure(tmp_path):
    page = _report(RUNS / "dying_relu", tmp_path)
    _self_contained(page)
    assert page.count('<img alt="') == len(FIGURES)
    assert "dead_relu" in page and "lower_learning_rate" in page and "bias_init" in page
    assert "Units that die during training" in page  # the explanation
    assert "nn.init.zeros_(m.bias)" in page  # the fix's code
    for name in FIGURES:  # the PNGs are still written beside the page
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_layer_names_from_the_run_are_escaped(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("<b>x</b>", nn.Linear(4, 4))
    model.add_module("act", nn.ReLU())
    nn.init.constant_(model[0].bias, -10.0)  # dead: a finding that names the layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, every=1, log_dir=run) as monitor:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean() + 1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    report = check_run(run)
    assert any("<b>x</b>" in f.layers or "act" in f.layers for f in report.findings)
    page = run_report_page(report, [])
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs "
                                               "it: apt-get install chromium)")
def test_page_of_a_50_layer_run_renders_in_headless_chromium(tmp_path):
    run = record_deep_run(tmp_path / "run")
    page = _report(run, tmp_path / "report")
    _self_contained(page)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
             "--window-size=1280,4000", "--hide-scrollbars",
             (tmp_path / "report" / "index.html").as_uri()],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (4000, 1280)
    # Not blank: most of the page is drawn on, with the figures' many colours, including
    # the magenta of exactly-zero gradients and the red of the error badge.
    drawn = (image < 0.95).any(axis=2)
    assert drawn.mean() > 0.2
    colours = {tuple(c) for c in (image[::4, ::4] * 31).astype(int).reshape(-1, 3)}
    assert len(colours) > 200
    magenta = (image[..., 0] > 0.9) & (image[..., 1] < 0.3) & (image[..., 2] > 0.75)
    assert magenta.mean() > 0.01
    # The figures load: the first figure starts in the first screen's lower half or below.
    rows_with_colour = np.where((np.ptp(image, axis=2) > 0.3).any(axis=1))[0]
    assert rows_with_colour.size > 1000


def test_repr_html_of_inspect_lr_find_and_check(tmp_path):
    report = inspect_model(examples.dead_relu_mlp(), input_shape=(16, 32))
    html = report._repr_html_()
    assert "<style>" in html and "dead_relu" in html and "data:image/png;base64," in html
    assert "Layers" in html and "bias_init" in html

    torch.manual_seed(0)
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    result = lr_find(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), data,
                     optimizer="sgd", steps=20, trials=False)
    html = result._repr_html_()
    assert "nndiag lr-find" in html and "data:image/png;base64," in html
    assert ("suggested learning rate" in html) == (result.suggested_lr is not None)

    checked = check_run(RUNS / "dying_relu")
    html = checked._repr_html_()
    assert "nndiag check" in html and "dead_relu" in html
    assert html.count("data:image/png;base64,") == len(FIGURES)
