"""Shifted re-captures of one field: found, kept in one duplicate group, and computed once per data state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data import recaptures
from bloodcell.data.recaptures import find_recaptures, recapture_pairs


def field(seed: int, size: int = 300) -> np.ndarray:
    """A random smear-like field: blurred blobs on a light background, larger than the captures cut from it."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (235, 232, 238))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 16)
        colour = (120, 60, 170) if rng.random() < 0.2 else (205, 170, 185)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(image)


def capture(scene: np.ndarray, dx: int, dy: int, side: int = 224) -> np.ndarray:
    return scene[40 + dy : 40 + dy + side, 40 + dx : 40 + dx + side]


def save(images: dict[str, np.ndarray], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        paths.append(folder / name)
        Image.fromarray(image).save(paths[-1], quality=92)
    return paths


def test_a_field_recaptured_with_a_shift_is_found_and_other_fields_are_not(tmp_path: Path) -> None:
    scene = field(0)
    images = {
        "a.jpg": capture(scene, 0, 0),
        "b.jpg": capture(scene, 14, -9),  # the stage moved 14 and 9 pixels: a hash would differ
        "c.jpg": capture(field(1), 0, 0),
        "d.jpg": capture(field(2), 5, 5),
    }
    paths = save(images, tmp_path / "imgs")
    names = list(images)
    pairs = find_recaptures(paths, names, names, ["x"] * 4, tmp_path / "cache")
    assert pairs == [("a.jpg", "b.jpg")]


def test_images_are_compared_within_their_class_only(tmp_path: Path) -> None:
    scene = field(3)
    paths = save({"a.jpg": capture(scene, 0, 0), "b.jpg": capture(scene, 6, 6)}, tmp_path / "imgs")
    assert find_recaptures(paths, ["a", "b"], ["1", "2"], ["Benign", "Pro-B"], tmp_path / "cache") == []


def test_the_pairs_are_computed_once_for_a_state_of_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = field(4)
    paths = save({"a.jpg": capture(scene, 0, 0), "b.jpg": capture(scene, -8, 3)}, tmp_path / "imgs")
    first = find_recaptures(paths, ["a", "b"], ["1", "2"], ["x", "x"], tmp_path / "cache")

    def no_decoding(path, size=0):
        raise AssertionError("decoded again")

    monkeypatch.setattr(recaptures, "grey_thumbnail", no_decoding)
    assert find_recaptures(paths, ["a", "b"], ["1", "2"], ["x", "x"], tmp_path / "cache") == first == [("a", "b")]
    with pytest.raises(AssertionError, match="decoded again"):  # another state of the data: computed afresh
        find_recaptures(paths, ["a", "b"], ["1", "3"], ["x", "x"], tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("recaptures-*.csv"))) == 1


def test_a_changed_file_costs_only_its_own_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene, other = field(4), field(5)
    paths = save({"a.jpg": capture(scene, 0, 0), "b.jpg": capture(scene, -8, 3), "c.jpg": capture(other, 0, 0),
                  "d.jpg": capture(other, 5, -4)}, tmp_path / "imgs")  # fmt: skip
    names, classes = ["a", "b", "c", "d"], ["x", "x", "y", "y"]
    first = find_recaptures(paths, names, names, classes, tmp_path / "cache")
    assert first == [("a", "b"), ("c", "d")]
    decoded: list[Path] = []
    real = recaptures.grey_thumbnail
    monkeypatch.setattr(recaptures, "grey_thumbnail", lambda path, *args: decoded.append(Path(path)) or real(path, *args))
    again = find_recaptures(paths, names, ["a", "b", "c", "changed"], classes, tmp_path / "cache")
    assert again == first and decoded == paths[2:]  # class y only
    assert len(list((tmp_path / "cache").glob("recaptures-*.csv"))) == 2  # one a class; y's old state removed


def test_too_few_thumbnails_have_no_pairs() -> None:
    assert [len(a) for a in recapture_pairs(np.zeros((1, 40, 40), np.float32))] == [0, 0]


def test_recaptures_join_one_duplicate_group(tmp_path: Path) -> None:
    """Indexed, a shifted re-capture shares its original's dup_group, which no split may cut."""
    from bloodcell.data.index import build_index
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32, segmented=False)
    scene = field(5)
    folder = root / "Original" / "Benign"
    Image.fromarray(capture(scene, 0, 0)).save(folder / "WBC-Benign-001.jpg", quality=92)
    Image.fromarray(capture(scene, 10, 4)).save(folder / "WBC-Benign-012.jpg", quality=92)
    result = build_index(root, progress=False)
    groups = result.manifest.set_index("path")["dup_group"]
    assert groups["Benign/WBC-Benign-001.jpg"] == groups["Benign/WBC-Benign-012.jpg"]
    assert result.summary["recaptured_pairs"] >= 1


def test_an_identical_copy_is_no_re_captured_pair(tmp_path: Path) -> None:
    """The screen links byte-identical copies too; counted as re-captures, the index said "1 pairs of
    re-captures linked" beside "0 groups with near duplicates or shifted re-captures"."""
    from bloodcell.data.index import build_index
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32, segmented=False)
    before = build_index(root, progress=False).summary["recaptured_pairs"]  # the synthetic cells' own look-alikes
    folder = root / "Original" / "Benign"
    (folder / "WBC-Benign-012.jpg").write_bytes((folder / "WBC-Benign-001.jpg").read_bytes())
    summary = build_index(root, progress=False).summary
    assert summary["exact_duplicate_groups"] == 1 and summary["recaptured_pairs"] == before


def test_no_images_no_pairs_and_an_index_of_rejected_files_still_written(tmp_path: Path) -> None:
    from bloodcell.data.index import build_index

    assert find_recaptures([], [], [], [], tmp_path / "cache") == []
    folder = tmp_path / "junk" / "Benign"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "junk" / "Pro-B").mkdir()
    (tmp_path / "junk" / "Pro-B" / "b.jpg").write_bytes(b"nor this")
    result = build_index(tmp_path / "junk", class_names=["Benign", "Pro-B"], progress=False)
    assert result.summary["accepted"] == 0 and result.summary["recaptured_pairs"] == 0


def test_the_check_computes_only_for_the_images_in_candidate_pairs() -> None:
    from bloodcell.data.recaptures import CONFIRM_SHIFT, best_correlations

    thumbs = np.random.default_rng(0).uniform(0, 255, (5, 40, 40)).astype(np.float32)
    thumbs[3] = thumbs[1]
    pairs = (np.array([1]), np.array([3]))
    assert best_correlations(thumbs, CONFIRM_SHIFT, pairs) == pytest.approx([1.0], abs=1e-4)
    assert len(best_correlations(thumbs, CONFIRM_SHIFT, (np.array([], int), np.array([], int)))) == 0


def test_the_check_in_chunks_gives_what_it_gives_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from bloodcell.data.recaptures import CONFIRM_SHIFT, best_correlations

    thumbs = np.random.default_rng(1).uniform(0, 255, (9, 40, 40)).astype(np.float32)
    i, j = np.triu_indices(9, k=1)
    at_once = best_correlations(thumbs, CONFIRM_SHIFT, (i, j))
    monkeypatch.setattr(recaptures, "PAIRS", 5)  # 36 pairs in 8 chunks, the last one short
    assert np.array_equal(best_correlations(thumbs, CONFIRM_SHIFT, (i, j)), at_once)


def test_a_class_of_look_alike_fields_is_left_unchecked_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Distinct fields seen through a round eyepiece: the black surround makes every pair correlate, and
    linking them would merge the whole class into one duplicate group."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:40, :40]
    outside = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 > 18**2
    thumbs = rng.uniform(150, 250, (60, 40, 40)).astype(np.float32)
    thumbs[:, outside] = 0
    assert [len(a) for a in recapture_pairs(thumbs, "Pro-B")] == [0, 0]
    assert recaptures._screen(thumbs, most=50) is None  # stopped before it lists the pairs
    assert "class Pro-B" in caplog.text and "not looked for" in caplog.text


def test_a_damaged_cache_file_is_computed_again(tmp_path: Path) -> None:
    scene = field(6)
    paths = save({"a.jpg": capture(scene, 0, 0), "b.jpg": capture(scene, 5, -7)}, tmp_path / "imgs")
    first = find_recaptures(paths, ["a", "b"], ["1", "2"], ["x", "x"], tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("recaptures-*.csv")
    for damage in ("", "x,y\n1,2\n", "a,b\na.jpg,"):  # empty; the wrong columns; a row cut short
        cached.write_text(damage)
        assert find_recaptures(paths, ["a", "b"], ["1", "2"], ["x", "x"], tmp_path / "cache") == first
        assert cached.read_text().startswith("a,b")


def test_a_segmented_index_survives_a_broken_original_counterpart(tmp_path: Path) -> None:
    """The Original index rejects its truncated file; the Segmented index compares that row as it is."""
    from bloodcell.data.index import build_index
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32)
    broken = root / "Original" / "Benign" / "WBC-Benign-003.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    assert build_index(root, "Original", progress=False).summary["rejected"][0]["path"].endswith("WBC-Benign-003.jpg")
    assert build_index(root, "Segmented", progress=False).summary["accepted"] == 48
