"""--try-fixes: each automatic fix, applied to a copy, measured before and after."""

from __future__ import annotations

import torch
from torch import nn

from nndiag import examples, inspect_model
from nndiag.autofix import APPLY, NotApplicable
from nndiag.batches import Batch
from nndiag.capture import run_probe


def _tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight, gain=5 / 3)
    return model


def test_unscaled_inputs_are_fixed_by_normalization_not_by_reinitialization():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 50 + 20
    report = inspect_model(_tanh_mlp(), (x, None), try_fixes=True)
    finding = report.finding("saturated_activations")
    fixes = {fix.id: fix for fix in finding.fixes}
    assert finding.evidence["explained_by"] == ["inputs_not_normalized"]
    assert finding.fixes[0].id == "normalize_inputs"
    assert fixes["normalize_inputs"].verified["resolved"]
    assert fixes["normalize_inputs"].verified["after"]["max_saturated_fraction"] < 0.25
    # Xavier init is already in place: re-initializing does not treat the cause, not offered
    assert "xavier_init" not in fixes
    assert fixes["batch_norm"].verified is None  # not automatic
    cause = report.finding("inputs_not_normalized")
    assert cause.fixes[0].verified["resolved"]
    assert cause.fixes[0].verified["after"]["input_scale"] < 10


def test_orthogonal_init_makes_each_recurrent_gate_block_orthogonal():
    model = examples.gru_tagger()
    probe = run_probe(model, [Batch(torch.randint(0, 100, (4, 5)))])
    APPLY["orthogonal_init"](model, probe, [])
    weight = model.rnn.weight_hh_l0.detach()
    hidden = weight.shape[1]
    for gate in weight.split(hidden):
        assert torch.allclose(gate @ gate.T, torch.eye(hidden), atol=1e-5)


def test_fixes_that_do_not_fit_the_model_say_why():
    model = examples.he_mlp()
    probe = run_probe(model, [Batch(torch.randn(8, 32))])
    for fix_id in ("orthogonal_init", "non_saturating_activation"):
        try:
            APPLY[fix_id](model, probe, [])
        except NotApplicable as reason:
            assert str(reason)
        else:
            raise AssertionError(f"{fix_id} applied to a model it does not fit")
