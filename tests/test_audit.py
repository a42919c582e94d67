"""Dataset audit: border features, the shortcut baseline, and the written reports (synthetic and real)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bloodcell.data.audit import (
    border_colour_baseline,
    border_colour_features,
    colour_statistics_features,
    run_audit,
    shortcut_verdict,
)

REPORT_KEYS = {
    "dataset",
    "layout",
    "variant",
    "images",
    "accepted",
    "classes",
    "image_sizes",
    "bytes",
    "rejected",
    "exact_duplicate_groups",
    "near_duplicate_groups",
    "images_in_duplicate_groups",
    "cross_class_duplicate_groups",
    "duplicate_groups",
    "split",
    "shortcut_baseline",
    "colour_statistics_baseline",
    "manifest",
    "report_markdown",
    "report_json",
}


def framed_images(border_colours: np.ndarray, size: int = 32, ring: int = 4, seed: int = 0) -> np.ndarray:
    """Images with a solid border of the given colour and random noise inside."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(len(border_colours), size, size, 3), dtype=np.uint8)
    mask = np.ones((size, size), dtype=bool)
    mask[ring:-ring, ring:-ring] = False
    images[:, mask] = border_colours[:, None, :]
    return images


def test_border_features_read_only_the_ring() -> None:
    colours = np.array([[10, 20, 30], [200, 100, 0]], dtype=np.uint8)
    features = border_colour_features(framed_images(colours, ring=4), ring=4, chunk=1)
    np.testing.assert_allclose(features, colours)
    assert colour_statistics_features(framed_images(colours)).shape == (2, 6)


def test_baseline_finds_a_border_shortcut_and_not_a_fake_one() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 50)
    palette = np.array([[230, 200, 200], [200, 230, 200], [200, 200, 230], [220, 220, 220]])
    shortcut = framed_images(
        np.clip(palette[labels] + rng.integers(-5, 6, size=(200, 3)), 0, 255).astype(np.uint8)
    )
    honest = framed_images(rng.integers(180, 240, size=(200, 3)).astype(np.uint8))
    train, test = np.arange(0, 200, 2), np.arange(1, 200, 2)
    strong = border_colour_baseline(shortcut, labels, train, test, ring=4)
    assert strong["balanced_accuracy"] > 0.95 and strong["verdict"] == "strong"
    assert strong["chance"] == 0.25 and strong["n_test"] == 100
    assert "balanced accuracy" in strong["statement"] and "Grad-CAM" in strong["statement"]
    weak = border_colour_baseline(honest, labels, train, test, ring=4)
    assert weak["balanced_accuracy"] < 0.45 and weak["verdict"] in {"none", "weak"}


@pytest.mark.parametrize(
    "score,verdict", [(0.26, "none"), (0.35, "weak"), (0.5, "moderate"), (0.7, "strong")]
)
def test_verdicts(score: float, verdict: str) -> None:
    assert shortcut_verdict(score, 0.25) == verdict


def test_audit_writes_markdown_and_json(aria_dataset: Path, tmp_path: Path) -> None:
    report = run_audit(aria_dataset, out_dir=tmp_path / "audit", image_size=32, ring=4, progress=False)
    assert set(report) == REPORT_KEYS
    assert report["images"] == 96 and report["classes"]["Pro-B"] == 24
    assert report["image_sizes"] == {"48x48": 96}
    assert json.loads((tmp_path / "audit" / "audit.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "audit" / "audit.md").read_text()
    for heading in (
        "Images per class",
        "Image sizes",
        "Rejected files",
        "Duplicates",
        "Session split",
        "Shortcut baselines",
    ):
        assert f"## {heading}" in markdown
    assert report["shortcut_baseline"]["statement"] in markdown
    assert 0 <= report["shortcut_baseline"]["balanced_accuracy"] <= 1


@pytest.mark.slow
def test_audit_on_real_data(real_data: Path, tmp_path: Path) -> None:
    report = run_audit(real_data, out_dir=tmp_path, progress=False)
    assert report["images"] == 2576 and not report["rejected"]
    assert report["image_sizes"] == {"224x224": 2576}
    assert report["exact_duplicate_groups"] >= 1 and report["near_duplicate_groups"] >= 1
    exact = [g for g in report["duplicate_groups"] if g["kind"] == "exact"]
    assert exact and all(g["classes"] == ["Pro-B"] for g in exact)
    baseline = report["shortcut_baseline"]
    assert baseline["n_test"] > 300
    # The backgrounds differ between classes: the border colour alone beats chance clearly.
    assert baseline["balanced_accuracy"] > baseline["chance"] + 0.15
    assert (tmp_path / "audit.md").is_file()
