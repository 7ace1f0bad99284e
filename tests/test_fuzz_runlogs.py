"""Fuzzing run logs at the edges of numbers and JSON, and with special files in their place.

Properties, for a real run whose numbers hypothesis replaces with edge values (the largest and
smallest float64 and float32, overflowing literals, -0.0, NaN and Infinity literals and their
strings, 400-digit and 5,000-digit integers, negative and int64-overflowing steps, values of
the wrong type, nesting up to 100,000 deep) and whose files it may replace with a FIFO, a
device, a directory or a dangling symlink:

* ``nndiag check`` ends with exit code 0, 1 or 2, never 4, never a traceback, never a hang;
  its ``--json`` output parses;
* a FIFO, a device or a directory in a run file's place is exit code 2;
* the report's figures draw whatever the reader accepted.

Derandomized and few examples, as ``tests/test_fuzz.py``; ``NNDIAG_FUZZ_EXAMPLES=2000`` searches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nndiag.errors import UsageError
from tests.test_bad_input_sweep import record_run
from tests.test_fuzz import cli, fuzz
from tests.test_hardening_runlogs import deadline, put_special_file

_FLOAT64_MAX = "1.7976931348623157e308"
_FLOAT32_MAX = "3.4028234663852886e38"
EDGE_NUMBERS = [
    _FLOAT64_MAX, "-" + _FLOAT64_MAX, "1e308", "1e309", "-1e309", "5e-324", "-5e-324",
    "2.2250738585072014e-308", _FLOAT32_MAX, "-" + _FLOAT32_MAX, "3.5e38",
    "1.1754943508222875e-38", "1.401298464324817e-45", "0", "-0.0", "0.0", "1", "-1",
    "NaN", "Infinity", "-Infinity", '"nan"', '"inf"', '"-inf"', '"NaN"', '"1.5"',
    "9" * 400, "-" + "9" * 400, "1" * 5000, "9223372036854775807", "9223372036854775808",
    "true", "null", "[]", "{}", '"x"', "[1, [2, [3]]]",
]
deep = st.sampled_from([10, 900, 1100, 100_000]).map(lambda n: "[" * n + "]" * n)
unbalanced = st.sampled_from([1000, 100_000]).map(lambda n: "[" * n)
number_text = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(json.dumps),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.integers(-(10**450), 10**450).map(str),
    deep, unbalanced,
)

# Where numbers sit in each file of a run (``"*"``: any element of the list there).
NUMBER_PATHS = {
    "steps.jsonl": [("first",), ("loss", "*"), ("lr", "*")],
    "samples.jsonl": [("step",), ("loss",), ("grad_norm",), ("layers", "std", "*"),
                      ("layers", "mean", "*"), ("layers", "dead_fraction", "*"),
                      ("layers", "weight_norm", "*"), ("layers", "grad_norm", "*"),
                      ("layers", "update_ratio", "*"), ("layers", "index", "*"),
                      ("layers", "name", "*"), ("layers", "kind", "*")],
    "meta.json": [("every",), ("world_size",), ("trainable_parameters",), ("model",),
                  ("optimizer",), ("weight_layers", "*", "kind"), ("schema",)],
    "amp.jsonl": [("step",), ("scale",)],
}
SPECIAL_KINDS = ["fifo", "/dev/zero", "/dev/urandom", "directory", "dangling symlink"]

replacement = st.fixed_dictionaries({
    "file": st.sampled_from(sorted(NUMBER_PATHS)),
    "line": st.floats(0, 1, exclude_max=True),
    "path": st.integers(0, 20),
    "element": st.integers(0, 20),
    "text": number_text,
})
extra_line = st.tuples(st.sampled_from(["steps.jsonl", "samples.jsonl", "amp.jsonl"]),
                       st.one_of(number_text, number_text.map(
                           lambda n: '{"first": 0, "loss": [' + n + '], "lr": [0.1]}')))
special = st.one_of(st.none(), st.tuples(st.sampled_from(sorted(NUMBER_PATHS)),
                                         st.sampled_from(SPECIAL_KINDS)))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    run = record_run(tmp_path_factory.mktemp("fuzz_runlogs") / "run", steps=8)
    (run / "amp.jsonl").write_text('{"step": 1, "scale": 32768.0}\n'
                                   '{"step": 3, "scale": 16384.0}\n')
    return run


def _replace(record: object, path: tuple[str, ...], element: int, marker: str) -> bool:
    """Put ``marker`` at ``path`` in the record (``*``: element number ``element``)."""
    *parents, last = path
    node = record
    for key in parents:
        if key == "*":
            if not isinstance(node, list) or not node:
                return False
            node = node[element % len(node)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    if last == "*" and isinstance(node, list) and node:
        node[element % len(node)] = marker
        return True
    if last != "*" and isinstance(node, dict):
        node[last] = marker
        return True
    return False


def damage(source: Path, target: Path, replacements: list[dict],
           extra: list[tuple[str, str]], special_file: tuple[str, str] | None) -> None:
    """Copy the run, put the number texts in place of its numbers, add lines, swap a file."""
    shutil.copytree(source, target)
    for number, change in enumerate(replacements):
        path = target / change["file"]
        if change["file"] == "meta.json":
            lines = [path.read_text()]
        else:
            lines = path.read_text().splitlines()
        index = int(change["line"] * len(lines))
        try:
            record = json.loads(lines[index])
        except (ValueError, RecursionError):  # damaged by an earlier replacement
            continue
        paths = NUMBER_PATHS[change["file"]]
        marker = f"@number{number}@"
        if _replace(record, paths[change["path"] % len(paths)], change["element"], marker):
            lines[index] = json.dumps(record).replace(json.dumps(marker), change["text"])
        path.write_text("\n".join(lines) + "\n")
    for name, line in extra:
        with open(target / name, "a") as out:
            out.write(line + "\n")
    if special_file is not None:
        name, kind = special_file
        put_special_file(target / name, kind)


@fuzz(40)
@given(replacements=st.lists(replacement, min_size=1, max_size=4),
       extra=st.lists(extra_line, max_size=2), special_file=special, as_json=st.booleans())
def test_check_survives_edge_numbers_and_special_files(tmp_path_factory, clean_run, replacements,
                                                       extra, special_file, as_json):
    target = tmp_path_factory.mktemp("edge") / "run"
    damage(clean_run, target, replacements, extra, special_file)
    with deadline(30):
        result = cli("check", target, *(["--json"] * as_json))
    if special_file is not None and special_file[1] != "dangling symlink":
        assert result.exit_code == 2  # refused (or an earlier file was)
    if as_json and result.exit_code != 2:
        json.loads(result.stdout)


@fuzz(4)
@given(replacements=st.lists(replacement, min_size=1, max_size=4),
       extra=st.lists(extra_line, max_size=2))
def test_the_report_draws_what_the_reader_accepts(tmp_path_factory, clean_run, replacements,
                                                  extra):
    from nndiag.render.plots.run_figures import FIGURES
    from nndiag.run_check import judge_run
    from nndiag.runlog import read_run

    target = tmp_path_factory.mktemp("edge_report") / "run"
    damage(clean_run, target, replacements, extra, None)
    try:
        log = read_run(target)
    except UsageError:
        return
    report = judge_run(log)
    for figure in FIGURES.values():  # drawn, not saved: saving a PNG only costs time here
        figure(log, report.findings)
