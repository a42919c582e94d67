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


def smear(cell_rgb: tuple[int, int, int], seed: int) -> np.ndarray:
    """A 64 px field: a light background with red-cell discs and one stained cell of ``cell_rgb``."""
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), 235.0) + rng.normal(0, 3, size=(64, 64, 3))
    yy, xx = np.mgrid[:64, :64]
    for y, x in rng.uniform(8, 56, size=(8, 2)):
        image[(yy - y) ** 2 + (xx - x) ** 2 < 36] = (205, 160, 190)
    image[(yy - 32) ** 2 + (xx - 32) ** 2 < 100] = cell_rgb
    return np.clip(image, 0, 255).astype(np.uint8)


def test_macenko_normalisation_moves_an_image_towards_its_template(stain_transfer) -> None:
    template, image = smear((110, 60, 160), seed=0), smear((60, 90, 170), seed=1)  # purple against blue cells
    (normalised,), unchanged = stain_transfer.macenko_normalised(image[None], template)
    assert normalised.dtype == np.uint8 and normalised.shape == image.shape and unchanged == 0
    cell = (np.mgrid[:64, :64] - 32) ** 2
    inside = cell.sum(axis=0) < 64  # the stained cell's core
    before = np.abs(image[inside].mean(axis=0) - template[inside].mean(axis=0)).sum()
    after = np.abs(normalised[inside].mean(axis=0) - template[inside].mean(axis=0)).sum()
    assert after < before / 2
    blank = np.full((1, 64, 64, 3), 240, dtype=np.uint8)  # no stain to separate: left as it is, and counted
    same, unchanged = stain_transfer.macenko_normalised(blank, template)
    assert unchanged == 1 and np.array_equal(same, blank)


def test_every_condition_is_scored_on_the_models_test_part(stain_transfer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BLOODCELL_HOME", str(tmp_path / "home"))
    dataset = make_aria_dataset(tmp_path / "aria", per_class=24, size=48, segmented=False)
    run = make_run(dataset, tmp_path / "run")
    result = stain_transfer.main(["--model", str(run), "--data", str(dataset), "--json", str(tmp_path / "out.json")])
    names = [row["condition"] for row in result["rows"]]
    assert names[0] == "clean" and names[1:8] == [name for name, _ in stain_transfer.conditions()][1:]
    assert names[8:] == [f"macenko to a typical {c} training image" for c in ("Benign", "Early Pre-B", "Pre-B", "Pro-B")]
    assert result["rows"][0]["mean_change_rgb"] == [0.0, 0.0, 0.0] and result["n_images"] > 0
    assert all(0.0 <= row["balanced_accuracy"] <= 1.0 for row in result["rows"])
    assert json.loads((tmp_path / "out.json").read_text()) == result


def test_a_run_is_scored_on_val_with_its_last_epoch_not_the_one_chosen_there(stain_transfer, tmp_path: Path) -> None:
    """The best epoch was picked on validation accuracy: scoring it there flatters the recipe."""
    run = tmp_path / "run"
    for which in ("best", "last"):
        (run / "checkpoints" / which).mkdir(parents=True)
        (run / "checkpoints" / which / "card.json").write_text("{}")
    assert stain_transfer.checkpoint_to_score(str(run), "val") == str(run / "checkpoints" / "last")
    assert stain_transfer.checkpoint_to_score(str(run), "test") == str(run / "checkpoints" / "best")
    assert stain_transfer.checkpoint_to_score(str(run), "val", "best") == str(run / "checkpoints" / "best")
    assert stain_transfer.checkpoint_to_score(None, "val") is None  # the bundled model
    assert stain_transfer.checkpoint_to_score(str(tmp_path / "model"), "val") == str(tmp_path / "model")
