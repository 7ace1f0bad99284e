"""``nndiag check RUN_DIR`` and ``nndiag report RUN_DIR``: judge and draw a recorded run."""

from __future__ import annotations

from pathlib import Path

import typer

from nndiag.cli.inspect_cmd import FailOn
from nndiag.cli.output import Output


def check(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory written by nndiag.Monitor."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE",
                                      help="Also write JUnit XML (one test case per rule)."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on",
                                   help="Exit 1 when a finding is at or above this severity."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Judge a recorded run: loss trend, NaN/Inf, gradients, dead units, update ratios.

    Example: nndiag check runs/exp1 --junit reports/nndiag.xml
    """
    out = Output(debug=debug)
    try:
        from nndiag.checking import check_run, write_junit
        from nndiag.render.json import render_json
        from nndiag.render.text import render_check

        report = check_run(run_dir)
        if junit is not None:
            write_junit(report, junit, fail_on.value)
            out.message(f"wrote {junit}")
        if json_output:
            out.stdout.out(render_json(report), highlight=False)
        else:
            render_check(report, out.stdout)
        code = 1 if report.fails(fail_on.value) else 0
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="A run directory written by nndiag.Monitor."),
    out_dir: Path | None = typer.Option(None, "--out", metavar="DIR",
                                        help="Where to write the figures (default: "
                                             "RUN_DIR/report)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Draw a recorded run as PNG figures, findings marked where they first appeared.

    Figures: loss and learning rate, gradient-norm heatmap, activation std, dead units and
    update ratios per layer over the sampled steps.
    """
    out = Output(debug=debug)
    try:
        from nndiag.checking import check_run
        from nndiag.render.plots import save_figure
        from nndiag.render.plots.run_figures import FIGURES
        from nndiag.runlog import read_run

        log = read_run(run_dir)
        findings = check_run(run_dir).findings
        target = out_dir or (run_dir / "report")
        for name, figure in FIGURES.items():
            path = save_figure(figure(log, findings), target / name)
            out.stdout.print(str(path), highlight=False)
        code = 0
    except Exception as exc:  # every error becomes one message and its exit code
        code = out.fail(exc)
    raise typer.Exit(code)
