"""How well does a recipe do on capture sessions it has not seen? Cross-validated over session blocks.

The ``session`` split's test part is 10 blocks (2-3 sessions per class), so its balanced accuracy has a
wide interval (about +/- 0.025) and moves by +/- 0.01 between equally good recipes. This script gives the
recipe's estimate over the whole dataset instead: the ``kfold`` protocol cuts every class into session
blocks, groups them into K stratified folds, and trains the recipe K times, each time on K-1 folds (with
the embargo beside the held-out blocks) and never on the held-out fold. Every image is predicted once,
by the model that never saw its fold; those out-of-fold predictions are scored together, with the
block-bootstrap interval over all the dataset's blocks.

Each fold's model is its *last* epoch (the recipe's fixed schedule), not the epoch that scored best on
the held-out fold, which would bias the estimate upwards. No temperature is fitted (there is no
separate calibration part), so only scores that ignore calibration are reported. Each fold is also
predicted with test-time augmentation (logits averaged over the 8 flips and quarter turns, as
``bloodcell evaluate --tta`` and ``predict --tta`` do), reported under ``tta``.

Usage::

    python benchmarks/crossval.py                                   # the default recipe, 5 folds
    python benchmarks/crossval.py --folds 5 --set augment.jpeg=0    # any recipe: --set overrides
    python benchmarks/crossval.py --members 2                       # an ensemble of 2 seeds a fold
    python benchmarks/crossval.py --data /path/to/leukemia-aria --out benchmarks/results

Results are written to ``<out>/crossval.json`` (with every session block's out-of-fold accuracy under
``blocks``, worst first, which names the sessions a recipe gets wrong) and ``<out>/predictions.csv`` (one
row an image: its path as ``bloodcell evaluate`` writes it, block, fold, true and predicted class, each
class's probability), to look at the images themselves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmark_common import add_data_and_out_options, require_dataset

from bloodcell.config import load_config, override
from bloodcell.data.prepare import prepare_data
from bloodcell.data.splits import bootstrap_blocks
from bloodcell.evaluate.metrics import classification_metrics
from bloodcell.evaluate.runner import predict_logits
from bloodcell.evaluate.tta import tta_logits
from bloodcell.io import atomic_write_json, atomic_write_text, probability_columns
from bloodcell.models import load_model
from bloodcell.probabilities import softmax_with_temperature
from bloodcell.train import fit
from bloodcell.train.checkpoint import checkpoint_dir


def run_fold(fold: int, folds: int, overrides: list[str], data: Path, work: Path, members: int = 1) -> dict[str, Any]:
    """Train the recipe without fold ``fold`` and predict that fold; returns labels, logits, blocks, timing.

    With ``members > 1`` the recipe is trained that many times, with seeds ``train.seed``, ``train.seed + 1``,
    ...; the fold's ``logits`` are then the log of the members' mean probabilities (an ensemble), and each
    member's own logits are kept under ``member_logits``.
    """
    fold_overrides = [
        *overrides, override("data.root", data), "data.protocol=kfold", f"data.folds={folds}", f"data.fold={fold}",
        "data.train_on=train", f"name=crossval-fold{fold}",
    ]  # fmt: skip
    config = load_config("default", fold_overrides)
    if config.train.early_stopping_patience:  # its "validation" is the held-out fold: it would choose on it
        raise SystemExit("crossval: train.early_stopping_patience would stop each fold on its held-out images' "
                         "scores; leave it at 0")  # fmt: skip
    prepared = prepare_data(config.data, root=data, progress=False)
    held_out = np.asarray(prepared.indices("val"))
    images = prepared.images[held_out]
    member_logits, member_tta_logits = [], []
    train_seconds = predict_seconds = 0.0
    for member in range(members):
        member_config = load_config("default", [*fold_overrides, f"train.seed={config.train.seed + member}"])
        result = fit(member_config, work / f"fold{fold}-member{member}", prepared=prepared, progress=False)
        train_seconds += result.seconds
        started = time.perf_counter()
        model, _ = load_model(checkpoint_dir(result.run_dir, "last"))
        member_logits.append(predict_logits(model, images))
        member_tta_logits.append(tta_logits(lambda views, model=model: predict_logits(model, views), images))
        predict_seconds += time.perf_counter() - started
    return {
        "fold": fold,
        "train_images": len(prepared.indices("train")),
        "held_out_images": len(held_out),
        "labels": np.asarray(prepared.labels)[held_out],
        "logits": ensemble_logits(member_logits),
        "tta_logits": ensemble_logits(member_tta_logits),
        "member_logits": member_logits,
        "blocks": prepared.split["block"].to_numpy()[held_out],
        "rows": held_out,  # in the split table, the same for every fold (the manifest's rows, in its order)
        "split": prepared.split,
        "paths": prepared.split["path"].to_numpy()[held_out],
        "classes": list(prepared.classes),
        "train_seconds": train_seconds,  # the fits alone (before the tenth session: with the prediction too)
        "predict_seconds": predict_seconds,  # the held-out fold, plain and with TTA, on the CPU
    }


def ensemble_logits(member_logits: list[np.ndarray]) -> np.ndarray:
    """Log of the members' mean softmax probabilities (one member: its logits unchanged)."""
    if len(member_logits) == 1:
        return member_logits[0]
    return np.log(np.mean([softmax_with_temperature(logits) for logits in member_logits], axis=0))


def summarise(runs: list[dict[str, Any]], overrides: list[str], n_bootstrap: int) -> dict[str, Any]:
    """Out-of-fold metrics over all folds together, and each fold's balanced accuracy; the same with TTA."""
    classes = runs[0]["classes"]
    # The bootstrap's units over all folds at once: which blocks stay apart depends on the pooled rows.
    labels, blocks = _stack(runs, "labels"), bootstrap_blocks(runs[0]["split"], _stack(runs, "rows"))
    pooled = classification_metrics(labels, softmax_with_temperature(_stack(runs, "logits")), classes, blocks, n_bootstrap=n_bootstrap)
    with_tta = classification_metrics(
        labels, softmax_with_temperature(_stack(runs, "tta_logits")), classes, blocks, n_bootstrap=n_bootstrap
    )
    per_fold = []
    for r in runs:
        per_fold.append({
            "fold": r["fold"], "train_images": r["train_images"], "held_out_images": r["held_out_images"],
            "held_out_blocks": len(np.unique(r["blocks"])), "balanced_accuracy": fold_balanced_accuracy(r),
            "tta_balanced_accuracy": fold_balanced_accuracy(r, "tta_logits"), "train_seconds": r["train_seconds"],
            "predict_seconds": r["predict_seconds"],
        })  # fmt: skip
    members = len(runs[0]["member_logits"])
    member_scores = [
        float(balanced_accuracy_score(labels, np.concatenate([r["member_logits"][m] for r in runs]).argmax(axis=1)))
        for m in range(members)
    ]
    return {
        "recipe_overrides": overrides,
        "members": members,  # models a fold; with more than one, every score below is the ensemble's
        "member_balanced_accuracy": member_scores,  # each member's own out-of-fold score (seed, seed + 1, ...)
        "folds": len(runs),
        "n_images": int(len(labels)),
        "n_blocks": int(len(np.unique(_stack(runs, "blocks")))),  # session blocks (the bootstrap joins some)
        "balanced_accuracy": pooled["balanced_accuracy"],
        "balanced_accuracy_ci": pooled["balanced_accuracy_ci"],
        "accuracy": pooled["accuracy"],
        "macro_f1": pooled["macro_f1"],
        "recall": {name: scores["recall"] for name, scores in pooled["per_class"].items()},
        "confusion_matrix": pooled["confusion_matrix"],
        "tta": {
            "views": 8,
            "balanced_accuracy": with_tta["balanced_accuracy"],
            "balanced_accuracy_ci": with_tta["balanced_accuracy_ci"],
            "recall": {name: scores["recall"] for name, scores in with_tta["per_class"].items()},
        },
        "per_fold": per_fold,
        "blocks": block_table(runs),
    }


def block_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every held-out session block's out-of-fold accuracy, worst first, with what its errors were read as.

    A block holds one class's neighbouring captures: mostly one session, sometimes two whose file numbers
    interleave (Pre-B:05). A block that is mostly wrong is a session the recipe does not carry over to; a
    few errors in many blocks are hard images inside sessions it otherwise reads.
    """
    classes = runs[0]["classes"]
    rows = []
    for run in runs:
        predicted = run["logits"].argmax(axis=1)
        for block in np.unique(run["blocks"]):
            mine = run["blocks"] == block
            labels, guesses = run["labels"][mine], predicted[mine]
            wrong = guesses[guesses != labels]
            read_as = {classes[k]: int(n) for k, n in zip(*np.unique(wrong, return_counts=True))}
            rows.append({
                "block": str(block), "fold": run["fold"], "class": classes[int(labels[0])], "images": int(mine.sum()),
                "errors": int(len(wrong)), "accuracy": float((guesses == labels).mean()), "read_as": read_as,
            })  # fmt: skip
    return sorted(rows, key=lambda row: (row["accuracy"], row["block"]))


def predictions_csv(runs: list[dict[str, Any]]) -> str:
    """One line an image: its path, block, fold, true class, out-of-fold prediction (with TTA too) and the
    probability of each class (``p_<class>``, as ``bloodcell evaluate`` writes them), so runs can be
    compared or combined image by image without training again."""
    classes = runs[0]["classes"]
    frames = []
    for run in runs:
        frame = pd.DataFrame({
            "path": run["paths"], "block": run["blocks"], "fold": run["fold"],
            "true_class": [classes[k] for k in run["labels"]],
            "predicted_class": [classes[k] for k in run["logits"].argmax(axis=1)],
            "predicted_class_tta": [classes[k] for k in run["tta_logits"].argmax(axis=1)],
        })  # fmt: skip
        probabilities = softmax_with_temperature(run["logits"])
        for k, column in enumerate(probability_columns(classes)):
            frame[column] = probabilities[:, k].round(6)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


def _stack(runs: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.concatenate([r[key] for r in runs])


def fold_balanced_accuracy(run: dict[str, Any], key: str = "logits") -> float:
    """Balanced accuracy of one fold's model on its held-out fold (``key="tta_logits"``: with TTA)."""
    return float(balanced_accuracy_score(run["labels"], run[key].argmax(axis=1)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_and_out_options(parser)
    parser.add_argument(
        "--folds", type=int, default=5, help="folds of session blocks, each held out once (default 5)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument(
        "--members", type=int, default=1,
        help="train each fold this many times (seeds train.seed, train.seed + 1, ...) and score the ensemble "
        "of their mean probabilities, next to each member alone",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="block-bootstrap resamples")
    args = parser.parse_args(argv)
    if args.folds < 2:  # each fold's model trains on the other folds: one fold leaves it nothing
        parser.error(f"--folds must be at least 2, got {args.folds}")
    if args.members < 1:
        parser.error(f"--members must be at least 1, got {args.members}")
    require_dataset(args.data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bloodcell-crossval-") as work:
        for fold in range(args.folds):
            print(f"fold {fold + 1} of {args.folds} ...", file=sys.stderr, flush=True)
            runs.append(run_fold(fold, args.folds, args.overrides, args.data, Path(work), args.members))
            print(f"  held-out balanced accuracy {fold_balanced_accuracy(runs[-1]):.4f}", file=sys.stderr, flush=True)
    summary = summarise(runs, args.overrides, args.bootstrap)
    low, high = summary["balanced_accuracy_ci"]
    print(f"out-of-fold balanced accuracy {summary['balanced_accuracy']:.4f} (95 % CI {low:.4f}-{high:.4f}) over "
          f"{summary['n_images']} images in {summary['n_blocks']} session blocks, {summary['folds']} folds")
    if summary["members"] > 1:
        print(f"ensemble of {summary['members']} models a fold; each alone: "
              + ", ".join(f"{score:.4f}" for score in summary["member_balanced_accuracy"]))  # fmt: skip
    print("per fold: " + ", ".join(f"{f['balanced_accuracy']:.4f}" for f in summary["per_fold"]))
    print("recall: " + ", ".join(f"{name} {value:.3f}" for name, value in summary["recall"].items()))
    tta = summary["tta"]
    print(f"with TTA (8 views): {tta['balanced_accuracy']:.4f} (95 % CI {tta['balanced_accuracy_ci'][0]:.4f}-"
          f"{tta['balanced_accuracy_ci'][1]:.4f}); per fold: "
          + ", ".join(f"{f['tta_balanced_accuracy']:.4f}" for f in summary["per_fold"]))  # fmt: skip
    failing = [block for block in summary["blocks"] if block["errors"]]
    print(f"session blocks with errors, worst first ({len(failing)} of {summary['n_blocks']}):")
    for block in failing:
        read_as = ", ".join(f"{name} {n}" for name, n in block["read_as"].items())
        print(f"  {block['block']} (fold {block['fold'] + 1}): {block['images'] - block['errors']} of "
              f"{block['images']} right, read as {read_as}")  # fmt: skip
    atomic_write_json(args.out / "crossval.json", summary)
    atomic_write_text(args.out / "predictions.csv", predictions_csv(runs))
    return summary


if __name__ == "__main__":
    main()
