"""What the machine offers this process (no heavy imports: the ONNX predictor and the CLI use it too)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
