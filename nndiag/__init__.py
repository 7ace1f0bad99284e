"""nndiag: measure why a PyTorch network trains badly, explain it, and recommend verified fixes.

Public API:
    inspect_model: measure a live model and return a ``Report`` of findings.
    inspect_checkpoint: analyse a checkpoint's weights without data, or load them into an
        architecture and inspect it live.
    lr_find: a learning-rate range test with a suggestion (suggest_lr: the rule alone).
    Monitor: record diagnostics inside a training loop into a run log (read_run reads it).
    check_run: judge a recorded run.
    Report, Finding, Fix: the result objects every command renders.
    UsageError, UserCodeError: errors with the CLI's exit codes (2 and 3).
"""

from nndiag.checking import check_run
from nndiag.errors import NndiagError, UsageError, UserCodeError
from nndiag.findings import Finding, Fix, Report
from nndiag.inspection import inspect_checkpoint, inspect_model
from nndiag.lrfind import LRFindResult, lr_find, suggest_lr
from nndiag.monitor import Monitor
from nndiag.runlog import RunLog, read_run

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "Fix",
    "LRFindResult",
    "Monitor",
    "NndiagError",
    "Report",
    "RunLog",
    "UsageError",
    "UserCodeError",
    "__version__",
    "check_run",
    "inspect_checkpoint",
    "inspect_model",
    "lr_find",
    "read_run",
    "suggest_lr",
]
