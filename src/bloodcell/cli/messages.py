"""Lines for the user on stderr: errors and warnings (in colour on a terminal unless ``NO_COLOR`` is set,
no-color.org), the note naming files passed over, and the one naming images squashed to a square."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import typer

from bloodcell.io import terminal_text


def _say(text: str, colour: str) -> None:
    # click already drops colour when stderr is not a terminal; NO_COLOR asks for none on a terminal too.
    typer.secho(text, fg=None if os.environ.get("NO_COLOR") else colour, err=True)


def error_line(text: str) -> None:
    _say(text, typer.colors.RED)


def warning_line(text: str) -> None:
    _say(text, typer.colors.YELLOW)


def markup_text(name: object) -> str:
    """A name from the data (a file, folder or class) for rich's markup: as :func:`~bloodcell.io.terminal_text`
    shows it, with its brackets escaped (rich would read "[/bold]x.jpg" as markup)."""
    from rich.markup import escape

    return escape(terminal_text(name))


def warn_of_squashed(sizes: Iterable[tuple[str, tuple[int, int] | None]]) -> None:
    """Name on stderr, in one line, the images that resizing to the model's square input squashed (see
    :func:`~bloodcell.data.decode.squashed_note`); nothing when there are none.

    With ``--json`` too: stdout keeps the JSON alone, and the answers about those images need the caveat.
    ``sizes`` holds ``(name, (width, height))`` of every input in order, the size None for one not read.
    """
    from bloodcell.data.decode import squashed_note

    note = squashed_note([(terminal_text(name), *size) for name, size in sizes if size is not None])
    if note:
        warning_line(note)


def plural(n: int, noun: str) -> str:
    """``1 block``, ``2 blocks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def skipped_note(skipped: list[Path], shown: int = 5) -> str:
    """One line naming the files passed over in the given folders: not images by their suffix, or, with an
    image's suffix, no regular files (pipes, devices: never opened, as a read could block)."""
    from bloodcell.data.decode import IMAGE_SUFFIXES

    def named(paths: list[Path]) -> str:
        more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
        return ", ".join(terminal_text(path.name) for path in paths[:shown]) + more

    special = [path for path in skipped if path.suffix.lower() in IMAGE_SUFFIXES]
    others = [path for path in skipped if path.suffix.lower() not in IMAGE_SUFFIXES]
    reasons = []
    if others:
        reasons.append(f"{len(others)} not images by their suffix ({' '.join(sorted(IMAGE_SUFFIXES))}): {named(others)}")
    if special:
        reasons.append(f"{len(special)} not regular files (pipes, devices): {named(special)}")
    return f"skipped {len(skipped)} file(s) in the folders given: " + "; ".join(reasons)
