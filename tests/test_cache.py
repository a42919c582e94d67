"""The decoded cache and prepare_data: correct pixels, reuse, keys, alignment with the split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bloodcell import CLASSES
from bloodcell.config import DataConfig
from bloodcell.data import cache as cache_module
from bloodcell.data.cache import cache_path, load_images
from bloodcell.data.decode import decode_image
from bloodcell.data.index import build_index, dataset_workdir
from bloodcell.data.prepare import prepare_data
from bloodcell.data.splits import SPLIT_RULES
from bloodcell.errors import UserError
from bloodcell.io import sha256_file


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused, not rebuilt")

    monkeypatch.setattr(cache_module, "decode_image", fail)


def test_cache_matches_decoder_and_is_reused(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    indexed = build_index(aria_dataset, progress=False)
    rows, root = indexed.manifest, indexed.dataset.root
    images = load_images(rows, root, 32, cache_dir=tmp_path / "c", progress=False)
    assert images.shape == (96, 32, 32, 3) and images.dtype == np.uint8
    assert isinstance(images, np.memmap)
    for k in (0, 50, 95):
        np.testing.assert_array_equal(images[k], decode_image(root / rows["path"][k], 32))
    assert [p.name for p in (tmp_path / "c").iterdir()] == [
        cache_path(rows, tmp_path / "c", 32, "Original").name
    ]

    forbid_decoding(monkeypatch)
    again = load_images(rows, root, 32, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again, images)


def test_cache_key_depends_on_rows_size_and_variant(aria_dataset: Path, tmp_path: Path) -> None:
    rows = build_index(aria_dataset, progress=False).manifest
    base = cache_path(rows, tmp_path, 32, "Original")
    assert cache_path(rows, tmp_path, 64, "Original") != base
    assert cache_path(rows, tmp_path, 32, "Segmented") != base
    assert cache_path(rows.iloc[::-1], tmp_path, 32, "Original") != base
    changed = rows.copy()
    changed.loc[0, "sha256"] = "0" * 64
    assert cache_path(changed, tmp_path, 32, "Original") != base
    assert cache_path(rows.copy(), tmp_path, 32, "Original") == base
    with pytest.MonkeyPatch.context() as patch:  # new decoding rules: the old pixels are not reused
        patch.setattr(cache_module, "DECODER_VERSION", cache_module.DECODER_VERSION + 1)
        assert cache_path(rows, tmp_path, 32, "Original") != base


def test_a_new_cache_replaces_the_stale_one_of_its_size(aria_dataset: Path, tmp_path: Path) -> None:
    indexed = build_index(aria_dataset, progress=False)
    rows, root, cache_dir = indexed.manifest, indexed.dataset.root, tmp_path / "cache"
    old = load_images(rows.iloc[:10], root, 16, cache_dir=cache_dir, progress=False)
    other_size = load_images(rows.iloc[:10], root, 24, cache_dir=cache_dir, progress=False)
    new = load_images(rows, root, 16, cache_dir=cache_dir, progress=False)  # the data changed since
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [cache_path(rows, cache_dir, 16, "Original").name, cache_path(rows.iloc[:10], cache_dir, 24, "Original").name]
    )
    np.testing.assert_array_equal(old, new[:10])  # a map opened before the deletion still reads its pixels
    assert other_size.shape == (10, 24, 24, 3)


def test_subset_is_aligned_with_its_rows(aria_dataset: Path, tmp_path: Path) -> None:
    indexed = build_index(aria_dataset, progress=False)
    subset = indexed.manifest.iloc[[90, 3, 40]].reset_index(drop=True)
    images = load_images(subset, indexed.dataset.root, 24, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(images[0], decode_image(indexed.dataset.root / subset["path"][0], 24))


def test_default_cache_dir_is_the_dataset_workdir(aria_dataset: Path) -> None:
    indexed = build_index(aria_dataset, progress=False)
    load_images(indexed.manifest, indexed.dataset.root, 16, progress=False)
    assert cache_path(
        indexed.manifest, dataset_workdir(aria_dataset, "Original") / "cache", 16, "Original"
    ).is_file()


def test_a_damaged_cache_file_is_rebuilt(aria_dataset: Path, tmp_path: Path) -> None:
    indexed = build_index(aria_dataset, progress=False)
    target = cache_path(indexed.manifest, tmp_path, 16, "Original")
    np.save(target, np.zeros((3, 16, 16, 3), dtype=np.uint8))
    images = load_images(indexed.manifest, indexed.dataset.root, 16, cache_dir=tmp_path, progress=False)
    assert images.shape == (96, 16, 16, 3) and images.any()
    # Cut short after it was written (a full disk, an interrupted copy): numpy cannot even map it.
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    images = load_images(indexed.manifest, indexed.dataset.root, 16, cache_dir=tmp_path, progress=False)
    assert images.shape == (96, 16, 16, 3) and images.any()
    target.write_bytes(b"")  # empty: numpy raises EOFError, which the CLI showed as "Aborted."
    images = load_images(indexed.manifest, indexed.dataset.root, 16, cache_dir=tmp_path, progress=False)
    assert images.shape == (96, 16, 16, 3) and images.any()


def test_prepare_data(aria_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DataConfig(image_size=40, mix_segmented=0.3)  # training would mix in Segmented images
    prepared = prepare_data(config, aria_dataset, progress=False)
    assert prepared.classes == CLASSES
    assert prepared.images.shape == (len(prepared.split), 40, 40, 3)
    assert prepared.labels.dtype == np.int64
    np.testing.assert_array_equal(prepared.labels, prepared.split["label"].to_numpy())
    k = int(prepared.indices("test")[0])
    np.testing.assert_array_equal(
        prepared.images[k], decode_image(prepared.root / prepared.split["path"].iloc[k], 40)
    )
    parts = [prepared.indices(p) for p in ("train", "val", "test", "embargo")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(prepared.split)))
    assert all(len(prepared.indices(p)) > 0 for p in ("train", "val", "test"))
    assert prepared.manifest_sha256 == sha256_file(prepared.manifest_path)
    assert prepared.split_path.is_file() and prepared.split_path.name == f"session-seed0-rules{SPLIT_RULES}.csv"
    assert prepared.segmented_images is not None and prepared.segmented_images.shape == prepared.images.shape
    segmented_row = decode_image(aria_dataset / "Segmented" / prepared.split["path"].iloc[k], 40)
    np.testing.assert_array_equal(prepared.segmented_images[k], segmented_row)

    forbid_decoding(monkeypatch)  # a second call with the same config reuses both caches
    again = prepare_data(config, aria_dataset, progress=False)
    np.testing.assert_array_equal(again.images, prepared.images)
    assert again.split.equals(prepared.split)
    # Without mixing, the other variant is neither read nor decoded: no second index, no second cache.
    monkeypatch.setattr("bloodcell.data.prepare.build_index", _only_original(build_index))
    assert prepare_data(DataConfig(image_size=40), aria_dataset, progress=False).segmented_images is None


def _only_original(build: Any) -> Any:
    def guarded(root: Any, variant: str = "Original", *args: Any, **kwargs: Any) -> Any:
        assert variant == "Original", f"the {variant} variant was indexed"
        return build(root, variant, *args, **kwargs)

    return guarded


def test_prepare_data_without_segmented_or_with_kfold(tmp_path: Path) -> None:
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "plain", per_class=24, segmented=False)
    prepared = prepare_data(
        DataConfig(image_size=32, protocol="kfold", folds=3, fold=1), root, progress=False
    )
    assert prepared.segmented_images is None
    assert len(prepared.indices("test")) == 0 and len(prepared.indices("val")) > 0
    assert set(prepared.split.loc[prepared.indices("val"), "fold"]) == {1}
    # 3 folds, not the default 5: a hash of that setting is in the name
    assert prepared.split_path.name.startswith("kfold-seed0-fold1-") and prepared.split_path.suffix == ".csv"


def test_prepare_data_names_the_files_it_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import make_aria_dataset

    root = make_aria_dataset(tmp_path / "aria", per_class=12, size=32, segmented=False)
    (root / "Original" / "Pro" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    with caplog.at_level("WARNING", logger="bloodcell.data.prepare"):
        prepared = prepare_data(DataConfig(image_size=32, block_size=4, embargo=0), root, progress=False)
        # train prepares the data again for its second stage and its evaluation: the note is given once.
        prepare_data(DataConfig(image_size=32, block_size=4, embargo=0), root, progress=False)
    assert "Pro/broken.jpg" not in set(prepared.split["path"])
    (message,) = [record.getMessage() for record in caplog.records]
    assert "1 of 49 files" in message and "Pro/broken.jpg: " in message and "bloodcell index" in message


def test_prepare_data_needs_a_dataset() -> None:
    with pytest.raises(UserError, match="no dataset given"):
        prepare_data(DataConfig(), None, progress=False)


def test_a_full_disk_is_an_error_naming_the_cache_before_any_decoding(aria_dataset: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Written through a memory map, a cache on a disk that fills would die by SIGBUS: the space is taken first."""
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_space)
    forbid_decoding(monkeypatch)
    indexed = build_index(aria_dataset, progress=False)
    with pytest.raises(OSError, match="No space left on device \\(the decoded cache needs 0 MiB") as raised:
        load_images(indexed.manifest, indexed.dataset.root, 32, cache_dir=tmp_path / "c", progress=False)
    assert raised.value.filename == str(cache_path(indexed.manifest, tmp_path / "c", 32, "Original"))
    assert list((tmp_path / "c").iterdir()) == []  # no temporary left filling the disk


def test_the_temporaries_of_killed_builds_are_removed_and_a_running_build_is_left(aria_dataset: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    import fcntl
    import os

    indexed = build_index(aria_dataset, progress=False)
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    killed, running, fresh = (cache_dir / f".Original-32px-{name}.npy.x.npy" for name in ("a", "b", "c"))
    for path in (killed, running, fresh):
        path.write_bytes(b"\0" * 64)
    for path in (killed, running):
        os.utime(path, (1, 1))  # long untouched
    with open(running, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a build in another process still writing it
        load_images(indexed.manifest, indexed.dataset.root, 32, cache_dir=cache_dir, progress=False)
        assert not killed.exists() and running.exists() and fresh.exists()


def test_a_file_system_that_cannot_lock_still_builds_and_removes_nothing(aria_dataset: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Lustre without flock answers ENOSYS: the cache is built unlocked, and no temporary is judged dead."""
    import errno
    import os

    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(cache_module.fcntl, "flock", no_locks)
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    old = cache_dir / ".Original-32px-a.npy.x.npy"
    old.write_bytes(b"\0" * 64)
    os.utime(old, (1, 1))
    indexed = build_index(aria_dataset, progress=False)
    images = load_images(indexed.manifest, indexed.dataset.root, 32, cache_dir=cache_dir, progress=False)
    assert images.shape == (96, 32, 32, 3) and old.exists()


def test_without_flock_or_fallocate_the_cache_still_builds(aria_dataset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Windows has no fcntl, macOS no posix_fallocate: the cache is built, unlocked and unreserved, and the
    temporary is closed before its rename (Windows cannot rename an open file)."""
    import os

    monkeypatch.setattr(cache_module, "fcntl", None)
    monkeypatch.delattr(os, "posix_fallocate")
    opened: list = []
    real_open = open

    def tracking_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        opened.append(handle)
        return handle

    real_replace = os.replace

    def replace_only_closed(source, target):
        assert all(handle.closed for handle in opened if handle.name == str(source)), "renamed while open"
        return real_replace(source, target)

    monkeypatch.setattr(cache_module, "open", tracking_open, raising=False)
    monkeypatch.setattr(os, "replace", replace_only_closed)
    indexed = build_index(aria_dataset, progress=False)
    images = load_images(indexed.manifest, indexed.dataset.root, 32, cache_dir=tmp_path / "c", progress=False)
    assert images.shape == (96, 32, 32, 3) and opened
    assert [p.name for p in (tmp_path / "c").iterdir()] == [cache_path(indexed.manifest, tmp_path / "c", 32, "Original").name]
