"""Each number is judged only where it means something for that parameter.

One test per class of misfire the rules had on standard architectures, each failing before the
weight and output readings existed: weights a normalization follows (scale-invariant), weights
that start at or near zero on purpose (norm gains stored as offsets, layer-scales, bias tables,
LoRA's B), re-parametrized weights, normalizations after a residual branch, small
squeeze-and-excitation bottlenecks, parameters unused by design, mixture-of-experts weights and
grouped-query attention. Plus the rule mutations that used to survive the suite.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from nndiag import inspect_checkpoint, inspect_model
from nndiag.lrfind.suggestion import despiked
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.records.layers import (
    OUTPUT_GATED,
    OUTPUT_NORMALIZED,
    READING_GAIN,
    READING_NORMALIZED,
    READING_REPARAMETRIZED,
    READING_ZERO,
    ROLE_NORM,
    ROLE_QUERY,
)
from nndiag.rules import run_probe_rules
from nndiag.rules.architecture import POST_LN_DEEP, post_ln_deep_stack
from nndiag.rules.sanity import SanityRecord, batch_mixing
from nndiag.rules.thresholds import THRESHOLDS


def _ids(report) -> set[str]:
    return {f.id for f in report.findings}


def _layer(report, name: str) -> dict:
    return next(row for row in report.layers if row["name"] == name)


def _inspect(model: nn.Module, batch, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inspect_model(model, batch, **kwargs)


def _healthy_zoo_model(name: str):
    """The report on a zoo model at its default init, which must be quiet."""
    if name != "lora_mlp":  # the hand-written ones need no transformers
        pytest.importorskip("transformers")
    from tests.fixtures.arch_zoo import entry

    zoo_entry = entry(name)
    report = _inspect(zoo_entry.build(), zoo_entry.batch())
    assert report.status == "ok", [f.summary for f in report.findings]
    return report


def _images(n: int = 16, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _labels(n: int = 16, classes: int = 4) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- scale invariance


def _conv_bn_net(weight_std: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Dropout(0.1), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, weight_std)
    return model


def test_weights_a_batchnorm_follows_are_read_as_scale_invariant_not_exploding():
    # Conv weights at N(0, 1e-3): ||g||/||w|| ~ 1e3, meaningless before a BatchNorm.
    report = _inspect(_conv_bn_net(1e-3), (_images(), _labels()))
    assert "exploding_gradients" not in _ids(report), [f.summary for f in report.findings]
    for name in ("0", "3", "7"):
        row = _layer(report, name)
        assert row["weight_reading"] == READING_NORMALIZED
        assert row["output_reading"] == OUTPUT_NORMALIZED
        assert row["grad_to_weight"] > THRESHOLDS["exploding_grad_to_weight"].warning
    assert _layer(report, "12")["weight_reading"] == "plain"  # the head: nothing follows it


def test_resnet50_with_batchnorm_after_every_conv_is_not_told_to_explode_or_add_batchnorm():
    report = _healthy_zoo_model("resnet50")
    stem = _layer(report, "resnet.embedder.embedder.convolution")
    assert stem["weight_reading"] == READING_NORMALIZED
    assert stem["grad_to_weight"] > 10  # what was reported as an explosion


def test_a_normalization_after_a_residual_branch_makes_the_branch_scale_irrelevant():
    """Sandwich / post-branch norm: x + norm(proj(h)), with proj initialized tiny."""

    class Sandwich(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(8, 32)
            self.blocks = nn.ModuleList()
            for _ in range(3):
                block = nn.ModuleDict({"up": nn.Linear(32, 64), "act": nn.GELU(),
                                       "down": nn.Linear(64, 32), "post_norm": nn.LayerNorm(32)})
                nn.init.normal_(block["down"].weight, std=3e-3)
                self.blocks.append(block)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for block in self.blocks:
                h = h + block["post_norm"](block["down"](block["act"](block["up"](h))))
            return self.head(h)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    report = _inspect(Sandwich(), (x, _labels()))
    assert report.status == "ok", [f.summary for f in report.findings]
    down = _layer(report, "blocks.0.down")
    assert down["weight_reading"] == READING_NORMALIZED
    assert down["grad_to_weight"] > THRESHOLDS["exploding_grad_to_weight"].warning


# ----------------------------------------------------------------------------- zero init, gains


def test_gemma2_norm_gains_stored_as_offsets_from_one_are_not_an_infinite_ratio():
    report = _healthy_zoo_model("gemma2")
    norm = _layer(report, "model.layers.0.input_layernorm")
    assert norm["weight_norm"] == 0 and norm["weight_reading"] == READING_ZERO
    # A post-attention norm (Gemma 2's sandwich) makes o_proj's scale irrelevant.
    assert _layer(report, "model.layers.0.self_attn.o_proj")["weight_reading"] == \
        READING_NORMALIZED


def test_convnext_layer_scale_is_a_gain_and_branches_are_compared_like_with_like():
    report = _healthy_zoo_model("convnext")
    layer = _layer(report, "convnext.encoder.stages.3.layers.0")
    assert layer["weight_reading"] == READING_GAIN  # layer_scale_parameter, 1e-6
    assert layer["grad_to_weight"] > 100  # what was reported as an explosion


@pytest.mark.parametrize("name", ["beit", "swin"])
def test_zero_initialized_relative_position_tables_are_not_an_infinite_ratio(name):
    report = _healthy_zoo_model(name)
    tables = [r for r in report.layers if "relative_position" in r["name"] and r["weight_norm"]
              is not None]
    assert tables and all(r["weight_reading"] == READING_ZERO for r in tables)


def test_zero_init_residual_batchnorm_is_no_explosion():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            nn.init.zeros_(self.bn2.weight)  # torchvision's zero_init_residual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          Block(), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    report = _inspect(model, (_images(), _labels()))
    assert report.status == "ok", [f.summary for f in report.findings]
    assert _layer(report, "3.bn2")["weight_reading"] == READING_ZERO


def test_lora_b_starts_at_zero_and_a_gets_no_gradient_by_design():
    report = _healthy_zoo_model("lora_mlp")
    assert _layer(report, "0.lora_B")["weight_reading"] == READING_ZERO
    lora_a = _layer(report, "0.lora_A")
    assert lora_a["output_reading"] == OUTPUT_GATED and lora_a["depth_gain"] == 0


# ----------------------------------------------------------------------------- re-parametrized


def _tcn_like(kind: str) -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1)]
    if kind == "weight_norm":
        convs = [parametrizations.weight_norm(c) for c in convs]
    elif kind == "spectral_norm":
        convs = [parametrizations.spectral_norm(c) for c in convs]
    else:  # the deprecated hook-based weight norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convs = [torch.nn.utils.weight_norm(c) for c in convs]
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 12, 3))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "legacy_weight_norm"])
def test_reparametrized_weights_keep_their_real_scale_elsewhere(kind):
    x = torch.randn(16, 4, 12, generator=torch.Generator().manual_seed(0))
    model = _tcn_like(kind)
    buffers = {name: b.clone() for name, b in model.state_dict().items()}
    report = _inspect(model, (x, _labels(classes=3)))
    for name, value in model.state_dict().items():  # spectral norm's power iteration undone
        assert torch.equal(value, buffers[name]), name
    assert "exploding_gradients" not in _ids(report), [f.summary for f in report.findings]
    names = [row["name"] for row in report.layers]
    assert not any("parametrizations" in name for name in names)  # not a call site
    conv = _layer(report, "0")
    assert conv["weight_reading"] == READING_REPARAMETRIZED
    with torch.no_grad():
        effective = model.eval()[0].weight
    assert conv["weight_norm"] == pytest.approx(float(effective.detach().norm()), rel=0.02)
    assert conv["grad_norm"] is not None and conv["grad_norm"] > 0


# ----------------------------------------------------------------------------- small bottlenecks


def test_a_squeeze_and_excitation_bottleneck_of_few_units_is_not_judged_for_dead_units():
    relu = LayerRecord(name="se.act", module="se.act", kind="ReLU", index=1, activation="relu",
                       std=0.1, absmax=1.0, dead_fraction=0.5, shape=[64, 4, 1, 1])
    fc = LayerRecord(name="fc", module="fc", kind="Linear", index=0, std=1.0, mean=0.0,
                     absmax=3.0, grad_out_norm=1.0, depth_gain=1.0, params=10, trainable=True,
                     weight_norm=1.0, weight_rms=0.1, grad_norm=0.1, grad_to_weight=0.1,
                     fan_in=64, fan_out=64, init_reference="he", init_scale=1.0)
    probe = ProbeRecord(layers=[fc, relu], loss=2.3, loss_name="cross_entropy", num_classes=10,
                        output_grad_norm=1.0, batch_size=64)
    assert run_probe_rules(probe) == []
    relu.shape = [64, 32, 1, 1]  # the same share of a wider layer is capacity lost
    assert {f.id for f in run_probe_rules(probe)} == {"dead_relu"}


def test_regnet_squeeze_and_excitation_gates_are_quiet():
    _healthy_zoo_model("regnet")


# ----------------------------------------------------------------------------- unused by design


def test_a_mask_token_for_masked_pretraining_is_unused_by_design():
    class MaskedEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.mask_token = nn.Parameter(torch.zeros(1, 8))
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            self.spare = nn.Linear(8, 8)  # really unused

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    finding = _inspect(MaskedEncoder(), (x, _labels())).finding("unused_parameters")
    assert finding is not None
    assert finding.evidence["parameters"] == ["spare.weight", "spare.bias"]
    assert finding.evidence["unused_by_design"] == ["mask_token"]


# ----------------------------------------------------------------------------- mixture of experts


def _moe(name: str, blocks: int = 2) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from tests.fixtures.arch_zoo import _GQA

    torch.manual_seed(0)
    if name == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                            **dict(_GQA, num_hidden_layers=blocks))
        return transformers.MixtralForCausalLM(config)
    config = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32,
                                         **dict(_GQA, num_hidden_layers=blocks))
    return transformers.Qwen2MoeForCausalLM(config)


def _saved(model: nn.Module):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "weights.pt")
        torch.save(model.state_dict(), path)
        return inspect_checkpoint(path)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_experts_fifty_times_too_large_are_caught_live_and_data_free_alike(name):
    from tests.fixtures.arch_zoo import _lm

    model = _moe(name)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".experts." in param_name:
                param.mul_(50)
    live, data_free = _inspect(model, _lm()), _saved(model)
    for report in (live, data_free):
        finding = report.finding("poor_initialization")
        assert finding is not None and finding.severity == "error", report.findings
        assert any("experts" in layer for layer in finding.layers)
        assert finding.evidence["worst_ratio"] == pytest.approx(50, rel=0.2)


def test_a_deep_mixtral_without_its_rmsnorms_is_caught_live_and_data_free_alike():
    from tests.fixtures.arch_zoo import _lm

    model = _moe("mixtral", blocks=12)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Identity())
    live, data_free = _inspect(model, _lm()), _saved(model)
    for report in (live, data_free):
        finding = report.finding("poor_initialization")
        assert finding is not None and finding.evidence["mechanism"] == "no_normalization"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_grouped_query_attention_projections_get_their_roles(name, implementation):
    from tests.fixtures.arch_zoo import _lm

    model = _moe(name)
    model.config._attn_implementation = implementation
    report = _inspect(model, _lm())
    roles = {row["name"].rsplit(".", 1)[-1]: row["role"] for row in report.layers
             if row["name"].startswith("model.layers.0.self_attn.")}
    assert roles == {"q_proj": ROLE_QUERY, "k_proj": "attention_key",
                     "v_proj": "attention_value", "o_proj": "attention_output"}


# ----------------------------------------------------------------------------- rule mutations


def _plain(name: str, index: int, gain: float, block: bool = True) -> LayerRecord:
    module = f"layers.{name}" if block else name
    return LayerRecord(name=module, module=module, kind="Linear", index=index, std=1.0,
                       mean=0.0, absmax=3.0, grad_out_norm=gain, depth_gain=gain, params=10,
                       trainable=True, weight_norm=1.0, weight_rms=0.1, grad_norm=0.1,
                       grad_to_weight=0.1, fan_in=64, fan_out=64, init_reference="he",
                       init_scale=1.0)


def test_a_vanishing_trend_through_blocks_is_reported_beside_a_healthy_outside_layer():
    # Block 0 gets 1e-5 of what block 3 gets; a layer outside the blocks is healthy (0.5).
    layers = [_plain("in_proj", 0, 0.5, block=False)]
    layers += [_plain(f"{b}.fc", b + 1, gain) for b, gain in enumerate((1e-5, 1e-3, 0.1, 1.0))]
    probe = ProbeRecord(layers=layers, loss=2.3, loss_name="cross_entropy", num_classes=10,
                        output_grad_norm=1.0, batch_size=64)
    finding = next(f for f in run_probe_rules(probe) if f.id == "vanishing_gradients")
    assert finding.evidence["block_trend"]["ratio"] == pytest.approx(1e-5)
    assert finding.evidence["min_depth_gain"] == pytest.approx(1e-5)
    assert finding.layers == ["layers.0.fc"]


def _transformer_block(block: int, index: int, post_ln: bool) -> list[LayerRecord]:
    attention = LayerRecord(name=f"layers.{block}.attn.q", module=f"layers.{block}.attn.q",
                            kind="Linear", index=index, role=ROLE_QUERY)
    norm = LayerRecord(name=f"layers.{block}.norm", module=f"layers.{block}.norm",
                       kind="LayerNorm", index=index, role=ROLE_NORM)
    ordered = [attention, norm] if post_ln else [norm, attention]
    for offset, record in enumerate(ordered):
        record.index = index + offset
    return ordered


def test_a_stack_mostly_pre_ln_is_not_named_a_post_ln_stack():
    post, pre = POST_LN_DEEP, POST_LN_DEEP // 2  # 16 post-LN blocks of 24: two thirds
    layers = [r for b in range(post + pre)
              for r in _transformer_block(b, 2 * b, post_ln=b < post)]
    probe = ProbeRecord(layers=layers, loss=2.3, loss_name="cross_entropy")
    assert post_ln_deep_stack(probe, THRESHOLDS) is None
    all_post = [r for b in range(post + pre) for r in _transformer_block(b, 2 * b, True)]
    assert post_ln_deep_stack(ProbeRecord(layers=all_post, loss=2.3, loss_name="x"),
                              THRESHOLDS) is not None


def test_a_spike_a_dozen_robust_sigmas_high_is_removed_and_noise_is_not():
    lrs = np.logspace(-6, 0, 80)
    noise = np.random.default_rng(0).normal(0.0, 0.01, len(lrs))
    clean = 2.3 + noise  # the flat start of a range test: the residual is the noise
    sigma = 1.4826 * np.median(np.abs(noise))
    spiked = clean.copy()
    spiked[40] += 12 * sigma
    spiked[60] += 3 * sigma  # within the noise a valley is read on
    out = despiked(lrs, spiked)
    assert out[40] < clean[40] + 3 * sigma  # replaced by the running median
    assert out[60] == spiked[60]
    assert np.array_equal(np.delete(out, [40]), np.delete(spiked, [40]))


def test_a_weak_leak_between_samples_is_batch_mixing_and_float_noise_is_not():
    # A batch statistic over 4096 samples mixes them at about 1/4096 = 2.4e-4 each.
    assert batch_mixing(SanityRecord(1.0, mixing_ratio=2.4e-4, mixing_method="gradient"))
    assert batch_mixing(SanityRecord(1.0, mixing_ratio=1e-6, mixing_method="gradient")) is None


def test_a_layer_layerdrop_skipped_in_the_probe_is_not_unused():
    class LayerDrop(nn.Module):
        """Skips its second layer in training mode (LayerDrop at its most unlucky draw)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for index, layer in enumerate(self.layers):
                if self.training and index == 1:
                    continue
                x = torch.relu(layer(x))
            return self.head(x)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    report = _inspect(LayerDrop(), (x, _labels()))
    assert "unused_parameters" not in _ids(report), [f.summary for f in report.findings]
    assert report.status == "ok"


def test_a_sparse_buffer_does_not_break_the_live_weight_read():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model.register_buffer("mask", torch.eye(4).to_sparse())
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert _inspect(model, (x, _labels(classes=3))).status == "ok"
