"""Advice: the fix catalogue's code runs, and the dispatcher routes every finding family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nndiag.advice import (
    REGISTRY,
    advise,
    advise_checkpoint,
    advise_run,
    advise_sanity,
    context_kind,
)
from nndiag.advice.catalog import CATALOG, layer_types, make_fix
from nndiag.advice.common import (
    CHECKPOINT,
    LR_CURVE,
    MAX_DERIVATIVE,
    PROBE,
    RUN,
    SANITY,
    activation_fix,
    xavier_init_fix,
)
from nndiag.findings import Finding
from nndiag.records import CheckpointRecord, LayerRecord, ProbeRecord
from nndiag.rules.sanity import SanityRecord
from nndiag.runlog import RunLog

DESIGN_FIX_IDS = {"he_init", "xavier_init", "orthogonal_init", "batch_norm", "layer_norm",
                  "gradient_clipping", "skip_connections", "non_saturating_activation",
                  "lower_learning_rate", "raise_learning_rate", "normalize_inputs", "bias_init",
                  "gated_recurrent_unit", "lr_warmup"}
PLACEHOLDERS = {"layer_types": layer_types({"Linear", "Conv2d"}), "activation": "tanh",
                "gain": "tanh", "module": "Tanh", "mean": 0.5, "std": 2.0, "layers": "0, 2",
                "n_blocks": 2}
TEMPLATES = [(fix_id, None) for fix_id in CATALOG] + [
    (fix_id, variant) for fix_id, entry in CATALOG.items() for variant in entry.variants]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(),
                                  nn.Hardtanh(), nn.Softsign(), nn.Hardsigmoid())
        self.conv = nn.Conv2d(2, 2, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _run_snippet(code: str) -> None:
    """Execute a fix's code with the names its snippets assume (model, optimizer, rnn...)."""
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(3, 4)
    namespace = {"torch": torch, "nn": nn, "model": model, "x": x, "lr": 1e-3,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                 "loss": model(x).sum(), "rnn": nn.LSTM(4, 4), "block": nn.Linear(4, 4),
                 "dim": 4, "c_in": 2, "c_out": 2, "d_in": 4, "d_out": 4, "input_size": 4,
                 "hidden_size": 4}
    exec(compile(code, "<fix>", "exec"), namespace)


def test_catalogue_holds_every_design_fix_id():
    # The documented fix ids keep their meaning; new ids may be added (transformer inits,
    # code fixes).
    assert DESIGN_FIX_IDS <= set(CATALOG)


@pytest.mark.parametrize(("fix_id", "variant"), TEMPLATES)
def test_every_fix_compiles_and_runs(fix_id, variant):
    fix = make_fix(fix_id, variant, **PLACEHOLDERS)
    assert fix.id == fix_id
    assert fix.summary and "{" not in fix.summary
    assert fix.code == fix.code.strip("\n")
    compile(fix.code, "<fix>", "exec")
    _run_snippet(fix.code)


@pytest.mark.parametrize("activation", sorted(MAX_DERIVATIVE))
def test_activation_specific_fixes_run_for_every_saturating_activation(activation):
    # calculate_gain knows only some activations: the others use the linear gain
    _run_snippet(xavier_init_fix({"Linear", "Conv2d"}, activation).code)
    _run_snippet(activation_fix(activation).code)


def test_make_fix_fills_placeholders_and_marks_automatic_fixes():
    fix = make_fix("he_init", layer_types=layer_types({"Conv2d", "Linear", "ReLU"}))
    assert "isinstance(m, (nn.Conv2d, nn.Linear))" in fix.code
    assert fix.automatic
    assert not make_fix("gradient_clipping").automatic
    assert make_fix("normalize_inputs", mean=0.123456, std=2.0).summary.startswith(
        "standardize the inputs (measured mean 0.123, std 2)")
    with pytest.raises(KeyError):
        make_fix("he_init")  # no layer types
    with pytest.raises(KeyError):
        make_fix("no_such_fix")


def test_registry_keys_use_the_five_context_kinds():
    assert {kind for kind, _ in REGISTRY} == {PROBE, CHECKPOINT, RUN, SANITY, LR_CURVE}


# ----------------------------------------------------------------------------- dispatch


def _layer(index: int, **extra) -> LayerRecord:
    return LayerRecord(name=f"fc{index}", module=f"fc{index}", kind="Linear", index=index,
                       std=1.0, mean=0.0, absmax=3.0, trainable=True, weight_norm=1.0,
                       grad_norm=0.01, fan_in=64, init_reference="he", init_scale=0.5, **extra)


def _probe() -> ProbeRecord:
    layers = [_layer(0, grad_out_norm=1e-4),
              LayerRecord(name="act0", module="act0", kind="ReLU", index=1, activation="relu",
                          dead_fraction=0.9, std=0.1, mean=0.0),
              _layer(2, grad_out_norm=1.0)]
    return ProbeRecord(layers=layers, loss=2.3, loss_name="cross_entropy", input_std=1.0,
                       input_mean=0.0)


def _ids(finding: Finding) -> list[str]:
    return [fix.id for fix in finding.fixes]


def test_probe_gradient_family():
    finding = Finding("vanishing_gradients", "warning", ["fc0"], "vanishing", evidence={
        "judged_by": ["depth"], "min_depth_gain": 1e-4, "min_depth_gain_layer": "fc0"})
    advise(finding, _probe())
    assert "fc0 (Linear)" in finding.explanation and "0.5x the He scale" in finding.explanation
    assert _ids(finding) == ["he_init", "batch_norm", "skip_connections"]


def test_probe_activation_family():
    finding = Finding("dead_relu", "error", ["act0"], "dead",
                      evidence={"dead_fraction": {"act0": 0.9}, "samples": 64})
    advise(finding, _probe())
    assert finding.explanation.startswith("In act0 (ReLU), 90% of the units output zero")
    assert _ids(finding) == ["he_init", "lower_learning_rate"]


def test_probe_sanity_family():
    finding = Finding("unused_parameters", "warning", ["branch"], "unused",
                      evidence={"modules_not_run": ["branch"]})
    advise(finding, _probe())
    assert "(branch never ran in forward)" in finding.explanation
    assert finding.fixes == []


def test_checkpoint_family():
    record = CheckpointRecord(path="model.pt", format="state_dict", modules=[])
    finding = advise_checkpoint(Finding("nan_inf", "error", ["fc0"], "nan"), record)
    assert finding.explanation.startswith("NaN/Inf are stored in the weights themselves")
    assert _ids(finding) == ["lower_learning_rate", "gradient_clipping"]


def test_run_family_reads_layer_kinds_from_meta():
    log = RunLog(Path("run"), meta={"weight_layers": [{"kind": "Conv2d"}, {"kind": "Linear"}]})
    finding = advise_run(Finding("loss_not_decreasing", "warning", [], "flat", evidence={
        "start": 2.3, "end": 2.29, "noise": 0.05}), log)
    assert finding.explanation.startswith("The running median of the loss moved from 2.3 to 2.29")
    assert _ids(finding) == ["raise_learning_rate", "he_init"]
    assert "isinstance(m, (nn.Conv2d, nn.Linear))" in finding.fixes[1].code


def test_pretraining_sanity_family():
    finding = advise_sanity(Finding("cannot_overfit_batch", "error", [], "no overfit", evidence={
        "batch_size": 8, "steps": 50, "first": 2.3, "best": 2.1}), SanityRecord(loss_at_init=2.3))
    assert "8 samples close to zero within 50 steps" in finding.explanation
    assert _ids(finding) == ["raise_learning_rate"]


def test_same_finding_id_is_advised_per_context_kind():
    probe_nan = advise(Finding("nan_inf", "error", [], "nan"), _probe())
    run_nan = advise(Finding("nan_inf", "error", [], "nan", evidence={
        "where": "the loss", "first_step": 7}), RunLog(Path("run"), meta={}))
    assert probe_nan.explanation.startswith("The inputs were checked")
    assert run_nan.explanation.startswith("NaN/Inf reached the loss at step 7")


def test_unknown_finding_is_left_as_is_and_unknown_context_is_an_error():
    finding = Finding("batch_mixing", "error", [], "mixing", explanation="kept")
    assert advise(finding, _probe()).explanation == "kept"  # batch_mixing has no probe advisor
    assert advise(Finding("no_such_id", "info", [], "x"), _probe()).fixes == []
    assert context_kind(SanityRecord(loss_at_init=1.0)) == SANITY
    with pytest.raises(TypeError):
        advise(finding, object())


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "Lion", None])
@pytest.mark.parametrize("fix_id", ["lower_learning_rate", "raise_learning_rate"])
def test_learning_rate_fixes_are_written_for_the_runs_optimizer(fix_id, optimizer):
    from nndiag.advice.catalog import fit_learning_rate_fix

    fix = fit_learning_rate_fix(make_fix(fix_id), optimizer, 0.05)
    new = "0.005" if fix_id == "lower_learning_rate" else "0.5"
    if optimizer in ("SGD", "Adam"):
        assert f"torch.optim.{optimizer}(model.parameters(), lr={new})" in fix.code
        assert "AdamW" not in fix.code
    else:
        assert f'group["lr"] = {new}' in fix.code
    _run_snippet(fix.code)


def test_a_run_of_sgd_gets_sgd_snippets_and_no_rate_advice_for_nan_before_any_update(tmp_path):
    from nndiag.diagnosis import diagnose
    from nndiag.monitor import Monitor
    from nndiag.runlog import read_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Monitor(model, optimizer, every=5, log_dir=tmp_path / "run") as monitor:
        for step in range(30):  # swings hard from step 15: oscillating, with rate advice
            x = torch.randn(16, 4) * (20.0 if step >= 15 and step % 2 else 1.0)
            loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (16,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    report = diagnose(read_run(tmp_path / "run"))
    codes = [fix.code for f in report.findings for fix in f.fixes if fix.id in
             ("lower_learning_rate", "raise_learning_rate")]
    assert codes and all("torch.optim.SGD(model.parameters(), lr=" in c for c in codes)

    first = tmp_path / "nan_at_first_step"
    with Monitor(model, optimizer, every=5, log_dir=first) as monitor:
        for _ in range(12):
            monitor.step(torch.tensor(float("nan")))
    (finding,) = [f for f in diagnose(read_run(first)).findings if f.id == "nan_inf"]
    assert "before any update" in finding.explanation
    assert all(fix.id not in ("lower_learning_rate", "raise_learning_rate")
               for fix in finding.fixes)
