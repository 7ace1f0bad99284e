"""``nndiag inspect``: per-layer measurements, diagnosis and fixes for a live model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer

from nndiag.cli.output import Output, validate_output_file, write_output
from nndiag.errors import UsageError, validate_seed


class FailOn(str, Enum):
    """Severity at which the exit code becomes 1."""

    warning = "warning"
    error = "error"


def parse_shape(text: str) -> list[int]:
    """Parse ``64,3,32,32`` into a shape.

    Raises:
        UsageError: Not a list of positive integers.

    """
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape {text!r}: expected positive integers like 64,3,32,32")
    return shape


def inspect(
    checkpoint: Path | None = typer.Argument(
        None, metavar="CHECKPOINT", show_default=False,
        help="A checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors/TorchScript) or a Hugging "
             "Face-style directory. Alone: a data-free analysis of the weights."),
    model: str | None = typer.Option(None, "--model", "-m", metavar="SPEC",
                                     help="The model: package.module:attr or path/file.py:attr "
                                          "(a callable is called with no arguments)."),
    data: str | None = typer.Option(None, "--data", "-d", metavar="SPEC",
                                    help="Batches (a DataLoader, a list) or one batch "
                                         "(inputs, targets)."),
    input_shape: str | None = typer.Option(None, "--input-shape", metavar="N,C,H,W",
                                           help="Probe with random inputs of this shape "
                                                "instead of data."),
    input_dtype: str = typer.Option("float32", "--input-dtype",
                                    help="dtype of random inputs: float32, float64, long..."),
    input_max: int | None = typer.Option(None, "--input-max",
                                         help="Exclusive upper bound of random integer inputs "
                                              "(default: the embedding's vocabulary size)."),
    loss: str | None = typer.Option(None, "--loss", metavar="NAME|SPEC",
                                    help="cross_entropy, mse, bce, l1, huber, nll or a spec "
                                         "f(outputs, targets). Default: from the targets."),
    batches: int = typer.Option(1, "--batches", min=1, help="Number of probe batches."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png",
                                     help="Write a figure (gradient flow, or weight scales for "
                                          "a data-free analysis)."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity."),
    try_fixes: bool = typer.Option(False, "--try-fixes",
                                   help="Apply automatic fixes to a copy of the model and "
                                        "report before/after measurements."),
    unsafe_load: bool = typer.Option(False, "--unsafe-load",
                                     help="Allow checkpoints that pickle Python objects. "
                                          "Loading them runs code from the file: only for "
                                          "files you trust."),
    non_strict: bool = typer.Option(False, "--non-strict",
                                    help="Load the checkpoint keys that match --model and "
                                         "report missing/unexpected keys as a finding."),
    seed: int = typer.Option(0, "--seed", help="Seed for random inputs and targets."),
    pretrained: bool | None = typer.Option(
        None, "--pretrained/--fresh",
        help="The weights are trained (never advise re-initializing them) or freshly "
             "initialized. Default: detected (Hugging Face from_pretrained, a CHECKPOINT)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Measure a model (or a checkpoint's weights), diagnose it and recommend fixes.

    Examples:
      nndiag inspect --model nndiag.examples:deep_sigmoid_mlp --input-shape 64,32
      nndiag inspect run/last.ckpt                                  (data-free)
      nndiag inspect run/last.ckpt --model train.py:Net --data train.py:val_batches
    """
    out = Output(debug=debug)
    options = InspectOptions(checkpoint, model, data, input_shape, input_dtype, input_max, loss,
                             batches, json_output, plot, fail_on.value, try_fixes, unsafe_load,
                             not non_strict, seed, pretrained)
    try:
        code = _run(out, options)
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


@dataclass
class InspectOptions:
    """The parsed command line of ``nndiag inspect``."""

    checkpoint: Path | None
    model: str | None
    data: str | None
    input_shape: str | None
    input_dtype: str
    input_max: int | None
    loss: str | None
    batches: int
    json_output: bool
    plot: Path | None
    fail_on: str
    try_fixes: bool
    unsafe_load: bool
    strict: bool
    seed: int
    pretrained: bool | None = None


def _run(out: Output, o: InspectOptions) -> int:
    from nndiag.inspection import inspect_checkpoint, inspect_model
    from nndiag.losses import resolve_loss
    from nndiag.render.json import render_json
    from nndiag.render.text import render_report
    from nndiag.specs import load_data, load_model

    if o.checkpoint is None and o.model is None:
        raise UsageError("give a CHECKPOINT, --model SPEC, or both")
    if o.data is not None and o.input_shape is not None:
        raise UsageError("give only one of --data SPEC and --input-shape N,...")
    if o.checkpoint is None and o.data is None and o.input_shape is None:
        raise UsageError("give --data SPEC or --input-shape N,... to probe the model")
    if o.plot is not None:
        if o.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise UsageError(f"--plot {str(o.plot)!r}: use a .png, .svg or .pdf file name")
        validate_output_file(o.plot, "--plot")
    validate_seed(o.seed, "--seed")
    shape = parse_shape(o.input_shape) if o.input_shape is not None else None
    loss_fn = resolve_loss(o.loss)
    with out.stderr.status("loading the model and data", spinner="dots"):
        net = load_model(o.model) if o.model is not None else None
        data = load_data(o.data) if o.data is not None else None
    live = dict(input_shape=shape, input_dtype=o.input_dtype, input_max=o.input_max,
                loss=loss_fn, batches=o.batches, try_fixes=o.try_fixes, seed=o.seed)
    if o.checkpoint is None:
        assert net is not None
        with out.stderr.status("probing the model" + (" and trying fixes" if o.try_fixes
                                                      else ""), spinner="dots"):
            report = inspect_model(net, data, pretrained=o.pretrained, **live)
    else:
        with out.progress("reading weights") as advance:
            report = inspect_checkpoint(o.checkpoint, net, data, unsafe_load=o.unsafe_load,
                                        strict=o.strict, progress=advance, **live)
    if o.json_output:
        out.stdout.out(render_json(report), highlight=False)
    else:
        render_report(report, out.stdout)
    if o.plot is not None:  # after the report: a figure that cannot be written loses nothing
        from nndiag.render.plots import plot_report, save_figure

        plot = o.plot
        write_output("--plot", plot, lambda: save_figure(plot_report(report), plot))
        out.message(f"wrote {plot}")
    return 1 if report.fails(o.fail_on) else 0
