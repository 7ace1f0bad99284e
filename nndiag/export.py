"""TensorBoard export: a recorded run as event files, written with the ``tensorboard`` package.

``nndiag export RUN_DIR --tensorboard DIR`` converts a run log after the fact;
``Monitor(..., tensorboard=DIR)`` (and the Lightning and Hugging Face callbacks) write the same
events while training runs. Tags:

- ``loss``, ``learning_rate``: every step.
- ``grad_norm/global``: the global gradient norm of each sampled step.
- ``grad_norm/<layer>``, ``update_ratio/<layer>``: per layer with weights, each sampled step.
- ``activation_std/<layer>``, ``dead_fraction/<layer>``: per measured call site (dead
  fraction for the ReLU family only), each sampled step.
- ``nndiag/findings`` (text): the findings of the run, with explanations and fixes, at the
  last step.

Only the ``tensorboard`` package's own writer (``EventFileWriter``) and protocol buffers are
used: no TensorFlow, no torch. The package is optional: it is imported when a writer is made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nndiag.errors import UsageError
from nndiag.findings import Report
from nndiag.records import StepRecord
from nndiag.runlog import RunLog, read_run

# Per-layer statistics: (tag prefix, LayerRecord field, only on layers with weights).
LAYER_SCALARS = (("grad_norm", "grad_norm", True), ("update_ratio", "update_ratio", True),
                 ("activation_std", "std", False), ("dead_fraction", "dead_fraction", False))
FINDINGS_TAG = "nndiag/findings"


def _tensorboard() -> tuple[Any, Any, Any, Any]:
    """The tensorboard modules the writer needs (a clear error when it is not installed)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as exc:
        raise UsageError("TensorBoard export needs the tensorboard package: "
                         "pip install 'nndiag[tensorboard]'") from exc
    return event_pb2, summary_pb2, tensor_pb2, EventFileWriter


def _text_tensor(tensor_pb2: Any, text: str) -> Any:
    from tensorboard.compat.proto import tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))


class TensorBoardWriter:
    """Writes a run's steps, samples and findings as TensorBoard events.

    Args:
        directory: The TensorBoard log directory (created; a new event file each time).
        keep_losses: Keep the losses written, for ``kept_losses`` (a run with no run log).

    Raises:
        UsageError: The ``tensorboard`` package is not installed, or the directory cannot
            be created.
    """

    def __init__(self, directory: str | Path, *, keep_losses: bool = False) -> None:
        self._event_pb2, self._summary_pb2, self._tensor_pb2, writer = _tensorboard()
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = writer(str(self.directory), flush_secs=10)
        except OSError as exc:
            raise UsageError(f"cannot write TensorBoard events in {str(self.directory)!r}: "
                             f"{exc.strerror or exc}") from exc
        self._keep = keep_losses
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._lrs: list[float | None] = []

    def _event(self, step: int, values: list[Any]) -> None:
        if values:
            self._writer.add_event(self._event_pb2.Event(
                wall_time=time.time(), step=step, summary=self._summary_pb2.Summary(value=values)))

    def _scalar(self, tag: str, value: float) -> Any:
        return self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))

    def write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """The loss and learning rate of consecutive steps from ``first``."""
        for offset, (loss, lr) in enumerate(zip(losses, lrs, strict=True)):
            values = [self._scalar("loss", loss)]
            if lr is not None:
                values.append(self._scalar("learning_rate", lr))
            self._event(first + offset, values)
        if self._keep:
            self._steps += range(first, first + len(losses))
            self._losses += losses
            self._lrs += lrs

    def write_sample(self, record: StepRecord) -> None:
        """One sampled step: the global gradient norm and the per-layer statistics."""
        values = []
        if record.grad_norm is not None:
            values.append(self._scalar("grad_norm/global", record.grad_norm))
        for layer in record.layers:
            for prefix, field, weights_only in LAYER_SCALARS:
                value = getattr(layer, field)
                if value is not None and (layer.has_weights or not weights_only):
                    values.append(self._scalar(f"{prefix}/{layer.name}", value))
        self._event(record.step, values)

    def write_findings(self, report: Report, step: int) -> None:
        """The findings of the run as one markdown text summary at ``step``."""
        metadata = self._summary_pb2.SummaryMetadata(
            plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = _text_tensor(self._tensor_pb2, findings_markdown(report))
        self._event(step, [self._summary_pb2.Summary.Value(tag=FINDINGS_TAG, metadata=metadata,
                                                           tensor=tensor)])

    def kept_losses(self) -> tuple[list[int], list[float], list[float | None]]:
        """The steps, losses and learning rates written (with ``keep_losses``)."""
        return self._steps, self._losses, self._lrs

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def findings_markdown(report: Report) -> str:
    """The findings of a report as markdown (TensorBoard's text plugin renders it)."""
    if not report.findings:
        return f"**{report.status.upper()}**: no problem found"
    lines = [f"**{report.status.upper()}**: {len(report.findings)} finding(s)", ""]
    for finding in report.findings:
        lines.append(f"- **[{finding.severity}] {finding.id}**: {_md(finding.summary)}")
        if finding.explanation:
            lines.append(f"  {_md(finding.explanation)}")
        if finding.layers:
            shown = ", ".join(f"`{_md(n)}`" for n in finding.layers[:8])
            more = f" (+{len(finding.layers) - 8})" if len(finding.layers) > 8 else ""
            lines.append(f"  layers: {shown}{more}")
        for fix in finding.fixes:
            lines.append(f"  - fix `{fix.id}`: {_md(fix.summary)}")
    return "\n".join(lines)


def _md(text: str) -> str:
    """One line of untrusted text made inert in markdown (no HTML, no line breaks)."""
    return " ".join(str(text).split()).replace("<", "&lt;").replace(">", "&gt;")


def export_run(log: RunLog, report: Report, directory: str | Path) -> Path:
    """Write a recorded run and its findings as TensorBoard events.

    Args:
        log: The run (``read_run``).
        report: Its findings (``check_run``).
        directory: The TensorBoard log directory.

    Returns:
        The directory written.
    """
    writer = TensorBoardWriter(directory)
    try:
        for step, loss, lr in zip(log.steps, log.losses, log.lrs, strict=True):
            writer.write_steps(step, [loss], [lr])
        for sample in log.samples:
            writer.write_sample(sample)
        writer.write_findings(report, log.last_step or 0)
    finally:
        writer.close()
    return writer.directory


def export_tensorboard(run_dir: str | Path, directory: str | Path) -> Path:
    """Read a run log, judge it and write it as TensorBoard events (``nndiag export``).

    Raises:
        UsageError: Not a run directory, an empty run, or no ``tensorboard`` package.
    """
    from nndiag.run_check import check_run

    _tensorboard()
    log = read_run(run_dir)
    return export_run(log, check_run(log), directory)
