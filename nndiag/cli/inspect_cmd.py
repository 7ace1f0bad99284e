"""``nndiag inspect``: per-layer measurements, diagnosis and fixes for a live model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from nndiag.cli.output import Output
from nndiag.errors import UsageError


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
    model: str = typer.Option(..., "--model", "-m", metavar="SPEC",
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
                                     help="Write a gradient-flow figure."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity."),
    try_fixes: bool = typer.Option(False, "--try-fixes",
                                   help="Apply automatic fixes to a copy of the model and "
                                        "report before/after measurements."),
    seed: int = typer.Option(0, "--seed", help="Seed for random inputs and targets."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Measure a model on a few batches, diagnose it and recommend fixes.

    Example: nndiag inspect --model nndiag.examples:deep_sigmoid_mlp --input-shape 64,32
    """
    out = Output(debug=debug)
    try:
        code = _run(out, model, data, input_shape, input_dtype, input_max, loss, batches,
                    json_output, plot, fail_on.value, try_fixes, seed)
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


def _run(out: Output, model_spec: str, data_spec: str | None, input_shape: str | None,
         input_dtype: str, input_max: int | None, loss: str | None, batches: int,
         json_output: bool, plot: Path | None, fail_on: str, try_fixes: bool, seed: int) -> int:
    from nndiag.inspection import inspect_model
    from nndiag.losses import resolve_loss
    from nndiag.render.json import render_json
    from nndiag.render.text import render_text
    from nndiag.specs import load_data, load_model

    if (data_spec is None) == (input_shape is None):
        raise UsageError("give exactly one of --data SPEC or --input-shape N,...")
    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {str(plot)!r}: use a .png, .svg or .pdf file name")
    shape = parse_shape(input_shape) if input_shape is not None else None
    loss_fn = resolve_loss(loss)
    with out.stderr.status("loading the model and data", spinner="dots"):
        net = load_model(model_spec)
        data = load_data(data_spec) if data_spec is not None else None
    with out.stderr.status("probing the model" + (" and trying fixes" if try_fixes else ""),
                           spinner="dots"):
        report = inspect_model(net, data, input_shape=shape, input_dtype=input_dtype,
                               input_max=input_max, loss=loss_fn, batches=batches,
                               try_fixes=try_fixes, seed=seed)
    if plot is not None:
        from nndiag.render.plots import save_figure
        from nndiag.render.plots.gradient_flow import plot_gradient_flow

        save_figure(plot_gradient_flow(report), plot)
        out.message(f"wrote {plot}")
    if json_output:
        out.stdout.out(render_json(report), highlight=False)
    else:
        render_text(report, out.stdout)
    return 1 if report.fails(fail_on) else 0
