"""Test-time augmentation: average a model's logits over flips and 90-degree rotations.

A blood smear has no up, down, left or right, so the eight symmetries of the square (the dihedral group
D4) are all label-preserving views of one image. Pure numpy on uint8 NHWC batches, so the torch and the
ONNX Runtime predictors share it.

Logits (not probabilities) are averaged: the result is again a logit vector, so the model card's
temperature applies to it exactly as to a plain prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: View sets by name: ``flips`` (4 views: identity, horizontal, vertical, both) and ``d4`` (all 8).
VIEW_SETS: dict[str, tuple[tuple[int, bool], ...]] = {
    # (number of 90-degree rotations, transpose-like flip before rotating)
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def dihedral_view(images: np.ndarray, rotations: int, flip: bool) -> np.ndarray:
    """One symmetry of the square applied to an ``(N, H, W, C)`` batch: optional horizontal flip, then
    ``rotations`` counter-clockwise quarter turns. Returns a contiguous array."""
    view = images[:, :, ::-1] if flip else images
    return np.ascontiguousarray(np.rot90(view, k=rotations, axes=(1, 2)))


def tta_views(images: np.ndarray, views: str = "d4") -> list[np.ndarray]:
    """All views of a batch for the named view set (the first is the batch itself)."""
    if views not in VIEW_SETS:
        raise ValueError(f"unknown TTA view set {views!r}; choose one of {', '.join(VIEW_SETS)}")
    return [dihedral_view(images, k, flip) for k, flip in VIEW_SETS[views]]


def tta_logits(
    logits_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, views: str = "d4"
) -> np.ndarray:
    """Average ``logits_fn`` over the views of ``images``.

    Parameters
    ----------
    logits_fn: maps a uint8 ``(N, H, W, 3)`` batch to ``(N, K)`` logits (any backend).
    images: the batch.
    views: ``"d4"`` (8 views) or ``"flips"`` (4 views).

    Returns the mean logits, shape ``(N, K)``, float64.
    """
    total = None
    names = VIEW_SETS.get(views)
    for view in tta_views(images, views):
        logits = np.asarray(logits_fn(view), dtype=np.float64)
        total = logits if total is None else total + logits
    assert total is not None and names is not None
    return total / len(names)
