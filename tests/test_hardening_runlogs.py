"""Run logs under hostile input: long runs, special files, edge numbers, terminal escapes.

* ``nndiag check`` on a long run is near-linear: the running median of the loss is exact (the
  old per-window ``statistics.median``, bit for bit) in O(n log n);
* a FIFO or a device in a run file's place is refused (exit 2) before a byte is read, and an
  over-long line is skipped without being held in memory;
* ``write_atomic`` replaces regular files only: a FIFO, a device (a twin of ``/dev/null``) or a
  symlink to either is written in place, a symlink to a regular file keeps being a symlink;
* malformed numbers and nesting in a run log are skipped lines, a ``meta.json`` field of the
  wrong type is exit 2, never exit 4;
* names from a run log or a live model reach the terminal escaped, never as markup.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import stat
import statistics
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.errors import UsageError
from nndiag.files import read_lines, write_atomic
from nndiag.render.safe import printable
from nndiag.rules.run import running_median
from nndiag.run_check import check_run
from nndiag.runlog import RunLog, read_run
from tests.test_bad_input_sweep import record_run

runner = CliRunner()
ESCAPES = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging when the body runs past ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: object):
    """Run the CLI under a deadline; assert the exit-code contract; return the result."""
    with deadline(30):
        result = runner.invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, TimeoutError), "the command hung"
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stdout == "", result.stderr
    return result


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return record_run(tmp_path_factory.mktemp("hardening_run") / "run", steps=12)


@pytest.fixture
def run(clean_run, tmp_path) -> Path:
    """A fresh copy of a small real run, to damage."""
    return Path(shutil.copytree(clean_run, tmp_path / "run"))


def edit_meta(run: Path, **fields: object) -> None:
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, **fields}))


# ----------------------------------------------------------------------- long runs


def median_per_window(values: list[float], window: int) -> list[float]:
    """The first release's running median: ``statistics.median`` of every window (O(n w))."""
    half = window // 2
    return [statistics.median(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def median_nan_last(values: list[float], window: int) -> list[float]:
    """The same with NaN ordered above every number (``statistics.median`` cannot order NaN)."""
    half, out = window // 2, []
    for i in range(len(values)):
        ordered = sorted(values[max(0, i - half): i + half + 1],
                         key=lambda v: (math.isnan(v), 0.0 if math.isnan(v) else v))
        middle = len(ordered) // 2
        out.append(ordered[middle] if len(ordered) % 2 else
                   (ordered[middle - 1] + ordered[middle]) / 2)
    return out


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal bit for bit: the sign of zero and NaN included."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y))
        for x, y in zip(a, b, strict=True))


EDGES = [0.0, -0.0, 1.0, math.inf, -math.inf, 1e308, -1e308, 1.7976931348623157e308, 5e-324,
         3.4028234663852886e38]


@pytest.mark.parametrize("seed", range(4))
def test_running_median_equals_the_median_of_every_window(seed):
    rng = random.Random(seed)
    for _ in range(150):
        pool = rng.sample(EDGES, 3)
        values = [rng.choice(pool) if rng.random() < 0.3 else round(rng.gauss(0, 1), 1)
                  for _ in range(rng.randint(0, 70))]
        window = rng.randint(1, 80)
        assert same_floats(running_median(values, window),
                           median_per_window(values, window)), (values, window)


def test_running_median_orders_nan_above_every_number():
    rng = random.Random(7)
    for _ in range(200):
        values = [rng.choice([math.nan, math.inf, -math.inf, rng.gauss(0, 1)])
                  for _ in range(rng.randint(1, 40))]
        window = rng.randint(1, 30)
        assert same_floats(running_median(values, window),
                           median_nan_last(values, window)), (values, window)


def test_checking_a_long_run_is_not_quadratic_in_its_length():
    """100,000 steps took 48 s with a median per window (its window grows with the run)."""
    rng = random.Random(0)
    steps = 100_000
    losses = [2 * math.exp(-5 * i / steps) + 0.3 + rng.gauss(0, 0.05) for i in range(steps)]
    log = RunLog(Path("long"), {"schema": "nndiag.run/2"}, steps=list(range(steps)),
                 losses=losses, lrs=[0.01] * steps)
    start = time.perf_counter()
    report = check_run(log)
    assert time.perf_counter() - start < 10
    assert report.summary["steps"] == steps and not report.findings


# ----------------------------------------------------------------------- special files


def put_special_file(path: Path, kind: str) -> None:
    """Put in ``path``'s place a ``fifo``, a ``directory``, a ``dangling symlink`` or a
    symlink to ``kind`` (a device such as ``/dev/zero``)."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling symlink":
        path.symlink_to(path.parent / "nowhere")
    else:
        path.symlink_to(kind)


@pytest.mark.parametrize("name", ["meta.json", "steps.jsonl", "samples.jsonl", "amp.jsonl"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom", "directory"])
def test_a_run_file_that_is_not_a_regular_file_is_refused(run, name, kind):
    put_special_file(run / name, kind)
    result = cli("check", run)
    assert result.exit_code == 2, result.stderr
    assert "not a regular file" in result.stderr and name in result.stderr


def test_an_over_long_line_is_skipped_without_holding_it(run, monkeypatch):
    monkeypatch.setattr("nndiag.files.MAX_LINE_BYTES", 2 * 2**20)
    with open(run / "steps.jsonl", "a") as out:  # a line of 24 MiB, then a good one
        out.write('{"first": 12, "loss": [' + "1," * (12 * 2**20) + "1]}\n")
        out.write('{"first": 12, "loss": [0.5], "lr": [0.1]}\n')
    tracemalloc.start()
    try:
        log = read_run(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert log.skipped_lines == 1 and log.steps[-1] == 12 and log.losses[-1] == 0.5
    assert peak < 8 * 2**20, peak / 2**20  # the bound and a chunk, not the 24 MiB line


@pytest.mark.parametrize("limit", [1, 8])
def test_read_lines_splits_like_split_and_drops_what_is_over_the_limit(tmp_path, monkeypatch,
                                                                       limit):
    monkeypatch.setattr("nndiag.files._CHUNK_BYTES", 5)  # lines across chunk boundaries
    rng = random.Random(limit)
    for _ in range(100):
        data = b"".join(rng.choice([b"a", b"bcd", b"\n", b"efghijklmno", b"\xff", b"\r\n"])
                        for _ in range(rng.randint(0, 25)))
        (tmp_path / "lines").write_bytes(data)
        expected = [None if len(line) > limit else line.decode("utf-8", "replace")
                    for line in data.split(b"\n")]
        if expected[-1] == "":
            expected.pop()
        assert list(read_lines(tmp_path / "lines", limit)) == expected, data


# ----------------------------------------------------------------------- writing in place


def _read_fifo(path: Path, into: list[bytes]) -> threading.Thread:
    reader = threading.Thread(target=lambda: into.append(path.read_bytes()), daemon=True)
    reader.start()
    return reader


def test_write_atomic_writes_a_fifo_in_place_through_a_symlink(tmp_path):
    fifo, link = tmp_path / "fifo", tmp_path / "out.xml"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    received: list[bytes] = []
    reader = _read_fifo(fifo, received)
    with deadline(20):
        write_atomic(link, lambda temp: Path(temp).write_text("<xml/>"))
    reader.join(20)
    assert received == [b"<xml/>"]
    assert link.is_symlink() and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "out.xml"]


@pytest.fixture
def null_device(tmp_path) -> Path:
    """A character device that reads empty and swallows writes: /dev/null's twin, in tmp_path.

    The tests write to it rather than to /dev/null: as root, a regression would replace the
    machine's /dev/null with a file.
    """
    path = tmp_path / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return path


@pytest.mark.parametrize("through_symlink", [False, True])
def test_junit_to_a_null_device_leaves_it_a_device(run, tmp_path, null_device,
                                                   through_symlink):
    target = null_device
    if through_symlink:
        target = tmp_path / "junit.xml"
        target.symlink_to(null_device)
    result = cli("check", run, "--junit", target)
    assert result.exit_code == 0 and result.stdout
    assert null_device.is_char_device() and null_device.read_bytes() == b""
    assert target.is_symlink() == through_symlink


def test_a_symlink_to_a_regular_file_stays_a_symlink_and_its_target_is_replaced(run, tmp_path):
    real, link = tmp_path / "reports" / "junit.xml", tmp_path / "junit.xml"
    real.parent.mkdir()
    real.write_text("old")
    link.symlink_to(real)
    assert cli("check", run, "--junit", link).exit_code == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert real.read_text().startswith("<?xml") and "testsuite" in real.read_text()
    assert sorted(p.name for p in real.parent.iterdir()) == ["junit.xml"]  # no temporary


def test_a_dangling_symlink_gets_its_target_written(tmp_path):
    link = tmp_path / "page.html"
    link.symlink_to(tmp_path / "target.html")
    write_atomic(link, lambda temp: Path(temp).write_text("<p>"))
    assert link.is_symlink() and (tmp_path / "target.html").read_text() == "<p>"


# ----------------------------------------------------------------------- never exit 4

BIG = "9" * 400  # beyond a float: OverflowError on conversion
HUGE = "1" * 5000  # beyond Python's int-string limit: ValueError in json
DEEP = "[" * 100_000  # RecursionError in json


@pytest.mark.parametrize("line", [
    DEEP,
    '{"first": 12, "loss": [' + DEEP + "]}",
    '{"first": 12, "loss": [' + HUGE + '], "lr": [0.1]}',
    '{"first": 12, "loss": [' + BIG + '], "lr": [0.1]}',
    '{"first": 12, "loss": [0.5], "lr": [' + BIG + "]}",
    '{"first": ' + BIG + ', "loss": [0.5], "lr": [0.1]}',
    '{"first": -3, "loss": [0.5], "lr": [0.1]}',
    '{"first": 9223372036854775807, "loss": [0.5, 0.4], "lr": [0.1, 0.1]}',
], ids=["deep", "deep loss", "5000 digits", "400-digit loss", "400-digit lr", "huge first",
        "negative first", "past int64"])
def test_a_malformed_steps_line_is_skipped(run, line):
    with open(run / "steps.jsonl", "a") as out:
        out.write(line + "\n")
    result = cli("check", run)
    assert result.exit_code in (0, 1)
    assert "1 unreadable line(s) skipped" in result.stdout


@pytest.mark.parametrize(("field", "number"), [
    ("grad_norm", BIG), ("loss", BIG), ("std", BIG), ("step", BIG), ("grad_norm", HUGE),
    ("step", "-1"), ("layers", DEEP)])
def test_a_malformed_sample_is_skipped(run, field, number):
    lines = (run / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    if field == "std":
        record["layers"]["std"][0] = "NUMBER"
    else:
        record[field] = "NUMBER"
    lines[-1] = json.dumps(record).replace('"NUMBER"', number)
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("check", run)
    assert result.exit_code in (0, 1)
    assert "1 unreadable line(s) skipped" in result.stdout


@pytest.mark.parametrize("change", [{"sites": [1]}, {"weights": "x"}, {"sites": {"name": [3]}},
                                    {"weights": {"name": ["0"], "weight_norm": [BIG]}}])
def test_a_malformed_sample_of_a_first_version_run_is_skipped(tmp_path, change):
    run = Path(shutil.copytree(Path(__file__).parent / "fixtures" / "run_v1", tmp_path / "run"))
    lines = (run / "samples.jsonl").read_text().splitlines()
    record = {**json.loads(lines[-1]), **change}
    lines[-1] = json.dumps(record).replace(f'"{BIG}"', BIG)
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("check", run)
    assert result.exit_code in (0, 1) and "1 unreadable line(s) skipped" in result.stdout


def test_malformed_amp_lines_are_skipped(run):
    (run / "amp.jsonl").write_text("\n".join([
        '{"step": 3, "scale": 32768.0}', '{"step": 4, "scale": ' + BIG + "}",
        '{"step": 1e308, "scale": 1.0}', '{"step": 5.0, "scale": 1.0}', '{"step": -1}',
        '{"step": ' + HUGE + "}", DEEP, "[1]", '"x"']) + "\n")
    assert read_run(run).skipped_steps == [{"step": 3, "scale": 32768.0}]
    assert cli("check", run).exit_code in (0, 1)


@pytest.mark.parametrize(("field", "value"), [
    ("world_size", "x"), ("world_size", 0), ("world_size", True), ("every", "10"),
    ("every", -1), ("every", 1.5), ("model", ["a"]), ("model", {"nested": 1}),
    ("optimizer", 3), ("weight_layers", "abc"), ("weight_layers", [1, 2]),
    ("weight_layers", [{"name": "fc", "kind": 7}]), ("trainable_parameters", "many"),
    ("created", 12), ("grad_scaler", []),
])
def test_a_meta_field_of_the_wrong_type_is_exit_2(run, field, value):
    edit_meta(run, **{field: value})
    result = cli("check", run)
    assert result.exit_code == 2 and repr(field) in result.stderr, result.stderr
    assert cli("report", run, "--out", run / "report").exit_code == 2


@pytest.mark.parametrize("text", [
    '{"schema": "nndiag.run/2", "x": ' + DEEP + "}",
    '{"schema": "nndiag.run/2", "n": ' + HUGE + "}",
    '{"schema": ' + BIG + "}", '["nndiag.run/2"]', "\xff\xfe",
], ids=["deep", "5000 digits", "number schema", "a list", "not utf-8"])
def test_an_unreadable_meta_is_exit_2(run, text):
    (run / "meta.json").write_bytes(text.encode("latin-1"))
    assert cli("check", run).exit_code == 2


def test_an_oversized_meta_is_refused_unread(run, monkeypatch):
    monkeypatch.setattr("nndiag.runlog.MAX_META_BYTES", 100)
    result = cli("check", run)
    assert result.exit_code == 2 and "too large" in result.stderr


# ----------------------------------------------------------------------- terminal

EVIL = "Evil\x1b[31m\x1b]0;title\x07[bold]x\u202eyxe\u2066"


def assert_inert(output: str) -> None:
    """No control sequence or bidirectional override of the name reaches the output."""
    assert not any(char in output for char in ESCAPES), ascii(output)
    assert printable(EVIL) in output  # shown, escaped, markup brackets included


def test_a_model_name_from_meta_is_printed_escaped(run):
    edit_meta(run, model=EVIL, optimizer="[red]SGD\x1b[2J")
    result = cli("check", run)
    assert_inert(result.stdout)
    assert "[red]SGD\\x1b[2J" in result.stdout


def test_a_run_directory_name_is_printed_escaped(tmp_path, clean_run):
    run = Path(shutil.copytree(clean_run, tmp_path / EVIL))
    assert_inert(cli("check", run).stdout)


def _evil_model() -> nn.Module:
    evil_linear = type(EVIL, (nn.Linear,), {})
    model = type(EVIL, (nn.Sequential,), {})(evil_linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model


def test_a_live_model_class_name_is_printed_escaped_by_check(tmp_path):
    record_run(tmp_path / "run", steps=12, model=_evil_model())
    assert read_run(tmp_path / "run").meta["model"] == EVIL
    assert_inert(cli("check", tmp_path / "run").stdout)


def test_a_live_model_class_name_is_printed_escaped_by_inspect(tmp_path):
    spec = tmp_path / "evil_spec.py"
    spec.write_text(textwrap.dedent(f'''
        from torch import nn

        EVIL = {EVIL!r}


        def model():
            linear = type(EVIL, (nn.Linear,), {{}})
            return type(EVIL, (nn.Sequential,), {{}})(linear(8, 16), nn.ReLU(),
                                                     nn.Linear(16, 4))
    '''))
    result = cli("inspect", "--model", f"{spec}:model", "--input-shape", "4,8")
    assert_inert(result.stdout)
    assert result.stdout.count(printable(EVIL)) >= 2  # the header and the layer's kind


def test_messages_print_paths_escaped(run, tmp_path):
    junit = tmp_path / "[bold]j\x1b[2J.xml"
    result = cli("check", run, "--junit", junit)
    assert "wrote" in result.stderr and "[bold]j\\x1b[2J.xml" in result.stderr
    assert "\x1b[2J" not in result.stderr


def test_report_prints_its_paths_escaped_and_exits_like_check(run, tmp_path):
    with open(run / "steps.jsonl", "a") as out:
        out.write('{"first": 12, "loss": ["nan"], "lr": [0.1]}\n')
    assert cli("check", run).exit_code == 1
    result = cli("report", run, "--out", tmp_path / EVIL)
    assert result.exit_code == 1 and "index.html" in result.stdout
    assert_inert(result.stdout)


def test_usage_errors_name_the_run_file(run):
    (run / "steps.jsonl").unlink()
    os.mkfifo(run / "steps.jsonl")
    with pytest.raises(UsageError, match="named pipe"):
        read_run(run)
