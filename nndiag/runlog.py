"""The run log: one directory per training run, append-only, readable while it grows.

Layout (schema ``nndiag.run/1``)::

    RUN_DIR/
      meta.json      written once, atomically: schema, model, sampling interval, layers, ranks
      steps.jsonl    one line per flush: {"first": step, "loss": [...], "lr": [...]}
      samples.jsonl  one line per sampled step: per-layer statistics, columnar

Every line is written whole and flushed to the operating system before ``Monitor.step``
returns, so a killed process (even SIGKILL) loses at most the line it was writing; the reader
skips a last line that is cut short. Numbers are rounded to 6 significant digits and
non-finite values are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``. Reading needs
no torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nndiag.errors import UsageError

SCHEMA = "nndiag.run/1"
META, STEPS, SAMPLES = "meta.json", "steps.jsonl", "samples.jsonl"


def encode(value: Any) -> Any:
    """Round floats to 6 significant digits; non-finite floats become strings."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """Undo ``encode`` for non-finite values."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


class RunWriter:
    """Appends records to a run directory."""

    def __init__(self, directory: str | Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / META).exists():
            raise UsageError(f"{str(self.directory)!r} already holds a run: choose a new log_dir")
        handle, temp = tempfile.mkstemp(dir=self.directory, prefix=".meta-")
        with os.fdopen(handle, "w") as out:
            json.dump(encode({"schema": SCHEMA, **meta}), out, indent=1)
        os.chmod(temp, 0o644)
        os.replace(temp, self.directory / META)
        self._steps = open(self.directory / STEPS, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(self.directory / SAMPLES, "a", encoding="utf-8")  # noqa: SIM115

    def _write(self, handle: Any, record: dict[str, Any]) -> None:
        handle.write(json.dumps(encode(record), separators=(",", ":")) + "\n")
        handle.flush()

    def write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """Append the losses and learning rates of consecutive steps from ``first``."""
        if losses:
            self._write(self._steps, {"first": first, "loss": losses, "lr": lrs})

    def write_sample(self, record: dict[str, Any]) -> None:
        """Append one sampled step's statistics."""
        self._write(self._samples, record)

    def close(self) -> None:
        """Close the files."""
        self._steps.close()
        self._samples.close()


@dataclass
class RunLog:
    """A run read back from disk.

    Attributes:
        path: The run directory.
        meta: The contents of ``meta.json``.
        steps: Step index of every recorded loss.
        losses: Loss of every step.
        lrs: Learning rate of every step (``None`` without an optimizer).
        samples: Sampled steps, in order (see ``Monitor`` for the fields).
        skipped_lines: Lines that could not be read (a cut last line after a crash).
    """

    path: Path
    meta: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float | None] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    @property
    def last_step(self) -> int | None:
        """The last step with a recorded loss or sample."""
        candidates = self.steps[-1:] + [s["step"] for s in self.samples[-1:]]
        return max(candidates) if candidates else None


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], 0
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(decode(record))
            else:
                skipped += 1
    return records, skipped


def read_run(directory: str | Path) -> RunLog:
    """Read a run directory written by ``Monitor`` (also while the run is still going).

    Raises:
        UsageError: Not a run directory, or a schema this version cannot read.
    """
    path = Path(directory)
    meta_path = path / META
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} not found")
    if not meta_path.is_file():
        raise UsageError(f"{str(path)!r} is not a run directory (no {META}); record one with "
                         "nndiag.Monitor(model, optimizer, log_dir=...)")
    try:
        meta = decode(json.loads(meta_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(meta_path)!r} is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise UsageError(f"{str(meta_path)!r}: unknown run-log schema {meta.get('schema')!r} "
                         f"(this nndiag reads {SCHEMA})")
    log = RunLog(path, meta)
    step_records, skipped_steps = _read_lines(path / STEPS)
    for record in step_records:
        first = int(record.get("first", 0))
        losses = record.get("loss") or []
        lrs = record.get("lr") or [None] * len(losses)
        log.steps += list(range(first, first + len(losses)))
        log.losses += [float(v) for v in losses]
        log.lrs += lrs
    log.samples, skipped_samples = _read_lines(path / SAMPLES)
    log.skipped_lines = skipped_steps + skipped_samples
    return log
