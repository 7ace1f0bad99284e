"""nndiag: measure why a PyTorch network trains badly, explain it, and recommend verified fixes.

Public API (imported on first use, so that ``import nndiag`` and the pytest plugin stay light):
    inspect_model: measure a live model and return a ``Report`` of findings.
    inspect_checkpoint: analyse a checkpoint's weights without data, or load them into an
        architecture and inspect it live.
    lr_find: a learning-rate range test with a suggestion (suggest_lr: the rule alone).
    Monitor: record diagnostics inside a training loop into a run log (read_run reads it).
    check_run: judge a recorded run; check_training: the CI gate for training code.
    diagnose: judge measured records (the rules, their advice, root-cause links) into a Report.
    Report, Finding, FindingId, Fix, LRFindResult, RunLog: the result objects every command
        renders.
    UsageError, UserCodeError: errors with the CLI's exit codes (2 and 3).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Finding": "nndiag.findings",
    "Fix": "nndiag.findings",
    "Report": "nndiag.findings",
    "FindingId": "nndiag.findings",
    "diagnose": "nndiag.diagnosis",
    "LRFindResult": "nndiag.lrfind",
    "lr_find": "nndiag.lrfind",
    "suggest_lr": "nndiag.lrfind",
    "Monitor": "nndiag.monitor",
    "RunLog": "nndiag.runlog",
    "read_run": "nndiag.runlog",
    "NndiagError": "nndiag.errors",
    "UsageError": "nndiag.errors",
    "UserCodeError": "nndiag.errors",
    "check_run": "nndiag.run_check",
    "check_training": "nndiag.training_check",
    "inspect_checkpoint": "nndiag.inspection",
    "inspect_model": "nndiag.inspection",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nndiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
