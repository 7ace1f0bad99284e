"""lr-find: the suggestion on synthetic curves, the sweep, state restoration and bad input."""

from __future__ import annotations

import json
import math
import random
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag import UsageError, examples
from nndiag.findings import Report
from nndiag.lrfind import (
    RULE,
    LRFindResult,
    Rule,
    choose_lr,
    eval_scatter,
    lr_find,
    plateau_candidates,
    snap_lr,
    suggest_lr,
    train_trial,
    trial_baseline,
)
from nndiag.lrfind.sweep import _early_stop

LRS = np.logspace(-7, 1, 100)


def valley(lrs: np.ndarray = LRS, low: float = 0.2, minimum_at: float = 1e-1) -> np.ndarray:
    """A clean range-test curve: flat at 2.3, falling from ~1e-3 to ``minimum_at``, then up."""
    x = np.log10(lrs)
    center = math.log10(minimum_at)
    fall = (2.3 - low) / (1 + np.exp(-(x - (center - 1.0)) * 3.0))
    rise = np.where(x > center, 30 * (x - center) ** 2, 0.0)
    return 2.3 - fall + rise


def noise(scale: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, len(LRS))


def test_valley_reads_the_descent():
    curve = valley() + noise(0.02, 1)
    s = suggest_lr(LRS, curve)
    assert s.lr_high == pytest.approx(1e-1, rel=0.5)
    assert 3e-4 < s.lr < s.lr_high / 3  # on the descent, well below the minimum
    assert s.findings == [] and s.shape == "valley"
    assert "valley" in s.reason
    by_minimum = suggest_lr(LRS, valley(), Rule(anchor="min", min_divisor=10.0))
    assert 3e-3 < by_minimum.lr < 3e-2 and "lowest" in by_minimum.reason


def test_noisy_valley_stays_on_the_descent_and_is_flagged_when_very_noisy():
    for seed in range(5):
        noisy = suggest_lr(LRS, valley() + noise(0.1, seed))
        assert 1e-3 < noisy.lr < 3e-2  # the curve falls from ~1e-3 to its minimum at 1e-1
    very = suggest_lr(LRS, valley() + noise(0.8))
    assert "lr_curve_noisy" in [f.id for f in very.findings]


def test_spikes_barely_move_the_suggestion():
    curve = valley() + noise(0.02, 1)
    spiky = curve.copy()
    rng = random.Random(0)
    for index in rng.sample(range(5, 85), 8):
        spiky[index] += 25.0
    clean, with_spikes = suggest_lr(LRS, curve), suggest_lr(LRS, spiky)
    assert clean.lr / 10 < with_spikes.lr < min(clean.lr * 10, clean.lr_high)
    assert with_spikes.lr_high == pytest.approx(clean.lr_high, rel=0.3)


def test_flat_curve_warns_and_suggests_below_the_rise():
    flat = np.where(np.log10(LRS) < 0, 1.0, 1.0 + 5 * np.log10(LRS).clip(0)) + noise(0.005)
    s = suggest_lr(LRS, flat)
    assert [f.id for f in s.findings] == ["lr_curve_flat"]
    assert s.findings[0].severity == "warning" and s.shape == "flat"
    assert s.lr < 1.0  # below the rise at ~1
    # The trials, not the flat curve, decide: candidates hang below the top of the sweep.
    assert s.candidates[0] == pytest.approx(snap_lr(LRS[-1] * 10 ** -RULE.flat_top))
    rise = suggest_lr(LRS, flat, Rule(flat_rule="rise", flat_divisor=10.0))
    assert 3e-2 < rise.lr < 3e-1  # a tenth of the rise at ~1
    flat_forever = suggest_lr(LRS, np.full(len(LRS), 0.7))
    assert flat_forever.lr is None and flat_forever.findings[0].severity == "error"


def test_negative_and_rescaled_losses_give_the_same_suggestion():
    curve = valley() + noise(0.05)
    base = suggest_lr(LRS, curve)
    shifted = suggest_lr(LRS, curve - 10.0)  # e.g. a negative log-likelihood bound
    scaled = suggest_lr(LRS, 3.0 * curve)
    assert shifted.lr == pytest.approx(base.lr, rel=1e-9)
    assert scaled.lr == pytest.approx(base.lr, rel=1e-9)
    assert np.allclose(np.array(shifted.smoothed) + 10.0, base.smoothed)
    assert shifted.smoothed[int(np.argmin(shifted.smoothed))] < -9


def test_nan_tail_is_cut_and_the_valley_still_read():
    curve = valley()
    cut_at = int(np.searchsorted(LRS, 0.5))
    with_nan = curve.copy()
    with_nan[cut_at:] = np.nan
    s = suggest_lr(LRS, with_nan)
    assert s.lr == pytest.approx(suggest_lr(LRS[:cut_at], curve[:cut_at]).lr)
    assert all(math.isnan(v) for v in s.smoothed[cut_at:])


def test_too_short_a_curve_gives_no_suggestion():
    s = suggest_lr(LRS[:5], valley()[:5])
    assert s.lr is None and s.findings[0].id == "lr_curve_too_short"


def test_minimum_at_the_end_of_the_range_warns():
    s = suggest_lr(LRS[:60], valley()[:60])  # stops while the loss still falls
    assert "lr_range_too_narrow" in [f.id for f in s.findings]


def test_curve_falling_to_the_end_of_the_range_is_flagged_and_not_trusted():
    """Adam on an LSTM: the sweep's own progress makes the loss fall all the way to lr = 10."""
    x = np.log10(LRS)
    curve = 1.4 - 1.3 / (1 + np.exp(-(x + 2.5) * 1.5)) + noise(0.01)
    s = suggest_lr(LRS, curve)
    assert s.shape == "falls_to_end"
    assert "lr_range_too_narrow" in [f.id for f in s.findings]
    assert s.lr <= LRS[-1] / 30  # far from the end of the range, which nothing says trains
    assert s.candidates and max(s.candidates) < LRS[-1]
    assert all(c == snap_lr(c) for c in s.candidates)


def test_long_slow_slide_stays_low_on_the_slide():
    """A fast early fall, then a long slow slide to a far-right minimum (transformers)."""
    x = np.log10(LRS)
    curve = 3.0 - 2.0 / (1 + np.exp(-(x + 4) * 4)) - 0.3 * np.clip(x + 3, 0, None) / 3.5
    curve = np.where(x > 0.5, curve + 40 * (x - 0.5) ** 2, curve)
    s = suggest_lr(LRS, curve)
    assert s.shape == "valley" and s.lr_high > 1
    assert s.lr_low <= s.lr <= s.lr_high / 3
    assert all(c < s.lr_high for c in s.candidates)
    capped = suggest_lr(LRS, curve, Rule(anchor="min", cap_at_steepest=True, min_divisor=10.0))
    assert "steepest" in capped.reason and capped.lr == pytest.approx(1e-4, rel=1.0)


def test_candidates_follow_the_rule_and_stay_in_the_range():
    rule = Rule(candidates=3, candidate_offset=0.5, candidate_spacing=0.5)
    s = suggest_lr(LRS, valley(minimum_at=1e-1), rule)
    # The anchor is the valley before the curve-only shift; candidates are placed around it.
    assert s.lr == pytest.approx(s.anchor * 10 ** rule.valley_shift)
    expected = [snap_lr(s.anchor * 10 ** d) for d in (0.5, 0.0, -0.5)]
    assert s.candidates == pytest.approx(expected)
    early = suggest_lr(LRS, valley(minimum_at=3e-7), rule)  # a minimum near the start
    assert all(c >= LRS[0] for c in early.candidates)


def test_trials_within_the_eval_loss_scatter_are_a_tie_won_by_the_lower_rate():
    rule = Rule(trial_tie_sigmas=1.0, trial_shrink=0.0)
    # A step's loss scatters by 0.1 over 16 samples: over 256 samples, by 0.1 / 4.
    scatter = eval_scatter(0.1, 16, 256)
    assert scatter == pytest.approx(0.025) and eval_scatter(None, 16, 256) == 0.0
    candidates, scores = [1e-1, 3e-2, 1e-2], [1.380, 1.384, 1.386]
    tied = choose_lr(candidates, scores, 50, rule, scatter)
    assert tied.lr == pytest.approx(1e-2) and "tie" in tied.reason
    assert choose_lr(candidates, scores, 50, rule).lr == pytest.approx(1e-1)  # no scatter
    no_ties = choose_lr(candidates, scores, 50, Rule(trial_shrink=0.0), scatter)
    assert no_ties.lr == pytest.approx(1e-1)
    clear = choose_lr(candidates, [0.50, 0.90, 1.30], 50, rule, scatter)
    assert clear.lr == pytest.approx(1e-1) and "tie" not in clear.reason


def test_trials_that_make_no_clear_progress_leave_the_curve_suggestion_standing():
    rule = Rule(trial_progress_sigmas=2.0, trial_shrink=0.0)
    candidates, scatter = [1e-1, 3e-2, 1e-2], 0.025
    # Every trial ends within two scatters (0.05) of the starting loss 1.40: they say nothing.
    stuck = choose_lr(candidates, [1.380, 1.384, 1.386], 50, rule, scatter, start=1.40,
                      fallback=4e-3)
    assert stuck.lr == pytest.approx(4e-3) and "say nothing" in stuck.reason
    # One trial fell clearly (by 0.3): it wins as usual.
    moved = choose_lr(candidates, [1.10, 1.384, 1.386], 50, rule, scatter, start=1.40,
                      fallback=4e-3)
    assert moved.lr == pytest.approx(1e-1)
    # Turned off, or without a start or a fallback, the best trial wins.
    off = Rule(trial_progress_sigmas=0.0, trial_shrink=0.0)
    assert choose_lr(candidates, [1.380, 1.384, 1.386], 50, off, scatter, start=1.40,
                     fallback=4e-3).lr == pytest.approx(1e-1)
    assert choose_lr(candidates, [1.380, 1.384, 1.386], 50, rule, scatter).lr == \
        pytest.approx(1e-1)


def test_choose_lr_keeps_the_best_trial_and_survives_all_diverging():
    picked = choose_lr([1e-1, 3e-2, 1e-2], [math.inf, 0.2, 0.3], 50, Rule(trial_shrink=0.0))
    assert picked.lr == pytest.approx(3e-2) and picked.findings == []
    assert "3.00e-02" in picked.reason
    shrunk = choose_lr([1e-1, 3e-2, 1e-2], [math.inf, 0.2, 0.3], 50, Rule(trial_shrink=0.5))
    assert shrunk.lr == pytest.approx(3e-2 / 10 ** 0.5)
    lost = choose_lr([1e-1, 3e-2], [math.inf, math.nan], 50)
    assert lost.lr < 3e-2 and [f.id for f in lost.findings] == ["lr_trials_diverged"]
    with pytest.raises(ValueError):
        choose_lr([1e-1], [], 50)


def plateau_curve(lrs: np.ndarray = LRS, diverges_at: float = 0.3) -> np.ndarray:
    """A recall task's range test: at chance (2.08) until the loss diverges past ``diverges_at``."""
    x = np.log10(lrs)
    return 2.08 + np.where(x > math.log10(diverges_at), 40 * (x - math.log10(diverges_at)) ** 2,
                           0.0) + noise(0.01)


def test_a_plateau_curve_sends_the_trials_up_to_where_the_loss_diverged():
    rule = Rule(plateau_drop=0.02, plateau_margin=0.0)
    s = suggest_lr(LRS, plateau_curve())
    assert s.shape == "flat" and [f.id for f in s.findings] == ["lr_curve_flat"]
    assert s.top == pytest.approx(LRS[-1])  # no loss was non-finite: the sweep's last rate
    cut = suggest_lr(LRS[:90], plateau_curve()[:90])
    assert cut.top == pytest.approx(LRS[89])
    # Every first trial stays within 2% of the starting loss 2.10: a plateau, searched upward.
    scores = [2.07, 2.08, 2.09]
    above = plateau_candidates([1e-2, 10 ** -2.5, 1e-3], scores, 2.10, 0.3, rule)
    assert above == pytest.approx([1e-1, 10 ** -1.5])  # 10**-0.5 is above the top (0.3)
    assert plateau_candidates([1e-2, 1e-3], scores, 2.10, 3.0, rule) == \
        pytest.approx([1.0, 10 ** -0.5, 1e-1, 10 ** -1.5])
    lower = Rule(plateau_drop=0.02, plateau_margin=0.5)
    assert plateau_candidates([1e-2], scores, 2.10, 3.0, lower) == pytest.approx(
        [10 ** -0.5, 1e-1, 10 ** -1.5])
    # A trial that learned (by more than 2%), a rule without the branch, or no start: nothing.
    assert plateau_candidates([1e-2, 1e-3], [1.50, 2.08], 2.10, 0.3, rule) == []
    assert plateau_candidates([1e-2, 1e-3], scores, 2.10, 0.3, Rule(plateau_drop=0.0)) == []
    assert plateau_candidates([1e-2, 1e-3], scores, None, 0.3, rule) == []
    assert plateau_candidates([1e-2], [math.inf], 2.10, 0.3, rule) == []


def test_a_rate_that_leaves_the_plateau_wins_lowered_else_the_first_trials_decide():
    rule = Rule(plateau_drop=0.02, plateau_leave=0.1, plateau_shrink=0.5, trial_shrink=0.25,
                trial_progress_sigmas=0.0)
    candidates = [1e-2, 1e-3, 1e-1, 10 ** -1.5]
    # 1e-1 fell from 2.10 to 0.30 (left the plateau); 10**-1.5 only to 2.05.
    left = choose_lr(candidates, [2.07, 2.08, 0.30, 2.05], 50, rule, start=2.10,
                     plateau=candidates[2:])
    assert left.lr == pytest.approx(1e-1 / 10 ** 0.5)
    assert "left the plateau" in left.reason and "1.00e-01" in left.reason
    # A plateau rate that fell less than 10% does not compete, even with the lowest loss: the
    # first trials decide as usual, and the reason says that nothing was learned.
    stuck = choose_lr(candidates, [2.07, 2.08, 1.95, 2.05], 50, rule, start=2.10,
                      plateau=candidates[2:])
    assert stuck.lr == pytest.approx(1e-2 / 10 ** 0.25)
    assert "--budget" in stuck.reason and "left the plateau" not in stuck.reason
    # Diverged plateau rates are ignored too.
    burst = choose_lr(candidates, [2.07, 2.08, math.inf, math.nan], 50, rule, start=2.10,
                      plateau=candidates[2:])
    assert burst.lr == pytest.approx(1e-2 / 10 ** 0.25) and burst.findings == []


def test_lr_find_trains_the_rates_above_a_plateau():
    model = examples.he_mlp(depth=3, width=16)
    # A plateau threshold no trial can pass: the first trials always "saw a plateau".
    rule = Rule(plateau_drop=0.99, plateau_margin=0.0)
    seen: list[tuple[int, int]] = []
    result = lr_find(model, _data(), optimizer="sgd", steps=30, trial_steps=3, rule=rule,
                     progress=lambda step, total: seen.append((step, total)))
    first = suggest_lr(result.lrs, result.losses, rule).candidates
    tried = [t["lr"] for t in result.trials]
    assert tried[: len(first)] == pytest.approx(first) and len(tried) > len(first)
    top = suggest_lr(result.lrs, result.losses, rule).top
    assert all(max(first) < lr <= top * (1 + 1e-9) for lr in tried[len(first):])
    assert seen[-1][0] == seen[-1][1] == len(result.losses) + 3 * len(tried)
    plain = lr_find(model, _data(), optimizer="sgd", steps=30, trial_steps=3,
                    rule=Rule(plateau_drop=0.0))
    assert [t["lr"] for t in plain.trials] == pytest.approx(first)


def test_shipped_rule_is_a_rule():
    assert isinstance(RULE, Rule) and RULE.candidates * RULE.trial_fraction <= 1.5


def test_early_stop_rule_uses_differences_only():
    assert _early_stop(2.0, 1.0, 4.5, 0.01) == "diverged"
    assert _early_stop(-8.0, -9.0, -5.5, 0.01) == "diverged"  # negative losses
    assert _early_stop(2.0, 1.99, 2.001, 0.005) is None  # flat: no clear fall, no rise
    assert _early_stop(2.0, 1.99, 2.1, 0.005) == "diverged"  # never fell: six times the noise


def test_a_curve_past_its_minimum_runs_on_until_it_diverges():
    # Half of a clear fall undone is not a reason to stop: the valley is read on the whole
    # descent and the rise after it, as fastai's sweep records it.
    assert _early_stop(-8.0, -9.0, -8.4, 0.01) is None
    assert _early_stop(2.0, 0.5, 2.9, 0.01) is None
    assert _early_stop(2.0, 0.5, 5.1, 0.01) == "diverged"


# ----------------------------------------------------------------------------- the sweep


def _data(n_batches: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * 32, 32, generator=g)
    y = x[:, :10].argmax(1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]


def test_sweep_finds_a_valley_and_restores_everything_bitwise():
    model = examples.resnet_bn(widths=(8,), blocks=1)
    model.eval()
    model.stem.train()
    for p in model.fc.parameters():
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()  # the optimizer now holds state that must come back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    saved_exp_avg = [s["exp_avg"].clone() for s in optimizer.state.values()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    images = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    result = lr_find(model, images, optimizer=optimizer, steps=30, start_lr=1e-5, end_lr=1.0,
                     trials=True, trial_steps=4)

    assert len(result.lrs) == len(result.losses) <= 30
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (g is None and p.grad is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes
    assert optimizer.state_dict()["param_groups"] == opt_state["param_groups"]
    for saved, now in zip(saved_exp_avg, optimizer.state.values(), strict=True):
        assert torch.equal(saved, now["exp_avg"])
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2][1])


def test_interrupted_sweep_still_restores_the_model():
    model = examples.resnet_bn(widths=(8,), blocks=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    rng = torch.get_rng_state()

    def interrupt(step: int, steps: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    images = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    torch.set_rng_state(rng)
    with pytest.raises(KeyboardInterrupt):
        lr_find(model, images, steps=30, start_lr=1e-3, end_lr=10.0, progress=interrupt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert model.training and torch.equal(torch.get_rng_state(), rng)


def test_result_is_a_report_with_the_lr_find_json_contract():
    result = lr_find(examples.he_mlp(depth=3, width=16), _data(), optimizer="sgd", steps=20)
    assert isinstance(result, Report) and isinstance(result, LRFindResult)
    data = result.to_dict()
    # The key order of nndiag.lr-find/1 as it has always been written, then the optional
    # fields added since (the curve's own suggestion and the trials).
    assert list(data) == ["schema", "status", "suggested_lr", "lr_low", "lr_high", "lrs",
                          "losses", "smoothed", "stopped_because", "reason", "findings",
                          "summary", "curve_lr", "trials"]
    schema = json.loads(resources.files("nndiag").joinpath(
        "schemas/lr-find-1.schema.json").read_text())
    assert set(data) == set(schema["properties"])
    assert set(schema["required"]) == set(data) - {"curve_lr", "trials"}
    assert data["schema"] == "nndiag.lr-find/1" and data["status"] == result.status
    assert data["suggested_lr"] == result.suggested_lr and data["lrs"] == result.lrs
    warned = LRFindResult(suggested_lr=None, lr_low=None, lr_high=None, lrs=[], losses=[],
                          smoothed=[], stopped_because="completed", reason="r",
                          findings=suggest_lr(LRS[:5], valley()[:5]).findings)
    assert warned.status == "error" and warned.fails("warning")
    assert warned.finding("lr_curve_too_short") is not None


def test_param_groups_keep_their_learning_rate_ratios():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    seen: list[tuple[float, float]] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append((self.param_groups[0]["lr"], self.param_groups[1]["lr"]))
            return super().step(closure)

    optimizer = Recording([{"params": model[0].parameters(), "lr": 1e-3},
                           {"params": model[2].parameters(), "lr": 1e-4}], lr=1e-3)
    result = lr_find(model, _data(), optimizer=optimizer, steps=20, early_stop=False,
                     trials=False)
    assert len(seen) == 20
    assert all(second / first == pytest.approx(0.1) for first, second in seen)
    assert [first for first, _ in seen] == pytest.approx(result.lrs)
    assert result.summary["param_group_lr_ratios"] == pytest.approx([1.0, 0.1])
    assert optimizer.param_groups[0]["lr"] == 1e-3  # restored


def test_trials_train_the_candidates_and_pick_the_best():
    model = examples.he_mlp(depth=3, width=16)
    result = lr_find(model, _data(), optimizer="sgd", steps=30, trials=True, trial_steps=5)
    assert result.trials and len(result.trials) <= RULE.candidates
    assert all(t["steps"] <= 5 for t in result.trials)
    finite = [t for t in result.trials if t["loss"] is not None]
    best = min(finite, key=lambda t: t["loss"])
    assert result.suggested_lr == pytest.approx(best["lr"] * 10 ** -RULE.trial_shrink)
    assert result.curve_lr is not None and result.summary["trial_steps"] == 5
    only_curve = lr_find(model, _data(), optimizer="sgd", steps=30, trials=False)
    assert only_curve.trials == [] and only_curve.suggested_lr == only_curve.curve_lr
    assert only_curve.curve_lr == pytest.approx(result.curve_lr)  # same sweep, same curve
    chosen = lr_find(model, _data(), optimizer="sgd", steps=30, trials=True, trial_steps=3,
                     candidates=[1e-2, 1e-3])
    assert [t["lr"] for t in chosen.trials] == [1e-2, 1e-3]


def test_trials_start_from_the_same_state_and_data_order():
    """Every stage sees the same batches: a DataLoader's own generator is restored too."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :10].argmax(1)), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    before = loader.generator.get_state()
    model = examples.he_mlp(depth=3, width=16)
    result = lr_find(model, loader, optimizer="sgd", steps=20, trials=True, trial_steps=4,
                     candidates=[1e-2, 1e-2])
    assert torch.equal(loader.generator.get_state(), before)
    first, second = result.trials
    assert first["loss"] == second["loss"]  # same start, same batches, same learning rate
    # train_trial (what the benchmark caches) is the trial lr_find runs, to the bit.
    alone = train_trial(model, loader, 1e-2, optimizer="sgd", steps=4)
    assert alone["loss"] == first["loss"]
    start, scatter = trial_baseline(model, loader, result.summary["noise"])
    assert start == result.summary["trial_start_loss"]
    assert scatter == result.summary["trial_loss_scatter"] > 0
    assert torch.equal(loader.generator.get_state(), before)


def test_trials_scored_on_validation_data():
    """With val_data the trials are scored on its first batches, not on the training data."""
    from torch.utils.data import DataLoader, TensorDataset

    model = examples.he_mlp(depth=3, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(320, 32, generator=g)
    val = DataLoader(TensorDataset(x, x[:, :10].argmax(1)), batch_size=64, shuffle=True,
                     generator=torch.Generator().manual_seed(1))
    val_state = val.generator.get_state()
    first = [(xb.clone(), yb.clone()) for xb, yb in val][:4]  # 256 samples: EVAL_SAMPLES
    val.generator.set_state(val_state)
    result = lr_find(model, _data(), optimizer="sgd", steps=20, trial_steps=4,
                     candidates=[1e-2, 1e-3], val_data=val)
    assert torch.equal(val.generator.get_state(), val_state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        reference = sum(float(F.cross_entropy(model(xb), yb)) for xb, yb in first) / 4
    model.train()
    assert result.summary["trial_start_loss"] == pytest.approx(reference, rel=1e-6)
    assert result.summary["trial_scored_on"] == "validation"
    assert result.summary["trial_eval_samples"] == 256
    on_train = lr_find(model, _data(), optimizer="sgd", steps=20, trial_steps=4,
                       candidates=[1e-2, 1e-3])
    assert on_train.summary["trial_scored_on"] == "training"
    assert on_train.summary["trial_start_loss"] != result.summary["trial_start_loss"]
    # train_trial and trial_baseline (what the benchmark caches) score the same way.
    alone = train_trial(model, _data(), 1e-2, optimizer="sgd", steps=4, val_data=val)
    assert alone["loss"] == result.trials[0]["loss"]
    start, _ = trial_baseline(model, _data(), result.summary["noise"], val_data=val)
    assert start == result.summary["trial_start_loss"]
    with pytest.raises(UsageError, match="--val-data"):
        lr_find(model, _data(), steps=20, trial_steps=2, val_data=[])
    with pytest.raises(UsageError, match="--data batches carry targets"):
        lr_find(model, _data(), steps=20, trial_steps=2, val_data=[x for x, _ in _data(2)])
    with pytest.raises(UsageError, match="--no-trials"):
        lr_find(model, _data(), steps=20, trials=False, val_data=val)


def test_trials_and_train_trial_start_from_the_users_rng():
    """A DataLoader without a generator of its own shuffles with the global RNG: reading the
    eval batches must not move it, or the trials would see other batches than the sweep."""
    from torch.utils.data import DataLoader, TensorDataset

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.seen: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.seen.append(float(x[0, 0]))
            return self.fc(x)

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 4, generator=g),
                                      torch.randint(0, 2, (64,), generator=g)),
                        batch_size=8, shuffle=True)
    model = Recorder()
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    lr_find(model, loader, steps=10, trial_steps=2, candidates=[1e-3, 1e-2])
    assert torch.equal(torch.random.get_rng_state(), state)
    sweep, first_trial, second_trial = model.seen[:2], model.seen[10:12], model.seen[12:14]
    assert sweep == first_trial == second_trial
    for val in (None, loader):
        train_trial(model, loader, 1e-3, steps=2, val_data=val)
        assert torch.equal(torch.random.get_rng_state(), state)


def test_accumulate_records_the_mean_of_the_micro_batches():
    model = examples.he_mlp(depth=3, width=16)
    data = _data(6)
    expected = sum(float(F.cross_entropy(model(x), y)) for x, y in data[:3]) / 3
    result = lr_find(model, data, optimizer="sgd", steps=10, accumulate=3, start_lr=1e-9,
                     end_lr=1e-8)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_data_is_cycled_including_one_shot_iterators():
    model = examples.he_mlp(depth=3, width=16)
    result = lr_find(model, iter(_data(2)), steps=12, early_stop=False)
    assert len(result.losses) == 12
    single = lr_find(model, _data(1)[0], steps=9, early_stop=False)
    assert len(single.losses) == 9


def test_divergence_stops_the_sweep_early():
    model = examples.he_mlp(depth=3, width=16)
    result = lr_find(model, _data(), optimizer="sgd", steps=100)
    assert result.stopped_because in ("diverged", "non_finite_loss")
    assert len(result.losses) < 100
    assert result.suggested_lr is not None and result.lr_high is not None


class _Broken(nn.Module):
    """A user forward that fails after a submodule ran fine (the user's bug, not the data)."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 10)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.error == "key":
            raise KeyError("a bug in the user's forward")
        return hidden.view(-1, 7)


def test_model_errors_split_into_the_data_and_the_users_code():
    """A torch.nn layer rejecting the batch is the data's fault (exit 2), as in inspect; the
    user's own forward raising is exit 3; either way the model is left as it was."""
    from nndiag.errors import UserCodeError

    model = examples.he_mlp(depth=3, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    narrow = [(x[:, :20], y) for x, y in _data()]
    with pytest.raises(UsageError, match="does not fit the model: layer '0' .Linear."):
        lr_find(model, narrow, steps=10)
    with pytest.raises(UsageError, match="does not fit the model"):
        lr_find(model, _data(), steps=10, trial_steps=2, val_data=narrow)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mismatched = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(8, 10))
    with pytest.raises(UsageError, match="layer '2' .Linear."):  # the innermost, not the first
        lr_find(mismatched, _data(), steps=10)
    with pytest.raises(UserCodeError, match="KeyError"):
        lr_find(_Broken("key"), _data(), steps=10)
    with pytest.raises(UserCodeError, match="is invalid for input"):
        lr_find(_Broken("view"), _data(), steps=10)


class _Masked(nn.Module):
    """Logits plus an additive float mask (-inf where a class is masked), as attention masks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(x) + mask


def test_a_nan_loss_blames_nan_data_but_not_an_inf_mask():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 3)
    mask[:, 2] = float("-inf")
    masked = [((torch.randn(8, 4, generator=g), mask), torch.randint(0, 2, (8,), generator=g))
              for _ in range(4)]
    result = lr_find(_Masked(), masked, steps=30, optimizer="sgd", end_lr=1e12,
                     early_stop=False, trials=False)
    assert result.stopped_because == "non_finite_loss"  # the rate diverged, not the data
    regression = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
                  for _ in range(4)]
    regression[2][1][3] = float("nan")
    with pytest.raises(UsageError, match="--data: the target batch holds NaN"):
        lr_find(nn.Linear(4, 1), regression, steps=10, trials=False)
    val = [(x.clone(), y.clone()) for x, y in regression[:2]]
    val[0][0][0, 0] = float("nan")
    with pytest.raises(UsageError, match="--val-data: the input batch holds NaN"):
        lr_find(nn.Linear(4, 1), regression[:2], steps=10, trial_steps=2, val_data=val)


class _TimesNaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_nan_in_a_later_batch_names_the_data_and_restores_the_model():
    model = examples.he_mlp(depth=3, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data()
    data[5][0][2, 3] = float("nan")  # the sixth batch of the sweep's data
    with pytest.raises(UsageError, match="holds NaN"):
        lr_find(model, data, steps=30)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_bad_input_is_a_usage_error():
    model = examples.he_mlp(depth=3, width=16)
    with pytest.raises(UsageError, match="larger than"):
        lr_find(model, _data(), start_lr=1e-2, end_lr=1e-4)
    with pytest.raises(UsageError, match="no batch"):
        lr_find(model, [], steps=10)
    nan_batch = (torch.full((8, 32), float("nan")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(UsageError, match="holds NaN"):
        lr_find(model, [nan_batch], steps=10)
    nan_model = nn.Sequential(model, _TimesNaN())
    with pytest.raises(UsageError, match="first step"):  # finite data: the model is blamed
        lr_find(nan_model, _data(), steps=10)
    with pytest.raises(UsageError, match="at least"):
        lr_find(model, _data(), steps=3)


# ----------------------------------------------------------------------------- the CLI

SPEC = "tests/fixtures/models.py"


def _cli(*args: str):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    return CliRunner().invoke(app, ["lr-find", *args])


def test_cli_json_plot_and_exit_code(tmp_path):
    import jsonschema

    from tests.fixtures.models import FIXTURES

    result = _cli("--model", f"{FIXTURES}:mlp8", "--data", f"{FIXTURES}:classification_batches",
                  "--optimizer", "sgd", "--json", "--plot", str(tmp_path / "lr.png"))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    schema = json.loads(resources.files("nndiag").joinpath(
        "schemas/lr-find-1.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert data["suggested_lr"] and len(data["lrs"]) == len(data["losses"])
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    text = _cli("--model", f"{FIXTURES}:mlp8", "--data", f"{FIXTURES}:classification_batches",
                "--optimizer", "sgd")
    assert text.exit_code == 0 and "suggested learning rate" in text.stdout
    best = min((t for t in data["trials"] if t["loss"] is not None), key=lambda t: t["loss"])
    assert "Trials from the same start" in text.stdout
    assert any(f"{best['lr']:.2e}" in line and "<- best" in line
               for line in text.stdout.splitlines())
    assert len(data["trials"]) == RULE.candidates  # the default trains the candidates
    assert data["suggested_lr"] != data["curve_lr"]
    tried = _cli("--model", f"{FIXTURES}:mlp8", "--data", f"{FIXTURES}:classification_batches",
                 "--trial-steps", "4", "--json")
    assert tried.exit_code == 0
    assert [t["steps"] for t in json.loads(tried.stdout)["trials"]] == [4] * RULE.candidates
    on_val = _cli("--model", f"{FIXTURES}:mlp8", "--data", f"{FIXTURES}:classification_batches",
                  "--val-data", f"{FIXTURES}:good_data", "--trial-steps", "4", "--json")
    summary = json.loads(on_val.stdout)["summary"]
    assert on_val.exit_code == 0 and summary["trial_scored_on"] == "validation"
    assert summary["trial_eval_samples"] == 16  # good_data: one batch of 16
    assert "on 16 validation samples" in _cli(
        "--model", f"{FIXTURES}:mlp8", "--data", f"{FIXTURES}:classification_batches",
        "--val-data", f"{FIXTURES}:good_data", "--trial-steps", "4").stdout
    curve_only = _cli("--model", f"{FIXTURES}:mlp8", "--data",
                      f"{FIXTURES}:classification_batches", "--no-trials", "--json")
    only = json.loads(curve_only.stdout)
    assert only["trials"] == [] and only["suggested_lr"] == only["curve_lr"]


@pytest.mark.parametrize(("args", "fragment"), [
    (("--data", "empty_data"), "no batch"),
    (("--data", "nan_data"), "holds NaN"),
    (("--data", "classification_batches", "--start-lr", "1", "--end-lr", "0.1"), "larger than"),
    (("--data", "classification_batches", "--optimizer", "lion"), "--optimizer"),
    (("--data", "classification_batches", "--val-data", "empty_data"), "--val-data"),
    (("--data", "wrong_shape_data"), "does not fit the model"),
    (("--data", "classification_batches", "--val-data", "wrong_shape_data"),
     "does not fit the model"),
    (("--data", "classification_batches", "--budget", "0"), "--budget must be at least 1"),
])
def test_cli_bad_input_exit_2_with_one_message(args, fragment):
    from tests.fixtures.models import FIXTURES

    spec_args = [a if not a.endswith(("_data", "_batches")) else f"{FIXTURES}:{a}" for a in args]
    result = _cli("--model", f"{FIXTURES}:mlp8", *spec_args)
    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
