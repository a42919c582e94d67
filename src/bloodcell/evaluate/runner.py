"""``evaluate_model``: one call from a saved model to ``metrics.json``, ``predictions.csv`` and the plots.

The model is evaluated on the part of a dataset that its own training config defines (same protocol,
seed, block size and image size), so a run's test part is exactly the images training never saw. Any
other folder of images in a known layout works the same way; ``split="all"`` then evaluates every image.

Order of work: logits on the evaluated images -> temperature fitted on the validation part (when the
data is the model's own) -> metrics with block-bootstrap intervals -> optional TTA -> optional
acquisition-shift suite -> shortcut baseline -> Grad-CAM examples and sanity check -> plots -> files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bloodcell.config import DataConfig, RunConfig, config_from_dict, load_config
from bloodcell.data.splits import bootstrap_blocks
from bloodcell.errors import NoFeatureMap, UserError
from bloodcell.evaluate.calibration import fit_temperature, save_temperature
from bloodcell.evaluate.metrics import (
    balanced_accuracy,
    block_bootstrap_ci,
    chance_level,
    classification_metrics,
    expected_calibration_error,
    headline_metrics,
    reliability_bins,
    roc_curves,
)
from bloodcell.evaluate.shifts import SEVERITIES, SHIFTS, apply_shift, describe_parameters
from bloodcell.evaluate.tta import VIEW_SETS, tta_logits
from bloodcell.io import atomic_path, atomic_write_json, path_digest, probability_columns, spreadsheet_safe
from bloodcell.notices import quieted
from bloodcell.probabilities import softmax_with_temperature

if TYPE_CHECKING:  # for annotations only: importing them at run time would load torch for every caller
    from torch import nn

    from bloodcell.data.layouts import Dataset
    from bloodcell.data.prepare import PreparedData
    from bloodcell.models.card import ModelCard, TrainedOn
    from bloodcell.models.classifier import Classifier

log = logging.getLogger(__name__)

#: Raised whenever metrics.json gains or changes a key the report reads: a report of an older metrics.json
#: evaluates the run again (or, told not to, says so) instead of failing on a missing key.
METRICS_FORMAT = "bloodcell-metrics/2"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
SPLITS: tuple[str, ...] = ("test", "val", "all")
#: Most images in the Grad-CAM sanity check (a random sample beyond it), and correct / wrong examples per
#: class in the grid. On 32 images its verdict on the cells changed with the sample drawn; a Grad-CAM pass
#: costs about 3 ms an image for bloodnet at 160 px on 2 cores, so every test image of Aria is used.
SANITY_IMAGES = 512
GRID_CORRECT = 2
GRID_WRONG = 2


def json_ready(value: Any) -> Any:
    """Convert numpy scalars and arrays, tuples and paths to JSON types, and NaN / inf to None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def run_dir_of(model_dir: Path) -> Path | None:
    """The run directory a model directory belongs to (``<run>/checkpoints/best``), or None."""
    if model_dir.parent.name == "checkpoints" and (model_dir.parent.parent / "config.yaml").is_file():
        return model_dir.parent.parent
    return None


def weights_sha256(model_dir: Path) -> str:
    """The SHA-256 of a model's weights file: what identifies a model wherever its folder is copied."""
    from bloodcell.io import sha256_file
    from bloodcell.models.card import WEIGHTS_FILE

    return sha256_file(model_dir / WEIGHTS_FILE)


def is_same_model(recorded: dict[str, Any], model_dir: Path) -> bool | None:
    """Whether the model a ``metrics.json`` records (its ``model`` section) is the one in ``model_dir``: the
    same folder (retrained since or not), or the same weights (a copied run). None when it cannot be told: an
    older evaluation, of no weights hash, whose model folder is gone."""
    from bloodcell.models.card import WEIGHTS_FILE

    path = recorded.get("path")
    if isinstance(path, str) and Path(path).resolve() == model_dir.resolve():
        return True
    digest = recorded.get("weights_sha256")
    if digest is None and isinstance(path, str) and (Path(path) / WEIGHTS_FILE).is_file():
        digest = weights_sha256(Path(path))
    return None if digest is None else digest == weights_sha256(model_dir)


def refuse_another_models_folder(out: Path, model_dir: Path) -> None:
    """Refuse to write an evaluation of ``model_dir`` into ``out`` where it would replace another model's: a
    training run's folder that is not this model's own run (nor a copy of it), or a folder whose
    ``metrics.json`` scored another model. Its report would then describe one model with another's scores."""
    if (out / "config.yaml").is_file():  # a training run's folder: only its own model's evaluation goes there
        own_run = run_dir_of(model_dir)
        best = out / "checkpoints" / "best"
        if (own_run is not None and own_run.resolve() == out.resolve()) or is_same_model({"path": str(best)}, model_dir):
            return
        raise UserError(f"{out} is the folder of another training run (its model: {best}); evaluating {model_dir} "
                        "there would replace that run's evaluation: choose another --out")  # fmt: skip
    try:
        recorded = json.loads((out / METRICS_FILE).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):  # none yet, or not an evaluation's: nothing to replace
        return
    if isinstance(recorded, dict) and is_same_model(recorded, model_dir) is False:
        raise UserError(f"{out / METRICS_FILE} is the evaluation of another model ({recorded.get('path')}); "
                        f"evaluating {model_dir} there would replace it: choose another --out")  # fmt: skip


def warn_if_unfinished(run_dir: Path, epochs: int) -> None:
    """Say so when the run a model belongs to stopped before its last epoch (Ctrl-C, a kill, a time limit):
    its ``checkpoints/best`` is a model still in training, which ``evaluate`` would otherwise score as the
    run's. Nothing when the run has no ``last`` checkpoint to tell (deleted to save room, say)."""
    from bloodcell.train.checkpoint import completed_epochs, is_complete

    done = completed_epochs(run_dir)
    if done is not None and not is_complete(run_dir, epochs):
        log.warning("%s is an unfinished run (%d of %d epochs trained): these are the scores of a model still in "
                    "training; finish it with: bloodcell train --resume %s", run_dir, done[0], epochs, run_dir)


def training_config(card: ModelCard, run_dir: Path | None) -> RunConfig:
    """The config a model was trained with: from its card, else its run's ``config.yaml``, else defaults."""
    if card.config:
        try:
            return config_from_dict(card.config)
        except ValueError as error:
            log.warning("model card config not readable (%s); using the run's config.yaml or defaults", error)
    if run_dir is not None:
        return load_config(str(run_dir / "config.yaml"))
    return RunConfig()


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits ``(N, K)`` float64 of a Classifier for a uint8 NHWC batch (no temperature)."""
    import torch

    from bloodcell.models.classifier import as_batch_tensor

    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = as_batch_tensor(images[start : start + batch_size])
            outputs.append(model(batch.to(device).permute(0, 3, 1, 2).float()).float().cpu().numpy())
    if not outputs:
        return np.zeros((0, 0))
    logits = np.concatenate(outputs).astype(np.float64)
    broken = int((~np.isfinite(logits)).any(axis=1).sum())
    if broken:  # every score after this would be meaningless, or a scikit-learn traceback
        raise UserError(f"the model's outputs are NaN or infinite for {broken} of {len(logits)} images: its weights "
                        "are broken (did its training diverge?)")  # fmt: skip
    return logits


def _conditions_metrics(
    y_true: np.ndarray, probs: np.ndarray, blocks: np.ndarray | None, n_classes: int, n_bootstrap: int
) -> dict[str, Any]:
    """Headline metrics plus the block-bootstrap interval, for TTA and every shifted condition."""
    row = headline_metrics(y_true, probs, n_classes)
    low, high = block_bootstrap_ci(y_true, probs.argmax(axis=1), blocks, n_classes, n_resamples=n_bootstrap)
    return {**row, "balanced_accuracy_ci": [low, high]}


def robustness_suite(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    y_true: np.ndarray,
    blocks: np.ndarray | None,
    n_classes: int,
    temperature: float,
    n_bootstrap: int = 1000,
    shifts: list[str] | None = None,
    progress: bool = False,
    clean_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics under every shift of the suite at severities 0 (clean) to 3.

    Parameters
    ----------
    logits_fn: uint8 NHWC batch -> logits (any backend).
    images, y_true, blocks: the evaluated images, labels and session blocks.
    n_classes: K; temperature: applied before the softmax (ECE).
    n_bootstrap: resamples for each interval; shifts: subset of :data:`SHIFTS` (default all).
    progress: draw a progress bar on stderr.
    clean_logits: logits of the unshifted images when already computed (saves a pass).

    Returns ``{"clean": {...}, "shifts": {name: [per-severity dicts]}, "worst": {severity: {...}},
    "chance"}`` (:func:`~bloodcell.evaluate.metrics.chance_level` of ``y_true``); each per-severity dict holds ``severity``, ``parameters``, ``balanced_accuracy``,
    ``balanced_accuracy_ci``, ``accuracy``, ``macro_f1`` and ``ece``.
    """
    from bloodcell.data.progress import track

    names = shifts or list(SHIFTS)
    clean_probs = softmax_with_temperature(logits_fn(images) if clean_logits is None else clean_logits, temperature)
    clean = _conditions_metrics(y_true, clean_probs, blocks, n_classes, n_bootstrap)
    table: dict[str, list[dict[str, Any]]] = {name: [{"severity": 0, "parameters": "identity", **clean}] for name in names}
    jobs = [(name, severity) for name in names for severity in SEVERITIES]
    for name, severity in track(jobs, len(jobs), "robustness", enabled=progress):
        probs = softmax_with_temperature(_logits_under_shift(logits_fn, images, name, severity), temperature)
        row = _conditions_metrics(y_true, probs, blocks, n_classes, n_bootstrap)
        table[name].append({"severity": severity, "parameters": describe_parameters(name, severity), **row})
    worst = {}
    for severity in SEVERITIES:
        name = min(names, key=lambda n: table[n][severity]["balanced_accuracy"])
        worst[str(severity)] = {"shift": name, **{k: table[name][severity][k] for k in ("balanced_accuracy", "accuracy")}}
    return {"clean": clean, "shifts": table, "worst": worst, "chance": chance_level(y_true)}


#: Images shifted at once by the robustness suite. Some shifts compute in float (defocus pads and convolves
#: each image): the whole evaluation set at once took 9.6 GB for 5,000 images at 160 px. A multiple of
#: predict_logits' batch, so the network sees the same batches as before.
SHIFT_CHUNK = 256


def _logits_under_shift(logits_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, name: str,
                        severity: int) -> np.ndarray:  # fmt: skip
    """The logits of ``images`` under one shift, shifted a chunk at a time (every shift is per image)."""
    if len(images) <= SHIFT_CHUNK:
        return logits_fn(apply_shift(images, name, severity))
    chunks = range(0, len(images), SHIFT_CHUNK)
    return np.concatenate([logits_fn(apply_shift(images[i : i + SHIFT_CHUNK], name, severity)) for i in chunks])


def corner_occlusion(
    logits_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, y_true: np.ndarray, clean_logits: np.ndarray
) -> dict[str, Any]:
    """Does the model read what is drawn in a corner? Its predictions with each corner patch painted over.

    The data audit's corner baselines show that a scale bar or label burned into a corner can tell the
    classes apart; a model that reads it changes its mind when the corner is masked
    (:func:`bloodcell.data.audit.mask_corner`). Returns ``{"patch", "n_images", "clean_balanced_accuracy",
    "corners": {corner: {"balanced_accuracy", "changed_predictions"}}}``.
    """
    from bloodcell.data.audit import CORNER_PATCH, CORNERS, mask_corner

    clean = clean_logits.argmax(axis=1)
    corners = {}
    for corner in CORNERS:
        predicted = logits_fn(mask_corner(images, corner)).argmax(axis=1)
        corners[corner] = {
            "balanced_accuracy": float(balanced_accuracy(y_true, predicted)),
            "changed_predictions": int((predicted != clean).sum()),
        }
    return {
        "patch": CORNER_PATCH,
        "n_images": len(images),
        "clean_balanced_accuracy": float(balanced_accuracy(y_true, clean)),
        "corners": corners,
    }


def shortcut_baseline(prepared: PreparedData, indices: np.ndarray, split: str) -> dict[str, Any] | None:
    """The data audit's border-colour-only classifier, fitted on the training part and scored on the
    evaluated images (for ``split="all"``: on the test part), side by side with the model.

    Returns the baseline dict (``balanced_accuracy``, ``chance``, ``verdict``, ``statement`` ...) plus
    ``scored_on`` and ``image_size`` (the model's: the audit's own baseline runs at 128 px and may differ a
    little), or None when the data has no training part.
    """
    from bloodcell.data.audit import border_colour_baseline

    train_idx = prepared.indices("train")
    test_idx = prepared.indices("test") if split == "all" else indices
    if len(train_idx) == 0 or len(test_idx) == 0 or len(np.unique(prepared.labels[train_idx])) < 2:
        return None
    scored_on = "test" if split == "all" else split
    result = border_colour_baseline(prepared.images, prepared.labels, train_idx, test_idx, scored_on=scored_on)
    return {**result, "scored_on": scored_on, "image_size": int(prepared.images.shape[1])}


def data_audit_summary(prepared: PreparedData, class_names: list[str] | None = None, progress: bool = False) -> dict[str, Any] | None:
    """The dataset audit (``bloodcell audit``) in brief, read from its ``audit.json`` or run now.

    Returns counts, rejected files, duplicate groups and both shortcut baselines (the full duplicate list
    stays in the audit's own files), or None when the audit cannot run on this data.
    """
    from bloodcell.data.audit import AUDIT_FORMAT, run_audit
    from bloodcell.data.index import dataset_workdir
    from bloodcell.data.splits import SPLIT_RULES

    dataset = prepared.dataset
    path = dataset_workdir(dataset.top, dataset.variant) / "audit" / "audit.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        # None yet, or one of another state of the folder (files added, removed or changed since), of an older
        # format, or split by other rules: the audit is run again, so the report never shows stale numbers.
        if (report is None or report.get("manifest_sha256") != prepared.manifest_sha256
                or report.get("format") != AUDIT_FORMAT or report.get("split_rules") != SPLIT_RULES):  # fmt: skip
            report = run_audit(dataset.top, dataset.variant, class_names, progress=progress)
    except (UserError, ValueError, OSError) as error:
        log.warning("data audit not available: %s", error)
        return None
    keys = ("dataset", "layout", "variant", "image_size", "images", "accepted", "classes", "image_sizes", "exact_duplicate_groups",
            "near_duplicate_groups", "images_in_duplicate_groups", "cross_class_duplicate_groups",
            "shortcut_baseline", "colour_statistics_baseline", "corner_baselines", "segmented_coverage", "report_markdown")
    summary = {key: report.get(key) for key in keys}
    summary["rejected"] = len(report.get("rejected", []))
    return summary


def _grid_examples(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> list[list[int | None]]:
    """Per class: the most confident correct predictions, then the most confident mistakes (indices; None
    where a class has too few of either)."""
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    rows = []
    for k in range(n_classes):
        members = np.flatnonzero(y_true == k)
        order = members[np.argsort(-confidence[members], kind="stable")]
        correct = [int(i) for i in order if predicted[i] == k][:GRID_CORRECT]
        wrong = [int(i) for i in order if predicted[i] != k][:GRID_WRONG]
        rows.append(_padded(correct, GRID_CORRECT) + _padded(wrong, GRID_WRONG))
    return rows


def _empty_slot_caption(slot: int, has_images: bool) -> str:
    """The caption of an empty slot of the Grad-CAM grid: why its class's row has no example there."""
    if not has_images:  # a folder of some of the classes: the row is empty, not free of mistakes
        return "no images of this class"
    return "no correct prediction" if slot < GRID_CORRECT else "no mistake"


def _padded(indices: list[int], size: int) -> list[int | None]:
    """``indices`` followed by None up to ``size`` entries."""
    return [*indices, *[None] * (size - len(indices))]


def explain_examples(
    model: Classifier,
    images: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    plots_dir: Path,
    method: str = "gradcam",
    target_layer: str | None = None,
    seed: int = 0,
    blocks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Grad-CAM grid of correct and wrong examples per class, and the sanity check on the images (a random
    sample of :data:`SANITY_IMAGES` beyond that), its cell-focus interval resampling their session ``blocks``.

    Returns the ``explain`` entry of ``metrics.json`` (the sanity-check dict plus ``grid`` counts).
    """
    from bloodcell.explain.gradcam import explain_images, overlay, sanity_check
    from bloodcell.report.plots import plot_gradcam_grid

    rows = _grid_examples(y_true, probs, len(classes))
    chosen = sorted({i for row in rows for i in row if i is not None})
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(images), size=min(SANITY_IMAGES, len(images)), replace=False))
    sanity = sanity_check(model, np.ascontiguousarray(images[sample]), method, target_layer,
                          groups=None if blocks is None else np.asarray(blocks)[sample])  # fmt: skip
    overlays: dict[int, np.ndarray] = {}
    if chosen:
        cams = explain_images(model, np.ascontiguousarray(images[chosen]), method, target_layer).cams
        overlays = {index: overlay(images[index], cams[p]) for p, index in enumerate(chosen)}
    grid = []
    predicted = probs.argmax(axis=1)
    for k, row in enumerate(rows):
        examples: list[dict[str, Any]] = []
        for slot, i in enumerate(row):
            if i is None:
                caption = _empty_slot_caption(slot, has_images=bool((y_true == k).any()))
                examples.append({"overlay": None, "caption": caption})
                continue
            ok = predicted[i] == k
            caption = f"correct, p={probs[i, k]:.2f}" if ok else f"predicted {classes[predicted[i]]}, p={probs[i, predicted[i]]:.2f}"
            examples.append({"overlay": overlays[i], "correct": bool(ok), "caption": caption})
        grid.append((classes[k], examples))
    height, width = sanity["map_size"]
    title = (f"{method} on layer '{sanity['target_layer']}' ({height}x{width} map): similarity to random-weights "
             f"CAMs {sanity['randomized_similarity']:.2f}")  # fmt: skip
    if sanity["cam_energy_on_cell"] is not None:
        random_share = sanity["random_energy_on_cell"]
        title += (f"; CAM energy on stained cells {sanity['cam_energy_on_cell']:.0%} ("
                  + (f"random weights {random_share:.0%}, " if random_share is not None else "")
                  + f"cell area {sanity['cell_area_fraction']:.0%})")  # fmt: skip
    plot_gradcam_grid(grid, plots_dir / "gradcam_grid.png", title)
    return {**sanity, "grid": {name: sum(e["overlay"] is not None for e in examples) for name, examples in grid}}


def default_out_dir(model_dir: Path, card: ModelCard, split: str, own_data: bool, data_root: Path) -> Path:
    """Where results go unless told: the run directory for its own test part, else
    ``evaluations/<data>-<8 hex>-<split>`` inside it; for the bundled model, ``./evaluations/<model name>``
    likewise, and for another model folder outside a run ``./evaluations/<model name>-<8 hex>``. The 8 hex
    digits of a folder's absolute path (as a dataset's work folder has) keep two folders of one name
    (``lab1/a``, ``lab2/a``; a model of one's own also named ``default``) from overwriting each other's
    results."""
    from bloodcell.models.card import bundled_model_dir

    run_dir = run_dir_of(model_dir)
    if run_dir is not None:
        base = run_dir
    elif model_dir.resolve() == bundled_model_dir().resolve():
        base = Path("evaluations") / card.name
    else:
        base = Path("evaluations") / f"{card.name}-{path_digest(model_dir)}"
    if split == "test" and own_data:
        return base
    named = f"{data_root.expanduser().resolve().name}-{path_digest(data_root)}-{split}"
    return (base / "evaluations" if run_dir is not None else base) / named


def _write_predictions(path: Path, prepared: PreparedData, indices: np.ndarray, label_map: np.ndarray, probs: np.ndarray,
                       classes: list[str]) -> Path:
    rows = prepared.split.iloc[indices]
    table = pd.DataFrame(
        {
            "path": [spreadsheet_safe(path) for path in rows["path"]],
            "block": rows["block"].to_numpy() if "block" in rows else "",
            "true_class": [classes[label_map[v]] for v in rows["label"].to_numpy()],
            "predicted_class": [classes[k] for k in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1).round(6),
        }
    )
    for k, column in enumerate(probability_columns(classes)):
        table[column] = probs[:, k].round(6)
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    return path


def _plots(metrics: dict[str, Any], y_true: np.ndarray, probs: np.ndarray, classes: list[str], plots_dir: Path,
           history: tuple[Path, str | None] | None, example: np.ndarray) -> dict[str, str]:
    from bloodcell.report import plots

    made = {}
    low, high = metrics["balanced_accuracy_ci"]
    title = (
        f"Confusion matrix, {metrics['evaluation']['split']} (n={metrics['n_images']})\nbalanced accuracy "
        f"{metrics['balanced_accuracy']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
    )
    made["confusion_matrix"] = plots.plot_confusion_matrix(metrics["confusion_matrix"], classes, plots_dir / "confusion_matrix.png", title)
    made["roc"] = plots.plot_roc_curves(roc_curves(y_true, probs, classes), metrics["roc_auc"], plots_dir / "roc.png")
    made["reliability"] = plots.plot_reliability(
        metrics["reliability_before_temperature"], metrics["reliability"], metrics["ece"],
        metrics["ece_after_temperature"], metrics["temperature"], plots_dir / "reliability.png",
    )
    if metrics.get("robustness"):
        made["robustness"] = plots.plot_robustness(metrics["robustness"], plots_dir / "robustness.png")
        made["shift_examples"] = plots.plot_shift_examples(example, plots_dir / "shift_examples.png")
    if history is not None and history[0].is_file():
        frame = pd.read_csv(history[0])
        if len(frame):
            made["training_curves"] = plots.plot_training_curves(frame, plots_dir / "training_curves.png", history[1])
    return {name: str(Path(path).relative_to(plots_dir.parent)) for name, path in made.items()}


def training_history(run_dir: Path) -> tuple[Path, str | None]:
    """The ``history.csv`` whose curves describe a run, and a note saying whose they are.

    A refit's own history has no validation columns, so its holdout stage's curves are the informative ones.
    """
    from bloodcell.train.run import (
        HOLDOUT_DIR,  # here, not at the top: the training engine is heavy to import
    )

    holdout = run_dir / HOLDOUT_DIR / "history.csv"
    if holdout.is_file():
        return holdout, "holdout stage (trained on train only); the model is its refit on train + val"
    return run_dir / "history.csv", None


@dataclass
class EvalSet:
    """The images an evaluation runs on, with everything needed to score and describe them."""

    prepared: PreparedData
    data_config: DataConfig
    split: str
    indices: np.ndarray  # rows of prepared.split
    images: np.ndarray  # uint8 NHWC
    y_true: np.ndarray  # labels in the model's class order
    blocks: np.ndarray | None  # session block of every image, joined blocks as one (splits.bootstrap_blocks)
    label_map: np.ndarray  # data label -> model label
    own_data: bool  # the data the model was trained on (the card's manifest hash matches)
    training_images_left_out: int | None = 0  # of the part, images the model trained on; None: cannot tell


def load_eval_set(card: ModelCard, config: RunConfig, data_root: str | Path | None, split: str, prepared: PreparedData | None = None,
                  progress: bool = False, trained_on: TrainedOn | None = None) -> EvalSet:  # fmt: skip
    """Rebuild the model's split on ``data_root`` (default: its training data) and pick the ``split`` images.

    On data that are not the model's own (another copy, files added or changed), the split rebuilt from
    them need not be the one the model trained with, so the images whose content is in ``trained_on``
    (the hashes of its training images: the same bytes, or the same picture re-encoded or resized) are left
    out; without that record a warning says the scores
    cannot be checked for them. Raises :class:`UserError` when the data has classes the model does not
    know, lacks that part, or holds nothing the model has not trained on.
    """
    from bloodcell.data.prepare import prepare_data
    from bloodcell.data.splits import TooFewToSplit

    # mix_segmented 0: evaluation never reads the Segmented variant, whatever the training mixed in
    data_config = config.data.model_copy(update={"image_size": card.input_size, "mix_segmented": 0.0})
    classes = list(card.classes)
    if prepared is None:
        folder = data_root if data_root is not None else data_config.root
        if data_root is None and folder is not None and not Path(folder).exists():
            raise UserError(f"the model's training data are no longer at {folder} (the folder its config records): "
                            "pass --data DATA where they are now")  # fmt: skip
        found = _found_or_none(folder, data_config.variant)
        names = data_config.class_names  # a model trained with --classes: its folders' names
        if found is not None and names is None:
            # Another lab's folders, one of them no class of the model's ("normal/" beside "hematogones/"),
            # would each be taken as a class by its own name. Match the model's classes to the folders
            # instead, by name or alias as `index --classes` does; the others are named and left out.
            matched = not set(found.classes) <= set(classes)
            present = classes_with_a_folder(classes, found.root) if matched else classes
        else:  # the names must each find a folder: only those that do are asked for
            # (a folder of one class of unknown name is no layout without the names: its folders are looked at)
            root = found.root if found is not None else Path(folder) if folder is not None and Path(folder).is_dir() else None
            present = classes_with_a_folder(names, root) if root is not None and names else names or classes
            matched = names is not None and len(present) < len(names)
        if matched:
            # Only the classes some folder stands for are asked for: a class the data lack is absent, as on a
            # folder of some of the classes.
            data_config = data_config.model_copy(update={"class_names": present})  # the audit's too
        # --split all scores every image: the warnings about the split rebuilt beside it (an embargo capped
        # for small blocks, a class with no image in a part) concern nothing it scores.
        # It needs no parts either: data too few to split (two patients a class) are scored whole.
        with quieted(logging.getLogger("bloodcell.data.splits"), when=split == "all"):
            try:
                prepared = prepare_data(data_config, data_root, progress=progress, unsplit_if_too_few=split == "all")
            except TooFewToSplit as error:
                if card.manifest_sha256 and _manifest_sha256(data_config, data_root) == card.manifest_sha256:
                    # its own data: --split all would refuse them too
                    raise _unsplittable_own_data(error.reason) from error
                raise UserError(f"{error}; or score every image, which needs no split: add --split all to "
                                "this command") from error  # fmt: skip
        if matched:
            folders = prepared.dataset.class_folders
            absent = [name for name in classes if name not in folders]
            log.warning("the model's classes, matched to the folders of %s: %s%s", prepared.dataset.top,
                        ", ".join(f"{name} = {folder}/" for name, folder in folders.items()),
                        f"; no folder holds {', '.join(absent)}" if absent else "")  # fmt: skip
    unknown = [name for name in prepared.classes if name not in classes]
    if unknown:
        raise UserError(f"the data has classes the model does not know: {', '.join(unknown)} (model: {', '.join(classes)})")
    label_map = np.array([classes.index(name) for name in prepared.classes])
    indices = np.arange(len(prepared.split)) if split == "all" else prepared.indices(split)
    if len(indices) == 0:
        raise UserError(f"the {data_config.protocol!r} split of {prepared.dataset.top} has no {split!r} part; use --split all")
    # A card that records no manifest cannot prove these are its data: treat them as other data, so its
    # record of training images is applied and its temperature is never refitted here.
    own_data = card.manifest_sha256 is not None and card.manifest_sha256 == prepared.manifest_sha256
    if own_data and prepared.not_split:  # cut when it trained, by older rules: its held-out images are unknown
        raise _unsplittable_own_data(prepared.not_split)
    indices, left_out = _without_training_images(indices, prepared, trained_on, own_data, split, list(card.trained_on),
                                                 data_config.embargo)  # fmt: skip
    return EvalSet(
        prepared=prepared,
        data_config=data_config,
        split=split,
        indices=indices,
        images=np.ascontiguousarray(prepared.images[indices]),
        y_true=label_map[prepared.labels[indices]],
        blocks=bootstrap_blocks(prepared.split, indices) if "block" in prepared.split else None,
        label_map=label_map,
        own_data=own_data,
        training_images_left_out=left_out,
    )


def _manifest_sha256(data_config: DataConfig, data_root: str | Path | None) -> str | None:
    """The hash of the manifest of the data ``prepare_data`` was asked for (the index is cached: cheap)."""
    from bloodcell.data.index import build_index

    folder = data_root if data_root is not None else data_config.root
    if folder is None:
        return None
    return build_index(folder, data_config.variant, data_config.class_names, progress=False).manifest_sha256


def _unsplittable_own_data(reason: str) -> UserError:
    """The refusal to score a model's own data that this version cannot split: which of them it held out,
    when an older version cut them, is unknown (scored whole, its training images would pass as held out)."""
    return UserError(f"the model was trained on these data, but this version of bloodcell cannot split them "
                     f"({reason}), so which of them it held out is unknown: evaluate it on other data, or train it "
                     "again")  # fmt: skip


def _found_or_none(folder: str | Path | None, variant: str) -> Dataset | None:
    """The dataset at ``folder`` with every class folder taken by its own name, or None where there is none
    to look at (not a folder, or no layout: preparing the data then says why)."""
    from bloodcell.data.layouts import find_dataset

    if folder is None or not Path(folder).is_dir():
        return None
    try:
        with quieted(logging.getLogger("bloodcell.data.layouts")):  # said again when the data are prepared
            return find_dataset(folder, variant, None)
    except UserError:
        return None


def classes_with_a_folder(classes: list[str], root: Path) -> list[str]:
    """The model's ``classes`` that a sub-folder of ``root`` stands for, by name or alias, as ``find_dataset``
    matches ``class_names`` to folders; raises :class:`UserError` when there are none."""
    from bloodcell.data.layouts import canonical_class, normalise_name

    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    keys = {normalise_name(name) for name in folders}
    keys |= {normalise_name(alias) for name in folders if (alias := canonical_class(name)) is not None}
    present = [name for name in classes if normalise_name(name) in keys]
    if not present:
        raise UserError(f"no folder under {root} is one of the model's classes ({', '.join(classes)}), by name "
                        f"or alias; folders there: {', '.join(folders) or 'none'}")
    return present


def folders_left_out(root: Path, class_folders: dict[str, str]) -> dict[str, int]:
    """The sub-folders of ``root`` beside the class folders that hold images (classes the model does not know,
    left out when its classes were matched to the folders), with how many images each."""
    from bloodcell.data.layouts import is_image_name

    if not root.is_dir():  # data moved since they were prepared
        return {}
    used = set(class_folders.values())
    counts = {}
    others = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in used)
    for folder in others:
        images = [path for path in folder.rglob("*") if is_image_name(path)
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts)]  # fmt: skip
        if images:
            counts[folder.name] = len(images)
    return counts


def _without_training_images(
    indices: np.ndarray, prepared: PreparedData, trained_on: TrainedOn | None, own_data: bool, split: str,
    trained_parts: list[str], embargo: int = 0,
) -> tuple[np.ndarray, int | None]:
    """``indices`` less the images the model trained on, and how many those were (None: unknown). On other
    data the capture-order neighbours of those images (within ``embargo`` positions, as the split reckons
    them) go too: the same sessions as images it trained on."""
    where = f"the {split} part" if split != "all" else "the data"
    # On its own data the split is rebuilt as in training, unless this bloodcell splits differently from the
    # one that trained the model (the rules changed in the eighteenth session): its record of training
    # images says which of them it learned, whatever the present split calls them.
    recorded = (np.isin(prepared.split["sha256"].to_numpy(), list(trained_on.sha256)) if own_data and trained_on
                else np.zeros(len(prepared.split), dtype=bool))  # fmt: skip
    if own_data and split != "all":
        if split in trained_parts or not recorded[indices].any():  # a refit's val part is said trained on elsewhere
            return indices, 0
        seen = recorded[indices]
        log.warning("%d of the %d images of %s are in the model's record of its training images: this version of "
                    "bloodcell splits the data differently from the one that trained it; they are left out (retrain "
                    "the model for a clean %s part)", int(seen.sum()), len(indices), where, split)  # fmt: skip
        if seen.all():
            raise UserError(f"every image of {where} is one the model was trained on: nothing left to evaluate")
        return indices[~seen], int(seen.sum())
    if own_data:  # every image of the model's own data: its training parts are known exactly
        trained = prepared.split["split"].isin(trained_parts).to_numpy() | recorded
        # and so are the duplicates of its training images that the split left out beside them, and the
        # embargo: training-block images next to a held-out block, left out of training only to keep a gap
        # there; they are capture-order neighbours of trained images, the same sessions, not held out.
        copies = prepared.split["dup_group"].isin(prepared.split["dup_group"][trained]).to_numpy()
        embargo = (prepared.split["split"] == "embargo").to_numpy()
        keep = ~(trained | copies | embargo)[indices]
    elif trained_on is None:
        log.warning("these are not the data the model was trained on, and it has no record of its training images "
                    "(trained-on.sha256): %s may hold images it trained on, which would flatter its scores", where)  # fmt: skip
        return indices, None
    else:
        if not trained_on.phash:  # a model trained before they were recorded, or on the Segmented variant
            log.warning("the model has no record of its training images' perceptual hashes (trained-on.phash): "
                        "re-encoded copies of them in %s are not recognised, only byte-identical ones and the "
                        "duplicates these data's index groups with those", where)  # fmt: skip
        table = prepared.split
        seen = trained_on.holds(table["sha256"].tolist(), table["phash"].tolist())
        # and what these data's own index groups with them: shifted re-captures of a field the model saw
        copies = table["dup_group"].isin(table["dup_group"][seen & (table["dup_group"] >= 0).to_numpy()]).to_numpy()
        # and the capture-order neighbours of the images it trained on, as the split's embargo keeps them from
        # a held-out part: a copy of the training data with files added would otherwise score its training
        # sessions as unseen (the embargo of the split rebuilt here is measured from the rebuilt training
        # part, not from what the model trained on). Conservative: a byte copy of a training image that its
        # split left out has neighbours too.
        from bloodcell.data.splits import capture_neighbours

        neighbours = capture_neighbours(table, seen, embargo) & ~(seen | copies)
        keep = ~(seen | copies | neighbours)[indices]
        if neighbours[indices].any():
            log.warning("%d of the images of %s are capture-order neighbours (within %d) of images the model "
                        "trained on, from the same sessions; they are left out", int(neighbours[indices].sum()),
                        where, embargo)  # fmt: skip
    if not keep.any():
        raise UserError(f"every image of {where} is one the model was trained on: nothing left to evaluate")
    if not keep.all():
        of = f" of {where}" if split != "all" else ""  # "these images" would name them twice
        log.warning("%d of the %d images%s are ones the model was trained on, or copies%s of them; they are left out",
                    int((~keep).sum()), len(indices), of,
                    " or capture-order neighbours")  # fmt: skip
    return indices[keep], int((~keep).sum())


def evaluated_scope(metrics: dict[str, Any], data_name: str) -> str:
    """Which images an evaluation scored, in words, for the CLI's table and the report: the part of
    ``data_name``, less the training images left out of it (or a note that nobody can tell)."""
    split = metrics["evaluation"]["split"]
    left_out = metrics["data"].get("training_images_left_out", 0)
    where = f"every image of {data_name}" if split == "all" else f"the {split} part of {data_name}"
    if split != "all" and not metrics["data"].get("same_as_training", True):
        where += " (its split rebuilt by the model's settings; --split all scores every image)"
    folders = metrics["data"].get("folders_left_out") or {}  # absent from a metrics.json written before it
    if folders:
        kind = "classes" if len(folders) > 1 else "a class"
        where += (f", not {', '.join(f'{name}/' for name in folders)} ({sum(folders.values())} images"
                  f"{' in all' if split != 'all' else ''}: {kind} the model does not know)")  # fmt: skip
    if left_out is None:
        return f"{where} (unchecked for training images: the model has no record of them)"
    if left_out:
        return f"{where}, less the {left_out} images the model trained on or copies or capture-order neighbours of them"
    return where


def calibrate(logits_fn: Callable[[np.ndarray], np.ndarray], data: EvalSet, card: ModelCard,
              trained_on: TrainedOn | None = None) -> tuple[float, str]:  # fmt: skip
    """The temperature and where it comes from: fitted on the validation part of the model's own data when
    the test part is judged, else (``--split val`` or ``all``, other data, or a model that trained on the
    validation part) the card's value: never refitted on the data being judged or on data the model
    learned from (validation images in its record of training images, where the split rules changed since
    it trained, are left out of the fit)."""
    if "val" in card.trained_on:
        return float(card.temperature), str(getattr(card, "temperature_source", None) or "model card")
    val = data.prepared.indices("val")
    if trained_on is not None and len(val):
        val = val[~np.isin(data.prepared.split["sha256"].to_numpy()[val], list(trained_on.sha256))]
    if data.own_data and data.split == "test" and len(val):  # never fitted on the images it then scores
        val_logits = logits_fn(np.ascontiguousarray(data.prepared.images[val]))
        return fit_temperature(val_logits, data.label_map[data.prepared.labels[val]]), (
            f"fitted on the validation part ({len(val)} images)"
        )
    # A temperature is fitted when the test part is judged; until then the card holds T = 1, unfitted.
    fitted = "test" in card.metrics or bool(getattr(card, "temperature_source", None))
    if data.own_data and data.split in ("val", "all") and fitted:  # fitted on validation images scored here
        return float(card.temperature), (
            "model card, fitted on these validation images (in-sample)" if data.split == "val"
            else "model card, fitted on the validation images among these (partly in-sample)"
        )
    return float(card.temperature), "model card" if fitted else "model card (never fitted: T = 1)"


def _digest_of(sha256s: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(map(str, sha256s))).encode()).hexdigest()


def describe_evaluation(card: ModelCard, config: RunConfig, model_dir: Path, data: EvalSet, n_bootstrap: int) -> dict[str, Any]:
    """The ``model``, ``data`` and ``evaluation`` sections of ``metrics.json``."""
    from bloodcell.data.splits import split_summary

    prepared, data_config = data.prepared, data.data_config
    protocol = "none" if prepared.not_split else data_config.protocol  # every image one held-out part
    summary = split_summary(prepared.split, protocol, data_config.split_seed, list(prepared.classes),
                            prepared.split_path)  # fmt: skip
    if prepared.not_split:  # one held-out part: no parts to leak between, so no verdict
        summary = {**summary, "leakage_check": None, "leakage_message": ""}
    return {
        "model": {
            "path": str(model_dir.resolve()),  # absolute: the report reads the card from wherever it runs
            "weights_sha256": weights_sha256(model_dir),  # the model, wherever its run folder is copied
            "name": card.name,
            "architecture": card.architecture,
            "input_size": card.input_size,
            "epoch": card.epoch,
            "config_name": config.name,
        },
        "data": {
            "root": str(prepared.dataset.top),
            "variant": prepared.dataset.variant,
            "manifest_sha256": prepared.manifest_sha256,
            "same_as_training": data.own_data,
            # Which images were scored, by content: two evaluations are comparable only when this matches.
            "scored_images_sha256": _digest_of(prepared.split["sha256"].to_numpy()[data.indices])
            if "sha256" in prepared.split else None,
            "training_images_left_out": data.training_images_left_out,
            # folder -> images: folders of no class of the model's, not scored (named in the scope)
            "folders_left_out": folders_left_out(prepared.dataset.root, prepared.dataset.class_folders),
            "trained_on": card.trained_on,
            "protocol": protocol,
            "not_split": prepared.not_split,  # why the protocol could not cut these data, if it could not
            "split_seed": data_config.split_seed,
            "block_size": data_config.block_size,
            "embargo": data_config.embargo,
            # session blocks, not the bootstrap's units (bootstrap_blocks joins a re-captured slide's)
            "n_blocks": int(prepared.split["block"].iloc[data.indices].nunique()) if data.blocks is not None else None,
            "split_summary": summary,
        },
        "evaluation": {
            "split": data.split,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "n_bootstrap": n_bootstrap,
        },
    }


def evaluate_model(
    model_path: str | Path | None = None,
    data_root: str | Path | None = None,
    split: str = "test",
    tta: bool = False,
    robustness: bool = True,
    out_dir: str | Path | None = None,
    *,
    explain: bool = True,
    cam_method: str = "gradcam",
    target_layer: str | None = None,
    update_card: bool = True,
    n_bootstrap: int = 1000,
    batch_size: int = 128,
    progress: bool = True,
    prepared: PreparedData | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model and write ``metrics.json``, ``predictions.csv`` and ``plots/``.

    Parameters
    ----------
    model_path: a run directory, model directory or ``card.json`` (None: the bundled default model).
    data_root: the dataset folder (None: the one in the model's training config).
    split: ``test`` or ``val`` (that part of the model's split protocol) or ``all`` (every image).
    tta: also evaluate with test-time augmentation (8 flips / rotations, logits averaged).
    robustness: also evaluate under the acquisition-shift suite (7 shifts x 3 severities).
    out_dir: where to write (None: the run directory for its own test part, else a sub-folder of it).
    explain: compute the Grad-CAM grid and sanity check.
    cam_method: CAM method for ``explain``.
    target_layer: the layer ``explain`` maps (dotted name inside the network; None: its last convolutional
        stage).
    update_card: store the temperature fitted on validation data (and the test metrics) in the card.
    n_bootstrap: bootstrap resamples per interval.
    batch_size: inference batch size.
    progress: progress bars on stderr.
    prepared: a ready :class:`~bloodcell.data.prepare.PreparedData` (skips indexing; tests, training).

    Returns the ``metrics.json`` dict (keys documented in docs/EVALUATION.md) plus ``out_dir``.
    """
    from bloodcell.models.card import bundled_model_dir, load_model, load_trained_on, resolve_model_dir

    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if explain:  # a misspelt method fails before any work, not after it
        from bloodcell.explain.gradcam import METHODS

        if cam_method not in METHODS:
            raise UserError(f"unknown CAM method {cam_method!r}; choose one of {', '.join(METHODS)}")
    started = time.perf_counter()
    model_dir = resolve_model_dir(model_path)
    model, card = load_model(model_dir)
    if explain and target_layer is not None:  # a misspelt layer, too, fails before any work
        from bloodcell.explain.gradcam import resolve_target_layer

        resolve_target_layer(model.net, target_layer, card.input_size)
    if out_dir is not None:  # before any work; a default folder is this model's own (its run, or named by its path)
        refuse_another_models_folder(Path(out_dir), model_dir)
    run_dir = run_dir_of(model_dir)
    config = training_config(card, run_dir)
    if run_dir is not None:
        warn_if_unfinished(run_dir, config.train.epochs)
    trained_on = load_trained_on([model_dir, *([run_dir] if run_dir is not None else [])])
    data = load_eval_set(card, config, data_root, split, prepared, progress, trained_on)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_dir, card, split, data.own_data,
                                                                     Path(data.prepared.dataset.top))  # fmt: skip
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the work, not after
    if data.own_data and split in card.trained_on:
        log.warning("%s: this model was trained on the %s part; its scores there are not held-out scores", model_dir, split)
    classes, y_true, blocks = list(card.classes), data.y_true, data.blocks

    def logits_fn(batch: np.ndarray) -> np.ndarray:
        return predict_logits(model, batch, batch_size)

    logits = logits_fn(data.images)
    temperature, temperature_source = calibrate(logits_fn, data, card, trained_on)
    raw_probs = softmax_with_temperature(logits, 1.0)
    probs = softmax_with_temperature(logits, temperature)

    metrics: dict[str, Any] = {"format": METRICS_FORMAT}
    metrics.update(classification_metrics(y_true, probs, classes, blocks, n_bootstrap=n_bootstrap))
    metrics.update(
        ece=expected_calibration_error(y_true, raw_probs),
        ece_after_temperature=expected_calibration_error(y_true, probs),
        temperature=temperature,
        temperature_source=temperature_source,
        reliability_before_temperature=reliability_bins(y_true, raw_probs),
        classes=classes,
    )
    metrics.update(describe_evaluation(card, config, model_dir, data, n_bootstrap))
    metrics["tta"] = None
    if tta:
        tta_probs = softmax_with_temperature(tta_logits(logits_fn, data.images, "d4"), temperature)
        metrics["tta"] = {"views": len(VIEW_SETS["d4"]), **_conditions_metrics(y_true, tta_probs, blocks, len(classes), n_bootstrap)}
    metrics["robustness"] = (
        robustness_suite(logits_fn, data.images, y_true, blocks, len(classes), temperature, n_bootstrap,
                         progress=progress, clean_logits=logits)
        if robustness else None
    )  # fmt: skip
    metrics["corner_occlusion"] = corner_occlusion(logits_fn, data.images, y_true, logits) if robustness else None
    metrics["shortcut_baseline"] = shortcut_baseline(data.prepared, data.indices, split)
    # The audit splits the data again, by its own default settings (its baselines train on that split's
    # training part): its warnings about that split (an embargo capped for small blocks) name settings this
    # run may not have, and concern nothing the evaluation scores; `bloodcell audit` itself still says them.
    with quieted(logging.getLogger("bloodcell.data.splits")):
        metrics["data_audit"] = data_audit_summary(data.prepared, data.data_config.class_names, progress)

    metrics["explain"] = None
    if explain:
        try:
            # The cell-focus interval pools the classes: a slide's blocks are one unit there, whatever its class.
            slides = (bootstrap_blocks(data.prepared.split, data.indices, stratified=False)
                      if data.blocks is not None else None)  # fmt: skip
            metrics["explain"] = explain_examples(model, data.images, y_true, probs, classes, plots_dir, cam_method,
                                                  target_layer, blocks=slides)  # fmt: skip
        except NoFeatureMap as error:  # e.g. an MLP-like network: the scores stand without it
            log.warning("Grad-CAM left out: %s", error)
    history = training_history(run_dir) if run_dir is not None else None
    metrics["plots"] = _plots(metrics, y_true, probs, classes, plots_dir, history, data.images[0])
    if metrics["explain"] is not None:
        metrics["plots"]["gradcam_grid"] = "plots/gradcam_grid.png"
    _write_predictions(out / PREDICTIONS_FILE, data.prepared, data.indices, data.label_map, probs, classes)
    metrics["evaluation"]["seconds"] = round(time.perf_counter() - started, 2)
    metrics = json_ready(metrics)
    atomic_write_json(out / METRICS_FILE, metrics)

    judged_on_own_split = data.own_data and data.split != "all"
    if update_card and judged_on_own_split and model_dir.resolve() != bundled_model_dir().resolve():
        headline = {k: metrics[k] for k in ("balanced_accuracy", "balanced_accuracy_ci", "accuracy", "macro_f1",
                                            "ece", "ece_after_temperature", "n_images")}  # fmt: skip
        headline["recall"] = {name: scores["recall"] for name, scores in metrics["per_class"].items()}
        save_temperature(model_dir, temperature, {split: headline} if split == "test" else None)
    return {**metrics, "out_dir": str(out)}
