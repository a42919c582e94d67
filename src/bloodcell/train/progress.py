"""What a person watching a run sees: a rich progress bar, and a plain ``train.log`` for later."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Self, SupportsFloat

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    """One bar per epoch with loss, validation balanced accuracy and images/s; a no-op when disabled.

    When stderr is not a terminal (a log file, a pipe, a batch job), a bar would be drawn once, at the end,
    for the last epoch only: each epoch is then one plain line instead, with the same figures.
    """

    #: Seconds between two readings of the loss. Reading a GPU tensor's value makes the host wait until the
    #: GPU has caught up, which every step would cost a launch-bound model much of its speed; the bar is
    #: redrawn ten times a second anyway.
    READ_EVERY = 0.25

    def __init__(self, enabled: bool, epochs: int, console: Console | None = None) -> None:
        self.epochs = epochs
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_read = float("-inf")
        self._console = console or Console(stderr=True)
        self._lines = enabled and not self._console.is_terminal
        self._epoch = 0
        if enabled and not self._lines:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("val bal-acc {task.fields[val]}"),
                TextColumn("{task.fields[rate]:.0f} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
            )

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_epoch(self, epoch: int, steps: int, last_val: str) -> None:
        self._epoch = epoch
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(
            "train", total=steps, epoch=epoch, epochs=self.epochs, loss=float("nan"), val=last_val, rate=0.0
        )

    def step(self, loss: SupportsFloat, rate: float) -> None:
        """Advance one step. ``loss`` may be a tensor on any device: it is read only every ``READ_EVERY`` s."""
        if self._progress is None or self._task is None:
            return
        now = time.perf_counter()
        if now - self._last_read < self.READ_EVERY:
            self._progress.update(self._task, advance=1)
            return
        self._last_read = now
        self._progress.update(self._task, advance=1, loss=float(loss), rate=rate)

    def end_epoch(self, val: str, loss: float, rate: float) -> None:
        """The epoch's own figures (its mean training loss and images/s), not the last sampled step's."""
        if self._lines:
            self._console.print(f"epoch {self._epoch}/{self.epochs}  loss {loss:.4f}  val bal-acc {val}  {rate:.0f} img/s",
                                highlight=False, soft_wrap=True)  # fmt: skip
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, val=val, loss=loss, rate=rate)


def open_log(run_dir: Path, enabled: bool) -> logging.Logger:
    """A logger writing to ``run_dir/train.log`` (appending, so a resumed run keeps its earlier lines)."""
    logger = logging.getLogger(f"bloodcell.train.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_log(logger)
    if enabled:
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def close_log(logger: logging.Logger) -> None:
    """Detach and close the logger's handlers (file handles must not outlive the run)."""
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
