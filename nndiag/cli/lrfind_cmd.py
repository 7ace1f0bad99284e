"""``nndiag lr-find``: a learning-rate range test whose suggestion you can trust."""

from __future__ import annotations

from pathlib import Path

import typer

from nndiag.cli.inspect_cmd import FailOn
from nndiag.cli.output import Output, validate_output_file, write_output
from nndiag.errors import UsageError, validate_seed


def lr_find(
    model: str = typer.Option(..., "--model", "-m", metavar="SPEC",
                              help="The model: package.module:attr or path/file.py:attr."),
    data: str = typer.Option(..., "--data", "-d", metavar="SPEC",
                             help="Training batches (a DataLoader, a list) or one batch; "
                                  "cycled if they run out."),
    val_data: str | None = typer.Option(None, "--val-data", metavar="SPEC",
                                        help="Validation batches to score the trials on "
                                             "(default: a held-out fifth of one pass when the "
                                             "trials cycle the data, else the first training "
                                             "batches, which the trials also train on)."),
    loss: str | None = typer.Option(None, "--loss", metavar="NAME|SPEC",
                                    help="cross_entropy, mse, bce, l1, huber, nll or a spec "
                                         "f(outputs, targets). Default: from the targets."),
    optimizer: str = typer.Option("adamw", "--optimizer", metavar="NAME|SPEC",
                                  help="sgd, adam, adamw, rmsprop, or a spec of "
                                       "f(params, lr) -> Optimizer."),
    momentum: float | None = typer.Option(None, "--momentum",
                                          help="Momentum for sgd (default 0.9) and rmsprop."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay."),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="First learning rate."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="Last learning rate."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps (learning rates) to try."),
    accumulate: int = typer.Option(1, "--accumulate", metavar="K",
                                   help="Micro-batches per step; the loss is their mean."),
    no_early_stop: bool = typer.Option(False, "--no-early-stop",
                                       help="Run every step even after the loss diverges."),
    trials: bool = typer.Option(True, "--trials/--no-trials",
                                help="Train the curve's candidates briefly from the same start "
                                     "and suggest the best (default; 1.5x the sweep's steps "
                                     "more). --no-trials: the curve's own reading, one sweep."),
    trial_steps: int | None = typer.Option(None, "--trial-steps", metavar="N",
                                           help="Steps of each trial (default: half --steps)."),
    budget: int | None = typer.Option(None, "--budget", metavar="STEPS",
                                      help="Steps of the run the rate is for: the trials "
                                           "last half of it (at least half --steps, at most 8x "
                                           "that). Default: a run longer than the trials."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png",
                                     help="Write the loss-vs-learning-rate figure."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity."),
    seed: int = typer.Option(0, "--seed", help="Seed for random targets."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Sweep the learning rate exponentially and suggest where to start training.

    The model, its buffers and modes, the RNG and the data order are restored afterwards.

    Example: nndiag lr-find --model train.py:build_model --data train.py:train_loader
    """
    out = Output(debug=debug)
    try:
        code = _run(out, model, data, loss, optimizer, momentum, weight_decay, start_lr,
                    end_lr, steps, accumulate, not no_early_stop, json_output, plot,
                    fail_on.value, seed, trials, trial_steps, val_data, budget)
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


def _run(out: Output, model_spec: str, data_spec: str, loss: str | None, optimizer: str,
         momentum: float | None, weight_decay: float, start_lr: float, end_lr: float,
         steps: int, accumulate: int, early_stop: bool, json_output: bool, plot: Path | None,
         fail_on: str, seed: int, trials: bool = True, trial_steps: int | None = None,
         val_data_spec: str | None = None, budget: int | None = None) -> int:
    from nndiag.losses import resolve_loss
    from nndiag.lrfind import lr_find as run_lr_find
    from nndiag.optimizers import optimizer_factory
    from nndiag.render.json import render_json
    from nndiag.render.text import render_report
    from nndiag.specs import load_data, load_model

    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {str(plot)!r}: use a .png, .svg or .pdf file name")
    if plot is not None:
        validate_output_file(plot, "--plot")
    validate_seed(seed, "--seed")
    loss_fn = resolve_loss(loss)
    factory = optimizer_factory(optimizer, momentum=momentum, weight_decay=weight_decay)
    with out.stderr.status("loading the model and data", spinner="dots"):
        net = load_model(model_spec)
        batches = load_data(data_spec)
        val_batches = load_data(val_data_spec, "--val-data") if val_data_spec else None
    with out.steps("learning-rate sweep and trials" if trials else "learning-rate sweep") \
            as advance:
        result = run_lr_find(net, batches, loss=loss_fn, optimizer=factory, start_lr=start_lr,
                             end_lr=end_lr, steps=steps, accumulate=accumulate,
                             early_stop=early_stop, trials=trials, trial_steps=trial_steps,
                             val_data=val_batches, budget=budget, seed=seed, progress=advance)
    if json_output:
        out.stdout.out(render_json(result), highlight=False)
    else:
        render_report(result, out.stdout)
    if plot is not None:  # after the report: a figure that cannot be written loses nothing
        from nndiag.render.plots import save_figure
        from nndiag.render.plots.lr_curve import plot_lr_curve

        write_output("--plot", plot, lambda: save_figure(plot_lr_curve(result), plot))
        out.message(f"wrote {plot}")
    return 1 if result.fails(fail_on) else 0
