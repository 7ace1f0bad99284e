"""The CLI: exit codes 0-3, one readable message per error and no traceback, JSON, plots."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.specs import load_object
from tests.test_bad_input_sweep import record_run, write_specs

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


def test_console_script_end_to_end(tmp_path, specs):
    """The installed entry point, as a user runs it (data on stdout, exit code 1).

    The spec module prints at import and in its factory: in a real process, stdout still
    holds the JSON alone and the prints are on stderr.
    """
    exe = Path(sys.executable).with_name("nndiag")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "nndiag"]
    done = subprocess.run([*command, "inspect", "--model",
                           spec(specs.parent / "printing_spec.py", "dead_relu_mlp"),
                           "--input-shape", "32,32", "--json"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["findings"][0]["id"] == "dead_relu"
    assert "hello from import" in done.stderr and "building the model" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_closes_the_pipe_early_does_not_change_the_exit_code():
    """``nndiag inspect ... | head -1``: the report stops, the exit code is still the finding's."""
    exe = Path(sys.executable).with_name("nndiag")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "nndiag"]
    with subprocess.Popen([*command, "inspect", "--model", "nndiag.examples:deep_sigmoid_mlp",
                           "--input-shape", "64,32"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline().startswith("nndiag inspect")
        child.stdout.close()  # as `head -1` does once it has its line
        errors = child.stderr.read()
        assert child.wait(timeout=120) == 1, errors  # an error finding, as without the pipe
    assert errors == ""


# ------------------------------------------------------------------ issue 12: exit codes, stdout


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> Path:
    """``bad_specs.py`` (models, data, losses built to fail); its siblings are in its folder."""
    return write_specs(tmp_path_factory.mktemp("specs"))


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> Path:
    return record_run(tmp_path_factory.mktemp("runs") / "run")


def spec(path: Path, attr: str) -> str:
    return f"{path}:{attr}"


@pytest.mark.parametrize(("args", "fragments"), [
    (("check", "--model", "{m}", "--data", "{d}", "--lr", "-1"), ("--lr", "positive")),
    (("check", "--model", "{m}", "--data", "{d}", "--lr", "nan"), ("--lr nan", "positive")),
    (("lr-find", "--model", "{m}", "--data", "{d}", "--optimizer", "sgd", "--momentum", "-1"),
     ("--momentum", ">= 0")),
    (("inspect", "--model", "{m}", "--input-shape", "4,8", "--seed", str(10**23)),
     ("--seed", "64 bits")),
    (("lr-find", "--model", "{m}", "--data", "{d}", "--seed", str(10**23)),
     ("--seed", "64 bits")),
    (("inspect", "--model", "{meta}", "--input-shape", "4,8"), ("'meta' device",)),
    (("lr-find", "--model", "{meta}", "--data", "{d}"), ("'meta' device",)),
    (("check", "--model", "{meta}", "--data", "{d}"), ("'meta' device",)),
    (("lr-find", "--model", "{noparams}", "--data", "{d}"), ("no trainable parameter",)),
    (("inspect", "--model", "{m}", "--input-shape", "100000,100000,100000"),
     ("--input-shape", "memory")),
    (("check", "--model", "{m}", "--data", "{d}", "--log-dir", "{file}"),
     ("--log-dir", "is a file")),
    (("report", "{run}", "--out", "{file}"), ("--out", "is a file")),
    (("inspect", "--model", "{m}", "--input-shape", "4,8", "--plot", "{file}/x.png"),
     ("--plot", "not a directory")),
    (("lr-find", "--model", "{m}", "--data", "{d}", "--plot", "{dir}"), ("--plot",)),
    (("check", "{run}", "--junit", "{file}/j.xml"), ("--junit", "not a directory")),
    (("check", "{run}", "--junit", "{dir}"), ("--junit", "is a directory")),
    (("report", "{run}", "--out", "{file}/figures"), ("--out", "not a directory")),
], ids=["lr -1", "lr nan", "momentum -1", "inspect huge seed", "lr-find huge seed",
        "inspect meta", "lr-find meta", "check meta", "lr-find no parameters",
        "input shape beyond memory", "log-dir a file", "report out a file",
        "plot under a file", "plot a directory", "junit under a file", "junit a directory",
        "report out under a file"])
def test_plain_user_errors_of_issue_12_are_exit_2(specs, recorded_run, args, fragments):
    (specs.parent / "a_file").write_text("x")
    (specs.parent / "dir.png").mkdir(exist_ok=True)
    names = {"m": spec(specs, "mlp"), "d": spec(specs, "data"), "meta": spec(specs, "meta_mlp"),
             "noparams": spec(specs, "NoParams"), "file": str(specs.parent / "a_file"),
             "dir": str(specs.parent / "dir.png"), "run": str(recorded_run)}
    assert_one_clean_error(run(*(a.format(**names) for a in args)), 2, *fragments)


def test_output_paths_are_checked_before_the_work_starts(specs, tmp_path):
    """The model factory would exit 3: the unwritable --plot is refused before it runs."""
    (tmp_path / "a_file").write_text("x")
    result = run("inspect", "--model", spec(specs, "exit_on_build"), "--input-shape", "4,8",
                 "--plot", str(tmp_path / "a_file" / "flow.png"))
    assert_one_clean_error(result, 2, "--plot")
    result = run("check", "--model", spec(specs, "exit_on_build"), "--data", spec(specs, "data"),
                 "--junit", str(tmp_path / "a_file" / "j.xml"))
    assert_one_clean_error(result, 2, "--junit")


def test_a_directory_without_write_permission_is_refused(tmp_path, recorded_run, monkeypatch):
    from nndiag.cli import output

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode):  # as for a user without write permission on ``locked``
        return not (Path(path) == locked and mode & os.W_OK) and real_access(path, mode)

    monkeypatch.setattr(output.os, "access", access)
    result = run("inspect", "--model", "nndiag.examples:he_mlp", "--input-shape", "4,32",
                 "--plot", str(locked / "sub" / "flow.png"))
    assert_one_clean_error(result, 2, "--plot", "permission denied")
    result = run("report", str(recorded_run), "--out", str(locked))
    assert_one_clean_error(result, 2, "--out", "permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run("inspect", "--model", "nndiag.examples:he_mlp", "--input-shape", "4,32",
                     "--plot", str(locked / "flow.png"))
        assert_one_clean_error(result, 2, "--plot", "permission denied")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("json_output", [False, True])
def test_a_figure_that_cannot_be_written_after_the_work_keeps_the_report(tmp_path, monkeypatch,
                                                                         json_output):
    import nndiag.render.plots as plots

    def disk_full(fig, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plots, "save_figure", disk_full)
    result = run("inspect", "--model", "nndiag.examples:deep_sigmoid_mlp", "--input-shape",
                 "16,32", "--plot", str(tmp_path / "flow.png"), *(["--json"] * json_output))
    assert result.exit_code == 2, result.stderr
    if json_output:
        assert json.loads(result.stdout)["findings"][0]["id"] == "vanishing_gradients"
    else:
        assert "vanishing_gradients" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--plot" in errors[0] and "No space left" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_junit_file_that_cannot_be_written_after_the_check_keeps_the_report(
        tmp_path, recorded_run, monkeypatch):
    import nndiag.run_check as checking

    def refuse(report, path, fail_on="error"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checking, "write_junit", refuse)
    result = run("check", str(recorded_run), "--json", "--junit",
                 str(tmp_path / "j.xml"))
    assert result.exit_code == 2, result.stderr
    assert json.loads(result.stdout)["schema"].startswith("nndiag.check/")
    assert "--junit" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_shard_is_exit_2(tmp_path, monkeypatch):
    from nndiag.checkpoints import formats

    directory = tmp_path / "hf"
    directory.mkdir()
    torch.save({"fc.weight": torch.randn(4, 8)}, directory / "part-1.bin")
    torch.save({"fc.bias": torch.zeros(4)}, directory / "part-2.bin")
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"fc.weight": "part-1.bin", "fc.bias": "part-2.bin"}}))
    assert run("inspect", str(directory)).exit_code in (0, 1)
    real_open = open

    def unreadable(path, *args, **kwargs):
        if Path(path).name == "part-2.bin":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(formats, "open", unreadable, raising=False)
    assert_one_clean_error(run("inspect", str(directory)), 2, "part-2.bin", "Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_a_shard_without_read_permission_is_exit_2(tmp_path):
    torch.save({"fc.weight": torch.randn(4, 8)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "pytorch_model.bin").chmod(0)
    assert_one_clean_error(run("inspect", str(tmp_path)), 2, "Permission denied")


def test_a_spec_that_prints_does_not_corrupt_json(specs):
    """stdout holds the JSON alone, the prints go to stderr (in a real process: above)."""
    result = run("lr-find", "--model", spec(specs.parent / "printing_spec.py", "mlp"),
                 "--data", spec(specs, "data"), "--steps", "10", "--no-trials", "--json")
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(result.stdout)["schema"] == "nndiag.lr-find/1"
    assert "building the model" in result.stderr


def test_a_model_that_prints_in_forward_does_not_corrupt_json(specs):
    before = sys.stdout
    result = run("inspect", "--model", spec(specs, "PrintingModel"), "--input-shape", "4,8",
                 "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["model"] == "PrintingModel"
    assert "forward says hello" in result.stderr
    assert sys.stdout is before  # the redirection ends with the command


def test_help_still_goes_to_stdout():
    result = run("check", "--help")
    assert result.exit_code == 0 and "--junit" in result.stdout


@pytest.mark.parametrize(("args", "fragments"), [
    (("inspect", "--model", "{dir}/exiting_spec.py:net", "--input-shape", "4,8"),
     ("running", "SystemExit(5)")),
    (("inspect", "--model", "{specs}:exit_on_build", "--input-shape", "4,8"),
     ("calling the factory", "SystemExit(5)")),
    (("inspect", "--model", "{specs}:ExitInForward", "--input-shape", "4,8"),
     ("the model raised", "SystemExit(7)")),
    (("inspect", "--model", "{specs}:mlp", "--data", "{specs}:data", "--loss",
      "{specs}:exit_loss"), ("--loss", "SystemExit(0)")),
    (("inspect", "--model", "{specs}:mlp", "--data", "{specs}:exit_in_data"),
     ("--data", "SystemExit(6)")),
    (("lr-find", "--model", "{specs}:mlp", "--data", "{specs}:data", "--optimizer",
      "{specs}:exit_optimizer"), ("--optimizer", "SystemExit(1)")),
    (("lr-find", "--model", "{specs}:mlp", "--data", "{specs}:exiting_iterable", "--steps",
      "10"), ("sys.exit(9)",)),
], ids=["at import", "in the factory", "in forward", "in the loss", "in the data factory",
        "in the optimizer factory", "while lr-find iterates the data"])
def test_sys_exit_in_user_code_is_exit_3_with_a_message(specs, args, fragments):
    names = {"specs": str(specs), "dir": str(specs.parent)}
    assert_one_clean_error(run(*(a.format(**names) for a in args)), 3, *fragments)


def test_targets_of_minus_100_are_ignored_as_cross_entropy_does(specs):
    x, y = load_object(spec(specs, "padded_data"))()[0]
    assert (y == -100).any()
    expected = float(F.cross_entropy(load_object(spec(specs, "mlp"))()(x), y))  # ignores -100
    result = run("inspect", "--model", spec(specs, "mlp"), "--data", spec(specs, "padded_data"),
                 "--json")
    assert result.exit_code in (0, 1), result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["loss_name"] == "cross_entropy" and summary["num_classes"] == 4
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_check_with_padded_targets_expects_log_c_at_init(specs):
    result = run("check", "--model", spec(specs, "mlp"), "--data", spec(specs, "padded_data"),
                 "--steps", "4", "--json")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["expected_loss_at_init"] == pytest.approx(math.log(4))
    assert "loss_at_init_unexpected" not in {f["id"] for f in report["findings"]}


def test_lr_find_trains_on_padded_targets(specs):
    result = run("lr-find", "--model", spec(specs, "mlp"), "--data", spec(specs, "padded_data"),
                 "--steps", "12", "--no-trials", "--json")
    assert result.exit_code in (0, 1), result.stderr
    assert all(math.isfinite(v) for v in json.loads(result.stdout)["losses"])
