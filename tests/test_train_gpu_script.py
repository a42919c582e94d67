"""benchmarks/train_gpu.py: its summary of a stage's speed, and its refusal to run without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmark_support import benchmark_module


def train_gpu_module():
    return benchmark_module("train_gpu")


def test_stage_speed_leaves_out_the_warm_up_epoch() -> None:
    history = [
        {"images_per_second": 100.0, "seconds": 3.0},
        {"images_per_second": 900.0, "seconds": 1.0},
        {"images_per_second": 1000.0, "seconds": 1.0},
        {"images_per_second": 1100.0, "seconds": 1.0},
    ]
    speed = train_gpu_module().stage_speed(history)
    assert speed["median_images_per_second"] == 1000.0
    assert speed["first_epoch_images_per_second"] == 100.0
    assert speed["epochs"] == 4 and speed["train_seconds"] == 6.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_without_a_gpu_it_stops_with_a_message(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "Original").mkdir()
    monkeypatch.setattr(sys, "argv", ["train_gpu.py", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no CUDA device"):
        train_gpu_module().main()
    assert not (tmp_path / "out").exists()


def test_a_compare_variant_that_changes_the_data_is_refused_before_any_gpu_work(tmp_path: Path, monkeypatch) -> None:
    """Each variant is scored on the default's test images at its size; checked first, as a GPU is lent
    for minutes (the check came after the default's training)."""
    (tmp_path / "Original").mkdir()
    monkeypatch.setattr(sys, "argv", ["train_gpu.py", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--compare", "", "data.image_size=64"])  # fmt: skip
    with pytest.raises(SystemExit, match="'data.image_size=64': a variant must keep the default's data"):
        train_gpu_module().main()
