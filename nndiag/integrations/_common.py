"""What the framework callbacks share: option checks, the run directory, the verdict at the end."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from nndiag.errors import NndiagError, UsageError
from nndiag.findings import Report, severity_rank, validate_severity

RUN_DIR_NAME = "nndiag"


class TrainingFindingsError(NndiagError):
    """Training ended with findings at or above the callback's ``fail_on`` severity.

    Attributes:
        report: The check report of the run.
    """

    exit_code = 1

    def __init__(self, report: Report, fail_on: str) -> None:
        ids = ", ".join(f"{f.id} ({f.severity})" for f in report.findings
                        if severity_rank(f.severity) >= severity_rank(fail_on))
        super().__init__(f"nndiag: training ended with findings at or above {fail_on}: {ids}")
        self.report = report


def validate_options(every: Any, fail_on: str | None) -> None:
    """Validate the options both callbacks take.

    Raises:
        UsageError: ``every`` not a whole number of at least 1, or an unknown ``fail_on``.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every must be a whole number of at least 1, got {every!r}")
    validate_severity(fail_on, "fail_on", optional=True)


def fresh_run_dir(base: str | Path) -> Path:
    """``BASE/nndiag``, or ``BASE/nndiag-2``, ``-3``... when a run already holds it."""
    root = Path(base)
    for index in range(1, 10_000):
        candidate = root / (RUN_DIR_NAME if index == 1 else f"{RUN_DIR_NAME}-{index}")
        if not (candidate / "meta.json").exists():
            return candidate
    raise UsageError(f"no free run directory under {str(root)!r}")


def tensorboard_dir(option: str | Path | bool | None, default: str | Path | None,
                    run_dir: Path) -> Path | None:
    """Where TensorBoard events go: the option, ``default`` for ``True``, else none."""
    if option is None or option is False:
        return None
    if option is True:
        return Path(default) if default is not None else run_dir / "tensorboard"
    return Path(option)


def finish(monitor: Any, *, fail_on: str | None, verbose: bool) -> Report | None:
    """Close the monitor, judge the run, print the findings and raise if asked.

    Returns:
        The check report (``None`` on ranks other than 0, or a run with no step).

    Raises:
        TrainingFindingsError: A finding at or above ``fail_on``.
    """
    from nndiag.run_check import check_run

    monitor.close()
    run_dir = monitor.run_dir
    if run_dir is None or monitor.step_count == 0:
        return None
    report = monitor.report if monitor.report is not None else check_run(run_dir)
    if verbose:
        from rich.console import Console

        from nndiag.render.text import render_check

        render_check(report, Console())
        print(f"nndiag: run log in {run_dir} (nndiag report {run_dir} --out DIR for an HTML "
              "report)")
    if fail_on is not None and report.fails(fail_on):
        raise TrainingFindingsError(report, fail_on)
    return report


def warn_once(seen: set[str], key: str, message: str) -> None:
    """A ``RuntimeWarning`` the first time ``key`` comes up."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
