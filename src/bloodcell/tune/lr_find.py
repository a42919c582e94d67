"""The learning-rate range test (Smith 2017, "Cyclical learning rates"; popularised by fastai's lr_find).

Starting from the config's freshly initialised model, take ``num_steps`` optimiser steps on augmented
training batches while the learning rate grows exponentially from ``start_lr`` to ``end_lr``, and record
the loss. The loss is smoothed with a bias-corrected exponential moving average (the raw per-batch loss is
too noisy to read), and the sweep stops once the smoothed loss exceeds ``diverge_factor`` times its minimum.

Suggestion rules, both computed and drawn on the plot:

- ``min_loss`` (default): the learning rate at the minimum of the smoothed loss, divided by 10. At the
  minimum the loss is already about to blow up, so one decade lower is the largest rate that still trains
  stably; it is fastai's ``lr_min`` and suits the one-cycle schedule, whose peak ``optimizer.lr`` is.
- ``steepest``: where the smoothed loss falls fastest against log(lr), searched between the start of the
  sweep (after the moving average has warmed up) and the minimum. More aggressive, and noisier.

The model, optimizer (with the config's weight decay), loss (class weights, label smoothing), gradient
clipping and augmentation are built exactly as :func:`bloodcell.train.fit` builds them, from
:mod:`bloodcell.train.setup`; the consistency loss is left out (it scales the loss, not the rate), and so
are the Segmented images (``data.mix_segmented``) and mixed precision: the sweep runs in fp32.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from bloodcell.config import RunConfig
from bloodcell.errors import UserError
from bloodcell.io import atomic_write_json, atomic_write_text
from bloodcell.machine import torch_settings_restored

if TYPE_CHECKING:
    import torch

Method = Literal["min_loss", "steepest"]


@dataclass
class LRFindResult:
    """The sweep and its verdict.

    Attributes
    ----------
    lrs, losses, smoothed: per step, the learning rate, raw batch loss and smoothed loss.
    suggested_lr: the value to use (by ``method``), always inside the swept range.
    min_loss_lr: learning rate at the smoothed loss's minimum.
    steepest_lr: learning rate of steepest descent of the smoothed loss.
    method: the rule that chose ``suggested_lr``.
    diverged: True when the sweep stopped early because the loss blew up.
    start_lr, end_lr: the requested range.
    plot_path, table_path: files written (None when no ``out_dir`` was given).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    min_loss_lr: float
    steepest_lr: float
    method: Method
    diverged: bool
    start_lr: float
    end_lr: float
    plot_path: Path | None = None
    table_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_never_fell(self) -> bool:
        """The smoothed loss was lowest at the first rate: the suggestion is only the sweep's floor."""
        return int(np.argmin(self.smoothed)) == 0

    @property
    def clipped_to_the_floor(self) -> bool:
        """The rule's rate lay below the sweep (the loss fell, but its minimum came within the first decade),
        so the suggestion is the lowest rate swept, not the rule's."""
        return not self.loss_never_fell and self.suggested_lr <= float(self.lrs[0])

    def summary(self) -> dict[str, Any]:
        """The JSON object ``lr-find --json`` prints (and ``lr_find.json`` holds)."""
        return {
            "suggested_lr": self.suggested_lr,
            "method": self.method,
            "min_loss_lr": self.min_loss_lr,
            "steepest_lr": self.steepest_lr,
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "steps": len(self.lrs),
            "swept": [self.lrs[0], self.lrs[-1]],
            "diverged": self.diverged,
            "loss_never_fell": self.loss_never_fell,
            "plot": str(self.plot_path) if self.plot_path else None,
            "table": str(self.table_path) if self.table_path else None,
            **self.extra,
        }


# ------------------------------------------------------------------------------------- pure parts


def exponential_lrs(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """``num_steps`` learning rates growing geometrically from ``start_lr`` to ``end_lr``."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise UserError(f"lr-find needs finite learning rates with 0 < start lr < end lr, got {start_lr} and {end_lr}")
    if num_steps < 10:
        raise UserError("lr-find needs at least 10 steps")
    return np.geomspace(start_lr, end_lr, num_steps)


def smooth_losses(losses: list[float] | np.ndarray, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average (as Adam corrects its moments), so early values are not low."""
    smoothed = np.empty(len(losses))
    average = 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        smoothed[i] = average / (1 - beta ** (i + 1))
    return smoothed


def _check_method(method: str) -> None:
    """Refuse a method this module does not know, naming those it does (the CLI spells them with hyphens)."""
    if method not in get_args(Method):
        raise UserError(f"unknown lr-find method {method!r}; choose {' or '.join(get_args(Method))}")


def suggest_lr(
    lrs: np.ndarray, smoothed: np.ndarray, method: Method = "min_loss"
) -> tuple[float, float, float]:
    """``(suggested, min-loss lr, steepest lr)`` from a sweep; see the module docstring for the rules.

    The suggestion is clipped into ``[lrs[0], lrs[-1]]``: when the loss never fell, the smallest swept rate
    is the honest answer (and the sweep should be widened downwards).
    """
    _check_method(method)
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    lowest = int(np.argmin(smoothed))
    min_loss_lr = float(lrs[lowest])
    # The moving average needs a few steps before its slope means anything.
    skip = min(max(1, len(lrs) // 20), max(0, lowest - 1))
    slopes = np.gradient(smoothed, np.log(lrs))
    steepest = skip + int(np.argmin(slopes[skip : lowest + 1])) if lowest > skip else lowest
    steepest_lr = float(lrs[steepest])
    suggested = min_loss_lr / 10 if method == "min_loss" else steepest_lr
    return float(np.clip(suggested, lrs[0], lrs[-1])), min_loss_lr, steepest_lr


# ------------------------------------------------------------------------------------- the sweep


def _device(config: RunConfig) -> torch.device:
    """The device training would use; one device only (the sweep is short, and runs on rank 0 under DDP)."""
    import os

    import torch

    from bloodcell.train.setup import resolve_accelerator

    accelerator = resolve_accelerator(config.train)
    if accelerator in {"cuda", "gpu"} and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if accelerator == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch_settings_restored()
def lr_find(
    config: RunConfig,
    prepared: Any,
    *,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_steps: int = 200,
    method: Method = "min_loss",
    beta: float = 0.98,
    diverge_factor: float = 4.0,
) -> LRFindResult:
    """Run the range test on ``prepared``'s training part and return the sweep and the suggestion.

    Parameters
    ----------
    config: the run config (model, optimizer, loss, augmentation, batch size, seed are used).
    prepared: :class:`~bloodcell.data.prepare.PreparedData` (or anything with ``images``, ``labels``,
        ``classes`` and ``indices('train')``).
    start_lr, end_lr, num_steps: the exponential sweep.
    method: ``min_loss`` or ``steepest`` (see the module docstring).
    beta: smoothing of the moving average.
    diverge_factor: stop when the smoothed loss exceeds this multiple of its minimum.
    """
    import torch

    from bloodcell.data.augment import BatchAugment
    from bloodcell.train.loop import check_every_class_trains
    from bloodcell.train.setup import build_classifier, build_optimizer, class_weights, set_threads

    _check_method(method)  # before the sweep, not after it
    lrs = exponential_lrs(start_lr, end_lr, num_steps)
    rows = np.asarray(prepared.indices("train"))
    if len(rows) < 2:
        raise UserError("lr-find needs training images; the split has fewer than 2")
    check_every_class_trains(list(prepared.classes), np.asarray(prepared.labels)[rows])  # as train refuses
    num_classes = len(prepared.classes)
    set_threads(config.train.num_threads, 1)
    device = _device(config)
    torch.manual_seed(config.train.seed)  # the same initial weights as the training run
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = build_classifier(config, num_classes)
    # torch's stubs list device and memory_format in separate overloads of Module.to; it takes them together.
    model = model.to(device=device, memory_format=memory_format).train()  # type: ignore[call-overload]
    optimizer = build_optimizer(model, config.optimizer, float(lrs[0]))
    labels_all = torch.from_numpy(np.asarray(prepared.labels)[rows]).long()
    weights = (
        class_weights(labels_all.numpy(), num_classes).to(device) if config.train.class_weights else None
    )
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config.train.label_smoothing)
    augment = BatchAugment(config.augment)
    images_all = torch.from_numpy(np.ascontiguousarray(prepared.images[rows]))  # NHWC uint8
    batch_size = min(config.train.batch_size, len(rows))
    generator = torch.Generator().manual_seed(config.train.seed)

    losses: list[float] = []
    average, best = 0.0, math.inf
    diverged = False
    order = torch.randperm(len(rows), generator=generator)
    cursor = 0
    for lr in lrs:
        if cursor + batch_size > len(order):  # a new pass over the training set, reshuffled
            order, cursor = torch.randperm(len(rows), generator=generator), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        images = images_all[batch].to(device).permute(0, 3, 1, 2)
        labels = labels_all[batch].to(device)
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        x = augment(images, generator).contiguous(memory_format=memory_format)
        loss = criterion(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        losses.append(value)
        average = beta * average + (1 - beta) * value  # the same average as smooth_losses, kept running
        smoothed_now = average / (1 - beta ** len(losses))
        best = min(best, smoothed_now)
        if len(losses) > 10 and smoothed_now > diverge_factor * best:
            diverged = True
            break
    if len(losses) < 5:
        raise UserError(
            f"lr-find: the loss diverged within {len(losses) + 1} steps; lower --start-lr (now {start_lr:g})"
        )
    swept = lrs[: len(losses)]
    smoothed = smooth_losses(losses, beta)
    suggested, min_loss_lr, steepest_lr = suggest_lr(swept, smoothed, method)
    return LRFindResult(
        lrs=[float(v) for v in swept],
        losses=losses,
        smoothed=[float(v) for v in smoothed],
        suggested_lr=suggested,
        min_loss_lr=min_loss_lr,
        steepest_lr=steepest_lr,
        method=method,
        diverged=diverged,
        start_lr=start_lr,
        end_lr=end_lr,
        extra={"model": config.model.name, "image_size": config.data.image_size, "batch_size": batch_size},
    )


# ------------------------------------------------------------------------------------- outputs


def plot_lr_find(result: LRFindResult, target: str | Path) -> Path:
    """Loss against learning rate (log axis): raw batches faint, smoothed bold, the candidates marked."""
    from bloodcell.report.plots import new_figure, save_figure

    figure, axes = new_figure(figsize=(7, 4.5))
    axes.plot(result.lrs, result.losses, color="tab:blue", alpha=0.25, linewidth=1, label="batch loss")
    axes.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    marks = [
        (result.min_loss_lr, "tab:gray", "minimum"),
        (result.steepest_lr, "tab:orange", "steepest descent"),
        (result.suggested_lr, "tab:red", f"suggested ({result.method.replace('_', '-')})"),
    ]
    for lr, colour, name in marks:
        axes.axvline(lr, color=colour, linestyle="--", linewidth=1.2, label=f"{name}: {lr:.2g}")
    axes.set_xscale("log")
    # Keep the divergence tail from flattening the interesting part of the curve.
    # (When the loss never fell, its first value is its lowest: span the whole curve instead.)
    low, high = min(result.smoothed), max(result.smoothed) if result.loss_never_fell else result.smoothed[0]
    axes.set_ylim(low - 0.1 * abs(high - low) - 1e-3, max(high, low) + 0.6 * abs(high - low) + 1e-3)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(
        f"Learning-rate range test ({len(result.lrs)} steps{', stopped at divergence' if result.diverged else ''})"
        + ("\nthe loss never fell: widen the sweep downwards (--start-lr)" if result.loss_never_fell else "")
    )
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, target)


def save_lr_find(result: LRFindResult, out_dir: str | Path) -> LRFindResult:
    """Write ``lr_find.png``, ``lr_find.csv`` (step, lr, loss, smoothed_loss) and ``lr_find.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    for step, row in enumerate(zip(result.lrs, result.losses, result.smoothed)):
        writer.writerow([step, *(f"{v:.6g}" for v in row)])
    result.table_path = atomic_write_text(out_dir / "lr_find.csv", buffer.getvalue())
    result.plot_path = plot_lr_find(result, out_dir / "lr_find.png")
    atomic_write_json(out_dir / "lr_find.json", result.summary())
    return result


def run_lr_find(
    config: RunConfig,
    data_root: str | Path | None,
    out_dir: str | Path | None = None,
    *,
    prepared: Any = None,
    **kwargs: Any,
) -> LRFindResult:
    """Prepare the data (unless ``prepared`` is given), run :func:`lr_find`, and save the plot and table.

    ``out_dir`` defaults to ``runs/lr-find-<config name>``; ``kwargs`` go to :func:`lr_find`. This is what
    ``bloodcell lr-find`` and ``train`` with ``optimizer.lr=auto`` call.
    """
    # The sweep's range is checked before the data are indexed and decoded (seconds to minutes).
    exponential_lrs(kwargs.get("start_lr", 1e-6), kwargs.get("end_lr", 1.0), kwargs.get("num_steps", 200))
    if prepared is None:
        from bloodcell.data.prepare import prepare_data

        prepared = prepare_data(config.data, data_root)
    result = lr_find(config, prepared, **kwargs)
    return save_lr_find(result, out_dir if out_dir is not None else Path("runs") / f"lr-find-{config.name}")
