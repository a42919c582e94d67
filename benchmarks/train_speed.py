"""Training speed and time-to-accuracy on this machine.

Two measurements, printed as tables and saved as JSON (``benchmarks/results/train_speed.json``):

1. **Throughput**, training images per second for every registered model at 96, 128, 150 and 224 px:
   - ``bare``: forward + backward + optimiser step on random float tensors already in channels_last
     layout, through the same model as training (its normalisation layer included): the model's ceiling;
   - ``loop``: the real training loop (:func:`bloodcell.train.fit`, one warm-up epoch then one measured
     epoch on random uint8 images) with the default config's augmentation, gathering and checks: its
     training steps, timed as ``history.csv``'s images per second are (validation and checkpointing
     come after that window); ``loop / bare`` shows what the loop costs (target: at least 0.8);
   - ``loop, no aug``: the same with every augmentation off, separating the loop's own cost from the
     augmentation's arithmetic, which on a CPU competes with the model for the same cores;
   - the default recipe's augmentation, noise draw and standardisation layer alone, in ms a batch.
   Bare and loop alternate (bare, loop, no aug, bare), the two bare runs are averaged, and the table
   shows medians over ``--rounds`` such rounds, because these machines are shared and their speed drifts.
2. **Time to accuracy** for the default config on the ``session`` split of the real dataset: wall time
   from the start (data preparation included, cache warm) to the first epoch with validation balanced
   accuracy >= 0.99, the whole run's wall time, and the best checkpoint's balanced accuracy on the test
   part, for one or more seeds.

Usage::

    python benchmarks/train_speed.py                       # both parts
    python benchmarks/train_speed.py --skip-accuracy       # throughput only
    python benchmarks/train_speed.py --skip-speed --seeds 0 1 2
    python benchmarks/train_speed.py --models bloodnet --sizes 128 --timm resnet18
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from benchmark_common import DEFAULT_DATA, RESULTS, bare_step_speed
from rich.console import Console
from rich.table import Table

from bloodcell.config import NormalizeConfig, RunConfig, config_from_dict, load_config, override
from bloodcell.io import atomic_write_json
from bloodcell.models import Classifier, create_model, list_models
from bloodcell.train import fit
from bloodcell.train.setup import keep_freed_memory, resolve_precision, set_threads

console = Console()


# ---------------------------------------------------------------------- throughput
@dataclass
class RandomData:
    """Random uint8 images in the shape of :class:`bloodcell.data.prepare.PreparedData` (all 'train' but a few)."""

    images: np.ndarray
    labels: np.ndarray
    split: pd.DataFrame
    classes: tuple[str, ...] = ("a", "b", "c", "d")
    manifest_sha256: str | None = None
    segmented_images: np.ndarray | None = None

    def indices(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.split["split"].to_numpy() == part)


def random_data(n_train: int, size: int, n_val: int = 8) -> RandomData:
    rng = np.random.default_rng(0)
    n = n_train + n_val
    return RandomData(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        labels=np.arange(n, dtype=np.int64) % 4,  # every class among the training images, as training requires
        split=pd.DataFrame({"split": ["train"] * n_train + ["val"] * n_val}),
    )


def bare_speed(
    name: str, size: int, batch: int, steps: int, kwargs: dict, bf16: bool, normalize: NormalizeConfig | None = None
) -> float:
    """Images/s of forward + backward + AdamW step on random channels_last tensors (2 warm-up steps), in bf16
    autocast or fp32. Pass the precision and the normalisation (the model's first layer) that training
    uses, so loop and bare are compared like for like."""
    torch.manual_seed(0)
    model = Classifier(create_model(name, 4, **kwargs), normalize).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return bare_step_speed(model, optimizer, size, batch, steps, warm_up=2, autocast_dtype=torch.bfloat16 if bf16 else None)


def loop_speed(
    name: str, size: int, batch: int, steps: int, kwargs: dict, base: RunConfig, threads: int, augment: bool = True
) -> float:
    """Images/s of the real loop's second epoch (``fit`` on random images; the config's augmentation or none)."""
    raw = base.model_dump(mode="json")
    raw["model"] = {"name": name, "kwargs": kwargs}
    if not augment:
        raw["augment"] = {key: _switched_off(value) for key, value in raw["augment"].items()}
    raw["data"]["image_size"] = size
    raw["train"].update(epochs=2, batch_size=batch, num_threads=threads, early_stopping_patience=0)
    config = config_from_dict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(config, Path(tmp) / "run", prepared=random_data(steps * batch, size), progress=False)
    return result.history[-1]["images_per_second"]


def _switched_off(value):
    """An augmentation setting turned off: a switch to False, a strength to 0; ranges (JPEG quality) kept."""
    if isinstance(value, bool):
        return False
    return 0 if isinstance(value, int | float) else value


def throughput(models: list[str], sizes: list[int], batch: int, steps: int, threads: int, rounds: int) -> list[dict]:
    """Bare, loop and loop-without-augmentation speeds, in ``rounds`` rounds of (bare, loop, no aug, bare).

    Each round's ratios use that round's own bare runs (the mean of the one before and the one after), and
    the table shows the medians over rounds: a shared machine's speed drifts within seconds, so ratios
    taken side by side are what can be compared.
    """
    base = load_config("default")
    rows = []
    precision = resolve_precision(base.train)
    bf16 = precision == "bf16-mixed"
    table = Table(title=f"Training images/s (batch {batch}, {threads} thread(s), channels_last, {precision}; "
                        f"medians of {rounds} rounds)")  # fmt: skip
    for column in ("model", "size", "bare fwd+bwd", "real loop", "loop / bare", "loop, no aug", "no aug / bare"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in models:
        kwargs = dict(base.model.kwargs) if name == base.model.name else {}
        for size in sizes:
            n_steps = steps if size <= 150 else max(3, steps // 2)
            runs = []
            for _ in range(rounds):
                bare_a = bare_speed(name, size, batch, n_steps, kwargs, bf16, base.normalize)
                loop = loop_speed(name, size, batch, n_steps, kwargs, base, threads)
                plain = loop_speed(name, size, batch, n_steps, kwargs, base, threads, augment=False)
                bare_b = bare_speed(name, size, batch, n_steps, kwargs, bf16, base.normalize)
                runs.append({"bare": (bare_a + bare_b) / 2, "loop": loop, "loop_no_augment": plain,
                             "bare_runs": [bare_a, bare_b]})  # fmt: skip
            row = {"model": name, "size": size, "rounds": runs}
            for key in ("bare", "loop", "loop_no_augment"):
                row[key] = statistics.median(run[key] for run in runs)
            row["ratio"] = statistics.median(run["loop"] / run["bare"] for run in runs)
            row["ratio_no_augment"] = statistics.median(run["loop_no_augment"] / run["bare"] for run in runs)
            rows.append(row)
            table.add_row(name, str(size), f"{row['bare']:.0f}", f"{row['loop']:.0f}", f"{row['ratio']:.2f}",
                          f"{row['loop_no_augment']:.0f}", f"{row['ratio_no_augment']:.2f}")  # fmt: skip
            ratios = ", ".join(f"{run['loop'] / run['bare']:.2f}" for run in runs)
            console.print(f"  {name} {size}px: bare {row['bare']:.0f}, loop {row['loop']:.0f}, loop without "
                          f"augmentation {row['loop_no_augment']:.0f} img/s; loop / bare by round {ratios}")  # fmt: skip
    console.print(table)
    return rows


# ---------------------------------------------------------------------- augmentation libraries
def augmentation_speed(size: int, batch: int, rounds: int) -> list[dict]:
    """Images/s of comparable augmentation pipelines on a uint8 batch: why ours is plain tensor code.

    Each pipeline does flips, a small random affine (10 degrees, 10 % zoom, 5 % shift) and brightness /
    contrast / saturation jitter, returning float images: ours (per-image parameters), kornia (per-image
    parameters) and torchvision v2 (one set of parameters for the whole batch, as it works on a batch).
    """
    from bloodcell.config import AugmentConfig
    from bloodcell.data.augment import BatchAugment

    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(0)
    ours = BatchAugment(
        AugmentConfig(rot90=False, affine_degrees=10, affine_scale=0.1, affine_translate=0.05, hue=0, gamma=0, stain=0)
    )
    pipelines = {"bloodcell BatchAugment": lambda x: ours(x, generator)}
    try:
        import kornia.augmentation as K

        kornia_pipeline = torch.nn.Sequential(
            K.RandomHorizontalFlip(), K.RandomVerticalFlip(),
            K.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), p=1.0, padding_mode="reflection"),
            K.ColorJitter(0.1, 0.1, 0.1, p=1.0),
        )  # fmt: skip
        pipelines["kornia (per image)"] = lambda x: kornia_pipeline(x.float() / 255) * 255
    except ImportError:
        pass
    try:
        from torchvision.transforms import v2

        tv_pipeline = v2.Compose([
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(0.1, 0.1, 0.1), v2.ToDtype(torch.float32, scale=False),
        ])  # fmt: skip
        pipelines["torchvision v2 (per batch)"] = lambda x: tv_pipeline(x.contiguous())
    except ImportError:
        pass
    rows = []
    for name, pipeline in pipelines.items():
        pipeline(images)
        started = time.perf_counter()
        for _ in range(rounds):
            pipeline(images)
        rate = rounds * batch / (time.perf_counter() - started)
        rows.append({"pipeline": name, "size": size, "images_per_second": rate})
    table = Table(title=f"Augmentation images/s ({size} px, batch {batch})")
    table.add_column("pipeline")
    table.add_column("images/s", justify="right")
    for row in rows:
        table.add_row(row["pipeline"], f"{row['images_per_second']:.0f}")
    console.print(table)
    return rows


def default_step_costs(batch: int, rounds: int) -> list[dict]:
    """Milliseconds a batch for the pieces of the default recipe's step that are not the network, at its size.

    The default config's whole augmentation, its per-pixel noise draw alone, and the model's per-image
    standardisation layer: the numbers behind the loop / bare ratio.
    """
    from bloodcell.data.augment import BatchAugment, _pixel_noise
    from bloodcell.models.classifier import Preprocess

    base = load_config("default")
    size = base.data.image_size
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    floats = images.float()
    generator = torch.Generator().manual_seed(0)
    augment, standardise = BatchAugment(base.augment), Preprocess(base.normalize)
    pieces = {
        "augmentation (the default config's, whole)": lambda: augment(images, generator),
        "  of which the per-pixel noise draw": lambda: _pixel_noise(generator, floats.shape, floats.device),
        "per-image standardisation (the model's first layer)": lambda: standardise(floats),
    }
    rows = []
    table = Table(title=f"Default recipe, ms a batch ({size} px, batch {batch}, medians of {rounds})")
    table.add_column("piece")
    table.add_column("ms", justify="right")
    for name, piece in pieces.items():
        piece()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            piece()
            times.append((time.perf_counter() - started) * 1000)
        rows.append({"piece": name.strip(), "size": size, "batch": batch, "ms": statistics.median(times)})
        table.add_row(name, f"{rows[-1]['ms']:.1f}")
    console.print(table)
    return rows


# ---------------------------------------------------------------------- time to accuracy
def test_balanced_accuracy(run_dir: Path, prepared) -> dict:
    """Balanced accuracy and accuracy of the run's best checkpoint on the split's test part."""
    from sklearn.metrics import balanced_accuracy_score

    from bloodcell.models import load_model

    model, card = load_model(run_dir)
    rows = prepared.indices("test")
    images = torch.from_numpy(np.ascontiguousarray(prepared.images[rows])).permute(0, 3, 1, 2)
    with torch.no_grad():
        predictions = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)]).argmax(1).numpy()
    labels = prepared.labels[rows]
    return {
        "test_balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "test_accuracy": float((predictions == labels).mean()),
        "test_images": len(rows),
        "best_epoch": card.epoch,
    }


def time_to_accuracy(data_root: Path, seeds: list[int], config_name: str, overrides: list[str], target: float) -> list[dict]:
    from bloodcell.data.prepare import prepare_data

    results = []
    for seed in seeds:
        # The holdout stage (train only): time to accuracy is measured on validation, which a refit trains on.
        config = load_config(
            config_name, [override("data.root", data_root), f"train.seed={seed}", "data.train_on=train", *overrides]
        )
        prepare_data(config.data, progress=False)  # warm the cache outside the timing (a user's second run)
        reached: dict[str, float] = {}
        started = time.perf_counter()

        def note(epoch: int, row: dict, reached: dict = reached, started: float = started) -> None:
            if "at" not in reached and row["val_balanced_accuracy"] >= target:
                reached.update(at=time.perf_counter() - started, epoch=epoch)

        with tempfile.TemporaryDirectory() as tmp:
            prepared = prepare_data(config.data, progress=False)
            prepare_seconds = time.perf_counter() - started
            result = fit(config, Path(tmp) / "run", prepared=prepared, epoch_callback=note, progress=False)
            wall = time.perf_counter() - started
            scores = test_balanced_accuracy(result.run_dir, prepared)
        row = {
            "config": config_name, "overrides": overrides, "seed": seed,
            "prepare_seconds": prepare_seconds, "wall_seconds": wall,
            "seconds_to_target": reached.get("at"), "epoch_reaching_target": reached.get("epoch"),
            "best_val_balanced_accuracy": result.best_val_balanced_accuracy, "epochs": len(result.history),
            "median_images_per_second": statistics.median(r["images_per_second"] for r in result.history),
            **scores,
        }  # fmt: skip
        results.append(row)
        console.print(row)

    table = Table(title=f"Time to val balanced accuracy >= {target} ({config_name}, session split)")
    for column in ("seed", "to target (s)", "at epoch", "total wall (s)", "img/s", "best val", "test bal-acc", "test acc"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["seed"]), f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] else "not reached",
            str(r["epoch_reaching_target"] or "-"), f"{r['wall_seconds']:.0f}", f"{r['median_images_per_second']:.0f}",
            f"{r['best_val_balanced_accuracy']:.4f}", f"{r['test_balanced_accuracy']:.4f}", f"{r['test_accuracy']:.4f}",
        )  # fmt: skip
    console.print(table)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None, help="registered models (default: all)")
    parser.add_argument("--timm", nargs="*", default=[], help="timm models to add, e.g. resnet18 mobilenetv3_small_100")
    parser.add_argument("--sizes", nargs="*", type=int, default=[96, 128, 150, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (halved above 150 px)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (bare, loop, no aug, bare); medians shown")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic, as training chooses)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for part 2")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()

    threads = set_threads(args.threads, 1)
    keep_freed_memory()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    console.print(f"torch {torch.__version__}, {os.cpu_count()} cores, {threads} thread(s), load average {load}")
    report: dict = {
        "machine": {"cores": os.cpu_count(), "threads": threads, "load_average_at_start": load,
                    "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
    }  # fmt: skip
    if not args.skip_speed:
        models = args.models or [spec.name for spec in list_models()]
        models += [f"timm/{name}" for name in args.timm]
        report["augmentation"] = augmentation_speed(128, args.batch, rounds=5)
        report["default_step_costs"] = default_step_costs(args.batch, rounds=15)
        report["throughput"] = throughput(models, args.sizes, args.batch, args.steps, threads, args.rounds)
    if not args.skip_accuracy:
        if not (args.data / "Original").is_dir():
            console.print(f"[red]dataset not found at {args.data}; pass --data[/red]")
            sys.exit(2)
        report["time_to_accuracy"] = time_to_accuracy(args.data, args.seeds, args.config, args.overrides, args.target)
    if load is not None:
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    atomic_write_json(args.out, report)
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
