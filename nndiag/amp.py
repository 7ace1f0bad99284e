"""Mixed precision: the steps a ``GradScaler`` skipped, in the run directory.

With fp16 loss scaling, a step whose scaled gradients hold inf or NaN is skipped (the
optimizer does not step) and the scale is lowered; at the start of training, while the scale
settles from 2^16, a few steps are skipped as a matter of course. ``Monitor`` counts those
steps (its optimizer step hooks did not run) and appends one line per skipped step to
``RUN_DIR/amp.jsonl`` (``{"step": 3, "scale": 32768.0}``, the scale after the backoff); the run
log itself is unchanged. This module writes and reads that file (``read_run`` loads it into
``RunLog.skipped_steps``); the run rule ``amp_skipped_steps`` (``rules/run.py``) judges it, as an
``info`` rather than the ``nan_inf`` error the overflowing gradients would otherwise read as.
No torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from nndiag.errors import UsageError
from nndiag.files import read_lines
from nndiag.findings import FindingId

AMP_FILE = "amp.jsonl"
FINDING_ID = FindingId.AMP_SKIPPED_STEPS
# Steps are counted from 0 in a signed 64-bit integer, as a training loop's counter would be.
MAX_STEP = 2**63


def is_step(value: object) -> bool:
    """Whether ``value`` is a step index a run log may hold: an ``int`` from 0 below 2^63."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_STEP


def append_skipped(run_dir: str | Path, step: int, scale: float) -> None:
    """Append one skipped step to ``RUN_DIR/amp.jsonl`` (warns, never raises, on failure)."""
    try:
        with open(Path(run_dir) / AMP_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": int(step), "scale": float(scale)}) + "\n")
    except OSError as exc:
        warnings.warn(f"nndiag: could not record a skipped AMP step in {str(run_dir)!r} "
                      f"({exc.strerror or exc})", RuntimeWarning, stacklevel=3)


def read_skipped(run_dir: str | Path) -> list[dict[str, float]]:
    """The skipped steps recorded in a run directory (none when there is no file).

    Unreadable lines (a run cut short while writing, a step that is not an index, a number
    too large for a float) are skipped.

    Raises:
        UsageError: ``amp.jsonl`` is not a regular file (a FIFO, a device) or is unreadable.
    """
    path = Path(run_dir) / AMP_FILE
    if not path.exists():
        return []
    rows = []
    try:
        for line in read_lines(path):
            if line is None:  # longer than any such line
                continue
            try:
                row = json.loads(line)
                if is_step(row["step"]):
                    rows.append({"step": row["step"], "scale": float(row.get("scale", "nan"))})
            except (ValueError, TypeError, KeyError, OverflowError, RecursionError):
                continue
    except OSError as exc:
        raise UsageError(f"{str(path)!r} is unreadable: {exc.strerror or exc}") from exc
    return rows
