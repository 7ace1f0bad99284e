"""nndiag check --model --data: each sanity check against a model built to fail it."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from typer.testing import CliRunner

from nndiag import examples
from nndiag.cli.app import app
from nndiag.training_check import check_training
from tests.fixtures import models
from tests.fixtures.models import FIXTURES

DATA = examples.classification_data(batches=8)


def ids(report) -> dict[str, str]:
    return {f.id: f.severity for f in report.findings}


@pytest.mark.parametrize(("build", "finding"), [
    (models.BatchMixer, "batch_mixing"),
    (examples.unused_branch_model, "unused_parameters"),
    (models.IgnoresInput, "cannot_overfit_batch"),
    (models.overconfident_mlp, "loss_at_init_unexpected"),
    (models.DetachedBranch, "unused_parameters"),
])
def test_each_sanity_check_catches_its_broken_model(build, finding):
    torch.manual_seed(0)
    report = check_training(build(), DATA, steps=20, overfit_steps=60)
    assert finding in ids(report), [f.summary for f in report.findings]
    found = next(f for f in report.findings if f.id == finding)
    assert found.explanation


def test_parameters_left_unchanged_by_the_optimizer():
    report = check_training(models.healthy_mlp(), DATA, optimizer=models.frozen_group_sgd,
                            lr=0.05, steps=10, overfit_steps=30)
    finding = next(f for f in report.findings if f.id == "parameters_not_updated")
    assert finding.layers == ["0.weight", "0.bias"]


def _image_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 8, 8, generator=g)
    return [(images[i:i + 16], (images[i:i + 16].mean((1, 2, 3)) > 0).long())
            for i in range(0, 64, 16)]


@pytest.mark.parametrize(("build", "data"), [
    (models.healthy_mlp, DATA),
    (lambda: examples.resnet_bn(widths=(8, 16), blocks=1), _image_batches()),
])
def test_healthy_models_pass_and_are_left_unchanged(build, data):
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_training(model, data, steps=30)
    assert report.status == "ok", [f.summary for f in report.findings]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cli_gate_json_and_junit(tmp_path):
    junit = tmp_path / "nndiag.xml"
    result = CliRunner().invoke(app, ["check", "--model", f"{FIXTURES}:BatchMixer", "--data",
                                      f"{FIXTURES}:training_batches", "--steps", "20",
                                      "--json", "--junit", str(junit)])
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert "batch_mixing" in [f["id"] for f in report["findings"]]
    suite = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert {"batch_mixing", "cannot_overfit_batch", "loss_at_init_unexpected",
            "loss_not_decreasing"} <= set(cases)
    assert cases["batch_mixing"].find("failure") is not None
    assert cases["loss_at_init_unexpected"].find("failure") is None
    healthy = CliRunner().invoke(app, ["check", "--model", f"{FIXTURES}:healthy_mlp", "--data",
                                       f"{FIXTURES}:training_batches", "--steps", "30"])
    assert healthy.exit_code == 0, healthy.stdout
    assert "no problem found" in healthy.stdout


def test_cli_check_needs_exactly_one_mode():
    assert CliRunner().invoke(app, ["check", "--data", "x:y"]).exit_code == 2
    result = CliRunner().invoke(app, ["check", "--model", f"{FIXTURES}:healthy_mlp"])
    assert result.exit_code == 2 and "--data" in result.stderr


def test_a_finding_from_two_phases_is_kept_twice_and_fails_its_junit_case(tmp_path):
    import xml.etree.ElementTree as ET

    from nndiag.findings import Finding, Report
    from nndiag.run_check import write_junit

    report = Report("nndiag.check/1", [
        Finding("vanishing_gradients", "error", ["0"], "through depth at init",
                evidence={"phase": "init"}),
        Finding("vanishing_gradients", "warning", ["0"], "early layers lag in training",
                evidence={"phase": "training"}),
    ], summary={"rules": ["vanishing_gradients", "dead_relu"]})
    suite = ET.parse(write_junit(report, tmp_path / "junit.xml")).getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == ["vanishing_gradients", "dead_relu"]
    failure = cases["vanishing_gradients"].find("failure")
    assert failure.get("message") == "through depth at init"
    assert "also [warning] early layers lag in training" in failure.text
    assert suite.get("failures") == "1"


def test_the_gate_tags_every_finding_with_its_phase():
    from nndiag import examples
    from nndiag.training_check import check_training

    report = check_training(examples.deep_sigmoid_mlp(depth=8),
                            examples.classification_data(batches=2), steps=6,
                            overfit_steps=5)
    assert report.findings
    assert all(f.evidence["phase"] in ("init", "sanity", "training") for f in report.findings)
