"""Error and warning lines on stderr, in colour on a terminal unless ``NO_COLOR`` is set (no-color.org)."""

from __future__ import annotations

import os

import typer


def _say(text: str, colour: str) -> None:
    # click already drops colour when stderr is not a terminal; NO_COLOR asks for none on a terminal too.
    typer.secho(text, fg=None if os.environ.get("NO_COLOR") else colour, err=True)


def error_line(text: str) -> None:
    _say(text, typer.colors.RED)


def warning_line(text: str) -> None:
    _say(text, typer.colors.YELLOW)
