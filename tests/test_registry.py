"""One diagnosis layer: every finding id defined once, every rule registered with its advice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nndiag.advice import REGISTRY, context_kind
from nndiag.findings import Finding, FindingId
from nndiag.records import CheckpointRecord, LoadResult, ProbeRecord
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord
from nndiag.rules import RULES, finding_ids, run_rules
from nndiag.rules.sanity import SanityRecord
from nndiag.rules.thresholds import CHECKPOINT_THRESHOLDS, RUN_THRESHOLDS, THRESHOLDS
from nndiag.runlog import RunLog

PACKAGE = Path(__file__).resolve().parent.parent / "nndiag"
CONTEXTS = {ProbeRecord: ProbeRecord(layers=[], loss=1.0, loss_name="mse"),
            CheckpointRecord: CheckpointRecord("x", "state_dict", []),
            LoadResult: LoadResult(),
            LRCurveRecord: LRCurveRecord(0, 8),
            TrialsRecord: TrialsRecord([1e-3]),
            RunLog: RunLog(path=Path("run"), meta={}),
            SanityRecord: SanityRecord(loss_at_init=1.0)}


def test_every_finding_id_is_reported_by_a_registered_rule():
    assert {finding_id for rule in RULES for finding_id in rule.ids} == set(FindingId)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.context.__name__}:{r.ids[0]}")
def test_every_registered_rule_has_advice_for_each_finding_it_reports(rule):
    kind = context_kind(CONTEXTS[rule.context])
    for finding_id in rule.ids:
        assert (kind, finding_id) in REGISTRY, (kind, finding_id)


def test_every_advisor_belongs_to_a_registered_rule():
    registered = {(context_kind(CONTEXTS[rule.context]), finding_id)
                  for rule in RULES for finding_id in rule.ids}
    assert set(REGISTRY) <= registered


def test_a_context_lists_what_its_rules_can_report():
    assert finding_ids(SanityRecord)[0] == FindingId.ZERO_GRAD_MISSING
    assert FindingId.LOSS_OSCILLATING in finding_ids(RunLog)
    assert FindingId.LOSS_OSCILLATING not in finding_ids(ProbeRecord)


def test_run_rules_keeps_only_the_rules_that_mean_something_on_a_broken_probe():
    from tests.test_rules import probe_of, weight_layer  # hand-made records

    bad = weight_layer(1, float("nan"), float("nan"), std=float("nan"))
    probe = probe_of([weight_layer(0, 1e-9, 1e-9), bad], loss=float("nan"),
                     unused_parameters=["spare.weight"])
    assert [f.id for f in run_rules(probe)] == [FindingId.NAN_INF, FindingId.UNUSED_PARAMETERS]
    assert all(isinstance(f, Finding) for f in run_rules(probe))


def _bare_ids(path: Path) -> list[tuple[int, str]]:
    """String constants that are finding ids, outside docstrings, dict keys and lookups.

    A dict key or a subscript names a field or a threshold that shares its name with a
    finding (``evidence["dead_channels"]``, ``thresholds["update_ratio_high"]``).
    """
    ids = {finding_id.value for finding_id in FindingId}
    tree = ast.parse(path.read_text())
    exempt: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant):
            exempt.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Dict):
            exempt.update(id(key) for key in node.keys if key is not None)
        if isinstance(node, ast.Subscript):
            exempt.add(id(node.slice))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "get" and node.args:
            exempt.add(id(node.args[0]))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in ids and id(node) not in exempt]


def test_no_finding_id_is_a_bare_string_outside_its_definition():
    found = {str(path.relative_to(PACKAGE)): bare for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "findings.py" and (bare := _bare_ids(path))}
    assert found == {}


def test_every_threshold_of_every_context_has_a_reason_ordered_levels_and_one_name():
    tables = (THRESHOLDS, RUN_THRESHOLDS, CHECKPOINT_THRESHOLDS)
    names = [name for table in tables for name in table]
    assert len(names) == len(set(names))  # diagnose merges them by name
    for table in tables:
        for name, rule in table.items():
            assert len(rule.reason) > 40, name
            assert (rule.error > rule.warning) == rule.higher_is_worse, name


def test_the_inspect_schema_names_every_finding_and_fix_an_inspection_can_carry():
    import json
    from importlib import resources

    from nndiag.advice.catalog import CATALOG

    schema = json.loads(resources.files("nndiag").joinpath(
        "schemas/inspect-1.schema.json").read_text())
    finding_enum = set(schema["$defs"]["finding"]["properties"]["id"]["enum"])
    fix_enum = set(schema["$defs"]["fix"]["properties"]["id"]["enum"])
    live = set(finding_ids(ProbeRecord)) | set(finding_ids(LoadResult))
    assert live <= finding_enum
    assert set(CATALOG) == fix_enum


def test_every_probe_rule_measures_its_headline_for_try_fixes():
    for rule in RULES:
        if rule.context is ProbeRecord:
            assert rule.headline is not None, rule.ids
            assert isinstance(rule.headline(CONTEXTS[ProbeRecord]), dict)


def test_diagnose_judges_advises_and_links_causes_across_contexts():
    from nndiag.diagnosis import diagnose
    from nndiag.findings import CheckReport, InspectReport
    from tests.test_rules import probe_of, weight_layer

    probe = probe_of([weight_layer(0, 5e3, 0.1), weight_layer(1, 10.0, 0.1),
                      weight_layer(2, 1.0, 0.1)])
    alone = diagnose(probe)
    assert isinstance(alone, InspectReport) and alone.status == "warning"
    exploding = alone.finding(FindingId.EXPLODING_GRADIENTS)
    assert exploding.fixes and exploding.explanation  # advised
    assert "explained_by" not in exploding.evidence

    step = SanityRecord(loss_at_init=2.3, carried_steps=3, steps_checked=3,
                        carried_parameters=["fc0.weight"], carried_ratio=1.0)
    together = diagnose(step, probe, phases=["sanity", "init"])
    assert isinstance(together, CheckReport) and together.status == "error"
    cause = together.findings[0]
    assert (cause.id, cause.evidence["phase"]) == (FindingId.ZERO_GRAD_MISSING, "sanity")
    symptom = together.finding(FindingId.EXPLODING_GRADIENTS)
    assert symptom.evidence["phase"] == "init" and symptom.severity == "info"
    assert symptom.evidence["explained_by"] == [FindingId.ZERO_GRAD_MISSING]
    with pytest.raises(ValueError):
        diagnose(step, probe, phases=["sanity"])
