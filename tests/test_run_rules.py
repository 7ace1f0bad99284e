"""The run rules (``nndiag.rules.run``) on hand-made run logs: no torch, no Monitor, no files.

Every rule in ``run_rules`` fires on a case built for it, with its id, severity, layers and
first step, and stays quiet on a healthy run (which produces no finding at all).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nndiag.records import LayerRecord, StepRecord
from nndiag.rules.run import loss_levels, run_rules
from nndiag.rules.thresholds import RUN_THRESHOLDS, THRESHOLDS, Threshold
from nndiag.runlog import RunLog

STEPS = 200
EVERY = 10
# Linear layers: name -> (weight norm, gradient-to-weight ratio); ReLUs: name -> dead fraction.
LINEARS = {"0": (8.0, 2e-3), "2": (6.0, 4e-3), "4": (3.0, 8e-3)}
RELUS = {"1": 0.05, "3": 0.06}


def healthy_losses(n: int = STEPS, seed: int = 0) -> list[float]:
    """A loss falling from ~2.5 to ~0.25 with 3% multiplicative noise."""
    rng = random.Random(seed)
    return [(2.3 * math.exp(-s / 50) + 0.2) * (1 + 0.03 * rng.gauss(0, 1)) for s in range(n)]


def healthy_sample(step: int, rng: random.Random) -> StepRecord:
    """Linear(0) ReLU(1) Linear(2) ReLU(3) Linear(4), with sane statistics."""

    def jitter(value: float) -> float:
        return value * (1 + 0.1 * rng.uniform(-1, 1))

    layers = []
    for index, name in enumerate(sorted({**LINEARS, **RELUS})):
        if name in LINEARS:
            weight_norm, ratio = LINEARS[name]
            ratio = jitter(ratio)
            layers.append(LayerRecord(
                name, name, "Linear", index, mean=0.0, std=jitter(0.8), absmax=jitter(4.0),
                params=1000, trainable=True, weight_norm=weight_norm,
                grad_norm=ratio * weight_norm, grad_to_weight=ratio,
                update_ratio=jitter(1e-3)))
        else:
            layers.append(LayerRecord(
                name, name, "ReLU", index, activation="relu", mean=jitter(0.4),
                std=jitter(0.6), absmax=jitter(3.0), dead_fraction=jitter(RELUS[name])))
    return StepRecord(step, None, jitter(1.0), layers)


def make_run(losses: list[float] | None = None, samples: bool = True, seed: int = 0) -> RunLog:
    """A healthy run: the given (or a healthy) loss, a sample every ``EVERY`` steps."""
    losses = healthy_losses(seed=seed) if losses is None else losses
    rng = random.Random(seed + 1)
    records = []
    if samples:
        records = [healthy_sample(step, rng) for step in range(0, len(losses), EVERY)]
        for record in records:
            record.loss = losses[record.step]
    return RunLog(Path("hand-made"), {"schema": "nndiag.run/2"}, steps=list(range(len(losses))),
                  losses=list(losses), lrs=[0.01] * len(losses), samples=records)


def tweak(log: RunLog, name: str, since: int = 0, until: int | None = None, **values) -> None:
    """Set fields of layer ``name`` in every sample with ``since <= step < until``.

    A ``grad_to_weight`` keeps ``grad_norm`` consistent with the layer's weight norm.
    """
    for sample in log.samples:
        if sample.step < since or (until is not None and sample.step >= until):
            continue
        layer = next(layer for layer in sample.layers if layer.name == name)
        for key, value in values.items():
            setattr(layer, key, value)
        if "grad_to_weight" in values:
            layer.grad_norm = values["grad_to_weight"] * layer.weight_norm


def piecewise(points: list[tuple[int, float]], noise: float = 0.02, seed: int = 3) -> list[float]:
    """A loss linear between ``(step, value)`` points, with multiplicative noise."""
    rng = random.Random(seed)
    losses = []
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        for s in range(s0, s1):
            losses.append(v0 + (v1 - v0) * (s - s0) / (s1 - s0))
    losses.append(points[-1][1])
    return [v * (1 + noise * rng.gauss(0, 1)) for v in losses]


def ids(log: RunLog, **kwargs) -> list[str]:
    return [f.id for f in run_rules(log, **kwargs)]


def only(log: RunLog, finding_id: str):
    """The one finding ``run_rules`` reports, which must have ``finding_id``."""
    findings = run_rules(log)
    assert [f.id for f in findings] == [finding_id], [(f.id, f.summary) for f in findings]
    return findings[0]


# -- healthy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_run_has_no_finding(seed):
    log = make_run(seed=seed)
    assert len(log.samples) == STEPS // EVERY
    assert run_rules(log) == []


def test_healthy_loss_without_samples_has_no_finding():
    assert run_rules(make_run(samples=False)) == []


# -- nan_inf ---------------------------------------------------------------------------------


def test_nan_loss_is_nan_inf_from_its_step():
    log = make_run()
    log.losses[120] = float("nan")
    finding = only(log, "nan_inf")
    assert finding.severity == "error"
    assert finding.evidence == {"first_step": 120, "where": "the loss"}


def test_inf_loss_without_samples_is_nan_inf():
    log = make_run(samples=False)
    log.losses[37:] = [float("inf")] * (STEPS - 37)
    finding = only(log, "nan_inf")
    assert (finding.severity, finding.evidence["first_step"]) == ("error", 37)


def test_inf_gradient_norm_in_a_sample_is_nan_inf_before_the_loss_goes():
    log = make_run()
    log.samples[5].grad_norm = float("inf")  # step 50
    log.losses[150:] = [float("nan")] * (STEPS - 150)
    finding = only(log, "nan_inf")
    assert finding.severity == "error"
    assert finding.evidence == {"first_step": 50, "where": "the gradients"}


def test_nan_loss_before_a_bad_gradient_is_reported_at_the_loss():
    log = make_run()
    log.losses[30] = float("nan")
    log.samples[5].grad_norm = float("inf")
    finding = only(log, "nan_inf")
    assert finding.evidence == {"first_step": 30, "where": "the loss"}


def test_non_finite_activations_are_nan_inf():
    log = make_run()
    tweak(log, "3", since=70, absmax=float("inf"), mean=float("nan"))
    finding = only(log, "nan_inf")
    assert finding.severity == "error"
    assert finding.evidence == {"first_step": 70, "where": "activations"}


# -- loss trend -----------------------------------------------------------------------------


def test_loss_ending_above_its_start_is_diverging_error():
    # Falls 2.3 -> 1.0 by step 60, then climbs to 4.0: crosses the start near step 115.
    log = make_run(piecewise([(0, 2.3), (60, 1.0), (199, 4.0)]))
    finding = only(log, "loss_diverging")
    assert finding.severity == "error"
    assert "ends higher than it started" in finding.summary
    assert 100 <= finding.evidence["first_step"] <= 130
    assert finding.evidence["end"] > finding.evidence["start"]


def test_loss_giving_back_half_its_fall_is_diverging_warning():
    # Falls 2.0 -> 0.5 by step 100, climbs back to 1.5 (2/3 of the fall): the running median
    # passes best + fall/2 ~ 1.24 near step 173.
    log = make_run(piecewise([(0, 2.0), (100, 0.5), (199, 1.5)]))
    finding = only(log, "loss_diverging")
    assert finding.severity == "warning"
    assert "gave back" in finding.summary
    assert 95 <= finding.evidence["best_step"] <= 105
    assert 160 <= finding.evidence["first_step"] <= 185


def test_flat_loss_is_not_decreasing():
    log = make_run([2.3] * STEPS)
    finding = only(log, "loss_not_decreasing")
    assert finding.severity == "warning"
    assert finding.evidence["first_step"] == 0


def test_flat_noisy_loss_is_not_decreasing():
    # The first release said "diverging" for about half of such runs (levels read at the
    # cut edges of the running median, a noise estimate below the real one).
    verdicts = {seed: ids(make_run(piecewise([(0, 2.3), (199, 2.3)], seed=seed), samples=False))
                for seed in range(20)}
    assert all(v == ["loss_not_decreasing"] for v in verdicts.values()), verdicts


def test_slightly_rising_loss_within_one_percent_is_not_decreasing_not_diverging():
    log = make_run(piecewise([(0, 2.3), (199, 2.31)], noise=0.0))
    assert only(log, "loss_not_decreasing").severity == "warning"


@pytest.mark.parametrize("n", [2, 9])
def test_fewer_than_ten_steps_gives_no_loss_verdict(n):
    rising = [1.0 + s for s in range(n)]
    assert run_rules(make_run(rising)) == []
    assert run_rules(make_run([2.0] * n, samples=False)) == []


def test_ten_steps_are_enough_for_a_loss_verdict():
    assert ids(make_run([1.0 + s for s in range(10)])) == ["loss_diverging"]


def test_run_without_samples_gets_only_loss_rules():
    log = make_run(piecewise([(0, 2.3), (60, 1.0), (199, 4.0)]), samples=False)
    assert log.samples == []
    assert ids(log) == ["loss_diverging"]


# -- loss_oscillating -------------------------------------------------------------------------


def swinging_losses(low: float, high: float) -> list[float]:
    """Falls 2.3 -> 1.0 by step 100, then cycles ``low, 1.0, high`` (running median 1.0)."""
    head = piecewise([(0, 2.3), (100, 1.0)])
    return head + [(low, 1.0, high)[s % 3] for s in range(STEPS - len(head))]


@pytest.mark.parametrize(("low", "high", "severity"),
                         [(0.6, 1.6, "warning"), (0.2, 3.0, "error")])
def test_loss_swinging_late_in_the_run_is_oscillating(low, high, severity):
    finding = only(make_run(swinging_losses(low, high)), "loss_oscillating")
    assert finding.severity == severity
    bounds = (0.4, 1.0) if severity == "warning" else (1.0, math.inf)
    assert bounds[0] <= finding.evidence["relative_amplitude"] < bounds[1]
    assert finding.evidence["first_step"] == STEPS // 2


def test_converged_loss_near_zero_with_relative_noise_is_not_oscillating():
    # Down to ~1e-4 with noise as large as the level itself: relative noise ~100%, but tiny
    # next to the starting loss.
    rng = random.Random(5)
    losses = [2.3 * math.exp(-s / 10) + 1e-4 * math.exp(rng.gauss(0, 1)) for s in range(STEPS)]
    assert run_rules(make_run(losses)) == []


HEALTHY_LOSSES = json.loads((Path(__file__).parent / "fixtures" / "healthy_losses.json")
                            .read_text())["runs"]


@pytest.mark.parametrize("run", sorted(HEALTHY_LOSSES))
def test_batch_noise_of_a_converged_classifier_is_not_oscillating(run):
    # Real healthy runs (digits, SGD+momentum, batch 16, 90-94% held-out accuracy): the loss
    # fell by 96-98% and its batch-to-batch spread, the loss of a few hard examples per batch,
    # is as large as its level. Dividing the learning rate by 10 would slow the run and not
    # quieten the noise.
    log = make_run(HEALTHY_LOSSES[run]["losses"])
    levels = loss_levels(log)
    assert levels.late_noise >= 0.9 * levels.late_level  # the swings are there
    assert levels.late_noise >= 0.02 * levels.start
    assert "loss_oscillating" not in ids(log)


def test_swings_of_a_loss_stalled_high_are_oscillating():
    # As large relative to the level as the converged classifier's noise, but stalled at a
    # third of the starting loss, where too high a learning rate keeps a run: judged.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        losses = [2.3 * (0.75 / 2.3) ** (s / 60) for s in range(60)]
        losses += (0.75 * np.exp(rng.normal(0.0, 0.9, STEPS - 60))).tolist()
        assert only(make_run(losses), "loss_oscillating").evidence["relative_amplitude"] >= 0.4


def _stalled_then_drifting(steps: int, decline: float, seed: int, swing: float = 0.9
                           ) -> list[float]:
    """Down to 0.75 by a tenth of the run, then falling by ``decline`` per quarter of the run,
    with log-normal swings (``swing``: ~60% of the level at 0.9, ~40% at 0.6)."""
    rng = np.random.default_rng(seed)
    head = steps // 10
    level = [2.3 * (0.75 / 2.3) ** (s / head) for s in range(head)]
    level += [0.75 * (1 - decline) ** ((s - head) / (steps / 4)) for s in range(head, steps)]
    return (np.asarray(level) * np.exp(rng.normal(0.0, swing, steps))).tolist()


def test_a_loss_still_falling_by_a_third_a_quarter_is_not_oscillating():
    # Significant and large: a fall of 30-45% between the last two quarters (not half), swings
    # of ~45% of the level.
    for seed in range(3):
        log = make_run(_stalled_then_drifting(1000, 0.4, seed, swing=0.65))
        assert "loss_oscillating" not in ids(log)


def test_a_long_runs_slow_drift_does_not_hide_its_swings():
    # 20,000 steps falling 10% per quarter: significant by the standard error alone, but the
    # swings of ~60% of the level are what the run does.
    log = make_run(_stalled_then_drifting(20_000, 0.1, 0), samples=False)
    assert "loss_oscillating" in ids(log)


def test_loss_still_falling_fast_but_noisy_is_not_oscillating():
    # 2.3 -> 1.5 in the first half, then halving every ~20 steps, with 60% log-normal noise:
    # the late spread is ~50% of the level, but the last quarter is far below the third.
    rng = random.Random(6)
    clean = piecewise([(0, 2.3), (100, 1.5)], noise=0.0)
    clean += [1.5 * math.exp(-s / 30) for s in range(1, STEPS - len(clean) + 1)]
    losses = [v * math.exp(0.6 * rng.gauss(0, 1)) for v in clean]
    assert run_rules(make_run(losses)) == []


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "severity"), [(1e-7, "warning"), (1e-10, "error")])
def test_first_layer_starved_of_gradient_is_vanishing(ratio, severity):
    log = make_run()
    tweak(log, "0", since=50, grad_to_weight=ratio)
    finding = only(log, "vanishing_gradients")
    assert finding.severity == severity
    assert finding.layers == ["0"]
    assert finding.evidence["weakest_layer"] == "0"
    assert finding.evidence["first_step"] == 50


def test_vanishing_only_in_the_first_half_is_not_reported():
    # 12 of 20 samples: the run's median is vanishing, its second half's is not.
    log = make_run()
    tweak(log, "0", until=120, grad_to_weight=1e-9)
    assert run_rules(log) == []


def test_normalization_layers_are_not_judged_for_vanishing_gradients():
    log = make_run()
    for sample in log.samples:
        sample.layers.insert(1, LayerRecord(
            "norm", "norm", "LayerNorm", 1, mean=0.0, std=1.0, absmax=4.0, params=64,
            trainable=True, weight_norm=8.0, grad_norm=8e-9, grad_to_weight=1e-9))
    assert run_rules(log) == []


@pytest.mark.parametrize(("ratio", "severity"), [(30.0, "warning"), (3e3, "error")])
def test_gradients_far_above_the_weights_are_exploding(ratio, severity):
    log = make_run()
    for name, factor in (("0", 0.5), ("2", 0.7), ("4", 1.0)):
        tweak(log, name, since=80, grad_to_weight=ratio * factor)
    finding = only(log, "exploding_gradients")
    assert finding.severity == severity
    assert finding.layers == ["4"]
    assert finding.evidence["first_step"] == 80


# -- dead_relu ------------------------------------------------------------------------------


def test_relu_dying_during_training_is_dead_relu_from_its_crossing():
    log = make_run()
    # ReLU "1": 0.05 until step 40, 0.3 at 40 and 50, 0.6 from 60, 0.95 from 120.
    tweak(log, "1", since=40, dead_fraction=0.3)
    tweak(log, "1", since=60, dead_fraction=0.6)
    tweak(log, "1", since=120, dead_fraction=0.95)
    tweak(log, "3", since=150, dead_fraction=0.55)
    initial = log.samples[0].layers[1].dead_fraction
    finding = only(log, "dead_relu")
    assert finding.severity == "error"
    assert finding.layers == ["1", "3"]
    assert finding.evidence["dead_fraction"] == {"1": 0.95, "3": 0.55}
    assert finding.evidence["first_step"] == 60
    assert finding.evidence["initial"] == initial
    assert 0.04 < initial < 0.06


def test_half_dead_relu_is_dead_relu_warning():
    log = make_run()
    tweak(log, "3", since=100, dead_fraction=0.6)
    finding = only(log, "dead_relu")
    assert finding.severity == "warning"
    assert finding.layers == ["3"]
    assert finding.evidence["first_step"] == 100


def test_relu_that_recovered_by_the_last_sample_is_not_dead():
    log = make_run()
    tweak(log, "1", since=50, until=150, dead_fraction=0.95)
    assert run_rules(log) == []


# -- update ratios --------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "severity"), [(0.1, "warning"), (0.8, "error")])
def test_large_updates_are_update_ratio_high(ratio, severity):
    log = make_run()
    tweak(log, "2", since=30, update_ratio=ratio)
    finding = only(log, "update_ratio_high")
    assert finding.severity == severity
    assert finding.layers == ["2"]
    assert finding.evidence["median_update_ratio"] == {"2": ratio}
    assert finding.evidence["first_step"] == 30


@pytest.mark.parametrize(("ratio", "severity"), [(1e-6, "warning"), (1e-9, "error")])
def test_tiny_updates_are_update_ratio_low(ratio, severity):
    log = make_run()
    tweak(log, "0", since=20, update_ratio=ratio)
    tweak(log, "4", since=20, update_ratio=ratio)
    finding = only(log, "update_ratio_low")
    assert finding.severity == severity
    assert finding.layers == ["0", "4"]
    assert finding.evidence["first_step"] == 20


@pytest.mark.parametrize(("reading", "ratio", "judged"), [
    ("gain", 7e-6, False),  # a LayerNorm's gain under AdamW at a fine-tuning rate moves ~lr
    ("plain", 7e-6, True), ("normalized", 7e-6, True),
    ("gain", 0.8, True),  # a gain rewritten every step is still too fast
    ("zero", 0.8, False), ("zero", 1e-9, False),  # a ratio to a norm that is zero on purpose
    ("reparametrized", 0.8, False), ("reparametrized", 1e-9, False)])
def test_update_ratio_band_is_for_weights_whose_norm_means_something(reading, ratio, judged):
    log = make_run()
    tweak(log, "2", since=20, update_ratio=ratio, weight_reading=reading)
    assert bool({"update_ratio_low", "update_ratio_high"} & set(ids(log))) == judged


def test_update_ratio_judged_by_each_steps_reading():
    # A zero-initialized branch that grows into plain weights: judged on its plain steps only.
    log = make_run()
    tweak(log, "2", until=100, update_ratio=5.0, weight_reading="zero")
    assert "update_ratio_high" not in ids(log)
    tweak(log, "2", since=100, update_ratio=0.8, weight_reading="plain")
    assert only(log, "update_ratio_high").evidence["median_update_ratio"] == {"2": 0.8}
    # A layer rewritten every step whose weights read zero only at the last sample: judged.
    log = make_run()
    tweak(log, "2", update_ratio=0.8)
    tweak(log, "2", since=STEPS - EVERY, weight_reading="zero")
    assert only(log, "update_ratio_high").layers == ["2"]


def test_update_ratio_judged_on_the_median_not_a_spike():
    log = make_run()
    tweak(log, "2", since=50, until=80, update_ratio=0.9)
    assert run_rules(log) == []


# -- run_rules as a whole ----------------------------------------------------------------------


def test_findings_come_most_severe_first():
    log = make_run()
    tweak(log, "3", since=100, dead_fraction=0.6)  # warning, judged before the update ratios
    tweak(log, "2", update_ratio=0.8)  # error
    assert [(f.id, f.severity) for f in run_rules(log)] == [
        ("update_ratio_high", "error"), ("dead_relu", "warning")]
    log.losses[150] = float("nan")
    assert ids(log) == ["nan_inf", "update_ratio_high", "dead_relu"]


def test_threshold_overrides_are_applied():
    strict = Threshold(0.01, 0.02, True, "test")
    assert {"dead_fraction", "update_ratio_high"} <= {*THRESHOLDS, *RUN_THRESHOLDS}
    finding = run_rules(make_run(), {"dead_fraction": strict})
    assert [(f.id, f.severity) for f in finding] == [("dead_relu", "error")]


def test_rules_do_not_import_torch():
    code = ("import sys, nndiag.rules.run, nndiag.runlog, nndiag.records, nndiag.run_check; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


# -- zero_grad_missing: gradient norms that grow like a running sum ---------------------------


def scale_gradients(log: RunLog, factor) -> None:
    """Multiply every sample's global and per-layer gradient norm by ``factor(step)``."""
    for sample in log.samples:
        scale = factor(sample.step)
        sample.grad_norm *= scale
        for layer in sample.layers:
            if layer.grad_norm is not None:
                layer.grad_norm *= scale
                layer.grad_to_weight = layer.grad_norm / layer.weight_norm


def summed_gradients(log: RunLog, exponent: float, seed: int = 0) -> None:
    """Gradient norms of a sum of t + 1 gradients: ~(t + 1)^a, each gradient 10% noisy.

    Consecutive sums share all but the newest terms, so their relative noise shrinks as
    1 / sqrt(t + 1) (the healthy samples' independent jitter is replaced).
    """
    rng = random.Random(seed)
    for sample in log.samples:
        scale = (sample.step + 1) ** exponent * (
            1 + 0.1 * rng.uniform(-1, 1) / math.sqrt(sample.step + 1))
        sample.grad_norm = scale
        for layer in sample.layers:
            if layer.name in LINEARS:
                weight_norm, ratio = LINEARS[layer.name]
                layer.grad_norm = ratio * weight_norm * scale
                layer.grad_to_weight = layer.grad_norm / layer.weight_norm


@pytest.mark.parametrize("exponent", [0.5, 0.8, 1.0])
def test_gradient_norm_growing_like_a_sum_is_zero_grad_missing(exponent):
    # Without zero_grad the recorded gradient at step t sums t + 1 gradients: ~(t + 1)^a.
    log = make_run()
    summed_gradients(log, exponent)
    finding = next(f for f in run_rules(log) if f.id == "zero_grad_missing")
    assert finding.severity == "error"
    assert finding.layers == ["0", "2", "4"]
    assert finding.evidence["slope"] == pytest.approx(exponent, abs=0.1)
    assert finding.evidence["first_step"] == 10  # the first sample at twice the first norm


def test_summed_gradients_explain_the_diverging_loss():
    from nndiag.advice import advise_run
    from nndiag.advice.causes import link_causes

    log = make_run(piecewise([(0, 2.3), (60, 1.0), (199, 4.0)]))
    summed_gradients(log, 0.7)
    findings = link_causes([advise_run(f, log) for f in run_rules(log)])
    assert [(f.id, f.severity) for f in findings if f.severity != "info"] == [
        ("zero_grad_missing", "error")]
    diverging = next(f for f in findings if f.id == "loss_diverging")
    assert diverging.evidence["explained_by"] == ["zero_grad_missing"]
    assert not {x.id for x in diverging.fixes} & {"lower_learning_rate", "lr_warmup"}
    assert [x.id for x in findings[0].fixes] == ["zero_grad"]


@pytest.mark.parametrize(("name", "factor"), [
    # accumulation done right over 4 samples: the norm saw-tooths around a level
    ("accumulation", lambda step: 1 + (step // EVERY) % 4),
    # a learning rate too high: exponential, far faster than a sum of bounded gradients
    ("exponential", lambda step: 1.05 ** step),
    # a healthy run whose gradients double slowly (weights growing out of a small init)
    ("slow growth", lambda step: 1 + step / STEPS),
    # a jump in the middle: not a steady rise
    ("jump", lambda step: 1 if step < 100 else 8),
])
def test_gradient_norms_that_do_not_grow_like_a_sum_are_not_zero_grad_missing(name, factor):
    log = make_run()
    scale_gradients(log, factor)
    assert "zero_grad_missing" not in ids(log)


def test_one_layer_growing_alone_is_not_zero_grad_missing():
    # A missing zero_grad sums the gradient of every parameter: one layer alone is another story.
    log = make_run()
    summed_gradients(log, 0.7)
    for name in ("0", "2"):
        weight_norm, ratio = LINEARS[name]
        tweak(log, name, grad_to_weight=ratio)
    assert "zero_grad_missing" not in ids(log)
