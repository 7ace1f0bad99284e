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

from nndiag.findings import FindingId

AMP_FILE = "amp.jsonl"
FINDING_ID = FindingId.AMP_SKIPPED_STEPS


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

    Unreadable lines (a run cut short while writing) are skipped.
    """
    path = Path(run_dir) / AMP_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            rows.append({"step": int(row["step"]), "scale": float(row.get("scale", "nan"))})
        except (ValueError, TypeError, KeyError):
            continue
    return rows
