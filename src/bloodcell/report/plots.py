"""The report's figures (matplotlib figures made without pyplot, so the caller's backend, a notebook's
inline one say, is left as it was): readable at a glance, class names on the axes, the
headline number in every title.

Every function takes plain data (arrays, dicts from ``metrics.json``, a history DataFrame) and a target
path, writes a PNG atomically and returns the path. Nothing here computes a metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bloodcell.io import atomic_path

DPI = 110
#: Colour-blind-safe palette (Okabe-Ito) for lines of different shifts / classes.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def new_figure(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes (``Figure.subplots``' arguments), drawn to files only: no pyplot, whose
    ``matplotlib.use("Agg")`` switched the whole process's backend, and no figure left for it to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and return the path."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    return Path(path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def best_epoch_row(history: pd.DataFrame) -> int:
    """The row of the epoch training keeps as ``best``: the highest validation balanced accuracy, ties to the
    lower validation loss (as the loop's score (balanced accuracy, -loss) orders them)."""
    score = history["val_balanced_accuracy"].to_numpy(dtype=float)
    loss = history["val_loss"].to_numpy(dtype=float) if "val_loss" in history else np.zeros(len(score))
    top = np.nanmax(score)
    return min((i for i in range(len(score)) if score[i] == top), key=lambda i: (loss[i], i))


def plot_training_curves(history: pd.DataFrame, path: str | Path, note: str | None = None) -> Path:
    """Loss and accuracy per epoch (train and validation) from a run's ``history.csv``.

    Parameters
    ----------
    history: one row per epoch with ``epoch``, ``train_loss``, ``val_loss``, ``train_accuracy``,
        ``val_accuracy``, ``val_balanced_accuracy`` (missing or empty columns are skipped).
    path: PNG to write.
    note: a line above the plots saying which run the curves are from.
    """
    history = history.dropna(axis="columns", how="all")
    fig, (ax_loss, ax_acc) = new_figure(1, 2, figsize=(10, 3.8))
    if note:
        fig.suptitle(note, fontsize=10)
    epoch = history["epoch"].to_numpy() if "epoch" in history else np.arange(1, len(history) + 1)
    for column, label, colour in (("train_loss", "train", PALETTE[0]), ("val_loss", "validation", PALETTE[1])):
        if column in history:
            ax_loss.plot(epoch, history[column], marker="o", ms=3, label=label, color=colour)
    # Training loss is taken on augmented images with label smoothing, so it can stay above validation loss.
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss per epoch\n(train: on augmented images, as optimised)")
    for column, label, colour in (
        ("train_accuracy", "train accuracy", PALETTE[0]),
        ("val_accuracy", "validation accuracy", PALETTE[1]),
        ("val_balanced_accuracy", "validation balanced accuracy", PALETTE[2]),
    ):
        if column in history:
            ax_acc.plot(epoch, history[column], marker="o", ms=3, label=label, color=colour)
    title = "Accuracy per epoch"
    if "val_balanced_accuracy" in history and len(history):
        best = best_epoch_row(history)
        title += f"\nbest validation balanced accuracy {history['val_balanced_accuracy'].iloc[best]:.3f} (epoch {epoch[best]})"
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=title, ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(
    counts: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Row-normalised confusion matrix (colour = share of the true class), each cell labelled with its
    count and percentage; true classes on rows, predicted on columns."""
    matrix = np.asarray(counts, dtype=np.int64)
    support = matrix.sum(axis=1, keepdims=True)
    # A class without images has no shares (blank, "no images"), not 0 %, which would read as 0 % recall.
    shares = np.divide(matrix, support, out=np.full(matrix.shape, np.nan), where=support > 0)
    fig, ax = new_figure(figsize=(0.9 * len(classes) + 2.6, 0.9 * len(classes) + 1.4))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            share = shares[i, j]
            colour = "white" if share > 0.6 else "black"
            label = f"{matrix[i, j]}\n{share:.0%}" if support[i, 0] else "no\nimages"
            ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=11 if support[i, 0] else 8)
    ax.set_xticks(range(len(classes)), labels=classes, rotation=30, ha="right", fontsize=10)
    ax.set_yticks(range(len(classes)), labels=classes, fontsize=10)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], aucs: Mapping[str, float | None], path: str | Path
) -> Path:
    """One-vs-rest ROC curve of every class, its AUC in the legend."""
    fig, ax = new_figure(figsize=(5.2, 4.6))
    for k, (name, (fpr, tpr)) in enumerate(curves.items()):
        ax.plot(fpr, tpr, color=PALETTE[k % len(PALETTE)], lw=1.8, label=f"{name} (AUC {_fmt(aucs.get(name))})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    defined = [v for v in aucs.values() if v is not None]
    macro = f"macro AUC {np.mean(defined):.3f}" if defined else "AUC undefined"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, one vs rest ({macro})",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def _reliability_panel(ax: Any, bins: Sequence[Mapping[str, Any]], title: str) -> None:
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    filled = [b for b in bins if b["count"]]  # an empty bin has no accuracy: drawn, it would read as 0
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    accuracy = [b["accuracy"] for b in filled]
    confidence = [b["confidence"] for b in filled]
    ax.bar(centres, accuracy, width=width * 0.95, color=PALETTE[0], alpha=0.85, label="accuracy")
    # The gap runs from accuracy to mean confidence (Guo et al. 2017): hatched, so it reads both ways.
    gaps = [c - a for a, c in zip(accuracy, confidence)]
    ax.bar(centres, gaps, bottom=accuracy, width=width * 0.95, fill=False, hatch="///", edgecolor=PALETTE[1],
           lw=1.0, label="gap to mean confidence")
    # How many images each bin holds: the ECE weighs the bins by it, so a 2-image bin counts for little.
    # Written at the foot of each bar, inside it, where no bar or gap can cover it.
    for centre, height, b in zip(centres, accuracy, filled):
        ax.text(centre, 0.02, str(b["count"]), ha="center", va="bottom", fontsize=6.5,
                color="white" if height > 0.08 else "#333333", fontweight="bold")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence (top class probability); numbers: images in the bin", ylabel="accuracy", title=title,
           xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.grid(alpha=0.3)


def plot_reliability(
    bins_before: Sequence[Mapping[str, Any]],
    bins_after: Sequence[Mapping[str, Any]] | None,
    ece_before: float,
    ece_after: float | None,
    temperature: float,
    path: str | Path,
) -> Path:
    """Reliability diagrams before and after temperature scaling, ECE and T in the titles."""
    panels = 2 if bins_after is not None else 1
    fig, axes = new_figure(1, panels, figsize=(5 * panels, 4.4), squeeze=False)
    _reliability_panel(axes[0, 0], bins_before, f"Before temperature scaling (ECE {_fmt(ece_before)})")
    if bins_after is not None:
        _reliability_panel(axes[0, 1], bins_after, f"After, T = {temperature:.2f} (ECE {_fmt(ece_after)})")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_robustness(robustness: Mapping[str, Any], path: str | Path, metric: str = "balanced_accuracy") -> Path:
    """Metric against severity (0 = clean) for every shift of the suite; the worst medium shift in the title.

    ``robustness`` is the ``robustness`` entry of ``metrics.json``: ``shifts`` maps a shift name to a list of
    per-severity dicts with ``severity`` and the metric.
    """
    fig, ax = new_figure(figsize=(8.0, 4.4))
    markers = "osD^v<>p"
    scores = []
    for k, (name, rows) in enumerate(robustness["shifts"].items()):
        severities = [r["severity"] for r in rows]
        values = [r[metric] for r in rows]
        scores += [v for v in values if v is not None]
        ax.plot(severities, values, marker=markers[k % len(markers)], color=PALETTE[k % len(PALETTE)], lw=1.8, label=name)
    # The axis spans the scores, not 0-1: a robust model's curves all lie within a few points of each other,
    # and on a 0-1 axis they would be drawn as one line at the top.
    low = max(0.0, math.floor((min(scores, default=0.0) - 0.02) * 20) / 20)
    chance = robustness.get("chance")
    if chance is not None and chance >= low:
        ax.axhline(chance, ls=":", color="grey", lw=1, label="chance")
    worst = robustness.get("worst", {}).get("2")
    title = f"Robustness to acquisition shifts ({metric.replace('_', ' ')})"
    if worst:
        title += f"\nclean {_fmt(robustness['clean'][metric])}, worst at medium: {worst['shift']} {_fmt(worst[metric])}"
    if chance is not None and chance < low:
        title += f" (chance {_fmt(chance)}, below the axis)"
    ax.set(xlabel="severity", ylabel=metric.replace("_", " "), title=title, ylim=(low, 1.005))
    ax.set_xticks([0, 1, 2, 3], labels=["0 clean", "1 low", "2 medium", "3 high"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_shift_examples(image: np.ndarray, path: str | Path) -> Path:
    """One image under every shift of the suite (columns) at severities 0 to 3 (rows), parameters as titles."""
    from bloodcell.evaluate.shifts import SEVERITIES, SEVERITY_NAMES, SHIFTS, apply_shift, describe_parameters

    names = list(SHIFTS)
    fig, axes = new_figure(1 + len(SEVERITIES), len(names), figsize=(1.55 * len(names), 1.75 * (1 + len(SEVERITIES)) + 0.3),
                             squeeze=False)  # fmt: skip
    for c, name in enumerate(names):
        for r, severity in enumerate((0, *SEVERITIES)):
            ax = axes[r, c]
            ax.imshow(apply_shift(image[None], name, severity)[0])
            ax.set_xticks([])
            ax.set_yticks([])
            label = name if r == 0 else describe_parameters(name, severity).replace(", ", "\n")
            ax.set_title(label, fontsize=7 if r else 8, fontweight="bold" if r == 0 else "normal")
            if c == 0:
                ax.set_ylabel(f"{severity} {SEVERITY_NAMES[severity]}", fontsize=8)
    fig.suptitle("The acquisition-shift suite on one test image (rows: severity)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gradcam_grid(
    rows: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str | Path, title: str, columns: int = 4
) -> Path:
    """A grid of CAM overlays: one row per class, its correct examples then its misclassified ones.

    Parameters
    ----------
    rows: ``(class name, examples)`` pairs; each example has ``overlay`` (uint8 RGB, or None for an empty
        slot), ``correct`` (bool) and ``caption`` (short text).
    path: PNG to write; title: the figure title (e.g. with the sanity-check numbers).
    columns: panels per row; missing examples leave a labelled blank.
    """
    fig, axes = new_figure(len(rows), columns, figsize=(2.3 * columns, 2.45 * len(rows) + 0.6), squeeze=False)
    for r, (name, examples) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            example = examples[c] if c < len(examples) else {"overlay": None, "caption": "no example"}
            if example["overlay"] is not None:
                ax.imshow(example["overlay"])
                colour = PALETTE[2] if example["correct"] else PALETTE[1]
                ax.set_title(example["caption"], fontsize=8, color=colour)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
            else:
                ax.text(0.5, 0.5, example["caption"], ha="center", va="center", fontsize=8, color="grey")
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if c == 0:
                ax.set_ylabel(f"true: {name}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_model_comparison(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of balanced accuracy with 95 % intervals for models side by side.

    ``rows``: dicts with ``name``, ``balanced_accuracy`` and optionally ``balanced_accuracy_ci``.
    """
    fig, ax = new_figure(figsize=(6.5, 0.6 * len(rows) + 1.4))
    names = [r["name"] for r in rows]
    values = np.array([r["balanced_accuracy"] for r in rows], dtype=float)
    ax.barh(names, values, color=[PALETTE[k % len(PALETTE)] for k in range(len(rows))], alpha=0.85)
    for k, row in enumerate(rows):
        interval = row.get("balanced_accuracy_ci")
        if interval and interval[0] is not None:  # only models have intervals, the shortcut has none
            error = [[max(values[k] - interval[0], 0)], [max(interval[1] - values[k], 0)]]
            ax.errorbar(values[k], k, xerr=error, color="black", capsize=4, lw=1.2)
    for k, v in enumerate(values):
        ax.text(0.02, k, f"{v:.3f}", va="center", fontsize=10, color="white", fontweight="bold")
    ax.set(xlabel="balanced accuracy (95% CI)", xlim=(0, 1.05), title="Balanced accuracy side by side")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, path)
