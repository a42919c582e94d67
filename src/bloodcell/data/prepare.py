"""Everything training and evaluation need from the data stages, in one call.

``prepare_data`` runs index -> split -> cache for a :class:`~bloodcell.config.DataConfig`, reusing the
hash cache and the decoded cache, so on a warm dataset it costs about a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bloodcell.config import DataConfig
from bloodcell.data.cache import load_images
from bloodcell.data.index import build_index, dataset_workdir
from bloodcell.data.layouts import VARIANTS, Dataset
from bloodcell.data.splits import TooFewToSplit, make_split, save_split, split_file_name, unsplit
from bloodcell.errors import UserError
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PreparedData:
    """A dataset ready for training and evaluation.

    Attributes
    ----------
    manifest: the full manifest (every file, rejected ones included).
    split: accepted rows in manifest order with ``block``, ``split`` (and ``fold`` for kfold).
    images: ``(len(split), size, size, 3)`` uint8 memory map aligned with ``split``'s rows.
    labels: int64 class indices aligned with ``split``.
    classes: class names in label order.
    root: the folder the manifest paths are relative to.
    manifest_sha256: SHA-256 of the manifest file (recorded in model cards).
    segmented_images: the Segmented counterparts aligned with ``split`` when ``data.mix_segmented`` asks for them
        and the dataset has them, else None.
    dataset: the dataset found on disk.
    manifest_path, split_path: where the manifest and the split were written.
    not_split: why the data could not be split, when ``unsplit_if_too_few`` let every image be one held-out
        part instead (:func:`~bloodcell.data.splits.unsplit`); None for a split cut by its protocol.
    """

    manifest: pd.DataFrame
    split: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    root: Path
    manifest_sha256: str
    segmented_images: np.ndarray | None
    dataset: Dataset
    manifest_path: Path
    split_path: Path
    not_split: str | None = None

    def indices(self, part: str) -> np.ndarray:
        """Row indices (into ``split``, ``images`` and ``labels``) of ``train``, ``val``, ``test`` or ``embargo``."""
        return np.flatnonzero(self.split["split"].to_numpy() == part)


def segmented_images(
    dataset: Dataset, split: pd.DataFrame, config: DataConfig, images: np.ndarray, progress: bool
) -> np.ndarray | None:
    """The other Aria variant's images aligned with ``split``, or None when any row has no usable counterpart."""
    if dataset.layout != "aria":
        return None
    if dataset.variant == "Segmented":
        return images
    if not (dataset.top / "Segmented").is_dir():
        return None
    segmented = build_index(dataset.top, "Segmented", config.class_names, progress=progress).manifest
    usable = segmented[~segmented["rejected"]].set_index("path")
    missing = split["path"][~split["path"].isin(usable.index)]
    if len(missing):
        log.warning(
            "Segmented variant lacks %d of %d images (e.g. %s); it is not used (no cell masks, no mixing)",
            len(missing),
            len(split),
            missing.iloc[0],
        )
        return None
    rows = usable.loc[split["path"], ["sha256"]].reset_index()
    cache_dir = dataset_workdir(dataset.top, "Segmented") / "cache"
    return load_images(
        rows,
        dataset.top / "Segmented",
        config.image_size,
        "Segmented",
        cache_dir=cache_dir,
        progress=progress,
    )


def prepare_data(
    data_config: DataConfig, root: str | Path | None = None, progress: bool = True, unsplit_if_too_few: bool = False
) -> PreparedData:
    """Index, split and decode a dataset as ``data_config`` says; reuse every cache that is still valid.

    Parameters
    ----------
    data_config: the ``data`` section of a run config (variant, class names, image size, split protocol ...).
    root: the dataset folder; overrides ``data_config.root``.
    progress: draw progress bars on stderr for the slow steps (first run only).
    unsplit_if_too_few: where the protocol cannot cut the data (too few images or sub-folders for its parts),
        keep every image as one held-out part in its session blocks, with a warning, instead of the error:
        for scoring every image (``evaluate --split all``), which needs no parts.

    Returns a :class:`PreparedData`. Raises :class:`UserError` when no dataset is given or it cannot be
    used, and :class:`~bloodcell.data.splits.LeakageError` if the split leaks.
    """
    folder = root if root is not None else data_config.root
    if folder is None:
        raise UserError("no dataset given: pass --data PATH (or set data.root in the config)")
    indexed = build_index(folder, data_config.variant, data_config.class_names, progress=progress)
    dataset = indexed.dataset
    note = skipped_files_note(indexed.manifest, folder)
    if note:
        warn_once(log, note)
    workdir = dataset_workdir(dataset.top, dataset.variant)
    fold = data_config.fold if data_config.protocol == "kfold" else None
    file_name = split_file_name(
        data_config.protocol, data_config.split_seed, fold, val_fraction=data_config.val_fraction,
        test_fraction=data_config.test_fraction, block_size=data_config.block_size, embargo=data_config.embargo,
        folds=data_config.folds if fold is not None else None, class_names=data_config.class_names,
    )  # fmt: skip
    not_split = None
    try:
        split = make_split(
            indexed.manifest,
            data_config.protocol,
            data_config.split_seed,
            val_fraction=data_config.val_fraction,
            test_fraction=data_config.test_fraction,
            block_size=data_config.block_size,
            embargo=data_config.embargo,
            folds=data_config.folds,
            fold=data_config.fold,
        )
    except TooFewToSplit as error:
        if not unsplit_if_too_few:
            raise
        not_split = error.reason
        log.warning("the %s split cannot be cut from %s (%s): every image is scored, as one held-out part in its "
                    "session blocks", data_config.protocol, dataset.top, not_split)  # fmt: skip
        split = unsplit(indexed.manifest, data_config.block_size)
        # Named apart from the protocol's splits: it is none of them, and must not stand in for one.
        file_name = f"unsplit-{file_name}"
    split_path = save_split(split, workdir / "splits" / file_name)
    images = load_images(
        split,
        dataset.root,
        data_config.image_size,
        dataset.variant,
        cache_dir=workdir / "cache",
        progress=progress,
    )
    return PreparedData(
        manifest=indexed.manifest,
        split=split,
        images=images,
        labels=split["label"].to_numpy(np.int64),
        classes=dataset.classes,
        root=dataset.root,
        manifest_sha256=indexed.manifest_sha256,
        # Only training with data.mix_segmented reads them: decoding the other variant for every command
        # cost a second index and a cache file as large as this one.
        segmented_images=segmented_images(dataset, split, data_config, images, progress)
        if data_config.mix_segmented > 0
        else None,
        dataset=dataset,
        manifest_path=indexed.manifest_path,
        split_path=split_path,
        not_split=not_split,
    )


def skipped_files_note(manifest: pd.DataFrame, folder: str | Path, shown: int = 5) -> str | None:
    """One line naming the files of a dataset that are not used (unreadable, not images ...), or None."""
    rejected = manifest[manifest["rejected"]]
    if rejected.empty:
        return None
    examples = "; ".join(f"{path}: {reason}" for path, reason in zip(rejected["path"][:shown], rejected["reason"][:shown]))
    more = f"; and {len(rejected) - shown} more" if len(rejected) > shown else ""
    return (f"{len(rejected)} of {len(manifest)} files in {folder} are skipped, not usable as images: {examples}{more} "
            f"(bloodcell index {folder} lists them all)")  # fmt: skip


__all__ = ["VARIANTS", "PreparedData", "prepare_data", "skipped_files_note"]
