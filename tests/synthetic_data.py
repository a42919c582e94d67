"""In-memory synthetic training data with the interface training needs (``bloodcell.train.TrainingData``).

The images are the conftest's toy cells (class told by the nucleus shape, random colours), drawn straight
into an array: training tests then need neither files nor the data stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bloodcell import CLASSES


@dataclass
class SyntheticData:
    """Images, labels and a train/val/test split, shaped like :class:`bloodcell.data.prepare.PreparedData`."""

    images: np.ndarray
    labels: np.ndarray
    split: pd.DataFrame
    classes: tuple[str, ...] = CLASSES
    manifest_sha256: str | None = "0" * 64
    segmented_images: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def indices(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.split["split"].to_numpy() == part)


def make_synthetic_data(per_class: int = 16, size: int = 32, seed: int = 0, segmented: bool = False) -> SyntheticData:
    """``per_class`` toy images a class; every 4th image of a class is validation, every 8th test."""
    from conftest import draw_cell

    rng = np.random.default_rng(seed)
    images, labels, parts = [], [], []
    for label in range(len(CLASSES)):
        for k in range(per_class):
            images.append(np.asarray(draw_cell(rng, label, size)))
            labels.append(label)
            parts.append("test" if k % 8 == 7 else "val" if k % 4 == 3 else "train")
    array = np.stack(images)
    masked = array.copy()
    masked[array.mean(axis=3) > 160] = 0
    return SyntheticData(
        images=array,
        labels=np.array(labels, dtype=np.int64),
        split=pd.DataFrame({"split": parts, "label": labels}),
        segmented_images=masked if segmented else None,
    )
