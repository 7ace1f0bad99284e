"""The recorded sample runs: check's exit code and finding for each, report's figures, JUnit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.render.plots.run_figures import FIGURES
from nndiag.run_check import RUN_FINDINGS
from nndiag.runlog import read_run

RUNS = Path(__file__).resolve().parents[1] / "sample_runs"
EXPECTED = {
    "healthy": (0, None),
    "vanishing": (1, "vanishing_gradients"),
    "exploding": (1, "exploding_gradients"),
    "dying_relu": (1, "dead_relu"),
    "oscillating": (1, "loss_oscillating"),
}


@pytest.mark.parametrize(("name", "expected"), EXPECTED.items())
def test_sample_run_exit_code_and_finding(name, expected):
    code, finding = expected
    result = CliRunner().invoke(app, ["check", str(RUNS / name), "--fail-on", "warning",
                                      "--json"])
    assert result.exit_code == code, result.stdout
    report = json.loads(result.stdout)
    ids = [f["id"] for f in report["findings"]]
    if finding is None:
        assert ids == []
    else:
        assert finding in ids
        found = next(f for f in report["findings"] if f["id"] == finding)
        assert found["evidence"]["first_step"] is not None
        assert found["explanation"] and found["fixes"]


def test_default_fail_on_error_gates_the_runs_with_errors():
    codes = {name: CliRunner().invoke(app, ["check", str(RUNS / name)]).exit_code
             for name in EXPECTED}
    assert codes == {"healthy": 0, "vanishing": 1, "exploding": 1, "dying_relu": 1,
                     "oscillating": 0}  # oscillating is a warning


def test_findings_carry_the_step_they_first_appeared():
    result = CliRunner().invoke(app, ["check", str(RUNS / "dying_relu"), "--json"])
    dead = next(f for f in json.loads(result.stdout)["findings"] if f["id"] == "dead_relu")
    log = read_run(RUNS / "dying_relu")
    first = dead["evidence"]["first_step"]
    before = [s for s in log.samples if s.step < first]
    assert before and all(max(layer.dead_fraction for layer in s.layers
                              if layer.dead_fraction is not None) < 0.5 for s in before)


def test_junit_xml_is_parsed_back(tmp_path):
    target = tmp_path / "reports" / "nndiag.xml"
    result = CliRunner().invoke(app, ["check", str(RUNS / "vanishing"), "--junit", str(target)])
    assert result.exit_code == 1
    suite = ET.parse(target).getroot()
    assert suite.tag == "testsuite" and suite.get("name") == "nndiag.check"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == set(RUN_FINDINGS)
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert failed == {"vanishing_gradients", "update_ratio_low"}  # errors; the warning passes
    assert suite.get("failures") == "2" and suite.get("tests") == str(len(RUN_FINDINGS))
    message = cases["vanishing_gradients"].find("failure").get("message")
    assert "gradient-to-weight" in message
    assert "warning" in cases["loss_not_decreasing"].find("system-out").text


def test_report_writes_every_figure(tmp_path):
    result = CliRunner().invoke(app, ["report", str(RUNS / "dying_relu"), "--out",
                                      str(tmp_path)])
    assert result.exit_code == 1, result.stderr  # an error finding, as `check` exits
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize(("name", "fail_on", "code"), [
    ("healthy", "error", 0), ("healthy", "warning", 0), ("dying_relu", "error", 1),
    ("oscillating", "error", 0), ("oscillating", "warning", 1)])
def test_report_exits_like_check(tmp_path, name, fail_on, code):
    result = CliRunner().invoke(app, ["report", str(RUNS / name), "--out", str(tmp_path),
                                      "--fail-on", fail_on])
    assert result.exit_code == code, result.stderr
    assert (tmp_path / "index.html").exists()
    checked = CliRunner().invoke(app, ["check", str(RUNS / name), "--fail-on", fail_on])
    assert checked.exit_code == code


def test_check_of_a_missing_or_foreign_directory_is_exit_2(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        result = CliRunner().invoke(app, ["check", str(target)])
        assert result.exit_code == 2 and result.stderr.startswith("error:")
