"""The default training on one CUDA GPU: wall time and images per second, end to end.

Meant to be run once, as one prepared script, on a GPU machine (the training issue's GPU target: the whole
default training in under 15 seconds on an H100/H200). It measures, on the first CUDA device:

1. ``prepare``: indexing, splitting and decoding the dataset with an empty cache (a fresh temporary
   ``$BLOODCELL_HOME``, which the later parts then share);
2. ``train_run``: the default config exactly as ``bloodcell train`` trains it (holdout stage on train,
   then the refit on train + val), in this process, as the first CUDA work of the process (the device's
   name and the JPEG check wait until after it): each stage's wall time, its training images per
   second, the GPU memory allocated at most, the images one augmentation call takes, and the refit
   model's balanced accuracy on the ``session`` split's test part; then the same
   for each ``--compare`` variant (``train_run_<k>``), side by side on the same machine;
3. ``bare``: forward + backward + AdamW step of the same model on random tensors at the same batch, in
   the same precision and memory format, with and without CUDA graphs: the model's ceiling, to set the
   loop's speed against; and the augmentation's time for a batch of 64 and of 1,024 images;
4. ``cli``: the whole ``bloodcell train --data DATA`` command in a fresh process (imports, CUDA start-up,
   both stages, evaluation and the HTML report), timed from outside, with its training and evaluation
   times as the command reports them;
5. ``jpeg``: whether the JPEG augmentation ran on the GPU (nvJPEG), and how far its pixels are from libjpeg's.

With ``--profile`` it first runs a short training under the PyTorch profiler (``profile.txt``: which
operators take the host's and the GPU's time). Optionally (``--crossval``) it then runs
``benchmarks/crossval.py`` for a few recipes while time is left.

Usage::

    python benchmarks/train_gpu.py --data DATA --out DIR [--compare "train.cuda_graph=false" ...]
                                   [--crossval "" "data.image_size=224" ...]

Results go to ``<out>/train_gpu.json`` (and ``<out>/crossval-<k>/crossval.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from benchmark_common import REPO, add_data_and_out_options, bare_step_speed, require_dataset
from sklearn.metrics import balanced_accuracy_score

from bloodcell.config import load_config, override
from bloodcell.data.augment import BatchAugment, gpu_jpeg_available, jpeg_round_trip
from bloodcell.data.prepare import prepare_data
from bloodcell.evaluate.runner import predict_logits
from bloodcell.io import atomic_write_json
from bloodcell.models import Classifier, create_model
from bloodcell.train import fit, train_run
from bloodcell.train.loop import batches_augmented_together
from bloodcell.train.setup import build_optimizer, graph_training_forward, resolve_precision


def stage_speed(history: list[dict[str, float]]) -> dict[str, float]:
    """Training images per second of a stage: the median epoch after the first (warm-up) and the mean."""
    speeds = [row["images_per_second"] for row in history]
    return {
        "epochs": len(history),
        "median_images_per_second": statistics.median(speeds[1:] or speeds),
        "first_epoch_images_per_second": speeds[0],
        "train_seconds": sum(row["seconds"] for row in history),
    }


def measure_training(config, prepared, run_dir: Path) -> dict[str, Any]:
    """Both stages of ``config`` as ``bloodcell train`` runs them: times, speeds, the test score, the GPU
    memory the stages allocated at most, and the images each augmentation call takes."""
    t0 = time.perf_counter()  # before the reset: it initialises CUDA, which a cold first training must count
    torch.cuda.reset_peak_memory_stats()
    result = train_run(config, run_dir, progress=False)
    wall = time.perf_counter() - t0
    batches = batches_augmented_together(torch.device("cuda"), config.train.batch_size, config.data.image_size)
    test, labels = np.asarray(prepared.indices("test")), np.asarray(prepared.labels)
    logits = predict_logits(result.model, prepared.images[test])
    return {
        "wall_seconds": wall,
        "holdout_seconds": result.holdout.seconds,
        "refit_seconds": result.seconds,
        "holdout": stage_speed(result.holdout.history),
        "refit": stage_speed(result.history),
        "holdout_last_val_balanced_accuracy": result.holdout.history[-1]["val_balanced_accuracy"],
        "test_balanced_accuracy": float(balanced_accuracy_score(labels[test], logits.argmax(axis=1))),
        "precision": resolve_precision(config.train),
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "images_per_augmentation_call": batches * config.train.batch_size,
    }


def attempt(measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``measure(*args)``, or the error it raised, with its traceback on stderr."""
    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001 - any failure is a result to record
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def bare_speed(config, batch: int, graphed: bool, steps: int = 50) -> float:
    """Images/s of forward + backward + optimiser step on random float input, after a warm-up.

    ``graphed``: forward and backward replayed as CUDA graphs, as training does with ``train.cuda_graph``.
    """
    model = (
        Classifier(create_model(config.model.name, 4, **config.model.kwargs), config.normalize)
        .cuda()
        .to(memory_format=torch.channels_last)
    )
    optimizer = build_optimizer(model, config.optimizer, 1e-3, fused=True)  # as training on a GPU builds it
    precision = resolve_precision(config.train)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    size = config.augment.crop or config.data.image_size  # the shape training steps on
    if graphed:
        graph_training_forward(model, (batch, 3, size, size), precision, torch.channels_last)
    return bare_step_speed(model, optimizer, size, batch, steps, warm_up=10, autocast_dtype=dtype)


def augment_milliseconds(config, images: np.ndarray, batches: tuple[int, ...] = (64, 1024)) -> dict[str, float]:
    """Milliseconds the default augmentation takes for one call of each size on the GPU (median of 10).

    A call of more images than a training batch holds several batches, each drawing its own blur sigma and
    JPEG quality, as the training loop's calls on a GPU do (``batches_augmented_together``).
    """
    augment = BatchAugment(config.augment)
    generator = torch.Generator().manual_seed(0)
    timings = {}
    for batch in batches:
        x = torch.from_numpy(np.array(images[:batch])).cuda().permute(0, 3, 1, 2)
        times = []
        for _ in range(13):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            augment(x, generator, batch_size=config.train.batch_size)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        timings[str(batch)] = 1e3 * statistics.median(times[3:])
    return timings


def jpeg_check(images: np.ndarray, quality: int = 60) -> dict[str, Any]:
    """GPU codec available? Mean / max absolute pixel difference between its round trip and libjpeg's."""
    batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()  # a copy: the cache is read-only
    cpu = jpeg_round_trip(batch, quality)
    gpu = jpeg_round_trip(batch.cuda(), quality).cpu()
    difference = (gpu - cpu).abs()
    return {
        "gpu_codec": gpu_jpeg_available(),
        "mean_abs_difference": float(difference.mean()),
        "max_abs_difference": float(difference.max()),
    }


def cli_wall_seconds(data: Path, out: Path) -> dict[str, Any]:
    """Wall time of the whole ``bloodcell train`` command in a new process, and its JSON summary."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "bloodcell", "train", "--data", str(data), "--out", str(out), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or not (out / "metrics.json").is_file():  # the report step failed, or training
        return {"seconds": seconds, "error": completed.stderr[-2000:]}
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "seconds": seconds,
        "training_seconds": summary["seconds"],
        "holdout_seconds": summary["holdout_seconds"],
        "evaluation_seconds": metrics["evaluation"]["seconds"],
        "test_balanced_accuracy": metrics["balanced_accuracy"],
    }


def profile_training(data: Path, out: Path, epochs: int = 3) -> dict[str, Any]:
    """Where a step's time goes: a short holdout training under the PyTorch profiler (host and GPU).

    Writes the operators' self times, host-sorted and GPU-sorted, to ``<out>/profile.txt``.
    """
    from torch.profiler import ProfilerActivity, profile

    config = load_config("default", [override("data.root", data.resolve()), f"train.epochs={epochs}", "data.train_on=train"])
    with tempfile.TemporaryDirectory(prefix="bloodcell-profile-") as work, profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]
    ) as profiler:
        fit(config, Path(work) / "run", progress=False)
    averages = profiler.key_averages()
    tables = [averages.table(sort_by=key, row_limit=35) for key in ("self_cpu_time_total", "self_cuda_time_total")]
    (out / "profile.txt").write_text("\n\n".join(tables))
    return {"epochs": epochs, "table": str(out / "profile.txt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_and_out_options(parser)
    parser.add_argument("--crossval", nargs="*", default=[], help="recipes for crossval.py, each a space-separated "
                        "list of key=value overrides ('' is the default recipe)")  # fmt: skip
    parser.add_argument("--compare", nargs="*", default=[], help="more trainings after the default's, each a "
                        "space-separated list of key=value overrides (e.g. 'train.cuda_graph=false'; '' trains "
                        "the default again, warm)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no crossval starts")
    parser.add_argument("--no-cli", action="store_true", help="skip the whole-command measurement (part 4)")
    parser.add_argument("--profile", action="store_true", help="first profile a short training (profile.txt)")
    args = parser.parse_args()
    require_dataset(args.data)
    config = load_config("default", [override("data.root", args.data.resolve())])
    # Every variant checked before any GPU work (a GPU is lent for minutes): each is scored below on the
    # default's test images, at its size, so it must keep the default's data.* settings.
    variants = [load_config("default", [override("data.root", args.data.resolve()), *o.split()]) for o in args.compare]
    for overrides, variant in zip(args.compare, variants):
        if variant.data != config.data:
            sys.exit(f"--compare {overrides!r}: a variant must keep the default's data.* settings")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures training on a GPU")
    started = time.perf_counter()
    # torch.cuda.is_available() above asks the driver without starting CUDA; the first training must be the
    # process's first CUDA work, so the device's name is read after it.
    results: dict[str, Any] = {"torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["BLOODCELL_HOME"] = tempfile.mkdtemp(prefix="bloodcell-gpu-home-")  # an empty cache, really

    def save(key: str, value: Any) -> None:
        results[key] = value
        print(f"{key}: {value}", flush=True)
        atomic_write_json(args.out / "train_gpu.json", results)

    t0 = time.perf_counter()
    prepared = prepare_data(config.data, progress=False)
    save("prepare_seconds_cold_cache", time.perf_counter() - t0)
    if args.profile:
        save("profile", attempt(profile_training, args.data, args.out))

    with tempfile.TemporaryDirectory(prefix="bloodcell-gpu-") as work:
        # A GPU is lent for minutes: one failed measurement is recorded, and the others still run.
        save("train_run", attempt(measure_training, config, prepared, Path(work) / "run"))
        save("device", torch.cuda.get_device_name(0))
        save("jpeg", jpeg_check(prepared.images[:64]))
        for k, (overrides, variant) in enumerate(zip(args.compare, variants)):  # side by side, on the same warm machine
            measured = attempt(measure_training, variant, prepared, Path(work) / f"run-{k}")
            save(f"train_run_{k}", {"overrides": overrides, **measured})
        save("bare_images_per_second", {
            str(batch): bare_speed(config, batch, graphed=False) for batch in (config.train.batch_size, 256)
        })  # fmt: skip
        save("bare_graphed_images_per_second", {
            str(batch): bare_speed(config, batch, graphed=True) for batch in (config.train.batch_size, 256)
        })  # fmt: skip
        save("augment_milliseconds", augment_milliseconds(config, prepared.images))
        if not args.no_cli:
            save("cli", cli_wall_seconds(args.data, Path(work) / "cli"))

    for k, recipe in enumerate(args.crossval):
        if time.perf_counter() - started > args.budget:
            save(f"crossval_{k}", {"recipe": recipe, "skipped": "time budget spent"})
            continue
        t0 = time.perf_counter()
        overrides = [item for part in recipe.split() for item in ("--set", part)]
        completed = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "crossval.py"), "--data", str(args.data),
             "--out", str(args.out / f"crossval-{k}"), *overrides],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        lines = (completed.stdout if completed.returncode == 0 else completed.stderr).strip().splitlines()
        save(f"crossval_{k}", {"recipe": recipe, "seconds": time.perf_counter() - t0, "output": lines[-3:]})


if __name__ == "__main__":
    main()
