"""Mixed precision: the steps a ``GradScaler`` skipped, in the run directory, and their finding.

With fp16 loss scaling, a step whose scaled gradients hold inf or NaN is skipped (the
optimizer does not step) and the scale is lowered; at the start of training, while the scale
settles from 2^16, a few steps are skipped as a matter of course. ``Monitor`` counts those
steps (its optimizer step hooks did not run) and appends one line per skipped step to
``RUN_DIR/amp.jsonl`` (``{"step": 3, "scale": 32768.0}``, the scale after the backoff); the run
log itself is unchanged. This module reads that file and turns it into the ``info`` finding
``amp_skipped_steps`` (a ``warning`` when more than a quarter of the steps were skipped: then
the model barely trains), instead of the ``nan_inf`` error the overflowing gradients would
otherwise read as. No torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from nndiag.findings import Finding, FindingId

AMP_FILE = "amp.jsonl"
FINDING_ID = FindingId.AMP_SKIPPED_STEPS
# Above this share of skipped steps the finding is a warning: most updates are lost.
WARN_SHARE = 0.25


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


def skipped_steps_finding(skipped: list[dict[str, float]], steps: int) -> Finding | None:
    """The finding for the steps a ``GradScaler`` skipped (``None`` when none was).

    Args:
        skipped: Rows of ``read_skipped`` (``step`` and the ``scale`` after the backoff).
        steps: The number of steps of the run.
    """
    if not skipped:
        return None
    count = len(skipped)
    share = count / max(steps, count, 1)
    severity = "warning" if share > WARN_SHARE else "info"
    listed = ", ".join(str(row["step"]) for row in skipped[:6]) + (" ..." if count > 6 else "")
    last_scale = skipped[-1]["scale"]
    explanation = (
        f"The loss scaler found inf/NaN in the scaled gradients and skipped the update on "
        f"{count} of {steps} steps ({share:.1%}): at steps {listed}; the scale was "
        f"{last_scale:g} after the last one. Those steps are recorded without gradient norms "
        "and are not NaN/Inf in the model: lowering the scale until the gradients fit fp16 is "
        "how loss scaling works, and a few skipped steps at the start (the scale settling "
        "from 65536) or now and then are normal.")
    if severity == "warning":
        explanation += (" Skipping this often means the gradients overflow fp16 even at a "
                        "small scale: most updates are lost. Train in bfloat16 (no scaler "
                        "needed), or lower the learning rate.")
    return Finding(FINDING_ID, severity, [],
                   f"the GradScaler skipped {count} of {steps} steps ({share:.1%}) on inf/NaN "
                   "gradients", explanation=explanation,
                   evidence={"skipped": count, "steps": steps, "share": share,
                             "skipped_steps": [row["step"] for row in skipped],
                             "last_scale": last_scale, "first_step": skipped[0]["step"]})
