"""What the machine offers this process (no heavy imports: the ONNX predictor and the CLI use it too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_settings_restored() -> Iterator[None]:
    """Put torch's thread count and CPU random state back as they were, however the block ends: training
    sets the one and seeds the other freely, and a library call must not leave the process reconfigured.
    Also a decorator (``@torch_settings_restored()``). A GPU's generator is left alone: no CUDA set-up here.
    """
    import torch  # here, not at the top: importing this module stays light

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_num_threads(threads)
