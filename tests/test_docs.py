"""The documentation: a strict site build, complete generated references, tested README examples.

The reference pages are generated from the code by ``docs/gen_reference.py`` (the mkdocs hook);
these tests check that they list every finding, threshold, fix and command-line option, that
they follow the threshold tables the rules read, that ``nndiag check --json`` follows its
schema, and that the README's examples print what the README shows.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from nndiag.advice.catalog import CATALOG
from nndiag.findings import FindingId
from nndiag.records import ProbeRecord, SanityRecord
from nndiag.render.json import render_json
from nndiag.rules import thresholds
from nndiag.rules.registry import RULES, finding_ids
from nndiag.rules.thresholds import Threshold
from nndiag.run_check import check_run
from nndiag.runlog import RunLog

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RUNS = sorted(p for p in (ROOT / "sample_runs").iterdir() if (p / "meta.json").is_file())
# The site's theme announces a future MkDocs it will not support; the build is otherwise quiet.
DOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def _load_generator():
    path = ROOT / "docs" / "gen_reference.py"
    spec = importlib.util.spec_from_file_location("gen_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _section(page: str, finding_id: str) -> str:
    """The part of the findings page about one finding."""
    start = page.index(f"## `{finding_id}` {{#{finding_id}}}")
    end = page.find("\n## ", start + 1)
    return page[start:end if end >= 0 else None]


# ---------------------------------------------------------------------------------- the site


def test_site_builds_strictly_with_the_generated_references(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                            cwd=ROOT, env=DOCS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    findings = (site / "reference" / "findings" / "index.html").read_text(encoding="utf-8")
    assert all(f'id="{f.value}"' in findings for f in FindingId)
    assert all(f'id="fix-{fix}"' in findings for fix in CATALOG)
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert 'id="check"' in cli and "--train-step" in cli
    assert (site / "reference" / "python-api" / "index.html").read_text(
        encoding="utf-8").count("inspect_model") > 1


def test_every_marker_names_a_generator_and_every_generator_is_used():
    used = {name for _, name in gen.markers()}
    assert used == set(gen.GENERATORS)
    with pytest.raises(KeyError, match="unknown generated section"):
        gen.expand("<!-- nndiag:nothing -->")


# ------------------------------------------------------------------------ findings reference


def test_every_finding_rule_threshold_and_fix_has_a_reference_entry():
    page = gen.findings_markdown()
    for finding in FindingId:
        section = _section(page, finding.value)
        assert "*Rule*" in section, finding
    for rule in RULES:
        function = gen._unwrap(rule.check)[-1]
        for finding in rule.ids:
            assert f"`{function.__module__}.{function.__name__}`" in _section(page, finding)
    every_threshold = {**thresholds.THRESHOLDS, **thresholds.RUN_THRESHOLDS,
                       **thresholds.CHECKPOINT_THRESHOLDS}
    for name in every_threshold:  # each one is read by some rule, and shown with it
        assert gen._breakable(name) in page, name
    for fix in CATALOG:
        assert f"{{#fix-{fix}}}" in page
        assert f"(#fix-{fix})" in page, f"no finding recommends {fix}"


def test_rules_are_read_for_their_thresholds_constants_severities_and_fixes():
    entries = gen.rule_entries()
    live_dead = next(r for r in entries["dead_relu"] if r.context == "ProbeRecord")
    assert live_dead.thresholds == ["dead_fraction"]
    assert set(live_dead.constants) == {"MIN_UNITS_FOR_DEAD_FRACTION", "MIN_SAMPLES_FOR_DEAD_UNITS"}
    assert live_dead.severities == ["warning", "error"]
    assert "he_init" in live_dead.fixes
    data_free = next(r for r in entries["poor_initialization"] if r.context == "CheckpointRecord")
    assert {"init_scale_untrained", "batch_norm_gain", "activation_growth"} <= set(
        data_free.thresholds)
    # A rule that calls another rule (the labels check calls the overfitting check) takes none
    # of the other's severities.
    assert entries["labels_misaligned"][0].severities == ["warning"]
    assert entries["unused_parameters"][0].severities == ["warning"]
    run_zero_grad = next(r for r in entries["zero_grad_missing"] if r.context == "RunLog")
    assert "SUMMED_GRADIENTS" in run_zero_grad.constants


def test_findings_page_follows_the_threshold_table_the_rules_read(monkeypatch):
    before = _section(gen.findings_markdown(), "dead_relu")
    assert "&ge; 0.5 | &ge; 0.9" in before
    changed = Threshold(0.375, 0.875, True, "A reason written by the test.")
    monkeypatch.setitem(thresholds.THRESHOLDS, "dead_fraction", changed)
    after = _section(gen.findings_markdown(), "dead_relu")
    assert "&ge; 0.375 | &ge; 0.875 | A reason written by the test." in after
    assert "&ge; 0.5 | &ge; 0.9" not in after


# ---------------------------------------------------------------------------- CLI reference


def test_every_command_and_option_is_in_the_cli_reference():
    page = gen.cli_markdown()
    group = gen.cli_command()
    names = [opt for p in group.params for opt in [*p.opts, *p.secondary_opts]]
    for name, command in group.commands.items():
        assert f"## `nndiag {name}` {{#{name}}}" in page
        section = page[page.index(f"{{#{name}}}"):]
        section = section[:section.find("\n## ") if "\n## " in section else None]
        for param in command.params:
            opts = [param.metavar or param.name.upper()] if param.param_type_name == "argument" \
                else [*param.opts, *param.secondary_opts]
            for opt in opts:
                assert f">{opt}</code>" in section, (name, opt)
            assert (param.help or "").split()[0] in section, (name, param.name)
    assert all(f">{n}</code>" in page for n in names)


# ---------------------------------------------------------------------------- JSON contracts


def _check_schema() -> dict:
    text = resources.files("nndiag").joinpath("schemas/check-1.schema.json").read_text()
    return json.loads(text)


def test_check_schema_lists_the_ids_the_check_can_report():
    schema = _check_schema()
    reported = {*finding_ids(ProbeRecord), *finding_ids(RunLog), *finding_ids(SanityRecord)}
    assert set(schema["$defs"]["finding_id"]["enum"]) == {str(i) for i in reported}
    assert set(schema["$defs"]["fix"]["properties"]["id"]["enum"]) == set(CATALOG)


@pytest.mark.parametrize("run", SAMPLE_RUNS, ids=lambda p: p.name)
def test_check_json_of_every_sample_run_follows_the_schema(run):
    report = json.loads(render_json(check_run(run)))
    jsonschema.validate(report, _check_schema())
    assert report["schema"] == "nndiag.check/1"


def test_gate_json_follows_the_check_schema():
    from nndiag import examples
    from nndiag.training_check import check_training
    from tests.fixtures.train_steps import no_zero_grad_step

    report = json.loads(render_json(check_training(
        examples.he_mlp(), examples.classification_data(), train_step=no_zero_grad_step,
        steps=10)))
    jsonschema.validate(report, _check_schema())
    assert report["summary"]["mode"] == "training"
    assert "zero_grad_missing" in {f["id"] for f in report["findings"]}
    report["findings"][0]["id"] = "not_a_finding"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, _check_schema())


def test_every_shipped_schema_is_in_the_contracts_reference():
    page = gen.contracts_markdown()
    for name, schema in gen.schemas().items():
        assert f"## `{schema['$id']}`" in page and name in page


# ----------------------------------------------------------------------------------- README


@dataclass
class Command:
    """A ``$ command`` of a README example, what the README shows it prints, its exit code."""

    line: str
    shown: list[str] = field(default_factory=list)
    exit_code: int | None = None


def readme_examples() -> list[list[Command]]:
    """Each README code block marked ``<!-- example -->``, as its commands."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- example -->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    examples = []
    for block in blocks:
        commands: list[Command] = []
        for line in block.splitlines():
            if line == "$ echo $?":
                commands.append(Command(line))
            elif line.startswith("$ "):
                commands.append(Command(line[2:]))
            elif commands and commands[-1].line == "$ echo $?":
                commands[-2].exit_code = int(line)
                commands.pop()
            elif commands:
                commands[-1].shown.append(line)
        examples.append(commands)
    return examples


def _headline(lines: list[str]) -> str:
    """What the README shows of an output, up to its ``...``, as words."""
    shown = lines[:lines.index("...")] if "..." in lines else lines
    return " ".join(" ".join(shown).split())


def _run_example(commands: list[Command], cwd: Path) -> list[tuple[Command, str, int]]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    results = []
    for command in commands:
        argv = shlex.split(command.line)
        argv[0] = sys.executable if argv[0] == "python" else str(bin_dir / argv[0])
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        results.append((command, done.stdout, done.returncode))
    return results


def test_readme_examples_print_what_the_readme_shows(tmp_path):
    examples = readme_examples()
    assert len(examples) >= 5, "the README lost its tested examples"
    for name in ("sample_runs", "tests"):  # the paths the examples name, from a scratch folder
        (tmp_path / name).symlink_to(ROOT / name)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda commands: _run_example(commands, tmp_path), examples))
    for results in runs:
        for command, stdout, code in results:
            if not command.shown and command.exit_code is None:
                assert code == 0, (command.line, stdout)
                continue
            expected = _headline(command.shown)
            assert " ".join(stdout.split()).startswith(expected), (command.line, stdout[:2000])
            if command.exit_code is not None:
                assert code == command.exit_code, command.line


def test_readme_fits_a_first_visit():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 210
    top = "\n".join(lines[:40])
    assert "make demo" in top and "make test" in top


# ---------------------------------------------------------------------------------- packaging


def test_package_ships_its_type_marker_and_schemas():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = config["tool"]["setuptools"]["package-data"]["nndiag"]
    assert "py.typed" in shipped and "schemas/*.json" in shipped
    assert resources.files("nndiag").joinpath("py.typed").is_file()
    assert "License :: OSI Approved :: MIT License" in config["project"]["classifiers"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_no_source_cites_a_design_document_that_is_not_in_the_repository():
    missing = "DESIGN" + ".md"
    cited = [path for folder in ("nndiag", "tests", "benchmarks", "docs", "sample_runs")
             for path in (ROOT / folder).rglob("*.py")
             if missing in path.read_text(encoding="utf-8")]
    assert not cited and not (ROOT / missing).exists()
