"""Every statistic nndiag records, against a slow, obvious reference computed with autograd.

The reference runs a deep copy of the model with plain forward hooks that keep each layer's
output (``retain_grad``), calls ``loss.backward()`` and computes each number directly.
In-place activations are made out-of-place in the reference copy, so the in-place model is
checked against the same function computed the plain way.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag import examples
from nndiag.batches import Batch
from nndiag.capture import ProbeConfig, run_probe
from nndiag.capture.layers import SATURATING, module_activation
from nndiag.losses import Loss
from nndiag.monitor import Monitor
from nndiag.specs import primary_output

REL = 1e-4

ACT_FN = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
          "softsign": F.softsign, "hardtanh": F.hardtanh, "relu6": F.relu6}


def _outplace(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return ref


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-module outputs, output gradients and weight gradients, the plain way."""
    ref = _outplace(model)
    ref.train()
    names = {m: n for n, m in ref.named_modules()}
    outputs: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []

    def hook(module, args, out):
        order.append(names[module])
        t = primary_output(out)
        if t is None or not t.is_floating_point():
            return
        if t.requires_grad:
            t.retain_grad()
        outputs.setdefault(names[module], []).append(t)
        inputs.setdefault(names[module], []).append(args[0] if args else None)

    handles = [m.register_forward_hook(hook) for m in ref.modules()]
    out = ref(x)
    logits = primary_output(out)
    logits.retain_grad()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    for h in handles:
        h.remove()
    return {"model": ref, "outputs": outputs, "inputs": inputs, "loss": loss.item(),
            "out_grad": logits.grad.norm().item(), "order": order}


# The oracle's own list: activations that halve the signal's variance the way ReLU does, for
# which He's sqrt(2 / fan_in) keeps the scale (Xavier otherwise).
RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU,
             nn.Mish, nn.Hardswish)
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def expected_init_std(ref: dict, module_name: str) -> float:
    """He or Xavier std of a weight layer, from the first activation it feeds in forward order."""
    modules = dict(ref["model"].named_modules())
    module = modules[module_name]
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
    parent = modules[module_name.rpartition(".")[0]] if "." in module_name else None
    # nn.TransformerEncoderLayer applies its activation as a function (F.relu by default)
    # between linear1 and linear2: no module call shows it.
    he = isinstance(parent, nn.TransformerEncoderLayer) and module_name.endswith("linear1") \
        and parent.activation in (F.relu, F.gelu)
    # Forward hooks fire in completion order: a layer's output is followed by what consumes it.
    # (Module calls only: the models checked here have no functional activation.)
    after = ref["order"][ref["order"].index(module_name) + 1:]
    for name in [] if he else after:
        later = modules[name]
        if isinstance(later, RELU_LIKE):
            he = True
            break
        if isinstance(later, (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign)) or \
                isinstance(later, WEIGHT_LAYERS):
            break
    return math.sqrt(2.0 / fan_in) if he else math.sqrt(2.0 / (fan_in + fan_out))


# The documented definition, written here rather than imported: an element is saturated when
# its local derivative is below 5% of the activation's largest derivative.
SATURATED_BELOW = 0.05


def saturated_fraction_by_autograd(kind: str, pre: torch.Tensor) -> float:
    """Share of elements whose derivative (taken by autograd) is below 5% of the maximum."""
    z = pre.detach().clone().requires_grad_(True)
    ACT_FN[kind](z).sum().backward()
    peak = {"sigmoid": 0.25}.get(kind, 1.0)
    slope = z.grad
    if kind in ("hardtanh", "relu6"):  # derivative is 0 on the flat parts, 1 elsewhere
        low, high = (0.0, 6.0) if kind == "relu6" else (-1.0, 1.0)
        flat = (pre <= low) | (pre >= high) if kind == "hardtanh" else pre >= high
        return flat.float().mean().item()
    return (slope < SATURATED_BELOW * peak).float().mean().item()


def dead_by_definition(out: torch.Tensor, producer: nn.Module | None = None) -> float:
    """Share of units zero for every sample: a feature map's channels (zero at every position
    too: any output of 4+ dims, or a convolution's), a Linear's features (zero for every token
    too), else each position apart from the batch dimension."""
    silent = out.detach() == 0
    if out.dim() >= 3 and isinstance(producer, nn.Linear):
        return silent.reshape(-1, out.shape[-1]).all(dim=0).float().mean().item()
    if out.dim() >= 4 or isinstance(producer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return silent.transpose(0, 1).reshape(out.shape[1], -1).all(dim=1).float().mean().item()
    return silent.reshape(out.shape[0], -1).all(dim=0).float().mean().item()


def producer_of(ref: dict, module_name: str, call: int) -> nn.Module | None:
    """The module whose output is the input of ``module_name``'s call (the reference runs out
    of place, so it is the very same tensor)."""
    source = ref["inputs"][module_name][call]
    modules = dict(ref["model"].named_modules())
    return next((modules[name] for name, outs in ref["outputs"].items() if name != module_name
                 and any(o is source for o in outs)), None)


def check_against_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    ref = reference(model, x, y)
    probe = run_probe(model, [Batch(x, y)], ProbeConfig(Loss("cross_entropy", F.cross_entropy)))
    assert probe.loss == pytest.approx(ref["loss"], rel=REL)
    assert probe.output_grad_norm == pytest.approx(ref["out_grad"], rel=REL)
    ref_modules = dict(ref["model"].named_modules())
    checked = 0
    for record in probe.layers:
        if record.functional:
            continue
        module_name = "" if record.module == "(model)" else record.module
        call = int(record.name.split("#")[1]) - 1 if "#" in record.name else 0
        out = ref["outputs"][module_name][call].detach()
        assert record.mean == pytest.approx(out.mean().item(), rel=REL, abs=1e-6), record.name
        assert record.std == pytest.approx(out.std(unbiased=False).item(), rel=REL,
                                           abs=1e-7), record.name
        assert record.absmax == pytest.approx(out.abs().max().item(), rel=REL)
        assert record.shape == list(out.shape)
        grad = ref["outputs"][module_name][call].grad
        if grad is not None:
            assert record.grad_out_norm == pytest.approx(grad.norm().item(), rel=1e-3,
                                                         abs=1e-12), record.name
        kind = module_activation(ref_modules[module_name])
        if kind in ("relu", "relu6"):
            producer = producer_of(ref, module_name, call)
            assert record.dead_fraction == pytest.approx(dead_by_definition(out, producer),
                                                         abs=1e-6), record.name
        if kind in SATURATING:
            pre = ref["inputs"][module_name][call].detach()
            assert record.saturated_fraction == pytest.approx(
                saturated_fraction_by_autograd(kind, pre), abs=2e-3), record.name
            assert record.preact_std == pytest.approx(pre.std(unbiased=False).item(), rel=REL)
        if record.weight_norm is not None and call == 0:
            module = ref_modules[module_name]
            # Submodules that never ran themselves (MultiheadAttention's out_proj) are folded
            # into the measured module whose forward used their weights.
            prefix = f"{module_name}." if module_name else ""
            group = [module] + [m for n, m in module.named_children()
                                if f"{prefix}{n}" not in ref["outputs"]]
            weights = [p for m in group for n, p in m.named_parameters(recurse=False)
                       if "bias" not in n]
            weight_norm = math.sqrt(sum(w.detach().norm().item() ** 2 for w in weights))
            assert record.weight_norm == pytest.approx(weight_norm, rel=REL)
            numel = sum(w.numel() for w in weights)
            assert record.weight_rms == pytest.approx(weight_norm / math.sqrt(numel), rel=REL)
            if record.trainable and all(w.grad is not None for w in weights):
                grad_norm = math.sqrt(sum(w.grad.norm().item() ** 2 for w in weights))
                assert record.grad_norm == pytest.approx(grad_norm, rel=1e-3), record.name
                assert record.grad_to_weight == pytest.approx(grad_norm / weight_norm, rel=1e-3)
            if isinstance(module, WEIGHT_LAYERS):
                expected = expected_init_std(ref, module_name)
                assert record.init_scale == pytest.approx(record.weight_rms / expected,
                                                          rel=REL), record.name
        checked += 1
    return checked


def _labels(n: int, classes: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.randint(0, classes, (n, *shape), generator=torch.Generator().manual_seed(3))


def _recorded_dead_fractions(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             name: str) -> list[float]:
    """A site's dead fraction on three recorded steps (lr 0): the first learns the data flow,
    the next two take the lean path."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, optimizer, every=1) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return [next(layer for layer in sample.layers if layer.name == name).dead_fraction
            for sample in monitor.samples]


def test_a_dead_filter_is_a_channel_silent_everywhere_not_a_silent_border():
    """Images with a constant zero border: a filter with a negative bias is silent on the border
    but fires inside (alive); one with a bias of -100 never fires (dead): 1 of 4 channels."""
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(0.5)
        conv.bias.copy_(torch.tensor([-0.1, -0.1, 0.0, -100.0]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 2:6, 2:6] = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    probe = run_probe(model, [Batch(x, _labels(16, 3))])
    out = torch.relu(conv(x))
    assert (out[:, :2] == 0).reshape(16, 2, -1).all(0).float().mean() > 0.3  # silent pixels
    assert probe.layer("1").dead_fraction == pytest.approx(0.25) == dead_by_definition(out)
    assert check_against_reference(model, x, _labels(16, 3)) == 3  # conv, ReLU, Linear
    # The recorder, on the same steps: its first sampled step learns the data flow, the next
    # ones take the lean path (a ReLU's unit sums).
    assert _recorded_dead_fractions(model, x, _labels(16, 3), "1") == [pytest.approx(0.25)] * 3


def test_a_dead_conv1d_filter_is_a_channel_silent_everywhere_not_a_silent_tail():
    """Zero-padded sequences through a Conv1d: a filter with a negative bias is silent on the
    padding but fires on the signal (alive); one with a bias of -100 never fires (dead)."""
    conv = nn.Conv1d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(0.5)
        conv.bias.copy_(torch.tensor([-0.1, -0.1, 0.0, -100.0]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32, 3))
    x = torch.zeros(16, 1, 32)
    x[:, :, :12] = torch.rand(16, 1, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    out = torch.relu(conv(x))
    by_position = (out == 0).reshape(16, -1).all(0).float().mean()
    assert by_position > 0.6  # the padded tail's positions: what a unit per position counts
    probe = run_probe(model, [Batch(x, _labels(16, 3))])
    assert probe.layer("1").dead_fraction == pytest.approx(0.25)
    assert dead_by_definition(out, conv) == pytest.approx(0.25)
    assert check_against_reference(model, x, _labels(16, 3)) == 3
    assert _recorded_dead_fractions(model, x, _labels(16, 3), "1") == [pytest.approx(0.25)] * 3


def test_a_feed_forward_unit_is_a_feature_over_every_token():
    """A Linear + ReLU on (batch, tokens, features): a feature that fires on the first token
    only is alive; one with a bias of -100 is dead. A unit per (token, feature) would count
    the first feature dead at every other token."""
    linear = nn.Linear(2, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
        linear.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(4, 3))
    x = torch.zeros(8, 6, 2)
    x[:, 0, 0] = 1.0  # the first feature's input, at the first token only
    x[:, :, 1] = torch.rand(8, 6, generator=torch.Generator().manual_seed(0)) + 0.5
    y = _labels(8, 3, (6,))
    out = torch.relu(linear(x))
    assert (out == 0).reshape(8, -1).all(0).float().mean() > 0.4  # per (token, feature)
    probe = run_probe(model, [Batch(x, y)])
    assert probe.layer("1").dead_fraction == pytest.approx(0.25)
    assert dead_by_definition(out, linear) == pytest.approx(0.25)
    assert check_against_reference(model, x, y) == 3
    assert _recorded_dead_fractions(model, x, y, "1") == [pytest.approx(0.25)] * 3


class _SharedReLU(nn.Module):
    """One ReLU module applied three times: after a Conv1d and a max-pool (zero-padded
    sequences: a unit is a channel), after a Linear on tokens (a unit is a feature, some
    tokens padding), and to a transposed view of the pooled map (dimensions moved: the shape
    rule, each position apart from the batch dimension)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
            self.conv.bias.copy_(torch.tensor([-0.1, -0.1, 0.0, -100.0]))
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.conv(x))
        channels = self.act(pooled)  # (N, 4, 16)
        features = self.act(self.fc(x[:, 0, :24].reshape(-1, 6, 4)))  # (N, 6, 4)
        moved = self.act(pooled.transpose(1, 2))  # (N, 16, 4), a view
        return self.head(torch.cat([channels.mean(-1), features.mean(1), moved.mean(1)], 1))


def test_where_the_units_of_a_shared_relu_lie_follows_each_call():
    model = _SharedReLU()
    x = torch.zeros(16, 1, 32)
    x[:, :, :12] = torch.rand(16, 1, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    y = _labels(16, 3)
    pooled = model.pool(model.conv(x)).detach()
    expected = {"act": dead_by_definition(torch.relu(pooled), model.conv),
                "act#2": dead_by_definition(torch.relu(model.fc(x[:, 0, :24].reshape(-1, 6, 4))),
                                            model.fc),
                "act#3": dead_by_definition(torch.relu(pooled.transpose(1, 2)))}
    assert expected["act"] == expected["act#2"] == pytest.approx(0.25)
    assert expected["act#3"] > 0.5  # the padding's positions
    probe = run_probe(model, [Batch(x, y)])
    for name, fraction in expected.items():
        assert probe.layer(name).dead_fraction == pytest.approx(fraction), name
        # The recorder agrees on every step, watched (the first) or lean (the next two).
        assert _recorded_dead_fractions(model, x, y, name) == [pytest.approx(fraction)] * 3


def test_oracle_sigmoid_mlp():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    assert check_against_reference(examples.deep_sigmoid_mlp(depth=6), x, _labels(32, 10)) >= 12


def test_oracle_saturated_tanh_mlp():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    assert check_against_reference(examples.saturated_tanh_mlp(), x, _labels(32, 10)) >= 10


def test_oracle_dead_relu_mlp():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    assert check_against_reference(examples.dead_relu_mlp(), x, _labels(32, 10)) >= 6


def test_oracle_cnn_with_batchnorm_and_inplace_relu():
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert check_against_reference(examples.inplace_relu_cnn(), x, _labels(8, 10)) >= 10


def test_oracle_resnet_with_shared_relu_calls():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = examples.resnet_bn(widths=(8, 16), blocks=1)
    assert check_against_reference(model, x, _labels(4, 10)) >= 15


def test_oracle_lstm():
    x = torch.randint(0, 100, (8, 6), generator=torch.Generator().manual_seed(0))
    assert check_against_reference(examples.lstm_classifier(), x, _labels(8, 10)) == 3


def test_oracle_transformer_encoder():
    x = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    model = examples.transformer_preln(layers=2, dim=32)
    assert check_against_reference(model, x, _labels(4, 100, (10,))) >= 12


def test_oracle_hardtanh_family_and_relu6():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Hardtanh(), nn.Linear(32, 32), nn.ReLU6(),
                          nn.Linear(32, 32), nn.Softsign(), nn.Linear(32, 4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    assert check_against_reference(model, x, _labels(32, 4)) == 7


def test_functional_relu_measured_from_the_tensor_that_reaches_it():
    """A transformer's F.relu: dead fraction and output gradient from plain autograd."""
    model = examples.transformer_preln(layers=1, dim=32)
    x = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    y = _labels(4, 100, (10,))
    probe = run_probe(model, [Batch(x, y)])
    record = probe.layer("encoder.layers.0/relu")
    assert record.functional and record.activation == "relu"

    ref = _outplace(model)
    kept = {}
    layer = ref.encoder.layers[0]

    def keep_input(module, args):
        args[0].retain_grad()
        kept["relu_out"] = args[0]

    layer.linear2.register_forward_pre_hook(keep_input)
    logits = ref(x)
    F.cross_entropy(logits.reshape(-1, 100), y.reshape(-1)).backward()
    relu_out = kept["relu_out"]
    # Applied to linear1's output: a unit is a feature, silent for every token.
    assert record.dead_fraction == pytest.approx(dead_by_definition(relu_out, layer.linear1),
                                                 abs=1e-6)
    assert record.std == pytest.approx(relu_out.detach().std(unbiased=False).item(), rel=REL)
    assert record.grad_out_norm == pytest.approx(relu_out.grad.norm().item(), rel=1e-3)


def test_multi_batch_pooling_matches_concatenated_batches():
    """Mean/std pooled over batches equal those of the concatenated batch; dead is all-batch."""
    model = examples.dead_relu_mlp()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 32, generator=g) for _ in range(3)]
    probe = run_probe(model, [Batch(x) for x in xs])
    ref = reference(model, torch.cat(xs), torch.zeros(24, dtype=torch.long))
    for name in ("0", "1", "2"):
        out = ref["outputs"][name][0].detach()
        record = probe.layer(name)
        assert record.mean == pytest.approx(out.mean().item(), rel=REL, abs=1e-6)
        assert record.std == pytest.approx(out.std(unbiased=False).item(), rel=REL)
    relu = ref["outputs"]["1"][0].detach()
    assert probe.layer("1").dead_fraction == pytest.approx(
        (relu == 0).all(0).float().mean().item())
