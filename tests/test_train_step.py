"""The CI gate through the user's own training step (issue 14).

Every classic bug is caught through the user's step with its own id, explanation and fix code
(not a learning-rate change), while the healthy step beside it, and every look-alike (gradient
accumulation done right, a model without dropout or BatchNorm, ``nll_loss`` after
``log_softmax``, a loss averaged by hand), passes with no warning.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.training_check import check_training, load_train_step
from tests.fixtures import train_steps as ts
from tests.fixtures.train_steps import STEPS

LR_FIXES = {"raise_learning_rate", "lower_learning_rate", "lr_warmup"}


def gate(step, build=ts.mlp, data=ts.batches, **options):
    return check_training(build(), data(), train_step=step, steps=options.pop("steps", 20),
                          **options)


def warnings_and_errors(report) -> list[tuple[str, str]]:
    return [(f.id, f.severity) for f in report.findings if f.severity != "info"]


# -- each bug, through the user's step, beside its healthy twin --------------------------------


BUGS = [
    # (buggy step, model, data, finding id, severity, fix id)
    (ts.no_zero_grad_step, ts.mlp, ts.batches, "zero_grad_missing", "error", "zero_grad"),
    (ts.softmax_step, ts.mlp, ts.batches, "softmax_before_loss", "error", "logits_to_loss"),
    (ts.softmax_nll_step, ts.mlp, ts.batches, "softmax_before_loss", "error",
     "logits_to_loss"),
    (ts.leaves_eval_mode_step, ts.dropout_bn_mlp, ts.batches, "train_mode_off", "error",
     "train_mode"),
    (ts.plain_step, ts.eval_mode_dropout_bn_mlp, ts.batches, "train_mode_off", "error",
     "train_mode"),
    (ts.sum_reduction_step, ts.mlp, ts.batches, "loss_reduction_sum", "warning",
     "mean_reduction"),
    (ts.sorts_inputs_only_step, ts.mlp, ts.batches, "labels_misaligned", "warning",
     "align_inputs_labels"),
    (ts.healthy_step, ts.mlp, ts.misaligned_batches, "labels_misaligned", "warning",
     "align_inputs_labels"),
    (ts.zero_grad_after_backward_step, ts.mlp, ts.batches, "parameters_not_updated", "error",
     "zero_grad"),
]


@pytest.mark.parametrize(("step", "build", "data", "finding_id", "severity", "fix"), BUGS,
                         ids=[f"{b[0].__name__}-{b[2].__name__}" for b in BUGS])
def test_each_bug_is_named_through_the_users_step(step, build, data, finding_id, severity, fix):
    report = gate(step, build, data)
    found = [f for f in report.findings if f.id == finding_id and
             f.evidence["phase"] == "sanity"]
    assert found, [(f.id, f.summary) for f in report.findings]
    finding = found[0]
    assert finding.severity == severity
    assert finding.explanation
    assert [x.id for x in finding.fixes] == [fix]
    assert finding.fixes[0].code
    # The root cause is the most severe finding: every other finding is at most as severe.
    assert all(f.severity in ("info", severity) or f.id == finding_id
               for f in report.findings), warnings_and_errors(report)


@pytest.mark.parametrize("build", [ts.mlp, ts.dropout_bn_mlp])
def test_the_healthy_step_beside_them_passes_with_no_warning(build):
    report = gate(ts.healthy_step, build)
    assert report.status == "ok", [(f.id, f.summary) for f in report.findings]
    assert report.summary["train_step"] == "--train-step 'healthy_step'"


# -- look-alikes that must not be flagged ------------------------------------------------------


@pytest.mark.parametrize(("step", "build"), [
    (ts.AccumulatingStep(4), ts.mlp),  # zeroes after each optimizer step, every 4 calls
    (ts.leaves_eval_mode_step, ts.mlp),  # eval mode, but nothing in the model depends on it
    (ts.eval_metrics_step, ts.dropout_bn_mlp),  # eval only for metrics, train() first thing
    (ts.nll_after_log_softmax_step, ts.mlp),
    (ts.log_softmax_into_cross_entropy_step, ts.mlp),
    (ts.hand_averaged_step, ts.mlp),  # reduction="sum" divided by the batch size
], ids=["accumulation", "eval-without-dropout-or-bn", "eval-for-metrics", "nll-log-softmax",
        "log-softmax-cross-entropy", "averaged-by-hand"])
def test_look_alikes_raise_no_warning(step, build):
    report = gate(step, build)
    assert report.status == "ok", [(f.id, f.summary) for f in report.findings]


def test_accumulation_is_seen_as_such():
    report = gate(ts.AccumulatingStep(4))
    assert report.status == "ok"
    # The overfitting check counted optimizer steps, not calls: the batch was learned.
    assert report.summary["loss_at_init"] > 2


# -- what each finding says --------------------------------------------------------------------


def test_softmax_before_loss_names_the_floor_and_explains_the_overfit_failure():
    report = gate(ts.softmax_step)
    root = report.finding("softmax_before_loss")
    assert root.evidence["where"] == "step" and root.evidence["produced_by"] == "softmax"
    assert root.evidence["floor"] == pytest.approx(1.461, abs=1e-3)
    assert root.evidence["overfit_best"] >= root.evidence["floor"]
    symptom = report.finding("cannot_overfit_batch")
    assert symptom.severity == "info"
    assert symptom.evidence["explained_by"] == ["softmax_before_loss"]
    assert symptom.explanation.startswith("Probably a consequence of softmax_before_loss")
    assert not {x.id for x in symptom.fixes} & LR_FIXES


def test_softmax_inside_the_model_is_located_in_the_model():
    def build():
        return torch.nn.Sequential(ts.mlp(), torch.nn.Softmax(dim=1))

    report = gate(ts.plain_step, build)
    root = report.finding("softmax_before_loss")
    assert root.evidence["where"] == "1" and root.layers == ["1"]
    assert root.fixes[0].summary.startswith("remove the softmax from the end of the model's")
    assert "the model's module '1' returns them" in root.explanation


def test_sigmoid_before_a_logit_loss_is_told_from_the_raw_logit():
    broken = gate(ts.sigmoid_bce_with_logits_step, ts.binary_mlp, ts.binary_batches)
    finding = broken.finding("softmax_before_loss")
    assert finding.evidence["produced_by"] == "sigmoid"
    assert "(values in [0, 1])" in finding.summary
    assert finding.fixes[0].summary.startswith("pass the raw logits to "
                                               "binary_cross_entropy_with_logits")
    healthy = gate(ts.bce_with_logits_step, ts.binary_mlp, ts.binary_batches)
    assert healthy.status == "ok", [(f.id, f.summary) for f in healthy.findings]


def test_zero_grad_missing_reports_how_much_gradient_was_carried():
    report = gate(ts.no_zero_grad_step)
    sanity = next(f for f in report.findings if f.id == "zero_grad_missing"
                  and f.evidence["phase"] == "sanity")
    assert sanity.evidence["carried_steps"] == sanity.evidence["steps_checked"] == 2
    assert sanity.evidence["stale_to_fresh"] > 0.5
    assert sanity.layers == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    # The recorded run says the same from the gradient norms alone.
    training = [f for f in report.findings if f.evidence["phase"] == "training"]
    assert [f.id for f in training if f.severity != "info"] == ["zero_grad_missing"]


def test_train_mode_off_for_part_of_the_model_is_only_info():
    def freeze_bn_step(model, batch, optimizer):
        model.train()
        model[1].eval()  # frozen BatchNorm, as when fine-tuning
        return ts.plain_step(model, batch, optimizer)

    report = gate(freeze_bn_step, ts.dropout_bn_mlp)
    finding = report.finding("train_mode_off")
    assert (finding.severity, finding.layers) == ("info", ["1"])
    assert report.status == "ok"


def test_loss_reduction_sum_compares_batch_sizes_and_keeps_loss_at_init_quiet():
    report = gate(ts.sum_reduction_step)
    finding = report.finding("loss_reduction_sum")
    assert finding.evidence["ratio"] == pytest.approx(2, rel=0.1)
    assert finding.evidence["batch_size"] == 64 and finding.evidence["reduction"] == ["sum"]
    assert report.finding("loss_at_init_unexpected") is None  # 64 x log 10 is expected


def test_parameters_not_updated_says_why():
    report = gate(ts.zero_grad_after_backward_step)
    finding = report.finding("parameters_not_updated")
    assert finding.evidence["reason"] == "zeroed_before_step"
    assert "between loss.backward() and optimizer.step()" in finding.explanation
    assert finding.fixes[0].summary.startswith("call optimizer.zero_grad() before")

    def never_steps(model, batch, optimizer):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    report = gate(never_steps, overfit_steps=5)
    assert report.finding("parameters_not_updated").evidence["reason"] == "no_step"


# -- the caller's objects, specs, Lightning -----------------------------------------------------


def test_model_mode_weights_and_rng_are_left_as_found():
    model = ts.dropout_bn_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_training(model, ts.batches(), train_step=ts.leaves_eval_mode_step, steps=10,
                   overfit_steps=5)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_optimizer_factory_of_the_model():
    report = gate(ts.healthy_step, optimizer=ts.sgd)
    assert report.summary["optimizer"] == "SGD"
    assert report.status == "ok", [(f.id, f.summary) for f in report.findings]


def test_load_train_step_specs():
    assert load_train_step("lightning") == "lightning"
    assert load_train_step(f"{STEPS}:healthy_step") is not None
    step = load_train_step(f"{STEPS}:AccumulatingStep")  # a class: one instance
    assert isinstance(step, object) and callable(step) and step.k == 4


def test_lightning_module_training_step_and_configure_optimizers():
    pytest.importorskip("pytorch_lightning")
    healthy = check_training(ts.lit_classifier(), ts.batches(), train_step="lightning",
                             steps=20)
    assert healthy.status == "ok", [(f.id, f.summary) for f in healthy.findings]
    assert healthy.summary["optimizer"] == "AdamW"
    assert healthy.summary["lr"] == pytest.approx(1e-3)  # from configure_optimizers
    broken = check_training(ts.lit_softmax_classifier(), ts.batches(), train_step="lightning",
                            steps=20, overfit_steps=30)
    assert broken.finding("softmax_before_loss").severity == "error"


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_train_step_json_junit_and_exit_codes(tmp_path):
    junit = tmp_path / "nndiag.xml"
    result = CliRunner().invoke(app, [
        "check", "--model", f"{STEPS}:mlp", "--data", f"{STEPS}:batches", "--train-step",
        f"{STEPS}:no_zero_grad_step", "--steps", "20", "--json", "--junit", str(junit)])
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["train_step"] == "--train-step 'no_zero_grad_step'"
    assert [f["id"] for f in report["findings"] if f["severity"] == "error"] == [
        "zero_grad_missing", "zero_grad_missing"]
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert {"zero_grad_missing", "softmax_before_loss", "train_mode_off", "loss_reduction_sum",
            "labels_misaligned", "cannot_overfit_batch", "batch_mixing"} <= set(cases)
    assert cases["zero_grad_missing"].find("failure") is not None
    assert cases["softmax_before_loss"].find("failure") is None

    healthy = CliRunner().invoke(app, [
        "check", "--model", f"{STEPS}:mlp", "--data", f"{STEPS}:batches", "--train-step",
        f"{STEPS}:healthy_step", "--optimizer", f"{STEPS}:sgd", "--steps", "20"])
    assert healthy.exit_code == 0, healthy.stdout
    assert "no problem found" in healthy.stdout


@pytest.mark.parametrize(("spec", "code", "message"), [
    (f"{STEPS}:no_such_step", 2, "has no attribute"),
    (f"{STEPS}:STEPS", 2, "expected a function f(model, batch, optimizer)"),
    ("tests.fixtures.models:raising_loss", 3, "raised TypeError"),
])
def test_cli_bad_train_steps_are_one_message_and_an_exit_code(spec, code, message):
    result = CliRunner().invoke(app, ["check", "--model", f"{STEPS}:mlp", "--data",
                                      f"{STEPS}:batches", "--train-step", spec])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# -- Monitor + check RUN -----------------------------------------------------------------------


def _record(run_dir, step) -> None:
    from nndiag.monitor import Monitor

    model = ts.mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = ts.batches()
    with Monitor(model, optimizer, every=5, log_dir=run_dir) as monitor:
        for i in range(60):
            monitor.step(step(model, data[i % len(data)], optimizer))


def test_monitor_and_check_run_name_a_missing_zero_grad(tmp_path):
    _record(tmp_path / "broken", ts.no_zero_grad_step)
    result = CliRunner().invoke(app, ["check", str(tmp_path / "broken"), "--json"])
    assert result.exit_code == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["id"], f["severity"]) for f in findings if f["severity"] != "info"] == [
        ("zero_grad_missing", "error")]
    assert findings[0]["fixes"][0]["id"] == "zero_grad"
    assert all(f["evidence"].get("explained_by") == ["zero_grad_missing"]
               for f in findings[1:])

    _record(tmp_path / "healthy", ts.healthy_step)
    healthy = CliRunner().invoke(app, ["check", str(tmp_path / "healthy"), "--json"])
    assert "zero_grad_missing" not in [f["id"] for f in json.loads(healthy.stdout)["findings"]]


def test_a_root_cause_explains_its_symptoms_and_only_an_error_lowers_them():
    from nndiag.advice.causes import link_causes
    from nndiag.findings import Finding, Fix

    def finding(finding_id, severity, fixes=()):
        return Finding(finding_id, severity, [], finding_id, explanation="why",
                       fixes=[Fix(f, f) for f in fixes])

    found = link_causes([
        finding("labels_misaligned", "warning", ["align_inputs_labels"]),
        finding("dead_relu", "warning", ["lower_learning_rate", "bias_init"]),
        finding("zero_grad_missing", "error", ["zero_grad"]),
        finding("loss_not_decreasing", "warning", ["raise_learning_rate"]),
    ])
    by_id = {f.id: f for f in found}
    assert found[0].id == "zero_grad_missing" and found[0].severity == "error"
    assert by_id["labels_misaligned"].severity == "info"  # a broken step learns nothing
    assert by_id["dead_relu"].severity == "info"
    assert [x.id for x in by_id["dead_relu"].fixes] == ["bias_init"]
    assert by_id["loss_not_decreasing"].evidence["explained_by"] == [
        "zero_grad_missing", "labels_misaligned"]
    assert by_id["loss_not_decreasing"].explanation.startswith(
        "Probably a consequence of zero_grad_missing")

    alone = link_causes([finding("loss_reduction_sum", "warning"),
                              finding("loss_diverging", "error", ["lower_learning_rate"])])
    diverging = next(f for f in alone if f.id == "loss_diverging")
    assert diverging.severity == "error" and diverging.fixes == []  # a warning lowers nothing
