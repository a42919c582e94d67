"""Dataset audit: border features, the shortcut baseline, and the written reports (synthetic and real)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bloodcell.data.audit import (
    _statement,
    audit_markdown,
    border_colour_baseline,
    border_colour_features,
    colour_statistics_features,
    corner_baselines,
    corner_features,
    corner_slices,
    fit_shortcut_baseline,
    mask_corner,
    run_audit,
    segmented_coverage,
    shortcut_verdict,
    stained_cell_coverage,
)

REPORT_KEYS = {
    "format",
    "dataset",
    "manifest_sha256",
    "layout",
    "variant",
    "image_size",
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
    "corner_baselines",
    "segmented_coverage",
    "stained_cell_coverage",
    "manifest",
    "split_rules",
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


def test_corner_patches_and_their_features() -> None:
    assert corner_slices(40, 40, "bottom-right") == (slice(36, 40), slice(28, 40))
    assert corner_slices(40, 40, "top-left") == (slice(0, 4), slice(0, 12))
    with pytest.raises(ValueError, match="middle"):
        corner_slices(40, 40, "middle")
    images = np.zeros((2, 40, 40, 3), dtype=np.uint8)
    images[1, 36:, 28:] = 200  # only the second image's bottom-right patch is bright
    features = corner_features(images, "bottom-right", chunk=1)
    assert features.shape == (2, 2 * 6 * 3)  # a 4 x 12 patch averaged over 2 x 2 blocks, 3 channels
    assert np.all(features[0] == 0) and np.all(features[1] == 200)
    assert np.all(corner_features(images, "top-left") == 0)


def test_mask_corner_paints_the_patch_with_the_background_beside_it() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    before = images.copy()
    for corner, inside in (("bottom-right", slice(32, 36)), ("top-left", slice(4, 8))):
        rows, cols = corner_slices(40, 40, corner)
        masked = mask_corner(images, corner)
        expected = np.round(images[:, inside, cols].astype(np.float32).mean(axis=1, keepdims=True)).astype(np.uint8)
        assert np.array_equal(masked[:, rows, cols], np.broadcast_to(expected, masked[:, rows, cols].shape))
        untouched = np.ones((40, 40), dtype=bool)
        untouched[rows, cols] = False
        assert np.array_equal(masked[:, untouched], images[:, untouched])
    assert np.array_equal(images, before)  # a copy: the caller's images are not changed


def test_corner_baseline_finds_a_mark_drawn_in_one_corner() -> None:
    """Each class's sessions draw their label in their own style in the bottom-right corner; the rest is noise."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 50)
    images = rng.integers(150, 250, size=(200, 40, 40, 3), dtype=np.uint8)
    train, test = np.arange(0, 200, 2), np.arange(1, 200, 2)
    unmarked = corner_baselines(images, labels, train, test)
    assert unmarked["margin"] < 0.1 and "No corner stands out" in unmarked["statement"]
    for k in range(4):  # a dark bar whose length depends on the class
        images[labels == k, 37:39, 29 : 31 + 2 * k] = 20
    marked = corner_baselines(images, labels, train, test)
    assert marked["strongest"] == "bottom-right" and marked["margin"] >= 0.5
    assert marked["corners"]["bottom-right"]["verdict"] == "strong"
    assert "bottom-right corner alone" in marked["statement"]


def test_a_corner_is_not_flagged_on_too_few_test_images_to_tell() -> None:
    """A mark that splits the classes perfectly, but scored on 8 test images (4 a class): one image moves a
    corner's score by 25 points, so the margin is noise and the corners are not flagged, as the border baseline
    is not graded (``uncertain``), and the statement claims neither a shortcut nor its absence."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 50)
    images = rng.integers(150, 250, size=(100, 40, 40, 3), dtype=np.uint8)
    images[labels == 1, 37:39, 29:37] = 20  # a dark bar in the bottom-right corner of class 1 only
    train, test = np.r_[0:46, 50:96], np.r_[46:50, 96:100]
    few = corner_baselines(images, labels, train, test)
    assert few["strongest"] == "bottom-right" and few["margin"] >= 0.1  # what used to be flagged
    assert all(result["verdict"] == "uncertain" for result in few["corners"].values())
    assert few["flagged"] is False
    assert "8 images only" in few["statement"] and "too few to tell" in few["statement"]
    assert "No corner stands out" not in few["statement"] and "bottom-right corner alone" not in few["statement"]
    enough = corner_baselines(images, labels, np.arange(0, 100, 2), np.arange(1, 100, 2))  # 25 test images a class
    assert enough["flagged"] is True and "bottom-right corner alone" in enough["statement"]


@pytest.mark.parametrize(
    "score,verdict", [(0.26, "none"), (0.35, "weak"), (0.5, "moderate"), (0.7, "strong")]
)
def test_verdicts(score: float, verdict: str) -> None:
    assert shortcut_verdict(score, 0.25) == verdict
    assert shortcut_verdict(score, 0.25, n_test=40) == verdict


def test_a_baseline_scored_on_a_handful_of_images_is_not_graded() -> None:
    assert shortcut_verdict(1.0, 0.25, n_test=39) == "uncertain"  # under 10 images a class
    features = np.r_[np.zeros((20, 1)), np.ones((20, 1))]
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    few = fit_shortcut_baseline(features, labels, np.r_[0:18, 20:38], np.r_[18:20, 38:40])
    assert few["balanced_accuracy"] == 1.0 and few["verdict"] == "uncertain"
    assert "4 images only" in _statement(few, "the border colour")


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
        "Corner patches",
    ):
        assert f"## {heading}" in markdown
    assert report["shortcut_baseline"]["statement"] in markdown
    assert set(report["segmented_coverage"]["classes"]) == set(report["classes"])
    assert report["segmented_coverage"]["statement"] in markdown
    assert set(report["stained_cell_coverage"]) == set(report["classes"])
    assert "## Stained cells" in markdown and report["format"] == "bloodcell-audit/3"
    assert 0 <= report["shortcut_baseline"]["balanced_accuracy"] <= 1
    # A folder's name is text, not raw HTML, as in report.md; a path in a code span is shown as typed.
    odd = audit_markdown({**report, "dataset": "/data/<img src=x onerror=alert(1)>", "manifest": "/m/a`b&c.csv"})
    assert "<img" not in odd and "# Dataset audit: /data/&lt;img src=x onerror=alert(1)&gt;" in odd
    assert "Manifest: `/m/a'b&c.csv`." in odd


def test_the_audit_file_sizes_describe_the_usable_images_only(aria_dataset: Path, tmp_path: Path) -> None:
    """A rejected 3-byte notes.txt is no image: it must not become the smallest "image" file size."""
    (aria_dataset / "Original" / "Pro" / "notes.txt").write_text("hi\n")
    report = run_audit(aria_dataset, out_dir=tmp_path / "audit", image_size=32, ring=4, progress=False)
    assert [Path(r["path"]).name for r in report["rejected"]] == ["notes.txt"]
    sizes = sorted(f.stat().st_size for f in (aria_dataset / "Original").rglob("*.jpg"))
    assert report["bytes"]["min"] == sizes[0] > 3 and report["bytes"]["max"] == sizes[-1]
    markdown = (tmp_path / "audit" / "audit.md").read_text()
    assert f"File sizes of the usable images: {sizes[0]:,} to {sizes[-1]:,} bytes" in markdown


def test_segmented_coverage_names_a_class_whose_masks_keep_almost_nothing() -> None:
    masks = np.zeros((6, 10, 10), dtype=bool)
    masks[:3, 2:6, 2:6] = True  # class 0: 16 % of each image, a cell
    masks[3, 0, 0] = True  # class 1: 1 %, 0 % and 16 %
    masks[5, 2:6, 2:6] = True
    coverage = segmented_coverage(masks, np.array([0, 0, 0, 1, 1, 1]), ["Benign", "Pro-B"])
    assert coverage["classes"]["Benign"] == {"mean": pytest.approx(0.16), "under_2_percent": 0.0}
    assert coverage["classes"]["Pro-B"]["under_2_percent"] == pytest.approx(2 / 3)
    assert "Pro-B (67 % of its images)" in coverage["statement"] and "Benign" not in coverage["statement"]
    whole = segmented_coverage(masks[:3], np.zeros(3, dtype=int), ["Benign", "Pro-B"])
    assert set(whole["classes"]) == {"Benign"} and "at least 90 %" in whole["statement"]


def test_stained_cell_coverage_per_class_and_inside_the_segmented_masks() -> None:
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[:2, 2:6, 2:6] = True  # class 0: 16 % each
    masks[2, 0, 0] = True  # class 1: 1 % and 0 %
    kept = np.zeros_like(masks)
    kept[:2, 2:4, 2:6] = True  # half of class 0's mask pixels
    coverage = stained_cell_coverage(masks, np.array([0, 0, 1, 1]), ["Benign", "Pro-B", "Pre-B"], kept)
    assert set(coverage) == {"Benign", "Pro-B"}
    assert coverage["Benign"] == {"mean": pytest.approx(0.16), "under_2_percent": 0.0, "inside_segmented": 0.5}
    assert coverage["Pro-B"] == {"mean": pytest.approx(0.005), "under_2_percent": 1.0, "inside_segmented": 0.0}
    assert stained_cell_coverage(masks, np.array([0, 0, 1, 1]), ["Benign", "Pro-B"])["Benign"]["inside_segmented"] is None


def test_an_audit_of_an_older_format_is_run_again(aria_dataset: Path, tmp_path: Path) -> None:
    import json

    from bloodcell.config import DataConfig
    from bloodcell.data.index import dataset_workdir
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.runner import data_audit_summary

    prepared = prepare_data(DataConfig(image_size=32, block_size=4, embargo=1), aria_dataset, progress=False)
    assert data_audit_summary(prepared)["images"] == 96
    stored = dataset_workdir(aria_dataset, "Original") / "audit" / "audit.json"
    report = json.loads(stored.read_text())
    report.update({"format": "bloodcell-audit/1", "images": 5})  # as an older bloodcell left it
    stored.write_text(json.dumps(report))
    assert data_audit_summary(prepared)["images"] == 96


def test_the_evaluation_runs_the_audit_again_once_the_folder_has_changed(aria_dataset: Path, tmp_path: Path) -> None:
    """A stored audit.json describes one state of the folder; after files are added it is stale."""
    import shutil

    from PIL import Image

    from bloodcell.config import DataConfig
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.runner import data_audit_summary

    folder = tmp_path / "changing"
    shutil.copytree(aria_dataset, folder)
    config = DataConfig(image_size=32, block_size=4, embargo=1)
    assert data_audit_summary(prepare_data(config, folder, progress=False))["images"] == 96
    for number in range(900, 904):
        Image.new("RGB", (48, 48), (120, 60, 150 + number - 900)).save(folder / "Original" / "Pro" / f"WBC-Malignant-Pro-{number}.jpg")
    summary = data_audit_summary(prepare_data(config, folder, progress=False))
    assert summary["images"] == 100 and summary["classes"]["Pro-B"] == 28


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
    # The bottom-right corner carries a scale-bar annotation whose style follows the session: alone it
    # scores well above the other three corners, which hold only background.
    corners = report["corner_baselines"]
    assert corners["strongest"] == "bottom-right" and corners["margin"] >= 0.1
    assert (tmp_path / "audit.md").is_file()


def test_a_baseline_on_one_class_says_so_in_words() -> None:
    from bloodcell.data.audit import fit_shortcut_baseline
    from bloodcell.errors import UserError

    features, labels = np.random.default_rng(0).normal(size=(10, 3)), np.array([0] * 8 + [1] * 2)
    with pytest.raises(UserError, match="at least 2 classes; the session split's training part holds 1"):
        fit_shortcut_baseline(features, labels, np.arange(8), np.arange(8, 10))


def test_chance_and_the_statement_follow_the_images_scored() -> None:
    """Balanced accuracy averages over the classes present where it is scored: a constant guess on images
    of 2 of the 4 classes scores 0.5, and the statement names the part it was scored on."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 40)
    images = framed_images(rng.integers(180, 240, size=(160, 3)).astype(np.uint8))
    train = np.flatnonzero(np.arange(160) % 2 == 0)
    two_classes = np.flatnonzero((np.arange(160) % 2 == 1) & (labels < 2))
    result = border_colour_baseline(images, labels, train, two_classes, ring=4, scored_on="val")
    assert result["chance"] == 0.5
    assert "held-out validation blocks" in result["statement"] and "test blocks" not in result["statement"]
    assert "held-out test blocks" in border_colour_baseline(images, labels, train, two_classes, ring=4)["statement"]


def test_a_file_name_holding_a_pipe_keeps_its_row_of_the_audit_table() -> None:
    from bloodcell.io import markdown_table

    table = markdown_table(["file", "reason"], [["Pro/bad|name.jpg", "not an image file\n(text)"]])
    assert table.splitlines()[2] == "| Pro/bad\\|name.jpg | not an image file (text) |"


def test_the_stained_cell_table_has_a_segmented_column_only_where_there_is_a_segmented_variant() -> None:
    from bloodcell.data.audit import _stained_table

    plain = {"normal": {"mean": 0.1, "under_2_percent": 0.0, "inside_segmented": None}}
    assert "Segmented" not in _stained_table(plain)
    aria = {"Benign": {"mean": 0.1, "under_2_percent": 0.0, "inside_segmented": 0.93}}
    assert _stained_table(aria).splitlines()[2] == "| Benign | 10.0 % | 0 % | 93 % |"
