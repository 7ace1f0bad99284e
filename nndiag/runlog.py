"""The run log: one directory per training run, append-only, readable while it grows.

Layout (schema ``nndiag.run/2``)::

    RUN_DIR/
      meta.json      written atomically: schema, model, sampling interval, layers, ranks; at
                     the first sampled step, the model input's mean and std ("input")
      steps.jsonl    one line per flush: {"first": step, "loss": [...], "lr": [...]}
      samples.jsonl  one line per sampled step: a ``StepRecord``, its layers as columns

A step's loss is written at the next step (the current one may still be computing on an
accelerator) and at every sampled step; samples as they are taken. Every line is written
whole and flushed to the operating system, so a killed process (even SIGKILL) loses at most
one step; the reader skips a last line that is cut short and any malformed line (not JSON,
nested too deep, a number too large for a float, over ``files.MAX_LINE_BYTES``: counted in
``skipped_lines``). It reads regular files only (a FIFO or a device in a run's place is
refused: ``nndiag.files``) and refuses a ``meta.json`` whose fields are not of the types
``Monitor`` writes.
Numbers are rounded to 6 significant digits and non-finite values are written as the strings
``"nan"``, ``"inf"``, ``"-inf"``. Reading needs no torch. Runs written as ``nndiag.run/1``
(separate ``sites`` and ``weights`` columns) are read too.

A writer that cannot write (a full disk, a removed directory) warns once and stops logging:
it never breaks the training loop it records.
"""

from __future__ import annotations

import json
import math
import reprlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nndiag.amp import is_step, read_skipped
from nndiag.errors import UsageError
from nndiag.files import read_bounded, read_lines, write_atomic
from nndiag.records import LayerRecord, ParamGroup, StepRecord, attach_parameters

SCHEMA = "nndiag.run/2"
READABLE_SCHEMAS = ("nndiag.run/1", SCHEMA)
META, STEPS, SAMPLES = "meta.json", "steps.jsonl", "samples.jsonl"
# The largest meta.json read (Monitor writes a few KiB; 100,000 weight layers are ~5 MiB).
MAX_META_BYTES = 32 * 2**20
_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\r\n"


def encode(value: Any) -> Any:
    """Round floats to 6 significant digits; non-finite floats become strings."""
    if isinstance(value, float):
        return json.loads(_json(value))
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def _json(value: Any) -> str:
    """Compact JSON text of plain data, floats at 6 significant digits, non-finite as strings.

    Written by hand for the hot path of ``Monitor(every=1)``: one formatting per number
    (``json.dumps`` after rounding would format each one twice), the elements of a list
    (a column of layers) written inline, and strings (layer names, kinds) encoded once.
    """
    kind = type(value)
    if kind is float:
        return _float_json(value)
    if kind is list or kind is tuple:
        parts = []
        for item in value:
            item_kind = type(item)
            if item_kind is float:
                if item == item and _NEG_INF < item < _INF:
                    text = f"{item:.6g}"
                    parts.append(text if "e" in text or "." in text else text + ".0")
                else:
                    parts.append(_float_json(item))
            elif item is None:
                parts.append("null")
            elif item_kind is str:
                text = _STRINGS.get(item)
                parts.append(text if text is not None else _string_json(item))
            else:
                parts.append(_json(item))
        return "[" + ",".join(parts) + "]"
    if kind is dict:
        return "{" + ",".join([_string_json(str(k)) + ":" + _json(v)
                               for k, v in value.items()]) + "}"
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is str:
        return _string_json(value)
    if isinstance(value, float):  # numpy and other float types
        return _float_json(float(value))
    return json.dumps(value)


_INF, _NEG_INF = math.inf, -math.inf
# JSON text of the strings written so far (layer names and kinds repeat at every step).
_STRINGS: dict[str, str] = {}
_MAX_STRINGS = 1 << 16


def _float_json(value: float) -> str:
    if value != value:
        return '"nan"'
    if value in (_INF, _NEG_INF):
        return '"inf"' if value > 0 else '"-inf"'
    text = f"{value:.6g}"
    return text if "e" in text or "." in text or "n" in text else text + ".0"


def _string_json(value: str) -> str:
    text = _STRINGS.get(value)
    if text is None:
        text = json.dumps(value)
        if len(_STRINGS) < _MAX_STRINGS:
            _STRINGS[value] = text
    return text


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
    """Appends records to a new run directory; stops (with one warning) if writing fails.

    Raises:
        UsageError: The directory already holds a run (or its files), or is not writable.
    """

    def __init__(self, directory: str | Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.failed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the run directory {str(self.directory)!r}: "
                             f"{exc.strerror or exc}") from exc
        taken = [name for name in (META, STEPS, SAMPLES) if (self.directory / name).exists()]
        if taken:
            raise UsageError(f"{str(self.directory)!r} already holds a run ({taken[0]}): "
                             "choose a new log_dir")
        self._meta = dict(meta)
        try:
            self._write_meta()
            self._steps = open(self.directory / STEPS, "x", encoding="utf-8")  # noqa: SIM115
            self._samples = open(self.directory / SAMPLES, "x", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot write the run log in {str(self.directory)!r}: "
                             f"{exc.strerror or exc}") from exc

    def _write_meta(self) -> None:
        text = json.dumps(encode({"schema": SCHEMA, **self._meta}), indent=1)
        write_atomic(self.directory / META, lambda temp: Path(temp).write_text(text),
                     prefix=".meta-")

    def update_meta(self, **fields: Any) -> None:
        """Add facts learned while training to ``meta.json`` (rewritten whole, atomically)."""
        if self.failed:
            return
        self._meta.update(fields)
        try:
            self._write_meta()
        except OSError as exc:
            self._stop(exc, stacklevel=4)

    def _stop(self, exc: OSError, stacklevel: int) -> None:
        """Stop logging after a failed write, with one warning; training goes on."""
        self.failed = True
        warnings.warn(f"nndiag: writing the run log in {str(self.directory)!r} failed "
                      f"({exc.strerror or exc}); logging stopped, training goes on",
                      RuntimeWarning, stacklevel=stacklevel)

    def _write(self, handle: Any, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            handle.write(_json(record) + "\n")
            handle.flush()
        except OSError as exc:
            self._stop(exc, stacklevel=5)

    def write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """Append the losses and learning rates of consecutive steps from ``first``."""
        if losses:
            self._write(self._steps, {"first": first, "loss": losses, "lr": lrs})

    def write_sample(self, record: StepRecord) -> None:
        """Append one sampled step's statistics."""
        self._write(self._samples, record.to_columns())

    def close(self) -> None:
        """Close the files (errors on close are the same warning as on write)."""
        for handle in (self._steps, self._samples):
            try:
                handle.close()
            except OSError as exc:
                if not self.failed:
                    self.failed = True
                    warnings.warn(f"nndiag: closing the run log failed ({exc})", RuntimeWarning,
                                  stacklevel=2)


@dataclass
class RunLog:
    """A run read back from disk.

    Attributes:
        path: The run directory.
        meta: The contents of ``meta.json``.
        steps: Step index of every recorded loss.
        losses: Loss of every step.
        lrs: Learning rate of every step (``None`` without an optimizer).
        samples: Sampled steps, in order.
        skipped_lines: Lines that could not be read (a cut last line after a crash, or a
            malformed record).
        skipped_steps: Steps a ``GradScaler`` skipped (``amp.jsonl``): ``step`` and the
            ``scale`` after the backoff.
    """

    path: Path
    meta: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float | None] = field(default_factory=list)
    samples: list[StepRecord] = field(default_factory=list)
    skipped_lines: int = 0
    skipped_steps: list[dict[str, float]] = field(default_factory=list)

    @property
    def last_step(self) -> int | None:
        """The last step with a recorded loss or sample."""
        candidates = self.steps[-1:] + [s.step for s in self.samples[-1:]]
        return max(candidates) if candidates else None


def _parse_line(line: str) -> dict[str, Any] | None:
    """A line's JSON object, non-finite numbers decoded (``None``: not a JSON object).

    ``line`` has no surrounding whitespace.
    """
    try:
        record, end = _DECODER.raw_decode(line)
        if end != len(line) or not isinstance(record, dict):
            return None
        return decode(record) if 'nan"' in line or 'inf"' in line else record
    except (ValueError, RecursionError):  # not JSON, an integer of 4,300+ digits, deep nesting
        return None


def _records(path: Path) -> Iterator[dict[str, Any] | None]:
    """The JSON objects of a JSON-lines file, one at a time (none if it is missing).

    ``None`` stands for a line that is not one (a cut last line, a malformed or over-long
    one). One at a time, so that reading a long run never holds its lines' objects at once.

    Raises:
        UsageError: ``path`` is not a regular file (a FIFO, ``/dev/zero``...) or unreadable.
    """
    if not path.exists():
        return
    try:
        for line in read_lines(path):
            if line is None:
                yield None
                continue
            text = line.strip(_JSON_SPACE)
            if text:
                yield _parse_line(text)
    except OSError as exc:
        raise UsageError(f"{str(path)!r} is unreadable: {exc.strerror or exc}") from exc


def _sample_v1(record: dict[str, Any]) -> StepRecord:
    """A ``nndiag.run/1`` sample (separate ``sites`` and ``weights`` columns) as a StepRecord."""
    sites, weights = record.get("sites") or {}, record.get("weights") or {}
    layers = []
    for i, name in enumerate(sites.get("name") or []):
        column = {k: v[i] for k, v in sites.items() if isinstance(v, list) and i < len(v)}
        layers.append(LayerRecord(
            name=name, module=name.split("#")[0].split("/")[0], kind=column.get("kind", ""),
            index=i, activation=column.get("activation"), functional="/" in name,
            mean=column.get("mean"), std=column.get("std"),
            absmax=math.inf if column.get("nonfinite") else None,
            dead_fraction=column.get("dead"), saturated_fraction=column.get("saturated")))
    groups = []
    for i, name in enumerate(weights.get("name") or []):
        def at(key: str, i: int = i) -> Any:
            values = weights.get(key)
            return values[i] if isinstance(values, list) and i < len(values) else None
        groups.append(ParamGroup(name, at("kind") or "", 0, True, at("weight_norm") or 0.0, 0,
                                 grad_norm=at("grad_norm"), update_ratio=at("update_ratio")))
    attach_parameters(layers, groups, "(model)")
    return StepRecord.from_columns({"step": record.get("step"), "loss": record.get("loss"),
                                    "grad_norm": record.get("grad_norm"),
                                    "layers": StepRecord(0, layers=layers).to_columns()["layers"]})


def read_run(directory: str | Path) -> RunLog:
    """Read a run directory written by ``Monitor`` (also while the run is still going).

    Raises:
        UsageError: Not a run directory, a schema this version cannot read, a ``meta.json``
            that is not what ``Monitor`` writes, or a run file that is not a regular file.
    """
    path = Path(directory)
    meta_path = path / META
    if path.is_file():
        raise UsageError(f"{str(path)!r} is a file: give the run directory Monitor wrote "
                         "(it holds meta.json)")
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} not found")
    if not meta_path.exists():
        raise UsageError(f"{str(path)!r} is not a run directory (no {META}); record one with "
                         "nndiag.Monitor(model, optimizer, log_dir=...)")
    meta = _read_meta(meta_path)
    schema = meta["schema"]
    log = RunLog(path, meta, skipped_steps=read_skipped(path))
    for record in _records(path / STEPS):
        try:
            if record is None:
                raise ValueError("not a JSON object")
            first = record.get("first", 0)
            losses = record.get("loss") or []
            lrs = record.get("lr") or [None] * len(losses)
            if not is_step(first) or not isinstance(losses, list) or \
                    not isinstance(lrs, list) or len(lrs) != len(losses) or \
                    not is_step(first + len(losses)):
                raise ValueError("malformed")
            values = [float(v) for v in losses]
            rates = [None if v is None else float(v) for v in lrs]
        except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit number
            log.skipped_lines += 1
            continue
        log.steps += range(first, first + len(values))
        log.losses += values
        log.lrs += rates
    for record in _records(path / SAMPLES):
        try:
            if record is None or not is_step(record.get("step")):
                raise ValueError("not a sampled step")
            log.samples.append(_sample_v1(record) if schema == "nndiag.run/1"
                               else StepRecord.from_columns(record))
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            log.skipped_lines += 1
    return log


# The fields of meta.json nndiag reads: what each must be, and the test.
_META_FIELDS: dict[str, tuple[str, Any]] = {
    "model": ("a string", lambda v: isinstance(v, str)),
    "optimizer": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
    "grad_scaler": ("a string", lambda v: isinstance(v, str)),
    "every": ("a positive integer", lambda v: is_step(v) and v > 0),
    "world_size": ("a positive integer", lambda v: is_step(v) and v > 0),
    "trainable_parameters": ("an integer from 0", is_step),
    "loss_summed_over": ("an integer from 2", lambda v: is_step(v) and v > 1),
    "input": ("an object with a numeric mean and std", lambda v: isinstance(v, dict) and all(
        type(v.get(key)) in (int, float) for key in ("mean", "std"))),
    "weight_layers": ("a list of objects with a string name and kind", lambda v: isinstance(
        v, list) and all(isinstance(layer, dict) and all(
            isinstance(layer.get(key, ""), str) for key in ("name", "kind")) for layer in v)),
}


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """``meta.json``: an object of a readable schema whose fields have the types Monitor writes.

    A field may be missing or ``null``; one of another type is refused, not guessed at.

    Raises:
        UsageError: Not a regular file, over ``MAX_META_BYTES``, not JSON, or a field
            of the wrong type.
    """
    try:
        meta = json.loads(read_bounded(meta_path, MAX_META_BYTES, f"a run's {META}")
                          .decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"{str(meta_path)!r} is unreadable: {exc.strerror or exc}") from exc
    except RecursionError as exc:
        raise UsageError(f"{str(meta_path)!r} is unreadable: nested too deeply") from exc
    except ValueError as exc:  # not UTF-8, not JSON, an integer of over 4,300 digits
        raise UsageError(f"{str(meta_path)!r} is unreadable: {exc}") from exc
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if schema not in READABLE_SCHEMAS:
        raise UsageError(f"{str(meta_path)!r}: unknown run-log schema {_short(schema)} "
                         f"(this nndiag reads {', '.join(READABLE_SCHEMAS)})")
    for key, (expected, valid) in _META_FIELDS.items():
        value = meta.get(key)
        if value is not None and not valid(value):
            raise UsageError(f"{str(meta_path)!r}: {key!r} must be {expected}, got "
                             f"{_short(value)}")
    return meta


def _short(value: Any) -> str:
    """A repr of bounded length and depth, for a message."""
    return reprlib.repr(value)
