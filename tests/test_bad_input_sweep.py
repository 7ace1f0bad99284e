"""Every command's bad inputs through the real CLI (issue 12): exit code 4 never appears.

Exit 4 means "a bug in nndiag". Each case below is a plain user mistake (a bad number, a model
nndiag cannot run, a path that cannot be read or written, a spec whose code misbehaves) and
must end with its documented code (2: bad usage or unusable input, 3: the user's own code
raised), one ``error:`` line on stderr, no traceback and nothing on stdout.
"""

from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nndiag import Monitor
from nndiag.cli.app import app

runner = CliRunner()

# Specs written to a temporary directory: models, data, losses and optimizers built to fail.
BAD_SPECS = '''
import sys

import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def meta_mlp():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class NoParams(nn.Module):
    def forward(self, x):
        return x * 2


def frozen():
    return mlp().requires_grad_(False)


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(4)]


def padded_data():
    """Class targets with -100 (ignored, the Hugging Face padding convention)."""
    batches = data()
    for _, y in batches:
        y[::3] = -100
    return batches


def all_ignored_data():
    return [(x, torch.full_like(y, -100)) for x, y in data()]


def out_of_range_data():
    return [(x, y + 10) for x, y in data()]


def empty():
    return []


def strings():
    return [("not", "tensors")]


NOT_CALLABLE = 3


def exit_on_build():
    sys.exit(5)


def exit_in_data():
    sys.exit(6)


class ExitingIterable:
    """Batches whose iteration calls sys.exit after the first."""

    def __iter__(self):
        yield data()[0]
        sys.exit(9)


def exiting_iterable():
    return ExitingIterable()


class ExitInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        sys.exit(7)


class PrintingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        print("forward says hello")
        return self.fc(x)


def exit_loss(outputs, targets):
    sys.exit(0)


def exit_optimizer(params, lr):
    sys.exit(1)


def raising_optimizer(params, lr):
    raise RuntimeError("this optimizer is broken")
'''

EXITING_SPEC = "import sys\nsys.exit(5)\n"
PRINTING_SPEC = '''
print("hello from import")
import torch
from torch import nn


def mlp():
    print("building the model")
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def dead_relu_mlp():
    from nndiag import examples

    print("building the model")
    return examples.dead_relu_mlp()
'''


def write_specs(directory: Path) -> Path:
    """Write the spec modules into ``directory``; return the path of ``bad_specs.py``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "exiting_spec.py").write_text(EXITING_SPEC)
    (directory / "printing_spec.py").write_text(textwrap.dedent(PRINTING_SPEC))
    (directory / "syntax_error.py").write_text("def broken(:\n")
    path = directory / "bad_specs.py"
    path.write_text(BAD_SPECS)
    return path


def record_run(directory: Path, steps: int = 6, model: torch.nn.Module | None = None) -> Path:
    """A small real run written by Monitor (of ``model``, which maps 4 features, or an MLP)."""
    torch.manual_seed(0)
    if model is None:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, every=2, log_dir=directory) as monitor:
        for _ in range(steps):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Files the cases refer to as ``{name}``."""
    root = tmp_path_factory.mktemp("sweep")
    specs = write_specs(root / "specs")
    (root / "a_file").write_text("not a directory\n")
    (root / "a_dir").mkdir()
    (root / "dir.png").mkdir()  # a directory with a figure's name
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    torch.save({"fc.weight": torch.randn(4, 8), "fc.bias": torch.zeros(4)}, root / "state.pt")
    data = (root / "state.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(root / "not_torch.zip", "w") as archive:
        archive.writestr("hello.txt", "hi")
    (root / "bad_header.safetensors").write_bytes(
        (20).to_bytes(8, "little") + b'{"w": {"dtype": "F32"' + bytes(40))
    (root / "no_weights").mkdir()
    shards = root / "shards"
    shards.mkdir()
    (shards / "pytorch_model.bin.index.json").write_text("{not json")
    outside = root / "outside_index"
    outside.mkdir()
    (outside / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": "../state.pt"}}))
    missing = root / "missing_shard"
    missing.mkdir()
    (missing / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"fc.weight": "part-1.bin"}}))
    run = record_run(root / "run")
    (root / "no_meta").mkdir()
    (root / "empty_run").mkdir()
    (root / "empty_run" / "meta.json").write_text(
        (run / "meta.json").read_text())  # a run with no recorded step
    (root / "bad_meta").mkdir()
    (root / "bad_meta" / "meta.json").write_text("{truncated")
    (root / "future_run").mkdir()
    (root / "future_run" / "meta.json").write_text(json.dumps({"schema": "nndiag.run/99"}))
    return {"root": str(root), "specs": str(specs), "dir": str(specs.parent), "run": str(run)}


# (id, command line, expected exit code). Placeholders: {specs} is bad_specs.py, {dir} the
# directory of the spec modules, {root} the directory of everything else.
M = "{specs}:mlp"
D = "{specs}:data"
CASES: list[tuple[str, tuple[str, ...], int]] = [
    # ------------------------------------------------------------------ inspect
    ("inspect/nothing to inspect", ("inspect", "--input-shape", "4,8"), 2),
    ("inspect/model without data", ("inspect", "--model", M), 2),
    ("inspect/data and input shape", ("inspect", "--model", M, "--data", D,
                                      "--input-shape", "4,8"), 2),
    ("inspect/shape not numbers", ("inspect", "--model", M, "--input-shape", "4,x"), 2),
    ("inspect/shape zero", ("inspect", "--model", M, "--input-shape", "0,8"), 2),
    ("inspect/shape negative", ("inspect", "--model", M, "--input-shape", "-4,8"), 2),
    ("inspect/shape empty", ("inspect", "--model", M, "--input-shape", ""), 2),
    ("inspect/shape larger than memory", ("inspect", "--model", M, "--input-shape",
                                          "100000,100000,100000"), 2),
    ("inspect/shape overflowing int64", ("inspect", "--model", M, "--input-shape",
                                         "9999999999,9999999999,9999999999"), 2),
    ("inspect/shape wrong for the model", ("inspect", "--model", M, "--input-shape", "4,5"), 2),
    ("inspect/bad dtype", ("inspect", "--model", M, "--input-shape", "4,8", "--input-dtype",
                           "complex7"), 2),
    ("inspect/integer inputs without vocabulary", ("inspect", "--model", M, "--input-shape",
                                                   "4,8", "--input-dtype", "long"), 2),
    ("inspect/input max zero", ("inspect", "--model", M, "--input-shape", "4,8",
                                "--input-dtype", "long", "--input-max", "0"), 2),
    ("inspect/batches zero", ("inspect", "--model", M, "--input-shape", "4,8", "--batches",
                              "0"), 2),
    ("inspect/huge seed", ("inspect", "--model", M, "--input-shape", "4,8", "--seed",
                           str(10**23)), 2),
    ("inspect/huge negative seed", ("inspect", "--model", M, "--input-shape", "4,8", "--seed",
                                    str(-(10**23))), 2),
    ("inspect/bad fail-on", ("inspect", "--model", M, "--input-shape", "4,8", "--fail-on",
                             "critical"), 2),
    ("inspect/plot not an image", ("inspect", "--model", M, "--input-shape", "4,8", "--plot",
                                   "{root}/x.txt"), 2),
    ("inspect/plot under a file", ("inspect", "--model", M, "--input-shape", "4,8", "--plot",
                                   "{root}/a_file/x.png"), 2),
    ("inspect/plot is a directory", ("inspect", "--model", M, "--input-shape", "4,8",
                                     "--plot", "{root}/dir.png"), 2),
    ("inspect/meta model", ("inspect", "--model", "{specs}:meta_mlp", "--input-shape", "4,8"),
     2),
    ("inspect/no parameters", ("inspect", "--model", "{specs}:NoParams", "--input-shape",
                               "4,8"), 2),
    ("inspect/frozen model", ("inspect", "--model", "{specs}:frozen", "--input-shape", "4,8"),
     2),
    ("inspect/not a module", ("inspect", "--model", "{specs}:NOT_CALLABLE", "--input-shape",
                              "4,8"), 2),
    ("inspect/no such module", ("inspect", "--model", "no_such_pkg_xyz:net", "--input-shape",
                                "4,8"), 2),
    ("inspect/no such file", ("inspect", "--model", "{root}/nope.py:net", "--input-shape",
                              "4,8"), 2),
    ("inspect/spec without attribute", ("inspect", "--model", "{specs}", "--input-shape",
                                        "4,8"), 2),
    ("inspect/syntax error in spec", ("inspect", "--model", "{dir}/syntax_error.py:broken",
                                      "--input-shape", "4,8"), 3),
    ("inspect/sys.exit at import", ("inspect", "--model", "{dir}/exiting_spec.py:net",
                                    "--input-shape", "4,8"), 3),
    ("inspect/sys.exit in the factory", ("inspect", "--model", "{specs}:exit_on_build",
                                         "--input-shape", "4,8"), 3),
    ("inspect/sys.exit in forward", ("inspect", "--model", "{specs}:ExitInForward",
                                     "--input-shape", "4,8"), 3),
    ("inspect/sys.exit in the data factory", ("inspect", "--model", M, "--data",
                                              "{specs}:exit_in_data"), 3),
    ("inspect/sys.exit in the loss", ("inspect", "--model", M, "--data", D, "--loss",
                                      "{specs}:exit_loss"), 3),
    ("inspect/empty data", ("inspect", "--model", M, "--data", "{specs}:empty"), 2),
    ("inspect/data of strings", ("inspect", "--model", M, "--data", "{specs}:strings"), 2),
    ("inspect/every target ignored", ("inspect", "--model", M, "--data",
                                      "{specs}:all_ignored_data"), 2),
    ("inspect/targets out of range", ("inspect", "--model", M, "--data",
                                      "{specs}:out_of_range_data"), 2),
    ("inspect/unknown loss", ("inspect", "--model", M, "--data", D, "--loss", "hinge"), 2),
    ("inspect/loss not callable", ("inspect", "--model", M, "--data", D, "--loss",
                                   "{specs}:NOT_CALLABLE"), 2),
    ("inspect/checkpoint missing", ("inspect", "{root}/nope.pt"), 2),
    ("inspect/checkpoint empty", ("inspect", "{root}/empty.pt"), 2),
    ("inspect/checkpoint garbage", ("inspect", "{root}/garbage.pt"), 2),
    ("inspect/checkpoint truncated", ("inspect", "{root}/truncated.pt"), 2),
    ("inspect/zip that is not torch", ("inspect", "{root}/not_torch.zip"), 2),
    ("inspect/bad safetensors header", ("inspect", "{root}/bad_header.safetensors"), 2),
    ("inspect/directory without weights", ("inspect", "{root}/no_weights"), 2),
    ("inspect/shard index not json", ("inspect", "{root}/shards"), 2),
    ("inspect/shard outside the directory", ("inspect", "{root}/outside_index"), 2),
    ("inspect/missing shard", ("inspect", "{root}/missing_shard"), 2),
    ("inspect/state dict with data but no model", ("inspect", "{root}/state.pt",
                                                   "--input-shape", "4,8"), 2),
    ("inspect/checkpoint not fitting the model", ("inspect", "{root}/state.pt", "--model", M,
                                                  "--input-shape", "4,8"), 2),
    ("inspect/run directory as checkpoint", ("inspect", "{run}"), 2),
    # ------------------------------------------------------------------ lr-find
    ("lr-find/no data", ("lr-find", "--model", M), 2),
    ("lr-find/negative start", ("lr-find", "--model", M, "--data", D, "--start-lr", "-1"), 2),
    ("lr-find/nan start", ("lr-find", "--model", M, "--data", D, "--start-lr", "nan"), 2),
    ("lr-find/infinite end", ("lr-find", "--model", M, "--data", D, "--end-lr", "inf"), 2),
    ("lr-find/reversed range", ("lr-find", "--model", M, "--data", D, "--start-lr", "1",
                                "--end-lr", "0.1"), 2),
    ("lr-find/too few steps", ("lr-find", "--model", M, "--data", D, "--steps", "0"), 2),
    ("lr-find/accumulate zero", ("lr-find", "--model", M, "--data", D, "--accumulate", "0"),
     2),
    ("lr-find/trial steps zero", ("lr-find", "--model", M, "--data", D, "--trial-steps", "0"),
     2),
    ("lr-find/negative momentum", ("lr-find", "--model", M, "--data", D, "--optimizer", "sgd",
                                   "--momentum", "-1"), 2),
    ("lr-find/nan momentum", ("lr-find", "--model", M, "--data", D, "--optimizer", "sgd",
                              "--momentum", "nan"), 2),
    ("lr-find/negative weight decay", ("lr-find", "--model", M, "--data", D,
                                       "--weight-decay", "-1"), 2),
    ("lr-find/unknown optimizer", ("lr-find", "--model", M, "--data", D, "--optimizer",
                                   "lion"), 2),
    ("lr-find/optimizer not callable", ("lr-find", "--model", M, "--data", D, "--optimizer",
                                        "{specs}:NOT_CALLABLE"), 2),
    ("lr-find/optimizer raising", ("lr-find", "--model", M, "--data", D, "--optimizer",
                                   "{specs}:raising_optimizer"), 3),
    ("lr-find/sys.exit in the optimizer", ("lr-find", "--model", M, "--data", D,
                                           "--optimizer", "{specs}:exit_optimizer"), 3),
    ("lr-find/sys.exit while iterating", ("lr-find", "--model", M, "--data",
                                          "{specs}:exiting_iterable", "--steps", "10"), 3),
    ("lr-find/huge seed", ("lr-find", "--model", M, "--data", D, "--seed", str(2**64)), 2),
    ("lr-find/meta model", ("lr-find", "--model", "{specs}:meta_mlp", "--data", D), 2),
    ("lr-find/no parameters", ("lr-find", "--model", "{specs}:NoParams", "--data", D), 2),
    ("lr-find/frozen model", ("lr-find", "--model", "{specs}:frozen", "--data", D), 2),
    ("lr-find/empty data", ("lr-find", "--model", M, "--data", "{specs}:empty"), 2),
    ("lr-find/empty val data", ("lr-find", "--model", M, "--data", D, "--val-data",
                                "{specs}:empty"), 2),
    ("lr-find/val data spec missing", ("lr-find", "--model", M, "--data", D, "--val-data",
                                       "{specs}:nope"), 2),
    ("lr-find/val data of strings", ("lr-find", "--model", M, "--data", D, "--val-data",
                                     "{specs}:strings"), 2),
    ("lr-find/val targets out of range", ("lr-find", "--model", M, "--data", D, "--val-data",
                                          "{specs}:out_of_range_data", "--trial-steps", "2"),
     2),
    ("lr-find/val data with --no-trials", ("lr-find", "--model", M, "--data", D,
                                           "--val-data", D, "--no-trials"), 2),
    ("lr-find/plot under a file", ("lr-find", "--model", M, "--data", D, "--plot",
                                   "{root}/a_file/curve.png"), 2),
    ("lr-find/plot is a directory", ("lr-find", "--model", M, "--data", D, "--plot",
                                     "{root}/dir.png"), 2),
    # ------------------------------------------------------------------ check
    ("check/neither run nor model", ("check", "--steps", "5"), 2),
    ("check/run and model", ("check", "{run}", "--model", M, "--data", D), 2),
    ("check/model without data", ("check", "--model", M), 2),
    ("check/run missing", ("check", "{root}/nope"), 2),
    ("check/run is a file", ("check", "{root}/a_file"), 2),
    ("check/directory that is not a run", ("check", "{root}/no_meta"), 2),
    ("check/run with no step", ("check", "{root}/empty_run"), 2),
    ("check/corrupt meta", ("check", "{root}/bad_meta"), 2),
    ("check/unknown schema", ("check", "{root}/future_run"), 2),
    ("check/junit is a directory", ("check", "{run}", "--junit", "{root}/a_dir"), 2),
    ("check/junit under a file", ("check", "{run}", "--junit", "{root}/a_file/j.xml"), 2),
    ("check/negative lr", ("check", "--model", M, "--data", D, "--lr", "-1"), 2),
    ("check/nan lr", ("check", "--model", M, "--data", D, "--lr", "nan"), 2),
    ("check/infinite lr", ("check", "--model", M, "--data", D, "--lr", "inf"), 2),
    ("check/zero lr", ("check", "--model", M, "--data", D, "--lr", "0"), 2),
    ("check/zero steps", ("check", "--model", M, "--data", D, "--steps", "0"), 2),
    ("check/log dir is a file", ("check", "--model", M, "--data", D, "--log-dir",
                                 "{root}/a_file"), 2),
    ("check/log dir under a file", ("check", "--model", M, "--data", D, "--log-dir",
                                    "{root}/a_file/run"), 2),
    ("check/log dir holds a run", ("check", "--model", M, "--data", D, "--steps", "2",
                                   "--log-dir", "{run}"), 2),
    ("check/unknown optimizer", ("check", "--model", M, "--data", D, "--optimizer", "lion"),
     2),
    ("check/meta model", ("check", "--model", "{specs}:meta_mlp", "--data", D), 2),
    ("check/no parameters", ("check", "--model", "{specs}:NoParams", "--data", D), 2),
    ("check/empty data", ("check", "--model", M, "--data", "{specs}:empty"), 2),
    ("check/every target ignored", ("check", "--model", M, "--data",
                                    "{specs}:all_ignored_data"), 2),
    ("check/sys.exit in forward", ("check", "--model", "{specs}:ExitInForward", "--data", D),
     3),
    ("check/bad fail-on", ("check", "{run}", "--fail-on", "critical"), 2),
    # ------------------------------------------------------------------ report
    ("report/run missing", ("report", "{root}/nope"), 2),
    ("report/run is a file", ("report", "{root}/a_file"), 2),
    ("report/directory that is not a run", ("report", "{root}/no_meta"), 2),
    ("report/corrupt meta", ("report", "{root}/bad_meta"), 2),
    ("report/unknown schema", ("report", "{root}/future_run"), 2),
    ("report/out is a file", ("report", "{run}", "--out", "{root}/a_file"), 2),
    ("report/out under a file", ("report", "{run}", "--out", "{root}/a_file/figs"), 2),
    # ------------------------------------------------------------------ no command
    ("unknown command", ("diagnose", "--model", M), 2),
    ("unknown option", ("inspect", "--model", M, "--frobnicate"), 2),
]


@pytest.mark.parametrize(("args", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_never_exits_4(world, args, code):
    argv = [arg.format(**world) for arg in args]
    result = runner.invoke(app, argv)
    assert result.exit_code != 4, (argv, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv, result.exception)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.exit_code == code, (argv, result.exit_code, result.stderr)
    assert result.stdout == "", result.stdout
    if result.stderr.startswith("Usage:"):  # refused by click while parsing the command line
        assert code == 2 and "Error" in result.stderr
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr


def test_the_sweep_covers_every_command():
    commands = {c[1][0] for c in CASES}
    assert {"inspect", "lr-find", "check", "report"} <= commands
    assert sum(c[0].startswith("check/") and "--model" in c[1] for c in CASES) >= 10
