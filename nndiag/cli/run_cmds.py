"""``nndiag check RUN_DIR`` and ``nndiag report RUN_DIR``: judge and draw a recorded run."""

from __future__ import annotations

from pathlib import Path

import typer

from nndiag.cli.inspect_cmd import FailOn
from nndiag.cli.output import Output, validate_output_dir, validate_output_file, write_output


def check(
    run_dir: Path | None = typer.Argument(None, metavar="[RUN_DIR]", show_default=False,
                                          help="A run directory written by nndiag.Monitor."),
    model: str | None = typer.Option(None, "--model", "-m", metavar="SPEC",
                                     help="Instead of a run: train this model briefly and "
                                          "check it (with --data)."),
    data: str | None = typer.Option(None, "--data", "-d", metavar="SPEC",
                                    help="Training batches for --model."),
    loss: str | None = typer.Option(None, "--loss", metavar="NAME|SPEC",
                                    help="cross_entropy, mse, bce, l1, huber, nll or a spec."),
    optimizer: str = typer.Option("adamw", "--optimizer", metavar="NAME|SPEC",
                                  help="sgd, adam, adamw, rmsprop, or a spec of f(params, lr) "
                                       "or f(model)."),
    train_step: str | None = typer.Option(None, "--train-step", metavar="SPEC|lightning",
                                          help="Your training step f(model, batch, optimizer) "
                                               "-> loss (it zeroes, steps and backpropagates "
                                               "itself), or 'lightning' for the model's "
                                               "training_step and configure_optimizers."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default 1e-3; SGD "
                                                       "1e-2)."),
    steps: int = typer.Option(50, "--steps", help="Steps of the short training run."),
    log_dir: Path | None = typer.Option(None, "--log-dir", metavar="DIR",
                                        help="Keep the short run's log here."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE",
                                      help="Also write JUnit XML (one test case per rule)."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Judge a recorded run, or gate training code with a short check run.

    With RUN_DIR: loss trend, NaN/Inf, gradients, dead units and update ratios over time.
    With --model and --data: the model is inspected at init, sanity-checked (loss at init,
    parameters that do not update, overfitting one batch, batch mixing) and trained for
    --steps steps, and the run is judged the same way. With --train-step, the checks run
    through your own step and watch it: gradients never zeroed, softmax before the loss,
    eval mode while training, a loss summed over the batch, inputs and targets apart.

    Examples:
      nndiag check runs/exp1 --junit reports/nndiag.xml
      nndiag check --model train.py:build_model --data train.py:train_batches --steps 50
      nndiag check --model train.py:build_model --data train.py:train_batches
        --train-step train.py:train_step --optimizer train.py:make_optimizer
    """
    out = Output(debug=debug)
    try:
        from nndiag.errors import UsageError
        from nndiag.render.json import render_json
        from nndiag.render.text import render_check
        from nndiag.run_check import check_run, write_junit

        if (run_dir is None) == (model is None):
            raise UsageError("give either RUN_DIR or --model SPEC --data SPEC")
        if junit is not None:
            validate_output_file(junit, "--junit")
        if log_dir is not None:
            validate_output_dir(log_dir, "--log-dir")
        if lr is not None:
            from nndiag.optimizers import validate_lr

            validate_lr(lr, "--lr")
        if model is not None:
            from nndiag.losses import resolve_loss
            from nndiag.specs import load_data, load_model
            from nndiag.training_check import check_training, load_train_step

            if data is None:
                raise UsageError("--model needs --data SPEC (training batches)")
            with out.stderr.status("loading the model and data", spinner="dots"):
                net, batches = load_model(model), load_data(data)
                step = load_train_step(train_step) if train_step is not None else None
            with out.stderr.status(f"checking: init, sanity, {steps} training steps",
                                   spinner="dots"):
                report = check_training(net, batches, loss=resolve_loss(loss),
                                        optimizer=optimizer, lr=lr, steps=steps,
                                        log_dir=log_dir, train_step=step)
        else:
            assert run_dir is not None
            report = check_run(run_dir)
        if json_output:
            out.stdout.out(render_json(report), highlight=False)
        else:
            render_check(report, out.stdout)
        if junit is not None:  # after the report: a file that cannot be written loses nothing
            path = junit
            write_output("--junit", path, lambda: write_junit(report, path, fail_on.value))
            out.message(f"wrote {junit}")
        code = 1 if report.fails(fail_on.value) else 0
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory written by nndiag.Monitor."),
    out_dir: Path | None = typer.Option(None, "--out", metavar="DIR",
                                        help="Where to write the report (default: "
                                             "RUN_DIR/report)."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity "
                                        "(the report is written either way)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Write a recorded run as one self-contained HTML page, DIR/index.html, and its figures.

    The page holds the findings with their explanations and fixes, and the figures (embedded):
    loss and learning rate, then per layer (a heatmap row each, named) the gradient norm, the
    update ratio, the activation std and the dead units over the sampled steps, findings
    marked at the step they first appeared. Each figure is also written as a PNG beside it.
    """
    out = Output(debug=debug)
    try:
        from nndiag.render.html import write_run_report
        from nndiag.run_check import judge_run
        from nndiag.runlog import read_run

        if out_dir is not None:
            validate_output_dir(out_dir, "--out")
        log = read_run(run_dir)
        judged = judge_run(log)
        target = out_dir or (run_dir / "report")
        for path in write_run_report(log, judged, target):
            out.line(str(path))
        code = 1 if judged.fails(fail_on.value) else 0
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory written by nndiag.Monitor."),
    tensorboard: Path = typer.Option(..., "--tensorboard", metavar="DIR",
                                     help="Write TensorBoard event files to this directory."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Export a recorded run to TensorBoard: per-layer scalars and the findings as text.

    Scalars: loss and learning rate per step; per sampled step the global gradient norm and,
    per layer, grad_norm/, update_ratio/, activation_std/ and dead_fraction/. Text:
    nndiag/findings. View with: tensorboard --logdir DIR

    Example:
      nndiag export runs/exp1 --tensorboard runs/exp1/tensorboard
    """
    out = Output(debug=debug)
    try:
        from nndiag.export import export_tensorboard

        path = export_tensorboard(run_dir, tensorboard)
        out.line(str(path))
        code = 0
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)
