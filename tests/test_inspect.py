"""inspect_model on the architectures users bring, and the promise to leave the model as found."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nndiag import UsageError, UserCodeError, examples, inspect_model
from tests.fixtures.models import ForwardBug, example_batch, log_of_negative


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    for field in ("requires_grad", "training", "hooks"):
        assert before[field] == after[field], field
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("try_fixes", [False, True])
def test_model_left_exactly_as_found(try_fixes):
    model = examples.resnet_bn(widths=(8, 16), blocks=1)
    model.eval()
    model.stages[0].train()  # a mixed train/eval state must come back as it was
    model.fc.weight.requires_grad_(False)
    for p in model.stem.parameters():
        p.grad = torch.full_like(p, 0.5)  # gradients the user already accumulated
    model.stem.register_forward_hook(lambda m, a, o: None)
    x = torch.randn(4, 3, 16, 16)
    before = snapshot(model)
    inspect_model(model, (x, None), try_fixes=try_fixes)
    assert_same(before, snapshot(model))


def test_model_left_as_found_after_user_code_raised():
    model = log_of_negative()
    bug = ForwardBug()
    batches = (torch.randn(8, 8), None), (torch.randn(8, 8), None)
    for net, data in zip((model, bug), batches, strict=True):
        before = snapshot(net)
        try:
            inspect_model(net, data)
        except UserCodeError:
            pass
        assert_same(before, snapshot(net))


def test_try_fixes_leaves_the_model_and_verifies_on_a_copy():
    model = examples.deep_sigmoid_mlp()
    reference = copy.deepcopy(model)
    report = inspect_model(model, input_shape=(64, 32), try_fixes=True)
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert all(isinstance(m, nn.Sigmoid) for m in model if not isinstance(m, nn.Linear))
    vanishing = report.finding("vanishing_gradients")
    swap = next(f for f in vanishing.fixes if f.id == "non_saturating_activation")
    assert swap.verified["applied"] and swap.verified["resolved"]
    assert swap.verified["before"]["min_depth_gain"] < 1e-10
    assert swap.verified["after"]["min_depth_gain"] > 1e-2


def test_try_fixes_he_init_resolves_xavier_convnet():
    report = inspect_model(examples.xavier_relu_convnet(), input_shape=(8, 3, 8, 8),
                           try_fixes=True)
    for finding_id in ("vanishing_gradients", "poor_initialization"):
        fix = report.finding(finding_id).fixes[0]
        assert fix.id == "he_init" and fix.verified["resolved"], finding_id


def test_try_fixes_reports_when_a_fix_cannot_be_applied():
    class FunctionalSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(20))

        def forward(self, x):
            for layer in self.layers:
                x = torch.sigmoid(layer(x))
            return x

    report = inspect_model(FunctionalSigmoid(), input_shape=(32, 16), try_fixes=True)
    swap = next(f for f in report.finding("vanishing_gradients").fixes
                if f.id == "non_saturating_activation")
    assert swap.verified["applied"] is False
    assert "functionally" in swap.verified["reason"]


def test_cnn_with_batchnorm_and_inplace_relu():
    report = inspect_model(examples.inplace_relu_cnn(), input_shape=(8, 3, 16, 16))
    relus = [r for r in report.layers if r["activation"] == "relu"]
    assert len(relus) == 3 and all(r["grad_out_norm"] > 0 for r in relus)
    assert {r["kind"] for r in report.layers} >= {"Conv2d", "BatchNorm2d", "ReLU", "Linear"}


@pytest.mark.parametrize("name", ["lstm_classifier", "gru_tagger"])
def test_recurrent_models_with_integer_inputs(name):
    report = inspect_model(getattr(examples, name)(), input_shape=(8, 12), input_dtype="long")
    rnn = next(r for r in report.layers if r["kind"] in ("LSTM", "GRU"))
    assert rnn["grad_norm"] > 0 and rnn["weight_norm"] > 0
    assert report.summary["input_std"] is None  # token ids are not a float signal


def test_transformer_encoder_sees_functional_relu_and_folds_out_proj():
    report = inspect_model(examples.transformer_preln(layers=2, dim=32), input_shape=(4, 10),
                           input_dtype="long")
    names = [r["name"] for r in report.layers]
    assert "encoder.layers.0/relu" in names and "encoder.layers.1/relu" in names
    attention = next(r for r in report.layers if r["name"] == "encoder.layers.0.self_attn")
    assert attention["params"] == 4 * 32 * 32 + 4 * 32  # in_proj and the folded out_proj
    assert report.notes == []


def test_dict_inputs_and_tuple_outputs():
    report = inspect_model(examples.dict_input_model(), examples.dict_input_data(),
                           loss=examples.dict_input_loss, batches=2)
    assert report.summary["batches"] == 2 and report.summary["loss_name"] == "dict_input_loss"
    assert {"conv.0", "meta.0", "head", "aux"} <= {r["name"] for r in report.layers}


def test_frozen_parameters_are_measured_but_not_judged_as_unused():
    report = inspect_model(examples.frozen_backbone_mlp(), input_shape=(32, 32))
    first = report.layers[0]
    assert first["trainable"] is False and first["grad_norm"] is None
    assert first["weight_norm"] > 0
    assert report.summary["frozen_parameters"] == 32 * 64 + 64 + 64 * 64 + 64
    assert report.status == "ok"


def test_shared_module_gets_one_record_per_call_and_parameters_once():
    report = inspect_model(examples.shared_weights_mlp(), input_shape=(32, 32))
    shared = [r for r in report.layers if r["module"] == "shared"]
    assert [r["name"] for r in shared] == ["shared", "shared#2", "shared#3"]
    assert shared[0]["grad_norm"] > 0 and shared[1]["grad_norm"] is None
    acts = [r["name"] for r in report.layers if r["module"] == "act"]
    assert acts == ["act", "act#2", "act#3", "act#4"]


def test_hugging_face_style_module_with_dict_output():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            self.lm_head = nn.Linear(16, 50)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            h = h + self.mlp(h)
            return {"logits": self.lm_head(h), "hidden_states": (h,)}

    ids = torch.randint(0, 50, (4, 7))
    data = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)
    report = inspect_model(TinyLM(), data)
    assert report.summary["loss_name"] == "cross_entropy" and report.summary["num_classes"] == 50
    assert report.status == "ok"


def test_nan_in_forward_is_reported_where_it_starts():
    report = inspect_model(log_of_negative(), (torch.randn(16, 8), None))
    nan = report.finding("nan_inf")
    assert nan is not None and nan.severity == "error"
    assert nan.evidence["first_layer"] == "out"  # fc is finite; log() feeds NaN into out
    assert "out (Linear)" in nan.explanation


def test_bad_arguments_are_usage_errors():
    model = examples.he_mlp()
    with pytest.raises(UsageError, match="exactly one"):
        inspect_model(model)
    with pytest.raises(UsageError, match="--input-max"):
        inspect_model(model, input_shape=(4, 32), input_dtype="long")
    with pytest.raises(UsageError, match="NaN"):
        x = torch.randn(8, 32)
        x[0, 0] = float("inf")
        inspect_model(model, (x, None))
    with pytest.raises(UsageError, match="does not fit the model"):
        inspect_model(model, input_shape=(8, 31))
    with pytest.raises(UsageError, match="range over"):
        inspect_model(model, (torch.randn(8, 32), torch.full((8,), 12)))


def test_example_docstring_holds():
    report = inspect_model(examples.deep_sigmoid_mlp(), input_shape=(64, 32))
    assert (report.status, report.findings[0].id) == ("error", "vanishing_gradients")
    assert example_batch("he_mlp").shape == (64, 32)
