"""How a model holds up under stain changes that the robustness suite does not contain.

The suite (``bloodcell evaluate``) changes stain intensity by a per-channel gamma and stain colour by a hue
rotation. Another lab's slides can differ in other ways: in the amount of each stain (haematoxylin against
eosin), and in the look that a stain-separation tool gives them. This script scores a model on the
``session`` split's test part (the images ``bloodcell evaluate`` scores) under two such families:

- ``hed x(h, e)``: each pixel's haematoxylin and eosin densities (colour deconvolution with the Ruifrok &
  Johnston vectors, as the training augmentation uses) scaled by ``h`` and ``e``. Linear in optical
  density, invertible, the identity at (1, 1); the default recipe's stain jitter spans 0.9-1.1.
- ``skimage round trip x(h, e)``: the same scaling through scikit-image's ``rgb2hed`` and ``hed2rgb``,
  which clip negative stain densities to zero: even at (1, 1) the background turns greyer and lavender,
  the look of a slide put through such a tool (or stained by another protocol). The default recipe's
  ``augment.stain_clip`` now imitates it, so for a model trained so this family is no longer unseen.
- ``macenko to a typical <class> training image``: Macenko stain normalisation (``torchstain``), which a
  pathology pipeline may apply to every slide, with a training image of each class as its template (the
  one whose mean colour lies nearest its class's median). It re-estimates each image's two stain vectors
  and re-renders the image with the template's: a change of stain colour and amount that no training
  augmentation imitates. The method was made for H&E histology; on smears it also distorts some images
  (cells turn blue, some red cells wash out), and an image whose stains it cannot separate is left as it
  is and counted under ``unchanged``.

Run from the repository root (the bundled model unless ``--model``)::

    python benchmarks/stain_transfer.py [--model RUN_OR_MODEL] [--data DATA] [--split test|val] [--checkpoint best|last] [--json FILE]

Prints one row a condition: balanced accuracy, the mean change of each channel (0..255) over the images,
on their stained cells and on their bright background, how many images the transform left unchanged (a
Macenko fit that failed), and the share of images read as each class; the JSON adds each condition's
confusion matrix.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from benchmark_common import DEFAULT_DATA, require_dataset
from skimage.color import hed2rgb, rgb2hed
from sklearn.metrics import confusion_matrix
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from bloodcell.evaluate.metrics import balanced_accuracy
from bloodcell.evaluate.runner import load_eval_set, predict_logits, run_dir_of, training_config
from bloodcell.explain.cell_masks import stained_cell_masks
from bloodcell.io import atomic_write_json
from bloodcell.models.card import load_model, load_trained_on, resolve_model_dir
from bloodcell.train.checkpoint import checkpoint_dir

# Haematoxylin, eosin and DAB stain vectors (Ruifrok & Johnston 2001), as bloodcell.data.augment uses.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: (haematoxylin, eosin) scales: milder and stronger than the training augmentation's 0.9-1.1.
SCALES = ((1.0, 1.0), (1.15, 0.85), (0.85, 1.15), (1.3, 0.7), (0.7, 1.3))
#: Pixels brighter than this (mean of R, G, B) count as background.
BACKGROUND_LEVEL = 200


def hed_scaled(images: np.ndarray, h: float, e: float) -> np.ndarray:
    """uint8 NHWC images with each pixel's haematoxylin and eosin densities scaled (invertible, linear in OD)."""
    density = -np.log(np.maximum(images.astype(np.float64) / 255.0, 1.0 / 255.0)) @ HED_FROM_RGB
    density *= np.array([h, e, 1.0])
    return np.clip(np.round(np.exp(-(density @ RGB_FROM_HED)) * 255.0), 0, 255).astype(np.uint8)


def skimage_round_trip(images: np.ndarray, h: float, e: float) -> np.ndarray:
    """uint8 NHWC images through scikit-image's stain separation and back, the two densities scaled."""
    out = [hed2rgb(rgb2hed(image) * np.array([h, e, 1.0])) for image in images]
    return np.clip(np.round(np.stack(out) * 255.0), 0, 255).astype(np.uint8)


def macenko_normalised(images: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 NHWC images Macenko-normalised to ``template`` (HWC), and how many were left unchanged
    because their two stains could not be separated (too few stained pixels, a degenerate fit; all of
    them when the template's cannot)."""
    normalizer = NumpyMacenkoNormalizer()
    fitted, _ = _macenko_step(lambda: normalizer.fit(np.asarray(template)))
    if not fitted:
        return np.asarray(images), len(images)
    out, unchanged = [], 0
    for image in images:
        ok, normalised = _macenko_step(lambda image=image: normalizer.normalize(np.asarray(image), stains=False)[0])
        out.append(normalised if ok else np.asarray(image))
        unchanged += not ok
    return np.stack(out), unchanged


def _macenko_step(step: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, result)`` of one Macenko step, or ``(False, None)`` when its fit is degenerate, which shows
    as a division by zero, an overflow, an invalid value or an empty mean (underflow is harmless)."""
    try:
        with np.errstate(divide="raise", over="raise", invalid="raise"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            return True, step()
    except (FloatingPointError, RuntimeWarning, np.linalg.LinAlgError, ValueError, IndexError):
        return False, None


def typical_images(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    """For each class present, its image whose mean colour lies nearest the class's median mean colour.

    ``score`` takes them from the training part of the data scored: the model's own training images when
    those are its data; on another lab's data, that lab's images (its split rebuilt), and a class absent
    there has no template."""
    typical = {}
    for k, name in enumerate(classes):
        rows = np.flatnonzero(labels == k)
        if len(rows):
            means = np.asarray(images[rows]).reshape(len(rows), -1, 3).mean(axis=1)
            typical[name] = np.asarray(images[rows[np.argmin(np.abs(means - np.median(means, axis=0)).sum(axis=1))]])
    return typical


Transform = Callable[[np.ndarray], tuple[np.ndarray, int]]


def conditions(templates: dict[str, np.ndarray] | None = None) -> list[tuple[str, Transform]]:
    """Every condition scored: its name and the transform of a batch (the images, and how many of them it
    left unchanged). ``templates``: the Macenko templates by class (none: no Macenko conditions)."""

    def whole(transform: Callable[[np.ndarray], np.ndarray]) -> Transform:
        return lambda x: (transform(x), 0)

    rows: list[tuple[str, Transform]] = [("clean", whole(lambda x: x))]
    for h, e in SCALES[1:]:
        rows.append((f"hed x({h}, {e})", whole(lambda x, h=h, e=e: hed_scaled(x, h, e))))
    for h, e in SCALES[:3]:
        rows.append((f"skimage round trip x({h}, {e})", whole(lambda x, h=h, e=e: skimage_round_trip(x, h, e))))
    for name, template in (templates or {}).items():
        rows.append((f"macenko to a typical {name} training image",
                     lambda x, t=template: macenko_normalised(x, t)))  # fmt: skip
    return rows


def checkpoint_to_score(model_path: str | None, split: str, checkpoint: str | None = None) -> str | None:
    """The model folder to score: for a run folder, its ``checkpoint`` (default ``last`` on ``val``, where
    the ``best`` epoch was chosen on the very images scored and would flatter them, as robustness.py and
    crossval.py avoid; ``best`` on ``test``, as ``bloodcell evaluate`` scores); any other path as given."""
    which = checkpoint or ("last" if split == "val" else "best")
    if model_path is not None and (checkpoint_dir(Path(model_path), which) / "card.json").is_file():
        return str(checkpoint_dir(Path(model_path), which))
    return model_path


def score(model_path: str | None, data: Path, split: str = "test") -> dict[str, Any]:
    """Balanced accuracy of the model on its ``split`` part of ``data`` under every condition."""
    model, card = load_model(model_path)
    model_dir = resolve_model_dir(model_path)
    run_dir = run_dir_of(model_dir)
    # The images `bloodcell evaluate` scores: on data not the model's own, less those it trained on.
    trained_on = load_trained_on([model_dir, *([run_dir] if run_dir is not None else [])])
    evaluated = load_eval_set(card, training_config(card, run_dir), data, split, trained_on=trained_on)
    images, truth = evaluated.images, evaluated.y_true
    # Where a change falls: on the stained cells (the Grad-CAM measure's masks) or the bright background.
    regions = {"cells": stained_cell_masks(images), "background": images.mean(axis=-1) > BACKGROUND_LEVEL}
    train = evaluated.prepared.indices("train")
    labels = evaluated.label_map[evaluated.prepared.labels[train]]  # in the model's class order
    templates = typical_images(evaluated.prepared.images[train], labels, list(card.classes))
    rows = []
    for name, transform in conditions(templates):
        shifted, unchanged = transform(images)
        change = shifted.astype(np.float64) - images
        predicted = predict_logits(model, shifted).argmax(axis=1)
        rows.append({
            "condition": name,
            "balanced_accuracy": round(float(balanced_accuracy(truth, predicted)), 4),
            "unchanged": unchanged,
            "mean_change_rgb": [round(float(v), 1) for v in change.mean(axis=(0, 1, 2))],
            **{f"mean_change_rgb_{region}": [round(float(v), 1) for v in change[mask].mean(axis=0)]
               for region, mask in regions.items()},
            "read_as": {c: round(float((predicted == k).mean()), 3) for k, c in enumerate(card.classes)},
            # rows: the true class, columns: the class read, both in the model's order
            "confusion": confusion_matrix(truth, predicted, labels=range(len(card.classes))).tolist(),
        })  # fmt: skip
    return {"model": card.name, "data": str(data), "split": split, "n_images": len(images), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="run or model directory (default: the bundled model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (Aria layout)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the part scored: test, or val to choose a recipe on (a holdout-stage model's)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default=None,
                        help="for a run folder: the checkpoint scored (default: last with --split val, where the "
                             "best epoch was chosen on the images scored; best with --split test)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    require_dataset(args.data)
    model = checkpoint_to_score(args.model, args.split, args.checkpoint)
    result = score(model, args.data, args.split)
    print(f"{result['model']} on the {args.split} part of {args.data} ({result['n_images']} images)")
    print(f"{'condition':<48} {'balanced acc.':>13}  {'change R, G, B: all':>20}  {'cells':>20}  {'background':>20}  "
          "unchanged  read as")  # fmt: skip
    for row in result["rows"]:
        changes = ["  ".join(f"{v:+5.1f}" for v in row[key])
                   for key in ("mean_change_rgb", "mean_change_rgb_cells", "mean_change_rgb_background")]  # fmt: skip
        read_as = " ".join(f"{c} {share:.2f}" for c, share in row["read_as"].items())
        print(f"{row['condition']:<48} {row['balanced_accuracy']:>13.3f}  {changes[0]:>20}  {changes[1]:>20}  "
              f"{changes[2]:>20}  {row['unchanged']:>9}  {read_as}")  # fmt: skip
    if args.json is not None:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
