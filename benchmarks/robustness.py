"""Which training recipe learns cells rather than session colour: one table, recipes side by side.

Every recipe is trained from scratch on the training part of the ``session`` split of the real dataset
with the same seed (the holdout stage of a ``bloodcell train`` run: no refit on train + val, so the
validation part stays unseen), then its last epoch is evaluated on the validation part and on the test
part, clean and under every acquisition shift of :mod:`bloodcell.evaluate.shifts` at each severity. Recipes are chosen on the
validation columns; the test columns are the published numbers. One row per recipe: validation clean and
worst medium shift, test clean balanced accuracy, balanced accuracy under each shift at low / medium / high
severity, the worst shift at medium and at high severity, ECE after temperature scaling, and the training
wall time on this machine.

Recipes (each is the ``default`` config plus ``--set`` overrides, so any of them can be rerun with
``bloodcell train --set ...``):

- ``plain``: flips and quarter turns, light brightness / contrast / saturation jitter and fixed
  normalisation only, the usual recipe, which learns the colour of each class's imaging sessions;
- ``colour``: plain + hue, per-channel gamma and HED stain jitter (the previous default);
- ``no-jpeg``: colour + per-image colour standardisation inside the model + mild blur and noise
  augmentation (the default before JPEG augmentation);
- ``no-stain-clip``: ``no-jpeg`` + JPEG re-compression of a quarter of the training images (the default
  until the fifteenth session);
- ``default``: the shipped default config's recipe: ``no-stain-clip`` + the negative stain densities of a
  quarter of the training images clipped, as scikit-image's stain separation round trip does;
- ``grey``: the default with the colour collapsed to luminance inside the model.

Usage::

    python benchmarks/robustness.py                                    # all recipes
    python benchmarks/robustness.py --recipes plain default
    python benchmarks/robustness.py --recipes plain default --protocol random   # the leaky split, to compare
    python benchmarks/robustness.py --recipes plain --set data.embargo=0        # --set: any override, every recipe
    python benchmarks/robustness.py --data /path/to/leukemia-aria --out benchmarks/results

``--protocol random`` trains and scores the same recipes on an image-level random split instead (the
protocol of published work on this data): its test images share sessions with training images, so the
difference between the two tables is what such a split leaks.

Results are also written to ``<out>/robustness.json`` and ``<out>/robustness.md`` (``robustness-random.*``
with ``--protocol random``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmark_common import add_data_and_out_options, require_dataset  # noqa: E402

from bloodcell.config import load_config, override  # noqa: E402
from bloodcell.data.prepare import prepare_data  # noqa: E402
from bloodcell.evaluate.runner import evaluate_model  # noqa: E402
from bloodcell.io import atomic_write_json, atomic_write_text  # noqa: E402
from bloodcell.train import fit  # noqa: E402
from bloodcell.train.checkpoint import checkpoint_dir  # noqa: E402

# Each recipe switches off by name what it leaves out of the default, so each stays the recipe its
# tables measured when the default gains a step.
COLOUR = ["normalize.per_image=false", "augment.blur=0", "augment.noise=0", "augment.jpeg=0", "augment.stain_clip=0"]
PLAIN = [*COLOUR, "augment.hue=0", "augment.gamma=0", "augment.stain=0"]
RECIPES: dict[str, list[str]] = {
    "plain": PLAIN,
    "colour": COLOUR,
    "no-jpeg": ["augment.jpeg=0", "augment.stain_clip=0"],
    "no-stain-clip": ["augment.stain_clip=0"],
    "default": [],
    "grey": ["normalize.grayscale=true"],
}
# Every recipe is judged as the holdout stage is: trained on train alone, so validation stays held out.
HOLDOUT = ["data.train_on=train"]


def run_recipe(
    name: str, overrides: list[str], data: Path, epochs: int | None, work: Path, protocol: str = "session"
) -> dict[str, Any]:
    """Train one recipe on ``protocol``'s split and evaluate it clean and under every shift; returns the row."""
    if epochs is not None:
        overrides = [*overrides, f"train.epochs={epochs}"]
    config = load_config(
        "default", [*overrides, *HOLDOUT, f"data.protocol={protocol}", override("data.root", data), f"name={name}"]
    )
    prepared = prepare_data(config.data, root=data, progress=False)
    started = time.perf_counter()
    result = fit(config, work / name, prepared=prepared, progress=False)
    train_seconds = time.perf_counter() - started
    # The last epoch: the model the recipe's fixed schedule produces (as the holdout stage of `bloodcell
    # train` and crossval.py judge it). The epoch that scored best on validation would have been chosen on
    # the very images the validation columns report, and flatter them.
    last = checkpoint_dir(result.run_dir, "last")
    val_metrics = evaluate_model(
        last, data_root=data, split="val", robustness=True, explain=False, progress=False,
        prepared=prepared, update_card=False, out_dir=result.run_dir / "eval-val",
    )
    metrics = evaluate_model(
        last, data_root=data, split="test", robustness=True, explain=False, progress=False,
        prepared=prepared, out_dir=result.run_dir / "eval-test",
    )
    by_shift, worst = shift_table_row(metrics)
    val_worst = shift_table_row(val_metrics)[1]
    return {
        "recipe": name,
        "protocol": protocol,
        "overrides": overrides,
        "val_clean": val_metrics["balanced_accuracy"],
        "val_worst_medium": {"balanced_accuracy": val_worst["medium"][0], "shift": val_worst["medium"][1]},
        "clean": metrics["balanced_accuracy"],
        "clean_ci": metrics["balanced_accuracy_ci"],
        "shifts": by_shift,
        "worst_medium": {"balanced_accuracy": worst["medium"][0], "shift": worst["medium"][1]},
        "worst_high": {"balanced_accuracy": worst["high"][0], "shift": worst["high"][1]},
        "ece_after_temperature": metrics["ece_after_temperature"],
        "train_seconds": train_seconds,
        "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
    }


def shift_table_row(metrics: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, tuple[float, str]]]:
    """Balanced accuracy per shift at severities 1-3, and the worst (value, shift) at medium and high."""
    shifts = metrics["robustness"]["shifts"]
    by_shift = {
        shift: [entry["balanced_accuracy"] for entry in rows if entry["severity"] > 0] for shift, rows in shifts.items()
    }
    worst = {
        level: min(((values[index], shift) for shift, values in by_shift.items()), default=(float("nan"), ""))
        for index, level in ((1, "medium"), (2, "high"))
    }
    return by_shift, worst


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as one Markdown table: shifts as columns, 'low/medium/high' in each cell."""
    shift_names = list(rows[0]["shifts"]) if rows else []
    header = [
        "recipe", "val clean", "val worst medium", "test clean (95 % CI)", *shift_names, "worst medium", "worst high",
        "ECE (T)", "train s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        low, high = row["clean_ci"]
        cells = [
            row["recipe"],
            f"{row['val_clean']:.3f}",
            f"{row['val_worst_medium']['balanced_accuracy']:.3f} ({row['val_worst_medium']['shift']})",
            f"{row['clean']:.3f} ({low:.3f}-{high:.3f})",
            *("/".join(f"{v:.2f}" for v in row["shifts"][name]) for name in shift_names),
            f"{row['worst_medium']['balanced_accuracy']:.3f} ({row['worst_medium']['shift']})",
            f"{row['worst_high']['balanced_accuracy']:.3f} ({row['worst_high']['shift']})",
            f"{row['ece_after_temperature']:.3f}",
            f"{row['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_and_out_options(parser)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[],
        help="config override key=value added to every recipe (repeatable), e.g. data.embargo=0",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=["session", "random"], default="session",
        help="split to train and score on: session blocks (default) or an image-level random split, which leaks "
        "sessions into the test part (to measure how much)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    require_dataset(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bloodcell-robustness-") as work:
        for name in args.recipes:
            print(f"training and evaluating recipe {name!r} ...", file=sys.stderr, flush=True)
            overrides = [*RECIPES[name], *args.overrides]
            rows.append(run_recipe(name, overrides, args.data, args.epochs, Path(work), args.protocol))
            print(markdown_table(rows[-1:]), file=sys.stderr, flush=True)
    table = markdown_table(rows)
    print(f"Balanced accuracy; val = the {args.protocol} split's validation part (chooses the recipe), the rest is")
    print("its test part; shift cells are low/medium/high severity.\n")
    print(table)
    stem = "robustness" if args.protocol == "session" else f"robustness-{args.protocol}"
    atomic_write_json(args.out / f"{stem}.json", rows)
    atomic_write_text(args.out / f"{stem}.md", table)
    return rows


if __name__ == "__main__":
    main()
