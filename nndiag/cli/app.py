"""The typer application: global options and the error-to-exit-code mapping."""

from __future__ import annotations

import typer

from nndiag import __version__
from nndiag.cli import inspect_cmd, lrfind_cmd, run_cmds

app = typer.Typer(
    name="nndiag",
    help="Measure why a PyTorch network trains badly, explain it, and recommend verified fixes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nndiag {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """nndiag: diagnostics for PyTorch training.

    Exit codes: 0 no finding at or above --fail-on; 1 findings at or above it; 2 bad usage or
    unusable input; 3 the model or loss code raised; 4 an internal error.
    """


app.command("inspect", no_args_is_help=True)(inspect_cmd.inspect)
app.command("lr-find", no_args_is_help=True)(lrfind_cmd.lr_find)
app.command("check", no_args_is_help=True)(run_cmds.check)
app.command("report", no_args_is_help=True)(run_cmds.report)


def main() -> None:
    """Console-script entry point."""
    app()
