"""Dataset audit: what a careful user should know about a dataset before training on it.

``run_audit`` writes ``audit.md`` and ``audit.json``: counts per class, image sizes, rejected files with
reasons, duplicate groups, and shortcut baselines. A shortcut baseline is a trivial classifier that sees
only features that should not matter (the colour of the image border, global colour statistics); if it
does much better than chance, the classes differ in acquisition (stain, background, camera) and a
network can score well for the wrong reasons. :func:`border_colour_baseline` is reused by evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bloodcell.config import DataConfig
from bloodcell.data.cache import load_images
from bloodcell.data.index import build_index, dataset_workdir
from bloodcell.data.prepare import segmented_images
from bloodcell.data.progress import track
from bloodcell.data.splits import SPLIT_RULES, make_split, split_counts
from bloodcell.errors import UserError
from bloodcell.evaluate.metrics import balanced_accuracy, chance_level
from bloodcell.explain.cell_masks import stained_cell_masks
from bloodcell.io import atomic_write_json, atomic_write_text, markdown_code, markdown_table, markdown_text

#: Written into audit.json; a stored audit of another format is run again (evaluation reads it).
AUDIT_FORMAT = "bloodcell-audit/3"
#: Border ring width in pixels (at the audit's image size) for the border-colour baseline.
DEFAULT_RING = 8
#: Image side the audit decodes at: its baselines read colours and image statistics, not cells, so a
#: small size does (the default trains at 160 px; this cache is shared with 128 px trainings).
DEFAULT_AUDIT_SIZE = 128
#: A Segmented-variant pixel is kept when any channel exceeds this (the background is black, JPEG leaves a
#: little noise in it).
SEGMENTED_THRESHOLD = 20


def border_colour_features(images: np.ndarray, ring: int = DEFAULT_RING, chunk: int = 512) -> np.ndarray:
    """Mean R, G, B of each image's outer ``ring``-pixel border (no cell, only background and edges).

    Parameters
    ----------
    images: ``(N, H, W, 3)`` uint8 (a memory map is fine; it is read in chunks).
    ring: border width in pixels.
    chunk: images read at once.

    Returns an ``(N, 3)`` float64 array in [0, 255].
    """
    height, width = images.shape[1:3]
    mask = np.ones((height, width), dtype=bool)
    mask[ring : height - ring, ring : width - ring] = False
    parts = [images[start : start + chunk][:, mask].mean(axis=1) for start in range(0, len(images), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 3))


def colour_statistics_features(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per-channel mean and standard deviation over the whole image: ``(N, 6)`` float64.

    Parameters
    ----------
    images: ``(N, H, W, 3)`` uint8 (a memory map is fine; it is read in chunks).
    chunk: images read at once.

    Returns ``[mean R, mean G, mean B, std R, std G, std B]`` per image.
    """
    parts = []
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        # Channel-first and contiguous: reducing along the last axis is several times faster than over HWC.
        pixels = np.ascontiguousarray(block.reshape(len(block), -1, 3).transpose(0, 2, 1)).astype(np.float64)
        parts.append(np.concatenate([pixels.mean(axis=2), pixels.std(axis=2)], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 6))


#: The corner patch of the corner baselines, as shares of the image's height and width: large enough to hold
#: a burned-in scale bar or label (this dataset's bottom-right corner carries one whose style changes from
#: session to session), small enough to hold mostly background.
CORNER_SHARE = (0.1, 0.3)
#: The patch in words, for reports.
CORNER_PATCH = f"{100 * CORNER_SHARE[0]:.0f} % of the height x {100 * CORNER_SHARE[1]:.0f} % of the width"
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
#: How far the strongest corner must score above the best other one to be flagged.
CORNER_FLAG_MARGIN = 0.1


def corner_slices(height: int, width: int, corner: str) -> tuple[slice, slice]:
    """Row and column slices of ``corner``'s patch (see :data:`CORNER_SHARE`) in an ``height x width`` image."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; choose one of {', '.join(CORNERS)}")
    h, w = max(2, round(height * CORNER_SHARE[0])), max(2, round(width * CORNER_SHARE[1]))
    rows = slice(0, h) if corner.startswith("top") else slice(height - h, height)
    cols = slice(0, w) if corner.endswith("left") else slice(width - w, width)
    return rows, cols


def mask_corner(images: np.ndarray, corner: str) -> np.ndarray:
    """A copy of uint8 ``(N, H, W, 3)`` images with ``corner``'s patch painted over by the background next to it.

    Each column of the patch gets the mean colour of the same column in the strip of equal height just
    inside it (above a bottom corner, below a top one): whatever was drawn there is gone, and no uniform
    block of a new colour appears in its place.
    """
    height, width = images.shape[1:3]
    rows, cols = corner_slices(height, width, corner)
    h = rows.stop - rows.start
    inside = slice(rows.start - h, rows.start) if rows.start > 0 else slice(h, min(2 * h, height))
    masked = np.array(images, copy=True)
    fill = images[:, inside, cols].astype(np.float32).mean(axis=1, keepdims=True)
    masked[:, rows, cols] = np.round(fill).astype(np.uint8)
    return masked


def corner_features(images: np.ndarray, corner: str, chunk: int = 512) -> np.ndarray:
    """The pixels of one corner patch, averaged over 2 x 2 blocks: ``(N, F)`` float64.

    The averaging halves the features in each direction (a logistic regression on a few hundred features
    fits in a second) and keeps what a drawn label or scale bar looks like.
    """
    height, width = images.shape[1:3]
    rows, cols = corner_slices(height, width, corner)
    parts = []
    for start in range(0, len(images), chunk):
        patch = images[start : start + chunk, rows, cols].astype(np.float64)
        n, h, w, c = patch.shape
        pooled = patch[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        parts.append(pooled.reshape(n, -1))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def corner_baselines(
    images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """A logistic regression on each corner patch alone: does something drawn in one corner tell the classes apart?

    Scale bars, magnification labels and file stamps are burned into the corners of many microscopy images,
    in a style that follows the microscope or the session, and so, in data like this, the class. All four
    corners hold background, whose colour is itself a shortcut (see :func:`border_colour_baseline`), so
    the telling number is one corner scoring well above the others.

    Returns ``{"feature", "model", "corners": {corner: fit_shortcut_baseline(...)}, "strongest", "margin",
    "flagged", "statement"}``; ``margin`` is the strongest corner's balanced accuracy minus the best of the
    others, ``flagged`` whether it reaches :data:`CORNER_FLAG_MARGIN` on enough test images to tell (the
    corners' verdicts are not ``uncertain``; see :data:`MIN_TEST_IMAGES_PER_CLASS`).
    """
    corners = {
        corner: fit_shortcut_baseline(corner_features(images, corner), labels, train_idx, test_idx, seed)
        for corner in CORNERS
    }
    scores = {corner: result["balanced_accuracy"] for corner, result in corners.items()}
    strongest = max(scores, key=scores.__getitem__)
    others = sorted(score for corner, score in scores.items() if corner != strongest)
    margin = round(scores[strongest] - others[-1], 4)
    # The corners share one test part, so all or none are uncertain; on a handful of images one image moves a
    # corner's score by several points, and a margin there is noise (the border baseline's rule, too few to tell).
    too_few = any(result["verdict"] == "uncertain" for result in corners.values())
    flagged = not too_few and margin >= CORNER_FLAG_MARGIN
    if too_few:
        statement = (
            f"The corners were scored on {corners[strongest]['n_test']} images only "
            f"({100 * others[0]:.1f}-{100 * scores[strongest]:.1f} % balanced accuracy), too few to tell a "
            f"corner shortcut from chance: measure them on more held-out images before reading anything into them."
        )
    elif flagged:
        statement = (
            f"The {strongest} corner alone reaches {100 * scores[strongest]:.1f} % balanced accuracy on the "
            f"held-out test blocks, the other corners {100 * others[0]:.1f}-{100 * others[-1]:.1f} %: something "
            f"drawn there (a scale bar, a label) differs between the classes' sessions. A model must not read "
            f"it; bloodcell evaluate masks each corner and counts the predictions that change."
        )
    else:
        statement = (
            f"No corner stands out ({100 * others[0]:.1f}-{100 * scores[strongest]:.1f} % balanced accuracy): "
            f"the corners tell the classes apart no better than their background colour does."
        )
    return {
        "feature": f"the pixels of one corner patch ({CORNER_PATCH})",
        "model": "logistic regression",
        "corners": corners,
        "strongest": strongest,
        "margin": margin,
        "flagged": flagged,
        "statement": statement,
    }


#: Below this many test images a class on average, a baseline's score is too noisy to grade (a 1.000 from
#: 4 images says little): its verdict is ``uncertain``.
MIN_TEST_IMAGES_PER_CLASS = 10


def shortcut_verdict(balanced_accuracy: float, chance: float, n_test: int | None = None) -> str:
    """``none``, ``weak``, ``moderate`` or ``strong``: how far a shortcut baseline is above chance.

    ``uncertain`` instead when ``n_test`` (the images it was scored on) is under
    :data:`MIN_TEST_IMAGES_PER_CLASS` per class on average.
    """
    if n_test is not None and n_test < MIN_TEST_IMAGES_PER_CLASS * round(1 / chance):
        return "uncertain"
    margin = balanced_accuracy - chance
    if margin < 0.05:
        return "none"
    if margin < 0.15:
        return "weak"
    if margin < 0.30:
        return "moderate"
    return "strong"


@contextlib.contextmanager
def _said_what_index_still_lists(root: str | Path) -> Iterator[None]:
    """An audit that cannot split the data or fit its baselines stops; its error then says where the
    counts, rejects and duplicate groups (what would explain the problem) can still be read."""
    try:
        yield
    except UserError as error:
        raise UserError(f"{error}. The audit's shortcut baselines need the session split; `bloodcell index "
                        f"{root}` lists the counts, rejected files and duplicate groups without it") from None  # fmt: skip


def fit_shortcut_baseline(
    features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """Train a logistic regression on ``features`` of the training rows, score the test rows.

    Parameters
    ----------
    features: ``(N, F)`` features that should not predict the class.
    labels: ``(N,)`` int class indices.
    train_idx, test_idx: row indices.
    seed: for the solver (it is deterministic with lbfgs, kept for completeness).

    Returns ``{"balanced_accuracy", "chance", "n_train", "n_test", "verdict"}``; chance is one over the
    number of classes among the test rows (the balanced accuracy of any constant guess on them).
    """
    present = np.unique(labels[train_idx])
    if len(present) < 2:  # scikit-learn's own words ("this solver needs samples of at least 2 classes") say less
        raise UserError(f"the shortcut baselines need training images of at least 2 classes; the session split's "
                        f"training part holds {len(present)}")  # fmt: skip
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    )
    model.fit(features[train_idx], labels[train_idx])
    score = float(balanced_accuracy(labels[test_idx], model.predict(features[test_idx])))
    chance = chance_level(labels[test_idx])
    return {
        "balanced_accuracy": round(score, 4),
        "chance": round(chance, 4),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "verdict": shortcut_verdict(score, chance, len(test_idx)),
    }


def border_colour_baseline(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    ring: int = DEFAULT_RING,
    seed: int = 0,
    scored_on: str = "test",
) -> dict[str, Any]:
    """The shortcut baseline: logistic regression on the mean colour of the image border.

    Parameters
    ----------
    images: ``(N, H, W, 3)`` uint8 images.
    labels: ``(N,)`` int class indices.
    train_idx, test_idx: rows to fit on and to score.
    ring: border width in pixels.
    seed: solver seed.
    scored_on: the part ``test_idx`` holds, as the statement names it (``test``, ``val``).

    Returns the dict of :func:`fit_shortcut_baseline` plus ``feature``, ``model`` and ``statement`` (a
    plain-words sentence on what the number means).
    """
    result = fit_shortcut_baseline(border_colour_features(images, ring), labels, train_idx, test_idx, seed)
    feature = f"mean RGB colour of the outer {ring}-pixel border ring ({images.shape[1]} px images)"
    return {
        "feature": feature,
        "model": "logistic regression",
        **result,
        "statement": _statement(result, "the border colour, never the cells,", scored_on),
    }


def _statement(result: dict[str, Any], what: str, scored_on: str = "test") -> str:
    score, chance = 100 * result["balanced_accuracy"], 100 * result["chance"]
    where = {"test": "the held-out test blocks", "val": "the held-out validation blocks"}.get(scored_on, f"the {scored_on} images")
    head = (
        f"A logistic regression that sees only {what} reaches {score:.1f} % balanced "
        f"accuracy on {where} (chance: {chance:.0f} %)."
    )
    tails = {
        "uncertain": (
            f" It was scored on {result['n_test']} images only, too few to tell a shortcut from chance: "
            "measure it on more held-out images before reading anything into it."
        ),
        "none": " It does no better than chance, so this feature gives a model no shortcut.",
        "weak": " That is a little above chance: the classes differ slightly in it, a weak shortcut.",
        "moderate": (
            " The classes clearly differ in it, so a model can score well partly for the wrong reasons; "
            "compare any model against this number and check its Grad-CAM maps."
        ),
        "strong": (
            " The classes differ strongly in acquisition (stain, background, camera), so high accuracy alone "
            "does not show that a model looks at the cells; compare any model against this number, check its "
            "Grad-CAM maps and test it on acquisition shifts."
        ),
    }
    return head + tails[result["verdict"]]


def duplicate_group_table(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """Every duplicate group with more than one member: ``group``, ``kind`` (exact/near), ``classes``, ``paths``."""
    accepted = manifest[~manifest["rejected"]]
    groups = []
    for group, rows in accepted.groupby("dup_group", sort=True):
        if len(rows) < 2:
            continue
        kind = "exact" if rows["sha256"].nunique() == 1 else "near"
        groups.append(
            {
                "group": int(group),
                "kind": kind,
                "classes": sorted(rows["class"].unique()),
                "paths": rows["path"].tolist(),
            }
        )
    return groups


def _size_counts(manifest: pd.DataFrame) -> dict[str, int]:
    accepted = manifest[~manifest["rejected"]]
    sizes = accepted["width"].astype(str) + "x" + accepted["height"].astype(str)
    return {size: int(n) for size, n in sizes.value_counts().items()}


def _file_sizes(manifest: pd.DataFrame) -> dict[str, int]:
    """``min``, ``median`` and ``max`` bytes of the accepted images (a rejected notes.txt is no image size)."""
    sizes = manifest.loc[~manifest["rejected"], "bytes"]
    return {k: int(v) for k, v in sizes.describe()[["min", "50%", "max"]].rename({"50%": "median"}).items()}


def run_audit(
    root: str | Path,
    variant: str = "Original",
    class_names: list[str] | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    image_size: int = DEFAULT_AUDIT_SIZE,
    ring: int = DEFAULT_RING,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit a dataset and write ``audit.md`` and ``audit.json``.

    Parameters
    ----------
    root: the dataset folder.
    variant: ``Original`` or ``Segmented`` (Aria layout).
    class_names: class names for a plain class-per-folder layout.
    out_dir: where to write the reports; default ``<dataset work folder>/audit``.
    seed: seed of the session split the baselines are scored on.
    image_size: decode size for the baselines (the decoded cache is shared with training).
    ring: border width in pixels for the border-colour baseline.
    progress: draw progress bars on stderr.

    Returns the report dict (what ``audit.json`` holds; keys documented in docs/ARCHITECTURE.md).
    """
    indexed = build_index(root, variant, class_names, progress=progress)
    dataset, manifest = indexed.dataset, indexed.manifest
    with _said_what_index_still_lists(root):
        split = make_split(manifest, "session", seed)
    workdir = dataset_workdir(dataset.top, dataset.variant)
    images = load_images(
        split, dataset.root, image_size, dataset.variant, cache_dir=workdir / "cache", progress=progress
    )
    labels = split["label"].to_numpy()
    train_idx = np.flatnonzero(split["split"].to_numpy() == "train")
    test_idx = np.flatnonzero(split["split"].to_numpy() == "test")
    jobs: dict[str, Callable[[], Any]] = {  # minutes on a large dataset, mostly the fits: one bar
        "border": lambda: border_colour_baseline(images, labels, train_idx, test_idx, ring, seed),
        "stats": lambda: fit_shortcut_baseline(colour_statistics_features(images), labels, train_idx, test_idx, seed),
        "corners": lambda: corner_baselines(images, labels, train_idx, test_idx, seed),
        "stained": lambda: stained_cell_masks(images),
    }
    with _said_what_index_still_lists(root):
        done = {name: job() for name, job in track(jobs.items(), len(jobs), "Shortcut baselines, cell masks", progress)}
    border, stats, corners = done["border"], done["stats"], done["corners"]
    stats = {
        "feature": "per-channel mean and standard deviation of the whole image",
        "model": "logistic regression",
        **stats,
        "statement": _statement(stats, "the image's overall colour statistics, no shapes,"),
    }
    segmented = segmented_images(dataset, split, DataConfig(image_size=image_size, class_names=class_names), images,
                                 progress)  # fmt: skip
    kept = segmented_masks(segmented) if segmented is not None else None
    coverage = segmented_coverage(kept, labels, dataset.classes) if kept is not None else None
    stained = stained_cell_coverage(done["stained"], labels, dataset.classes, kept)
    groups = duplicate_group_table(manifest)
    out = Path(out_dir) if out_dir is not None else workdir / "audit"
    report: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "dataset": str(dataset.top),
        "manifest_sha256": indexed.manifest_sha256,  # which state of the folder this describes
        "split_rules": SPLIT_RULES,  # and which rules split it for the baselines
        "layout": dataset.layout,
        "variant": dataset.variant,
        "image_size": image_size,
        "images": indexed.summary["images"],
        "accepted": indexed.summary["accepted"],
        "classes": indexed.summary["classes"],
        "image_sizes": _size_counts(manifest),
        "bytes": _file_sizes(manifest),
        "rejected": indexed.summary["rejected"],
        "exact_duplicate_groups": indexed.summary["exact_duplicate_groups"],
        "near_duplicate_groups": indexed.summary["near_duplicate_groups"],
        "images_in_duplicate_groups": int(sum(len(g["paths"]) for g in groups)),
        "cross_class_duplicate_groups": int(sum(len(g["classes"]) > 1 for g in groups)),
        "duplicate_groups": groups,
        "split": {"protocol": "session", "seed": seed, "counts": split_counts(split, dataset.classes)},
        "shortcut_baseline": border,
        "colour_statistics_baseline": stats,
        "corner_baselines": corners,
        "segmented_coverage": coverage,
        "stained_cell_coverage": stained,
        "manifest": str(indexed.manifest_path),
        "report_markdown": str(out / "audit.md"),
        "report_json": str(out / "audit.json"),
    }
    atomic_write_json(out / "audit.json", report)
    atomic_write_text(out / "audit.md", audit_markdown(report))
    return report


def stained_cell_coverage(
    masks: np.ndarray, labels: np.ndarray, classes: Sequence[str], kept: np.ndarray | None = None
) -> dict[str, Any]:
    """How much of each class's images the stained-cell masks of the Grad-CAM measure cover, and, with the
    Segmented variant's kept pixels (``kept``), what share of the masks' pixels lie inside them.

    Returns class -> ``mean`` share of pixels, ``under_2_percent`` (share of images whose mask is too small
    for a whole cell) and ``inside_segmented`` (None without ``kept``).
    """
    coverage = _coverage_by_class(masks, labels, classes)
    result: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(classes):
        if name in coverage:
            rows = labels == k
            inside = (
                float((masks[rows] & kept[rows]).sum() / max(int(masks[rows].sum()), 1)) if kept is not None else None
            )
            result[name] = {**coverage[name], "inside_segmented": inside}
    return result


def _coverage_by_class(masks: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Class -> ``mean`` share of the images' pixels the masks hold, and ``under_2_percent``: the share of
    images whose mask holds under 2 % of the pixels, too little for a whole cell (classes without images
    are left out)."""
    covered = masks.reshape(len(masks), -1).mean(axis=1)
    return {
        name: {"mean": float(covered[labels == k].mean()), "under_2_percent": float((covered[labels == k] < 0.02).mean())}
        for k, name in enumerate(classes)
        if (labels == k).any()
    }


def segmented_masks(segmented: np.ndarray, threshold: int = SEGMENTED_THRESHOLD) -> np.ndarray:
    """Boolean ``(N, H, W)`` masks of the pixels Segmented-variant images keep (their background is black)."""
    return segmented.max(axis=-1) > threshold


def segmented_coverage(masks: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """How much of each class's images the Segmented variant keeps: its "cell masks" are a colour threshold.

    Returns ``threshold``, ``classes`` (class -> ``mean`` share of pixels kept, ``under_2_percent``: share of
    images keeping under 2 %, which can hold no whole cell) and a ``statement`` naming the classes whose
    masks miss the cells in more than a tenth of their images.
    """
    per_class = _coverage_by_class(masks, labels, classes)
    missing = [f"{name} ({100 * c['under_2_percent']:.0f} % of its images)" for name, c in per_class.items()
               if c["under_2_percent"] > 0.1]  # fmt: skip
    statement = (
        f"The Segmented variant keeps under 2 % of the pixels, too little for a whole cell, in {', '.join(missing)}: "
        "its masks miss the cells there, so background-free training images (data.mix_segmented) are "
        f"unreliable for {'that class' if len(missing) == 1 else 'those classes'}."
        if missing
        else "The Segmented variant keeps a cell-sized share of the pixels in at least 90 % of every class's images."
    )
    return {"threshold": SEGMENTED_THRESHOLD, "classes": per_class, "statement": statement}


def _stained_table(stained: dict[str, dict[str, Any]]) -> str:
    """The stained-cell masks' table, with the column of the Segmented variant's masks only where there is
    one (the Aria layout)."""
    segmented = any(c["inside_segmented"] is not None for c in stained.values())
    header = ["class", "mean share of pixels", "images under 2 %"] + (["mask pixels inside the Segmented variant's"]
                                                                      if segmented else [])  # fmt: skip
    rows = [[name, f"{100 * c['mean']:.1f} %", f"{100 * c['under_2_percent']:.0f} %"]
            + ([f"{100 * c['inside_segmented']:.0f} %" if c["inside_segmented"] is not None else ""] if segmented else [])
            for name, c in stained.items()]  # fmt: skip
    return markdown_table(header, rows)


def audit_markdown(report: dict[str, Any], max_groups: int = 50) -> str:
    """Render an audit report dict as Markdown (the file ``audit.md``)."""
    counts = report["split"]["counts"]
    classes = list(report["classes"])
    border, stats = report["shortcut_baseline"], report["colour_statistics_baseline"]
    sections = [
        f"# Dataset audit: {markdown_text(report['dataset'])}",
        (
            f"Layout `{report['layout']}`" + (f", variant `{report['variant']}`" if report["layout"] == "aria" else "")
            + f": {report['images']} files, "
            f"{report['accepted']} usable, {len(report['rejected'])} rejected. Manifest: `{markdown_code(report['manifest'])}`."
        ),
        "## Images per class\n\n"
        + markdown_table(["class", "images"], [[name, n] for name, n in report["classes"].items()]),
        "## Image sizes\n\n"
        + markdown_table(["width x height", "images"], [[s, n] for s, n in report["image_sizes"].items()])
        + f"\n\nFile sizes of the usable images: {report['bytes']['min']:,} to {report['bytes']['max']:,} bytes (median {report['bytes']['median']:,}).",
        "## Rejected files\n\n"
        + (
            markdown_table(["file", "reason"], [[r["path"], r["reason"]] for r in report["rejected"]])
            if report["rejected"]
            else "None."
        ),
        "## Duplicates\n\n"
        f"{report['exact_duplicate_groups']} groups of byte-identical files and {report['near_duplicate_groups']} groups "
        f"holding near duplicates (perceptual-hash distance within the index threshold); "
        f"{report['images_in_duplicate_groups']} images are in a duplicate group, "
        f"{report['cross_class_duplicate_groups']} groups span two classes. Splits keep every group on one side.\n\n"
        + (
            markdown_table(
                ["group", "kind", "classes", "files"],
                [
                    [g["group"], g["kind"], ", ".join(g["classes"]), ", ".join(g["paths"])]
                    for g in report["duplicate_groups"][:max_groups]
                ],
            )
            if report["duplicate_groups"]
            else "None."
        )
        + (
            f"\n\n({len(report['duplicate_groups']) - max_groups} more in audit.json.)"
            if len(report["duplicate_groups"]) > max_groups
            else ""
        ),
        f"## Session split (seed {report['split']['seed']})\n\n"
        + markdown_table(
            ["part", *classes, "total"],
            [[part, *[c[name] for name in classes], c["total"]] for part, c in counts.items()],
        ),
        "## Shortcut baselines\n\n"
        + markdown_table(
            ["features", "model", "balanced accuracy (test)", "chance", "verdict"],
            [
                [
                    b["feature"],
                    b["model"],
                    f"{100 * b['balanced_accuracy']:.1f} %",
                    f"{100 * b['chance']:.0f} %",
                    b["verdict"],
                ]
                for b in (border, stats)
            ],
        )
        + f"\n\n{border['statement']}\n\n{stats['statement']}",
        "## Corner patches\n\n"
        f"Features: {report['corner_baselines']['feature']}, {report['corner_baselines']['model']}.\n\n"
        + markdown_table(
            ["corner", "balanced accuracy (test)", "verdict"],
            [
                [corner, f"{100 * b['balanced_accuracy']:.1f} %", b["verdict"]]
                for corner, b in report["corner_baselines"]["corners"].items()
            ],
        )
        + f"\n\n{report['corner_baselines']['statement']}",
    ]
    coverage = report.get("segmented_coverage")
    if coverage:
        sections.append(
            "## Segmented variant: how much of each image it keeps\n\n"
            f"A pixel is kept when a channel exceeds {coverage['threshold']} (its background is black).\n\n"
            + markdown_table(
                ["class", "mean share of pixels kept", "images keeping under 2 %"],
                [[name, f"{100 * c['mean']:.1f} %", f"{100 * c['under_2_percent']:.0f} %"]
                 for name, c in coverage["classes"].items()],
            )  # fmt: skip
            + f"\n\n{coverage['statement']}"
        )
    stained = report.get("stained_cell_coverage")
    if stained:
        sections.append(
            "## Stained cells: the masks of the Grad-CAM energy measure\n\n"
            "The pixels whose purple excess, (R + B) / 2 - G, falls in the top class of a three-class Otsu threshold "
            "(white cells and blasts under a Romanowsky stain; `bloodcell.explain.cell_masks`).\n\n"
            + _stained_table(stained)
        )
    return "\n\n".join(sections) + "\n"
