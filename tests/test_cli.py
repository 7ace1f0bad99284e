"""The CLI: exit codes 0-3, one readable message per error and no traceback, JSON, plots."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from nndiag.cli.app import app

FIXTURES = Path(__file__).parent / "fixtures" / "models.py"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def fixture(attr: str) -> str:
    return f"{FIXTURES}:{attr}"


def schema() -> dict:
    text = resources.files("nndiag").joinpath("schemas/inspect-1.schema.json").read_text()
    return json.loads(text)


def assert_one_clean_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert result.stdout == ""


def test_version_and_help():
    assert run("--version").stdout.startswith("nndiag ")
    result = run("inspect", "--help")
    assert result.exit_code == 0
    for option in ("--model", "--data", "--input-shape", "--json", "--plot", "--try-fixes",
                   "--fail-on"):
        assert option in result.stdout


def test_exit_0_on_a_healthy_model():
    result = run("inspect", "--model", "nndiag.examples:he_mlp", "--input-shape", "32,32")
    assert result.exit_code == 0, result.stderr
    assert "OK" in result.stdout and "no problem found" in result.stdout


def test_exit_1_on_an_error_finding_with_explanation_and_fixes():
    result = run("inspect", "--model", "nndiag.examples:deep_sigmoid_mlp", "--input-shape",
                 "64,32")
    assert result.exit_code == 1
    out = " ".join(result.stdout.split())
    assert "vanishing_gradients" in out and "sigmoid" in out
    assert "non_saturating_activation" in out and "nn.ReLU()" in out


def test_fail_on_decides_between_0_and_1_for_warnings():
    args = ("inspect", "--model", "nndiag.examples:unused_branch_model", "--input-shape", "16,32")
    assert run(*args).exit_code == 0
    assert run(*args, "--fail-on", "warning").exit_code == 1


def test_json_output_validates_against_the_contract(tmp_path):
    result = run("inspect", "--model", "nndiag.examples:xavier_relu_convnet", "--input-shape",
                 "8,3,8,8", "--json", "--try-fixes")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema())
    assert report["schema"] == "nndiag.inspect/1" and report["status"] == "error"
    found = {f["id"] for f in report["findings"]}
    assert {"vanishing_gradients", "poor_initialization"} <= found
    verified = [fix["verified"] for f in report["findings"] for fix in f["fixes"]
                if fix["verified"]]
    assert verified and all(v["applied"] for v in verified)


def test_json_writes_non_finite_numbers_as_strings():
    result = run("inspect", "--model", fixture("log_of_negative"), "--data",
                 fixture("good_data"), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # strict JSON: no NaN literal
    jsonschema.validate(report, schema())
    assert report["findings"][0]["id"] == "nan_inf"
    assert "nan" in json.dumps(report["layers"])


def test_schema_rejects_a_broken_report():
    result = run("inspect", "--model", "nndiag.examples:he_mlp", "--input-shape", "8,32",
                 "--json")
    report = json.loads(result.stdout)
    report["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, schema())


def test_plot_is_written(tmp_path):
    target = tmp_path / "figs" / "flow.png"
    result = run("inspect", "--model", "nndiag.examples:deep_sigmoid_mlp", "--input-shape",
                 "16,32", "--plot", str(target))
    assert result.exit_code == 1
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["flow.png"]  # no temporary left


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (("--model", "no_such_package.models:net", "--input-shape", "4,8"), 2,
     ("no module named 'no_such_package.models'",)),
    (("--model", "nndiag.examples:no_such_model", "--input-shape", "4,8"), 2,
     ("has no attribute 'no_such_model'",)),
    (("--model", "missing/file.py:net", "--input-shape", "4,8"), 2, ("not found",)),
    (("--model", "nndiag.examples", "--input-shape", "4,8"), 2, ("expected 'package.module",)),
    (("--model", fixture("returns_int"), "--input-shape", "4,8"), 2,
     ("expected an nn.Module", "got int")),
    (("--model", fixture("NOT_A_MODULE"), "--input-shape", "4,8"), 2, ("expected an nn.Module",)),
    (("--model", fixture("mlp8"), "--data", fixture("wrong_shape_data")), 2,
     ("does not fit the model", "Linear", "(16, 5)")),
    (("--model", fixture("mlp8"), "--input-shape", "4,3,2"), 2, ("does not fit the model",)),
    (("--model", fixture("mlp8"), "--data", fixture("nan_data")), 2, ("NaN",)),
    (("--model", fixture("mlp8"), "--data", fixture("empty_data")), 2, ("no batch",)),
    (("--model", fixture("mlp8"), "--input-shape", "4,x"), 2, ("positive integers",)),
    (("--model", fixture("mlp8"), "--input-shape", "4,8", "--data", fixture("good_data")), 2,
     ("only one of",)),
    (("--model", fixture("mlp8"), "--input-shape", "4,8", "--loss", "hinge"), 2,
     ("unknown loss",)),
    (("--model", fixture("mlp8"), "--data", fixture("good_data"), "--loss",
      fixture("non_scalar_loss")), 2, ("scalar",)),
    (("--model", fixture("mlp8"), "--input-shape", "4,8", "--plot", "out.txt"), 2, (".png",)),
    (("--model", fixture("mlp8"), "--data", fixture("good_data"), "--loss",
      fixture("raising_loss")), 3, ("this loss is broken",)),
    (("--model", fixture("ForwardBug"), "--input-shape", "4,8"), 3,
     ("the model raised", "missing_attribute")),
    (("--model", fixture("raises_on_build"), "--input-shape", "4,8"), 3,
     ("cannot build this model",)),
])
def test_bad_input_gives_one_message_and_the_documented_code(args, code, fragments):
    assert_one_clean_error(run("inspect", *args), code, *fragments)


def test_unknown_option_is_usage_error():
    result = run("inspect", "--model", "nndiag.examples:he_mlp", "--no-such-flag")
    assert result.exit_code == 2


def test_debug_shows_the_traceback():
    result = run("inspect", "--model", fixture("ForwardBug"), "--input-shape", "4,8", "--debug")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, as a user runs it (data on stdout, exit code 1)."""
    exe = Path(sys.executable).with_name("nndiag")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "nndiag"]
    done = subprocess.run([*command, "inspect", "--model", "nndiag.examples:dead_relu_mlp",
                           "--input-shape", "32,32", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["findings"][0]["id"] == "dead_relu"
    assert "Traceback" not in done.stderr
