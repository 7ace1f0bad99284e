"""The typer application: global options and the error-to-exit-code mapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import typer
from typer.core import TyperCommand

from nndiag import __version__
from nndiag.cli import inspect_cmd, lrfind_cmd, run_cmds
from nndiag.cli.output import USER_CODE_ERROR, Output, data_stdout_only
from nndiag.errors import UserExit

app = typer.Typer(
    name="nndiag",
    help="Measure why a PyTorch network trains badly, explain it, and recommend verified fixes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class NndiagCommand(TyperCommand):
    """A command whose body runs with stdout kept for nndiag's data.

    Arguments are parsed (and ``--help`` printed) before ``invoke``; while the command body
    runs, user code's ``print`` goes to stderr (``data_stdout_only``). A ``SystemExit`` that
    user code raised where nndiag did not convert it (every entry point in ``nndiag.specs``
    does) becomes exit code 3 with a message: nndiag's commands end with ``typer.Exit``,
    which is not a ``SystemExit``.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command body with stdout kept for data and ``SystemExit`` mapped to 3."""
        with data_stdout_only():
            try:
                return super().invoke(ctx)
            except SystemExit as exc:
                error = UserExit(exc.code)
                error.__cause__ = exc  # --debug shows where the user's code exited
                Output(debug=bool(ctx.params.get("debug"))).fail(error)
                raise typer.Exit(USER_CODE_ERROR) from exc


def command(name: str, function: Callable[..., Any]) -> None:
    """Register a command of the app (as ``NndiagCommand``: every command must be one)."""
    app.command(name, cls=NndiagCommand, no_args_is_help=True)(function)


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


command("inspect", inspect_cmd.inspect)
command("lr-find", lrfind_cmd.lr_find)
command("check", run_cmds.check)
command("report", run_cmds.report)
command("export", run_cmds.export)


def main() -> None:
    """Console-script entry point."""
    app()
