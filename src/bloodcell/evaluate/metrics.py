"""Classification metrics with honest uncertainty: the numbers every evaluation reports.

Point estimates come from scikit-learn. The 95 % interval of balanced accuracy resamples *session blocks*
(capture-order groups, a proxy for patient and session), not single images: neighbouring images of one
session are strongly correlated, so an image-level bootstrap would give an interval that is far too narrow.

Blocks are resampled within their class (a stratified cluster bootstrap), as the split draws them: every
resample keeps every class, so balanced accuracy stays defined and does not swing with class composition.
A class with a single block in the evaluated images has no between-block spread to resample; its images
are resampled instead (:func:`resampling_units`), so it still contributes uncertainty rather than none.
With one or two blocks a class the interval is rough, and ``ci_method`` says how many units it rests on.

Everything here is pure numpy/scikit-learn (no torch), so the ONNX side can use it too.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

#: Number of equal-width confidence bins of the reliability diagram and ECE (as in Guo et al. 2017).
DEFAULT_ECE_BINS = 15
DEFAULT_BOOTSTRAP = 1000
#: Confidence at or above which an error counts as a confident one. A low ECE is an average over all images;
#: it can hide a few errors made with near certainty, the ones a reader would act on unchecked.
CONFIDENT = 0.9


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``: scikit-learn's ``balanced_accuracy_score``
    without its warning when a class absent from ``y_true`` is predicted (routine on a folder of some of
    the classes). The one definition every stage uses."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred)
    with warnings.catch_warnings():  # one label given is one label meant (a baseline scored on one class)
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return float(balanced_accuracy_from_confusion(confusion_matrix(y_true, y_pred, labels=labels)))


def chance_level(y_true: np.ndarray) -> float:
    """The balanced accuracy of any constant guess: one over the number of classes present in ``y_true``
    (balanced accuracy averages recall over those classes only, so a folder of 2 of the 4 classes has
    chance 0.5, not 0.25)."""
    return 1.0 / max(len(np.unique(np.asarray(y_true))), 1)


def balanced_accuracy_from_confusion(cms: np.ndarray) -> np.ndarray:
    """Balanced accuracy of one ``(K, K)`` or many ``(..., K, K)`` confusion matrices (rows = true class).

    Classes without true samples are left out of the mean, exactly as scikit-learn does.

    Returns a float array of shape ``cms.shape[:-2]`` (a 0-d array for a single matrix).
    """
    cms = np.asarray(cms, dtype=np.float64)
    support = cms.sum(axis=-1)
    diag = np.diagonal(cms, axis1=-2, axis2=-1)
    present = support > 0
    recall = np.divide(diag, support, out=np.zeros_like(diag), where=present)
    return recall.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def resampling_units(y_true: np.ndarray, blocks: Sequence[Any] | np.ndarray | None) -> np.ndarray:
    """The unit of every image for the bootstrap: its session block, or the image itself when its class has
    only one block (or no blocks are given). Returns an int array ``(N,)`` of unit ids."""
    y_true = np.asarray(y_true)
    if blocks is None:
        return np.arange(len(y_true))
    _, block_index = np.unique(np.asarray(blocks), return_inverse=True)
    majority = np.array([np.bincount(y_true[block_index == b]).argmax() for b in range(block_index.max() + 1)])
    blocks_per_class = np.bincount(majority, minlength=int(y_true.max()) + 1)
    lone = blocks_per_class[majority[block_index]] < 2  # images whose class has a single block
    return np.where(lone, block_index.max() + 1 + np.arange(len(y_true)), block_index)


def block_bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    blocks: Sequence[Any] | np.ndarray | None,
    n_classes: int,
    statistic: Callable[[np.ndarray], np.ndarray] = balanced_accuracy_from_confusion,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` under a cluster bootstrap over session blocks.

    Parameters
    ----------
    y_true, y_pred: integer class labels, shape ``(N,)``.
    blocks: the session block of every image (any hashable labels); None treats each image as its own
        block (an image-level bootstrap, only right when images are independent). Classes with a single
        block are resampled by image (see :func:`resampling_units`).
    n_classes: number of classes K.
    statistic: maps confusion matrices ``(R, K, K)`` to ``R`` values (vectorised).
    n_resamples: bootstrap resamples.
    confidence: coverage of the interval (0.95 for a 95 % interval).
    seed: random seed; the same inputs and seed give the same interval.
    stratified: resample blocks within their (majority) true class (default); False resamples all blocks
        together, so class composition varies between resamples.

    Returns ``(low, high)``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        return float("nan"), float("nan")
    _, block_index = np.unique(resampling_units(y_true, blocks), return_inverse=True)
    n_blocks = int(block_index.max()) + 1
    # One confusion matrix per block: a resample's matrix is then a weighted sum, which is fast.
    per_block = np.zeros((n_blocks, n_classes, n_classes))
    np.add.at(per_block, (block_index, y_true, y_pred), 1)
    # Strata: the (majority) true class of each block, or one stratum holding every block.
    stratum = per_block.sum(axis=2).argmax(axis=1) if stratified else np.zeros(n_blocks, dtype=np.int64)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, n_blocks))
    rows = np.arange(n_resamples)[:, None]
    for value in np.unique(stratum):
        members = np.flatnonzero(stratum == value)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        np.add.at(weights, (rows, draws), 1)
    resampled = (weights @ per_block.reshape(n_blocks, -1)).reshape(n_resamples, n_classes, n_classes)
    values = statistic(resampled)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


class ReliabilityBin(TypedDict):
    """One bin of :func:`reliability_bins`."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # None for an empty bin, as is accuracy
    accuracy: float | None


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins of top-label confidence for a reliability diagram.

    Returns one dict per bin: ``lower``, ``upper``, ``count``, ``confidence`` (mean top probability) and
    ``accuracy`` (share correct); the last two are None for empty bins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 (impossible for a softmax) would go to bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins: list[ReliabilityBin] = []
    for b in range(n_bins):
        member = index == b
        count = int(member.sum())
        bins.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "confidence": float(confidence[member].mean()) if count else None,
                "accuracy": float(correct[member].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = DEFAULT_ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between confidence and accuracy per bin.

    Parameters
    ----------
    y_true: integer labels ``(N,)``; probs: class probabilities ``(N, K)``; n_bins: equal-width bins.

    Returns ECE in [0, 1] (0 = perfectly calibrated top-label confidence).
    """
    bins = reliability_bins(y_true, probs, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    gaps = (
        b["count"] * abs(b["accuracy"] - b["confidence"])
        for b in bins
        if b["accuracy"] is not None and b["confidence"] is not None  # an empty bin has neither
    )
    return float(sum(gaps) / total)


def roc_auc_per_class(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """One-vs-rest ROC AUC of every class (None where the class is absent or is all there is)."""
    y_true = np.asarray(y_true)
    result: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.all() or not positive.any():
            result[name] = None
        else:
            result[name] = float(roc_auc_score(positive, probs[:, k]))
    return result


def roc_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve ``(fpr, tpr)`` of every class that has positives and negatives."""
    y_true = np.asarray(y_true)
    curves = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            curves[name] = (fpr, tpr)
    return curves


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in ``y_true``, the classes balanced accuracy averages over.

    A class absent from the evaluated images has no F1 (no true positive is possible): averaging it in as
    0, scikit-learn's default with ``labels=`` every class, would score a folder of one class read
    perfectly at 1 / K. Predictions of an absent class still count, as false negatives of the true ones.
    """
    present = np.unique(np.asarray(y_true))
    return float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def per_class_report(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """The classification report: precision, recall, F1 and support of every class.

    A class of the images that is never predicted gets precision 0 (scikit-learn's ``zero_division=0``), not
    an error; a class absent from the images (support 0) has no recall or F1 (None), not 0, and no precision
    either unless it is predicted (then 0: every such prediction is wrong).
    """
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    predicted = np.bincount(np.asarray(y_pred, dtype=np.int64), minlength=len(classes))
    return {
        name: {
            "precision": float(precision[k]) if support[k] or predicted[k] else None,
            "recall": float(recall[k]) if support[k] else None,
            "f1": float(f1[k]) if support[k] else None,
            "support": int(support[k]),
        }
        for k, name in enumerate(classes)
    }


def headline_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """The few numbers tracked under every condition (robustness, TTA): balanced accuracy, accuracy,
    macro-F1 and ECE."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(probs).argmax(axis=1)
    labels = list(range(n_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "balanced_accuracy": float(balanced_accuracy_from_confusion(cm)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
        "ece": expected_calibration_error(y_true, probs),
    }


#: Below this many blocks in a class, ``ci_method`` warns that the interval is rough (a cluster bootstrap
#: over n clusters underestimates the variance by about (n - 1) / n, and a handful of clusters barely spread).
FEW_BLOCKS = 5
#: Blocks of fewer images than this (median) are no capture sessions: on a small folder the split cuts
#: each class into at least 7 blocks whatever its size, and ``ci_method`` says the interval then rests
#: on little more than single images.
FEW_IMAGES_PER_BLOCK = 5


def joins_blocks(unit: object) -> bool:
    """Whether a bootstrap unit (:func:`bloodcell.data.splits.bootstrap_blocks`) joins several session blocks,
    ``<class>:<nn>+<class>:<nn>``; a class name may hold a ``+`` itself, as ``CD34+`` does."""
    return re.fullmatch(r".+:\d+(\+.+:\d+)+", str(unit)) is not None


def ci_description(y_true: np.ndarray, blocks: Sequence[Any] | np.ndarray | None, n_bootstrap: int,
                   single_block_classes: list[str]) -> str:  # fmt: skip
    """What the balanced-accuracy interval rests on, in words (``ci_method``): how many blocks, per class too,
    since a test part holds only a few of each and the interval is then rough."""
    method = f"95% percentile bootstrap, {n_bootstrap} resamples"
    if blocks is None:
        return f"{method} of {len(y_true)} images (no session blocks)"
    blocks = np.asarray(blocks)
    per_class = [len(np.unique(blocks[y_true == k])) for k in np.unique(y_true)]
    spread = f"{min(per_class)}" if min(per_class) == max(per_class) else f"{min(per_class)}-{max(per_class)}"
    text = f"{method} of {len(np.unique(blocks))} session blocks in all ({spread} per class), each class's blocks resampled within it"
    if any(joins_blocks(block) for block in np.unique(blocks)):
        text += " (blocks that a re-captured field joins, one slide, counted as one)"
    if min(per_class) < FEW_BLOCKS:
        text += "; with so few blocks the interval is rough and, if anything, too narrow"
    size = float(np.median(np.unique(blocks, return_counts=True)[1]))
    if size < FEW_IMAGES_PER_BLOCK:
        text += (f"; the blocks hold {size:g} images each (median), far fewer than a capture session, so the "
                 "interval is nearly one over images and too narrow where a session's images are alike")
    return text + (f"; single-block classes resampled by image: {', '.join(single_block_classes)}"
                   if single_block_classes else "")  # fmt: skip


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    blocks: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """All the metrics of one evaluation, under the documented keys of ``metrics.json``.

    Parameters
    ----------
    y_true: integer labels ``(N,)`` indexing ``classes``.
    probs: predicted class probabilities ``(N, K)`` (after temperature scaling if any).
    classes: class names in label order.
    blocks: session block of every image for the bootstrap interval (None: image-level bootstrap).
    n_bootstrap: bootstrap resamples; seed: bootstrap seed.

    Returns a JSON-ready dict: ``balanced_accuracy``, ``balanced_accuracy_ci`` ([low, high]),
    ``ci_method``, ``accuracy``, ``macro_f1``, ``per_class``, ``confusion_matrix``,
    ``confusion_matrix_normalized`` (rows sum to 1; NaN for a class without images), ``roc_auc`` (class -> AUC or None), ``roc_auc_macro``,
    ``ece``, ``nll``, ``reliability`` (bins), ``confident_errors`` and ``n_images``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    # Rows of classes absent from the images are NaN (null in JSON), not scikit-learn's 0/0 -> 0, which
    # would read as 0 % recall.
    support = cm.sum(axis=1, keepdims=True)
    cm_normalized = np.divide(cm, support, out=np.full(cm.shape, np.nan), where=support > 0)
    low, high = block_bootstrap_ci(y_true, y_pred, blocks, n_classes, n_resamples=n_bootstrap, seed=seed)
    auc = roc_auc_per_class(y_true, probs, classes)
    defined = [v for v in auc.values() if v is not None]
    n_blocks = len(np.unique(np.asarray(blocks))) if blocks is not None else len(y_true)
    units = resampling_units(y_true, blocks)
    lone = sorted({classes[k] for k in y_true[units >= n_blocks]}) if blocks is not None else []
    return {
        # From the confusion matrix, as for TTA and the shifts: scikit-learn's function gives the same number
        # but warns when an absent class is predicted, which a folder of some of the classes makes routine.
        "balanced_accuracy": float(balanced_accuracy_from_confusion(cm)),
        "balanced_accuracy_ci": [low, high],
        "ci_method": ci_description(y_true, blocks, n_bootstrap, lone),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
        "per_class": per_class_report(y_true, y_pred, classes),
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": np.round(cm_normalized, 6).tolist(),
        "roc_auc": auc,
        "roc_auc_macro": float(np.mean(defined)) if defined else None,
        "ece": expected_calibration_error(y_true, probs),
        "nll": negative_log_likelihood(y_true, probs),
        "reliability": reliability_bins(y_true, probs),
        "confident_errors": confident_errors(y_true, probs),
        "n_images": len(y_true),
    }


def negative_log_likelihood(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean ``-log p(true class)``, unclipped where it can be: scikit-learn's ``log_loss`` clips probabilities
    at machine epsilon, so no image could add more than 36 and a confident error was undercounted; here an
    image's term is capped only where its probability underflows to 0 (at 745, float64's smallest positive
    value), far beyond any model's margin."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        return float("nan")
    chosen = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), y_true]
    return float(-np.log(np.maximum(chosen, np.finfo(np.float64).smallest_subnormal)).mean())


def confident_errors(y_true: np.ndarray, probs: np.ndarray, threshold: float = CONFIDENT) -> dict[str, Any]:
    """``{threshold, count, errors}``: how many of the ``errors`` (wrong top-label predictions) were made with
    a top-label probability of at least ``threshold``."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    wrong = probs.argmax(axis=1) != y_true
    return {
        "threshold": threshold,
        "count": int((wrong & (probs.max(axis=1) >= threshold)).sum()),
        "errors": int(wrong.sum()),
    }
