"""One progress bar style for every long data step, drawn on stderr so ``--json`` output stays clean."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def track(items: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while drawing a progress bar on stderr.

    Parameters
    ----------
    items: what to iterate over.
    total: how many items there are (for the bar's length and the time estimate).
    description: a few words shown left of the bar.
    enabled: ``False`` yields the items with no output at all (tests, ``--no-progress``).

    Returns an iterator over ``items``.
    """
    if not enabled:
        yield from items
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
