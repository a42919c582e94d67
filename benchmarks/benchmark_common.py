"""What the benchmark scripts that train on the real dataset share: where it is, and where results go.

Imported by scripts run as ``python benchmarks/<name>.py`` (their folder is then on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: The team's copy of the dataset, beside the checkout; ``BLOODCELL_DATA`` or ``--data`` point elsewhere.
DEFAULT_DATA = Path(os.environ.get("BLOODCELL_DATA", REPO.parent / "shared" / "data" / "leukemia-aria"))


def add_data_and_out_options(parser: argparse.ArgumentParser) -> None:
    """``--data`` (the Aria-layout dataset folder) and ``--out`` (where the JSON results are written)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (Aria layout)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")


def require_dataset(data: Path) -> None:
    """Stop with a one-line message unless ``data`` holds the Aria layout's ``Original`` folder."""
    if not (data / "Original").is_dir():
        sys.exit(f"dataset not found at {data} (pass --data or set BLOODCELL_DATA)")


def bare_step_speed(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    size: int,
    batch: int,
    steps: int,
    warm_up: int,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Images/s of forward + backward + optimiser step on random channels_last input, on the model's device.

    The model's ceiling, which the training loop is compared against: no data, no augmentation, no
    checks. ``autocast_dtype`` (e.g. bf16) runs the forward under autocast, as mixed-precision training does.
    """
    device = next(model.parameters()).device
    images = (torch.rand(batch, 3, size, size, device=device) * 255).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronise() -> None:  # a GPU runs ahead of the host: time what it did, not what was queued
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warm_up):
        step()
    synchronise()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronise()
    return steps * batch / (time.perf_counter() - started)
