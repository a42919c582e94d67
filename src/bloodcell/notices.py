"""Warnings given once per process.

One command prepares the data several times (``train``: the holdout stage, the refit, then the evaluation
of its report), and each time the index, the split and the layout find the same things. Said every time,
one finding would bury the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

#: The warnings this process has given, as worded.
GIVEN: set[str] = set()


def warn_once(log: logging.Logger, message: str, *args: object) -> None:
    """``log.warning(message % args)``, unless this process has given that very warning before (a warning
    its logger was set to drop is not counted as given)."""
    if not log.isEnabledFor(logging.WARNING):
        return
    text = message % args if args else message
    if text not in GIVEN:
        GIVEN.add(text)
        log.warning(text)


@contextmanager
def quieted(log: logging.Logger, when: bool = True) -> Iterator[None]:
    """Let ``log`` pass errors only inside the block (when ``when``), and put its level back however the
    block ends: a library call must not leave the caller's logging quieter."""
    level = log.level
    if when:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
