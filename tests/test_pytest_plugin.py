"""The pytest plugin, run on two small projects with pytester."""

from __future__ import annotations

import pytest
import torch

PROJECT = '''
import torch
import torch.nn.functional as F
from torch import nn

from nndiag import examples


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(h.shape[1], h.shape[0]).t())


def test_healthy_model_trains(nndiag_check):
    torch.set_num_threads(1)
    report = nndiag_check(examples.he_mlp(depth=4, width=64), examples.classification_data(),
                          F.cross_entropy, steps=30)
    assert report.status == "ok"


def test_broken_model_trains(nndiag_check):
    torch.set_num_threads(1)
    nndiag_check(Mixer(), examples.classification_data(), F.cross_entropy, steps=20)
'''


def test_plugin_passes_a_healthy_project_and_fails_a_broken_one(pytester):
    pytester.makepyfile(test_training=PROJECT)
    result = pytester.runpytest_subprocess("-q")  # loaded through its entry point
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*batch_mixing*", "*mixes the batch dimension*"])
    assert "Traceback" not in result.stdout.str()


STEP_PROJECT = '''
import torch
import torch.nn.functional as F

from nndiag import examples


def forgets_zero_grad(model, batch, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def test_healthy_step(nndiag_check):
    torch.set_num_threads(1)
    report = nndiag_check(examples.he_mlp(depth=3, width=64),
                          examples.classification_data(batches=8),
                          train_step=examples.train_step, steps=20)
    assert report.status == "ok"


def test_step_without_zero_grad(nndiag_check):
    torch.set_num_threads(1)
    nndiag_check(examples.he_mlp(depth=3, width=64), examples.classification_data(batches=8),
                 train_step=forgets_zero_grad, steps=20)
'''


def test_plugin_checks_the_projects_own_training_step(pytester):
    pytester.makepyfile(test_step=STEP_PROJECT)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*[[]error[]] zero_grad_missing*", "*fix zero_grad:*",
                                 "*optimizer.zero_grad()*every step, before backward()*"])
    assert "Traceback" not in result.stdout.str()


def test_plugin_is_registered_and_inert(pytester):
    pytester.makepyfile(test_plain="def test_nothing():\n    assert True\n")
    result = pytester.runpytest_subprocess("-q", "--trace-config")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*nndiag*pytest_plugin*"])


def test_loading_the_plugin_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, nndiag.pytest_plugin; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]


def test_unknown_fail_on_is_a_usage_error_before_any_work(nndiag_check):
    from nndiag.errors import UsageError
    from nndiag.findings import Report

    class Untouchable(torch.nn.Module):
        def forward(self, x):  # the check must refuse before it runs the model
            raise AssertionError("the model ran")

    with pytest.raises(UsageError, match="fail_on.*critical"):
        nndiag_check(Untouchable(), [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))],
                     fail_on="critical")
    with pytest.raises(UsageError, match="info, warning, error"):
        Report("nndiag.check/1").fails("critical")
    assert Report("nndiag.check/1").fails("warning") is False
