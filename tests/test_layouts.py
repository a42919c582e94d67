"""Dataset layouts: Aria (both variants), the Kaggle 4-class copy, plain class folders, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell import CLASSES
from bloodcell.data.layouts import canonical_class, find_dataset, normalise_name
from bloodcell.errors import UserError

KAGGLE_FOLDERS = ["Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B"]


def write_image(path: Path, fmt: str = "JPEG", size: int = 32, seed: int = 0) -> Path:
    """A small random RGB image in ``fmt`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_folders(root: Path, folders: list[str], per_folder: int = 3, stem: str = "Snap") -> Path:
    for k, folder in enumerate(folders):
        for number in range(1, per_folder + 1):
            write_image(root / folder / f"{stem}_{number:03d}.jpg", seed=k * 100 + number)
    return root


def test_normalise_and_aliases() -> None:
    assert normalise_name("[Malignant] early Pre-B") == "malignantearlypreb"
    assert canonical_class("[MALIGNANT] Early pre b") == "Early Pre-B"
    assert canonical_class("Pro") == "Pro-B"
    assert canonical_class("benign") == "Benign"
    assert canonical_class("cats") is None


def test_aria_original_and_segmented(aria_dataset: Path) -> None:
    original = find_dataset(aria_dataset)
    assert original.layout == "aria"
    assert original.classes == CLASSES
    assert original.root == (aria_dataset / "Original").resolve()
    assert original.top == aria_dataset.resolve()
    assert len(original.files) == 96
    assert original.files[0] == ("Benign/WBC-Benign-001.jpg", "Benign")
    assert {name for _, name in original.files} == set(CLASSES)
    assert all(path.split("/")[0] == original.class_folders[name] for path, name in original.files)

    segmented = find_dataset(aria_dataset, variant="Segmented")
    assert segmented.root == (aria_dataset / "Segmented").resolve()
    assert segmented.files == original.files


def test_images_outside_the_class_folders_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=2, size=32, segmented=False)
    (root / "Original" / "Mature").mkdir()
    Image.new("RGB", (32, 32)).save(root / "Original" / "Mature" / "m-001.jpg")
    Image.new("RGB", (32, 32)).save(root / "Original" / "stray.jpg")
    (root / "Original" / "notes.txt").write_text("not an image: not worth a warning")
    with caplog.at_level("WARNING", logger="bloodcell.data.layouts"):
        dataset = find_dataset(root)
    assert dataset.classes == CLASSES
    (message,) = [record.getMessage() for record in caplog.records]
    assert "Mature/, stray.jpg not used" in message and "notes.txt" not in message


def test_a_class_folder_of_images_in_an_unread_format_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A class exported as WebP holds no image bloodcell reads, so it is no class folder: a model of the
    other classes would be trained without a word about it."""
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        for k in range(3):
            Image.new("RGB", (32, 32)).save(tmp_path / name / f"{name}-{k}.jpg")
    (tmp_path / "C").mkdir()
    for k in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / "C" / f"c-{k}.webp")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with caplog.at_level("WARNING", logger="bloodcell.data.layouts"):
        dataset = find_dataset(tmp_path)
    assert dataset.classes == ("A", "B") or list(dataset.classes) == ["A", "B"]
    (message,) = [record.getMessage() for record in caplog.records]
    assert "C/ (3 .webp files) not used" in message and "convert" in message and "notes" not in message


def test_an_empty_folder_beside_the_class_folders_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An empty C/ beside A/ and B/ (a class whose images were never copied in) was dropped without a word,
    and a 2-class model trained; a folder of notes, or one holding only the OS's junk files, is a folder too."""
    make_folders(tmp_path, ["A", "B"])
    (tmp_path / "C" / "sub").mkdir(parents=True)
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "__MACOSX").mkdir()
    with caplog.at_level("WARNING", logger="bloodcell.data.layouts"):
        dataset = find_dataset(tmp_path)
    assert dataset.classes == ("A", "B")
    (message,) = [record.getMessage() for record in caplog.records]
    assert message == f"{tmp_path}: C/, D/ hold no images: not used as a class"


def test_aria_variant_folder_given_directly(aria_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = find_dataset(aria_dataset / "Original")
    assert dataset.layout == "aria"
    assert dataset.top == aria_dataset.resolve()
    assert not caplog.records
    # The other variant's folder: the variant asked for is used, and a warning says so.
    assert (
        find_dataset(aria_dataset / "Original", variant="Segmented").root
        == (aria_dataset / "Segmented").resolve()
    )
    assert "the Segmented variant (the one asked for)" in caplog.text and "--variant Original" in caplog.text


def test_an_aria_folder_of_a_single_class_is_still_the_aria_layout(tmp_path: Path) -> None:
    """Not a plain layout whose classes would be "Original" and "Segmented"."""
    root = make_folders(tmp_path / "aria", ["Original/Benign", "Segmented/Benign"])
    for given in (root, root / "Original"):
        dataset = find_dataset(given)
        assert dataset.layout == "aria" and list(dataset.classes) == ["Benign"], given
    assert find_dataset(root, variant="Segmented").root == (root / "Segmented").resolve()
    # A folder named Original whose image folders are not all class names is not taken for the Aria layout.
    plain = make_folders(tmp_path / "plain", ["Original/Benign", "Original/tumour"])
    assert list(find_dataset(plain / "Original").classes) == ["Benign", "tumour"]


def test_an_aria_dataset_unpacked_into_a_folder_of_its_own_is_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An archive unpacked into a folder (``data/archive/Original/...``, macOS's ``__MACOSX`` beside it): the
    one folder is looked into, as for the Kaggle copy, instead of "no recognisable classes"."""
    outer = tmp_path / "data"
    inner = make_folders(outer / "archive", [f"{v}/{c}" for v in ("Original", "Segmented") for c in ("Benign", "Pro")])
    (outer / "__MACOSX" / "archive").mkdir(parents=True)
    dataset = find_dataset(outer, variant="Segmented")
    assert (dataset.layout, dataset.top, dataset.root) == ("aria", inner.resolve(), (inner / "Segmented").resolve())
    assert dataset.classes == ("Benign", "Pro-B") and len(dataset.files) == 6
    assert "variant" not in caplog.text  # the wrapper is no variant folder: nothing to warn of
    # Only one level, and only a lone folder: beside a second folder, the wrapper is pointed at, not looked into.
    (outer / "notes").mkdir()
    with pytest.raises(UserError, match=r"archive holds a dataset of its own .*: give .*archive as the dataset folder"):
        find_dataset(outer)


@pytest.mark.parametrize("healthy", ["Benign", "Healthy"])
def test_a_class_of_the_kaggle_copy_s_folders_beside_a_class_folder_is_a_class(tmp_path: Path, healthy: str) -> None:
    """Benign/ (or Healthy/) beside ALL/{[Malignant] ...}: a two-class dataset, not a dataset beside another
    folder; but a whole Kaggle copy, its Benign included, beside Benign/ is refused, not taken for a class."""
    make_folders(tmp_path / "binary", [healthy, *[f"ALL/{name}" for name in KAGGLE_FOLDERS[1:]]])
    assert set(find_dataset(tmp_path / "binary").classes) == {"ALL", healthy}
    make_folders(tmp_path / "whole", [healthy, *[f"Blood cell Cancer [ALL]/{name}" for name in KAGGLE_FOLDERS]])
    with pytest.raises(UserError, match=r"Blood cell Cancer \[ALL\] holds a dataset of its own"):
        find_dataset(tmp_path / "whole")


def test_an_aria_dataset_beside_a_class_folder_is_no_class(tmp_path: Path) -> None:
    """Benign/ beside leukemia-aria/{Original,Segmented}/...: the Aria copy was taken for a class mixing all
    four classes and both variants."""
    make_folders(tmp_path / "d", ["Benign", *[f"leukemia-aria/{v}/{c}" for v in ("Original", "Segmented") for c in ("Benign", "Pro")]])
    with pytest.raises(UserError, match="leukemia-aria holds a dataset of its own"):
        find_dataset(tmp_path / "d")


def test_a_lone_folder_of_unknown_class_folders_is_pointed_at(tmp_path: Path) -> None:
    make_folders(tmp_path / "data" / "my lab", ["tumour", "healthy"])
    with pytest.raises(UserError, match=r"if my lab/ holds the class folders, give .*my lab instead"):
        find_dataset(tmp_path / "data")


def test_aria_variant_folders_named_in_another_case_are_refused(tmp_path: Path) -> None:
    """Not taken for two classes, "original" and "segmented" (the same images, with and without background)."""
    root = make_folders(tmp_path / "aria", [f"{v}/{c}" for v in ("original", "SEGMENTED") for c in ("Benign", "Pro")])
    with pytest.raises(UserError, match="SEGMENTED, original look like the Aria layout's variant folders, named in "
                       "another case; rename SEGMENTED/ to Segmented/, original/ to Original/"):
        find_dataset(root)
    (root / "SEGMENTED").rename(root / "Segmented")  # beside a right one: the variant asked for is said to rename
    with pytest.raises(UserError, match=r"has no 'Original' folder \(rename original/ to Original/\)"):
        find_dataset(root)


def test_aria_missing_variant_is_a_clear_error(tmp_path: Path) -> None:
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=2, segmented=False)
    with pytest.raises(UserError, match="no 'Segmented' folder"):
        find_dataset(root, variant="Segmented")
    with pytest.raises(UserError, match="unknown variant"):
        find_dataset(root, variant="Colour")


@pytest.mark.parametrize("wrapped", [True, False])
def test_kaggle_layout_loose_names(tmp_path: Path, wrapped: bool) -> None:
    base = tmp_path / "kaggle"
    folders = ["benign", "[MALIGNANT] Early pre-B", "[Malignant] Pre-B", "[malignant]  pro b"]
    holder = base / "Blood cell Cancer [ALL]" if wrapped else base
    make_folders(holder, folders[::-1])
    dataset = find_dataset(base)
    assert dataset.layout == "kaggle"
    assert dataset.classes == CLASSES
    assert dataset.class_folders == dict(zip(CLASSES, folders))
    assert dataset.root == holder.resolve()
    by_class = {name: [p for p, c in dataset.files if c == name] for name in CLASSES}
    assert by_class["Early Pre-B"][0].startswith("[MALIGNANT] Early pre-B/")
    assert all(len(paths) == 3 for paths in by_class.values())


@pytest.mark.parametrize("wrapped", [True, False])
def test_kaggle_layout_with_user_class_names(tmp_path: Path, wrapped: bool) -> None:
    """--classes (a model's classes) on the Kaggle copy: matched inside its wrapper too, in the given order."""
    holder = tmp_path / "kaggle" / "Blood cell Cancer [ALL]" if wrapped else tmp_path / "kaggle"
    make_folders(holder, KAGGLE_FOLDERS)
    dataset = find_dataset(tmp_path / "kaggle", class_names=["Pro-B", "Benign"])
    assert dataset.root == holder.resolve() and dataset.classes == ("Pro-B", "Benign")
    assert dataset.class_folders == {"Pro-B": "[Malignant] Pro-B", "Benign": "Benign"}


def test_kaggle_exact_names(tmp_path: Path) -> None:
    make_folders(tmp_path / "Blood cell Cancer [ALL]", KAGGLE_FOLDERS)
    assert find_dataset(tmp_path).class_folders == dict(zip(CLASSES, KAGGLE_FOLDERS))


def test_plain_folders_take_folder_names(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["zebra", "apple", "mango"])
    dataset = find_dataset(tmp_path / "d")
    assert dataset.layout == "folders"
    assert dataset.classes == ("apple", "mango", "zebra")
    assert len(dataset.files) == 9


def test_plain_folders_with_user_class_names_keep_their_order(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["Zebra", "apple", "notes"])
    dataset = find_dataset(tmp_path / "d", class_names=["zebra", "Apple"])
    assert dataset.classes == ("zebra", "Apple")
    assert dataset.class_folders == {"zebra": "Zebra", "Apple": "apple"}
    assert {c for _, c in dataset.files} == {"zebra", "Apple"}


def test_plain_folders_with_canonical_aliases(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["pro-b", "BENIGN", "pre"])
    dataset = find_dataset(tmp_path / "d")
    assert dataset.layout == "folders"
    assert dataset.classes == ("Benign", "Pre-B", "Pro-B")


def test_a_folder_without_images_beside_the_classes_changes_nothing(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["pro-b", "BENIGN", "pre"])
    (tmp_path / "d" / "notes").mkdir()
    (tmp_path / "d" / "notes" / "readme.txt").write_text("how the slides were stained")
    assert find_dataset(tmp_path / "d").classes == ("Benign", "Pre-B", "Pro-B")


def test_a_class_named_twice_is_refused(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["Benign", "Pro"])
    for names in (["Benign", "Benign", "Pro"], ["Benign", "benign", "Pro"]):
        with pytest.raises(UserError, match="named twice"):
            find_dataset(tmp_path / "d", class_names=names)


def test_user_class_name_not_found(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["a", "b"])
    with pytest.raises(UserError, match="class 'c': no folder"):
        find_dataset(tmp_path / "d", class_names=["a", "c"])


@pytest.mark.parametrize(
    "fmt,suffix", [("JPEG", ".jpeg"), ("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("TIFF", ".TIFF")]
)
def test_every_accepted_format_is_found(tmp_path: Path, fmt: str, suffix: str) -> None:
    for folder in ("a", "b"):
        write_image(tmp_path / "d" / folder / f"img_001{suffix}", fmt)
    dataset = find_dataset(tmp_path / "d")
    assert sorted(p for p, _ in dataset.files) == [f"a/img_001{suffix}", f"b/img_001{suffix}"]


def test_hidden_and_system_files_are_skipped(tmp_path: Path) -> None:
    make_folders(tmp_path / "d", ["a", "b"], per_folder=1)
    (tmp_path / "d" / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "d" / "a" / "Thumbs.db").write_bytes(b"junk")
    assert [p for p, _ in find_dataset(tmp_path / "d").files] == ["a/Snap_001.jpg", "b/Snap_001.jpg"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        find_dataset(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        find_dataset(write_image(tmp_path / "x.jpg"))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        find_dataset(tmp_path / "empty")


def test_loose_images_without_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "d" / "a.jpg")
    with pytest.raises(UserError, match="no class folders"):
        find_dataset(tmp_path / "d")


def test_folders_without_images(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / "d" / folder).mkdir(parents=True)
        (tmp_path / "d" / folder / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no recognisable classes"):
        find_dataset(tmp_path / "d")


def test_a_file_whose_name_is_not_utf8_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    """The manifest is UTF-8 text: such a name used to stop indexing with a UnicodeEncodeError."""
    import os

    from bloodcell.data.index import build_index
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=2, size=32, segmented=False)
    good = next((root / "Original" / "Pro").iterdir())
    os.link(good, os.path.join(os.fsencode(root / "Original" / "Pro"), b"WBC-Malignant-Pro-\xff.jpg"))
    index = build_index(root, progress=False)
    assert len(index.manifest) == 8
    assert "name is not valid UTF-8" in caplog.text and "\\udcff" in caplog.text
