"""benchmarks/stain_transfer.py: its stain transforms, and one run end to end on a tiny model and toy data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark_support import benchmark_module
from conftest import make_aria_dataset
from eval_support import make_run


@pytest.fixture(scope="module")
def stain_transfer():
    return benchmark_module("stain_transfer")


def test_hed_scaling_is_the_identity_at_one_and_changes_the_stains_otherwise(stain_transfer) -> None:
    images = np.random.default_rng(0).integers(20, 250, size=(3, 16, 16, 3), dtype=np.uint8)
    same = stain_transfer.hed_scaled(images, 1.0, 1.0)
    assert same.dtype == np.uint8 and same.shape == images.shape
    assert np.abs(same.astype(int) - images).max() <= 1  # rounding only
    more_haematoxylin = stain_transfer.hed_scaled(images, 1.3, 0.7)
    assert np.abs(more_haematoxylin.astype(int) - images).mean() > 3
    tinted = stain_transfer.skimage_round_trip(images, 1.0, 1.0)
    assert tinted.dtype == np.uint8 and tinted.shape == images.shape


def test_every_condition_is_scored_on_the_models_test_part(stain_transfer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    dataset = make_aria_dataset(tmp_path / "aria", per_class=24, size=48, segmented=False)
    run = make_run(dataset, tmp_path / "run")
    result = stain_transfer.main(["--model", str(run), "--data", str(dataset), "--json", str(tmp_path / "out.json")])
    names = [name for name, _ in stain_transfer.conditions()]
    assert [row["condition"] for row in result["rows"]] == names and names[0] == "clean"
    assert result["rows"][0]["mean_change_rgb"] == [0.0, 0.0, 0.0] and result["n_images"] > 0
    assert all(0.0 <= row["balanced_accuracy"] <= 1.0 for row in result["rows"])
    assert json.loads((tmp_path / "out.json").read_text()) == result
