"""A pytest plugin: the ``nndiag_check`` fixture gates training code in a project's tests.

Registered under the ``pytest11`` entry point and inert unless a test asks for the fixture
(nothing but pytest is imported when pytest starts)::

    def test_model_trains(nndiag_check):
        nndiag_check(build_model(), train_batches(), torch.nn.functional.cross_entropy, steps=30)

    def test_my_training_step(nndiag_check):
        nndiag_check(build_model(), train_batches(), train_step=train_step, steps=30)

The fixture runs ``nndiag.training_check.check_training`` and fails the test, with every finding,
its explanation and its fixes, when a finding is at or above ``fail_on`` (default ``error``).
It returns the report otherwise. With ``train_step=f(model, batch, optimizer) -> loss`` (or
``"lightning"``) the checks run through the project's own training step and name the bugs
that live there (``zero_grad_missing``, ``softmax_before_loss``, ``train_mode_off``...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def format_failure(report: Any, fail_on: str) -> str:
    """The findings of a failed check as readable text."""
    from nndiag.findings import severity_rank

    lines = [f"nndiag check failed ({report.status}): findings at or above {fail_on!r}"]
    for finding in report.findings:
        if severity_rank(finding.severity) < severity_rank(fail_on):
            continue
        lines.append(f"\n[{finding.severity}] {finding.id}: {finding.summary}")
        if finding.explanation:
            lines.append(f"    {finding.explanation}")
        for index, fix in enumerate(finding.fixes):
            lines.append(f"    fix {fix.id}: {fix.summary}")
            if index == 0 and fix.code:  # the first fix's code, ready to paste
                lines += [f"        {line}" for line in fix.code.splitlines()]
    return "\n".join(lines)


@pytest.fixture
def nndiag_check() -> Callable[..., Any]:
    """Check that a model trains: ``nndiag_check(model, data, loss_fn=None, steps=30, ...)``.

    Other keywords (``train_step``, ``optimizer``, ``lr``, ``overfit_steps``, ``log_dir``,
    ``seed``) go to ``check_training``.
    """

    def run(model: Any, data: Any, loss_fn: Any = None, *, steps: int = 30,
            fail_on: str = "error", **options: Any) -> Any:
        from nndiag.findings import validate_severity
        from nndiag.training_check import check_training

        validate_severity(fail_on, "nndiag_check(fail_on=...)")  # before the work, not after
        report = check_training(model, data, loss=loss_fn, steps=steps, **options)
        if report.fails(fail_on):
            pytest.fail(format_failure(report, fail_on), pytrace=False)
        return report

    return run
