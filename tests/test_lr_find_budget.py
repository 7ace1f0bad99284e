"""lr-find aimed at a budget, and trials held out when they cycle small data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nndiag import UsageError, examples
from nndiag.lrfind import (
    Rule,
    budget_trial_steps,
    choose_lr,
    holds_out,
    lr_find,
    plateau_candidates,
    train_trial,
    trial_baseline,
)


def _batches(n_batches: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * 16, 32, generator=g)
    return [(x[i:i + 16], x[i:i + 16, :10].argmax(1)) for i in range(0, len(x), 16)]


def test_budget_sets_the_trial_steps_within_bounds():
    assert budget_trial_steps(300, 50, Rule(budget_fraction=1.0)) == 300
    assert budget_trial_steps(300, 50, Rule(budget_fraction=0.25)) == 75
    assert budget_trial_steps(100, 50, Rule(budget_fraction=0.25)) == 50  # never below
    assert budget_trial_steps(100_000, 50, Rule(budget_fraction=1.0)) == 400  # at most 8x


def test_trials_are_held_out_only_when_they_cycle_the_data():
    assert holds_out(15, 50) and holds_out(50, 50)
    assert not holds_out(75, 50)  # one pass is longer than a trial
    assert not holds_out(None, 50)  # a stream: no length
    assert not holds_out(2, 50)  # too few batches to split


def test_trials_that_all_end_above_their_start_send_the_choice_below_them():
    rule = Rule(trial_progress_sigmas=2.0, plateau_drop=0.02)
    # Overfitting: every trial ends far above the starting loss 0.70 (scatter 0.01).
    overfit = choose_lr([1.78e-2, 5.62e-3, 1.78e-3], [1.90, 1.54, 1.09], 300, rule, 0.01,
                        start=0.70, fallback=3.4e-3)
    assert overfit.lr == pytest.approx(1.78e-3 / 10 ** 0.5)
    assert "above the starting loss" in overfit.reason
    # That is no plateau: the rates above are not tried.
    assert plateau_candidates([1.78e-2, 1.78e-3], [1.90, 1.09], 0.70, 1.0, rule) == []


def test_budget_trains_as_long_as_the_run_on_all_but_a_held_out_slice():
    model = examples.he_mlp(depth=3, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(10)
    result = lr_find(model, data, optimizer="sgd", steps=20, budget=60,
                     candidates=[1e-2, 1e-3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    summary = result.summary
    # 10 steps by default; a budget of 60 makes the trials 30 (RULE.budget_fraction = 0.5),
    # which cycle 10 batches.
    assert summary["trial_steps"] == budget_trial_steps(60, 10) == 30
    assert summary["budget"] == 60
    assert [t["steps"] for t in result.trials] == [30, 30]
    assert summary["trial_scored_on"] == "held_out" and summary["trial_held_out_batches"] == 2
    assert summary["trial_eval_samples"] == 32
    assert "aimed at a run of 60 steps" in result.reason and "held out" in result.reason
    # Scored on the last two batches of the pass, which the trials did not train on.
    model.eval()
    with torch.no_grad():
        reference = sum(float(F.cross_entropy(model(x), y)) for x, y in data[8:]) / 2
    model.train()
    assert summary["trial_start_loss"] == pytest.approx(reference, rel=1e-6)
    # The trials train on the first eight batches only, and score on the last two.
    trained: set[int] = set()
    hook = model.register_forward_pre_hook(
        lambda module, args: trained.add(args[0].data_ptr()) if module.training else None)
    try:
        train_trial(model, data, 1e-2, optimizer="sgd", steps=30, holdout=True)
    finally:
        hook.remove()
    assert trained == {x.data_ptr() for x, _ in data[:8]}
    # train_trial and trial_baseline (what the benchmark caches) hold out the same way.
    alone = train_trial(model, data, 1e-2, optimizer="sgd", steps=30, holdout=True)
    assert alone["loss"] == result.trials[0]["loss"]
    start, _ = trial_baseline(model, data, summary["noise"], holdout=True)
    assert start == summary["trial_start_loss"]
    # Data that one trial does not cycle is scored as without a budget.
    long = lr_find(model, _batches(40), optimizer="sgd", steps=20, budget=60,
                   candidates=[1e-2])
    assert long.summary["trial_scored_on"] == "training"
    assert long.summary["trial_held_out_batches"] == 0
    plain = lr_find(model, data, optimizer="sgd", steps=20, candidates=[1e-2])
    assert plain.summary["budget"] is None and plain.summary["trial_steps"] == 10
    assert not math.isnan(plain.suggested_lr)


def test_bad_budgets_are_usage_errors():
    model = examples.he_mlp(depth=3, width=16)
    with pytest.raises(UsageError, match="--budget must be at least 1"):
        lr_find(model, _batches(), steps=20, budget=0)
    with pytest.raises(UsageError, match="--no-trials"):
        lr_find(model, _batches(), steps=20, budget=100, trials=False)


def test_trials_that_cycle_small_data_are_held_out_by_default():
    model = examples.he_mlp(depth=3, width=16)
    data = _batches(10)
    # Ten steps per trial (half of 20) cycle ten batches: the last two score, the rest train.
    held = lr_find(model, data, optimizer="sgd", steps=20, candidates=[1e-2])
    assert held.summary["trial_scored_on"] == "held_out"
    assert held.summary["trial_held_out_batches"] == 2 and held.summary["budget"] is None
    assert "aimed at" not in held.reason
    alone = train_trial(model, data, 1e-2, optimizer="sgd", steps=10, holdout=True)
    assert alone["loss"] == held.trials[0]["loss"]
    # Turned off, or with trials shorter than a pass, the trials score on training batches.
    off = lr_find(model, data, optimizer="sgd", steps=20, candidates=[1e-2],
                  rule=Rule(holdout=False))
    assert off.summary["trial_scored_on"] == "training"
    short = lr_find(model, data, optimizer="sgd", steps=20, trial_steps=9, candidates=[1e-2])
    assert short.summary["trial_scored_on"] == "training"
