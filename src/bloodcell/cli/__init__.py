"""The ``bloodcell`` command: a thin Typer layer over the Python API.

Each pipeline stage registers its commands from its own module here (``data``, ``train`` ...); this
module only builds the app and turns user-facing errors into one line and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from bloodcell import __version__

app = typer.Typer(
    name="bloodcell",
    help="Train, evaluate, explain and serve a leakage-aware classifier of B-ALL subtypes from blood-smear "
    "images. Research tool only: not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bloodcell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Train, evaluate, explain and serve a leakage-aware B-ALL subtype classifier (research use only)."""


def _register_commands() -> None:
    # Each module adds its commands to ``app``; import order is the order in --help.
    import importlib

    for module in ("data", "train", "evaluate", "serve", "tune", "download", "demo"):
        try:
            importlib.import_module(f"bloodcell.cli.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"bloodcell.cli.{module}":
                raise


_register_commands()


def main() -> None:
    """Entry point: run the app, printing user errors as one line without a traceback."""
    from bloodcell.config import ConfigError
    from bloodcell.data.decode import ImageError
    from bloodcell.data.splits import LeakageError
    from bloodcell.errors import UserError

    try:
        app()
    except (UserError, ConfigError, ImageError, LeakageError, FileNotFoundError, NotADirectoryError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
