"""The training loop, meant to be read top to bottom in one sitting (in the manner of nanoGPT).

``fit(config)`` trains one run: it prepares the data (index, split, decoded cache), builds the model and
the configured optimiser (AdamW, Adam or SGD), then for each epoch shuffles the training images, augments whole batches on the training device,
takes optimiser steps at a learning rate computed from the step number, validates, appends a row to
``history.csv`` and writes the ``best`` and ``last`` checkpoints. Lightning Fabric supplies devices, mixed
precision and distributed data parallel; everything else is plain PyTorch.

Reproducibility and resuming: every epoch reseeds torch and its data / augmentation generators from
``(seed, epoch, rank)``, the schedule is a pure function of the step (at the steps an epoch recorded in
``trainer.json``), and ``last`` holds the optimiser's
state, so a run resumed from ``last`` after Ctrl-C or a kill computes exactly what the uninterrupted run
would have computed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F

from bloodcell.config import RUNTIME_KEYS, RunConfig, config_from_dict, load_config, save_config
from bloodcell.data.augment import BatchAugment
from bloodcell.errors import UserError
from bloodcell.evaluate.metrics import balanced_accuracy
from bloodcell.io import atomic_write_text
from bloodcell.machine import torch_settings_restored
from bloodcell.models import Classifier, ModelCard
from bloodcell.models.card import save_trained_on
from bloodcell.notices import quieted
from bloodcell.train.checkpoint import (
    checkpoint_dir,
    has_resumable_checkpoint,
    holds_a_run,
    load_optimizer_state,
    load_trainer_state,
    refuse_foreign_folder,
    remove_stale_temporaries,
    remove_unfinished_checkpoints,
    save_checkpoint,
)
from bloodcell.train.progress import RunProgress, close_log, open_log
from bloodcell.train.setup import (
    architecture_kwargs,
    build_classifier,
    build_optimizer,
    class_weights,
    derive_seed,
    graph_training_forward,
    keep_freed_memory,
    learning_rate,
    make_fabric,
    release_training_graph,
    resolve_precision,
    set_threads,
)

if TYPE_CHECKING:
    from lightning_fabric import Fabric

HISTORY_COLUMNS = [
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
    "lr", "seconds", "images_per_second",
]
EVAL_BATCH = 256
# On a CUDA GPU, augment about this many pixels in one call (1,024 images of 160 px: 300 MB as float32, about
# 1 GB at the call's peak, 1.6 GB with the consistency loss's two views): see batches_augmented_together.
GPU_AUGMENT_PIXELS = 1024 * 160 * 160


class TrainingData(Protocol):
    """What training needs from the data stage (:class:`bloodcell.data.prepare.PreparedData` provides it).

    Read-only: training never replaces them, so a frozen dataclass (PreparedData) provides them too.
    """

    @property
    def images(self) -> np.ndarray: ...  # (N, H, W, 3) uint8, aligned with the split's rows

    @property
    def labels(self) -> np.ndarray: ...  # (N,) int64 class indices

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def manifest_sha256(self) -> str | None: ...

    @property
    def segmented_images(self) -> np.ndarray | None: ...  # the Segmented variant, aligned with ``images``, if any

    def indices(self, part: str) -> np.ndarray: ...


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What :func:`fit` returns (on every process; ``is_main_process`` is True on rank 0 only)."""

    run_dir: Path
    best_val_balanced_accuracy: float
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float
    stopped: str = "completed"  # "completed" or "early_stopping"
    is_main_process: bool = True
    model: torch.nn.Module | None = field(default=None, repr=False)  # the Classifier after the last epoch
    holdout: TrainResult | None = None  # a train+val refit's holdout stage (bloodcell.train.run)


@dataclass
class LoopState:
    """Everything about the loop's progress that ``last/trainer.json`` must hold to resume exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_score: tuple[float, float] = (-1.0, float("-inf"))  # (val balanced accuracy, -val loss)
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "best_score": list(self.best_score)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["best_score"] = tuple(fields.get("best_score", (-1.0, float("-inf"))))
        return cls(**fields)


@torch_settings_restored()
def fit(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    prepared: TrainingData | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one run and write its run directory.

    Parameters
    ----------
    config: the validated run configuration.
    out_dir: the run directory; default ``runs/<config.name>``. It must not hold another run unless
        ``resume`` is set.
    prepared: data from :func:`bloodcell.data.prepare.prepare_data`; prepared from ``config.data`` if None.
    epoch_callback: called as ``epoch_callback(epoch, history_row)`` after each validation, once the
        epoch's checkpoints are on disk. It may raise (Optuna prunes a trial this way); the exception
        propagates and the run can later be resumed.
    resume: continue from ``out_dir/checkpoints/last``; the run then ends exactly as the uninterrupted
        run would have.
    progress: show a progress bar (rank 0 only).

    Returns a :class:`TrainResult`. Raises :class:`TrainingDiverged` (a :class:`UserError`) if the loss
    becomes NaN, after keeping the last good checkpoint. Torch's thread count and CPU random state are as
    they were when it returns or raises: a library call must not leave the process reconfigured.
    """
    started = time.perf_counter()
    fabric = make_fabric(config.train)
    fabric.launch()
    local_processes = max(1, fabric.world_size // getattr(fabric.strategy, "num_nodes", 1))
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / config.name
    # A resumed run keeps the thread count it trained with: chosen afresh from the idle cores it could
    # differ, and a different count changes the floating-point sums (the result would not be bit-identical).
    threads = set_threads(recorded_threads(run_dir, config.train.num_threads) if resume else config.train.num_threads,
                          local_processes)  # fmt: skip
    keep_freed_memory()  # reuse freed tensor memory instead of page-faulting it back every step
    main = fabric.is_global_zero
    refused: UserError | None = None
    if main:
        try:
            if resume and not (run_dir / "config.yaml").is_file():
                raise UserError(f"{run_dir}: nothing to resume (no run was started there: no config.yaml)")
            resume = resume and has_resumable_checkpoint(run_dir)  # killed before a first epoch: start afresh
            config = _prepare_run_dir(run_dir, config, resume, prepared)
        except UserError as error:
            refused = error
    # Every rank learns that rank 0 refused the folder, and the others leave quietly: waiting at the next
    # collective, they used to die with 60 lines of "connection closed by peer" under rank 0's one line.
    if fabric.world_size > 1 and fabric.broadcast(refused is not None, src=0):
        if refused is None:
            raise SystemExit(1)
    if refused is not None:
        raise refused
    config = fabric.broadcast(config, src=0)  # rank 0 may have resolved lr=auto or read the run's config
    resume = fabric.broadcast(resume, src=0)
    log = open_log(run_dir, main)
    classifier = None
    state = LoopState()
    try:
        # ------------------------------------------------------------ data
        with fabric.rank_zero_first(), quieted(logging.getLogger("bloodcell"), when=not main):  # said by rank 0 only
            data = prepared if prepared is not None else prepare_training_data(config, progress and main)
        classes = list(data.classes)
        train_rows, val_rows = np.asarray(data.indices("train")), np.asarray(data.indices("val"))
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise UserError(f"the split has {len(train_rows)} training and {len(val_rows)} validation images: too few "
                            "images, or duplicate groups that hold most of them (see the warnings above; "
                            "bloodcell audit lists the groups)")  # fmt: skip
        check_every_class_trains(classes, np.asarray(data.labels)[train_rows])
        skipped = getattr(data, "manifest", None)
        if main and skipped is not None and skipped["rejected"].any():
            from bloodcell.data.prepare import skipped_files_note

            folder = config.data.root if config.data.root is not None else getattr(data, "root", "the dataset")
            log.warning(skipped_files_note(skipped, folder))  # into train.log; prepare_data said it on stderr
        refit = config.data.train_on == "train+val"
        if refit:  # the validation images join training; nothing is validated and the last epoch is the model
            train_rows, val_rows = np.concatenate([train_rows, val_rows]), val_rows[:0]
        split_table = getattr(data, "split", None)
        if main and split_table is not None and "sha256" in split_table:  # what evaluation must never score
            trained = split_table.iloc[train_rows]
            # A Segmented (masked) image's hash says little: unrelated masked fields hash alike.
            by_picture = "phash" in trained and config.data.variant != "Segmented"
            save_trained_on(run_dir, trained["sha256"], trained["phash"] if by_picture else ())
        # The whole training set lives in one uint8 tensor on the training device: batches are gathered by
        # index, so no DataLoader or per-image Python is involved. NHWC in memory = channels_last NCHW.
        train_images = fabric.to_device(torch.from_numpy(np.ascontiguousarray(data.images[train_rows])))
        train_labels = fabric.to_device(torch.from_numpy(np.asarray(data.labels)[train_rows]).long())
        val_images = torch.from_numpy(np.ascontiguousarray(data.images[val_rows]))
        val_labels = np.asarray(data.labels)[val_rows]
        segmented = None
        if config.data.mix_segmented > 0:
            if data.segmented_images is None:
                raise UserError("data.mix_segmented > 0 needs the dataset's Segmented variant, which was not found")
            segmented = fabric.to_device(torch.from_numpy(np.ascontiguousarray(data.segmented_images[train_rows])))

        # ------------------------------------------------------------ model, optimiser, loss
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        base_lr = float(config.optimizer.lr)  # "auto" was resolved into a number by _prepare_run_dir
        classifier = build_classifier(config, len(classes), initial_weights=not resume)
        if config.train.channels_last:
            classifier = classifier.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(classifier, config.optimizer, base_lr, fused=fabric.device.type == "cuda")
        model, optimizer = fabric.setup(classifier, optimizer)
        weights = class_weights(train_labels.cpu().numpy(), len(classes)) if config.train.class_weights else None
        criterion = torch.nn.CrossEntropyLoss(
            weight=None if weights is None else fabric.to_device(weights),
            label_smoothing=config.train.label_smoothing,
        )
        augment = BatchAugment(config.augment)
        batch_size = config.train.batch_size
        per_rank = len(train_rows) // fabric.world_size
        steps_per_epoch = max(1, per_rank // batch_size)  # drop the ragged last batch: equal steps on all ranks
        augment_group = batches_augmented_together(fabric.device, batch_size, config.data.image_size)
        total_steps = steps_per_epoch * config.train.epochs
        schedule = {"world_size": fabric.world_size, "steps_per_epoch": steps_per_epoch}

        # ------------------------------------------------------------ resume
        # What Fabric runs, which may differ from what was asked (16-mixed falls back to bf16 on a CPU), and
        # whether a loss scaler skips the steps whose gradients overflow.
        precision = str(getattr(fabric.strategy.precision, "precision", resolve_precision(config.train)))
        scaled = getattr(fabric.strategy.precision, "scaler", None) is not None
        command = _command_line(checkpoint_dir(run_dir, "last") if resume else None)
        if resume:
            try:
                state = _restore(run_dir, classifier, optimizer, data, schedule)
            except UserError:
                if not main:  # every process reads the same checkpoint and refuses it: rank 0 alone says why
                    raise SystemExit(1) from None
                raise
            log.info("resumed from %s at epoch %d", checkpoint_dir(run_dir, "last"), state.epoch)
            if main:  # a kill after the checkpoint and before the history was written: history follows last again
                _write_history(run_dir, state.history)
        else:
            log.info(
                "run %s: %s on %d %s / %d val images, %d classes, %d px, %s x%d, precision %s, threads %d",
                config.name, config.model.name, len(train_rows), config.data.train_on, len(val_rows), len(classes),
                config.data.image_size, fabric.device, fabric.world_size, precision, threads,
            )
        _record_step_graph(config, fabric, classifier, log, batch=min(batch_size, per_rank))

        # ------------------------------------------------------------ epochs
        with RunProgress(progress and main, config.train.epochs) as bar:
            for epoch in range(state.epoch + 1, config.train.epochs + 1):
                if state.stopped:
                    break
                epoch_started = time.perf_counter()
                torch.manual_seed(derive_seed(config.train.seed, epoch, fabric.global_rank))  # dropout
                order = torch.Generator().manual_seed(derive_seed(config.train.seed, epoch))  # same on all ranks
                augment_rng = torch.Generator().manual_seed(derive_seed(config.train.seed, epoch, fabric.global_rank, 1))
                permutation = torch.randperm(len(train_rows), generator=order)
                my_rows = permutation[fabric.global_rank :: fabric.world_size][: steps_per_epoch * batch_size]
                my_rows = fabric.to_device(my_rows)  # one copy an epoch: each copy from host memory stalls a GPU
                bar.start_epoch(epoch, steps_per_epoch, _format_last_val(state))

                model.train()
                loss_sum = torch.zeros((), device=fabric.device)
                correct = torch.zeros((), device=fabric.device)
                # The last step's (non-finite flag, batch index, loss, learning rate).
                pending: tuple[torch.Tensor, int, torch.Tensor, float] | None = None
                for batch_index in range(steps_per_epoch):
                    rows = my_rows[batch_index * batch_size : (batch_index + 1) * batch_size]
                    labels = train_labels[rows]
                    if batch_index % augment_group == 0:  # augment this batch and the next augment_group - 1
                        group_rows = my_rows[batch_index * batch_size : (batch_index + augment_group) * batch_size]
                        views = _augmented_views(augment, train_images, segmented, group_rows, augment_rng, config)
                    first = (batch_index % augment_group) * batch_size
                    batch_views = [view[first : first + len(rows)] for view in views]

                    lr = learning_rate(state.step, total_steps, base_lr, config.schedule)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss, logits = _training_loss(model, criterion, batch_views, labels, config)
                    fabric.backward(loss)
                    grad_norm = (
                        fabric.clip_gradients(
                            model, optimizer, max_norm=config.train.grad_clip, error_if_nonfinite=False
                        )
                        if config.train.grad_clip > 0 else None
                    )
                    # Read one step late: the host queues this step before it waits for the last one's check.
                    if pending is not None:
                        _stop_if_diverged(fabric, log, run_dir, state, epoch, *pending)
                    pending = (_non_finite(loss, grad_norm, scaled), batch_index, loss.detach(), lr)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1

                    loss_sum += loss.detach()
                    correct += (logits.argmax(dim=1) == labels).sum()
                    if progress and main:
                        done = (batch_index + 1) * len(rows) * fabric.world_size
                        bar.step(loss.detach(), done / (time.perf_counter() - epoch_started))

                if pending is None:  # steps_per_epoch is at least 1
                    raise RuntimeError(f"epoch {epoch} took no training step")
                del views, batch_views  # the last call's images: free for validation (about 1 GB on a GPU)
                _stop_if_diverged(fabric, log, run_dir, state, epoch, *pending)  # before any checkpoint
                # A step whose loss was finite can still leave weights that are not (an infinite gradient
                # without clipping): never validated, never saved.
                _stop_if_diverged(fabric, log, run_dir, state, epoch, _non_finite_weights(classifier),
                                  steps_per_epoch - 1, loss.detach(), lr)  # fmt: skip
                _sync_buffers(fabric, classifier)
                train_seconds = time.perf_counter() - epoch_started
                seen = _all_reduced(fabric, torch.tensor(float(len(my_rows)), device=fabric.device), "sum")
                row: dict[str, float] = {
                    "epoch": epoch,
                    "train_loss": _all_reduced(fabric, loss_sum, "mean") / steps_per_epoch,
                    "train_accuracy": _all_reduced(fabric, correct, "sum") / seen,
                    "lr": lr,
                    "images_per_second": seen / train_seconds,
                }

                validate = not refit and (epoch % config.train.eval_every == 0 or epoch == config.train.epochs)
                improved = refit  # a refit has no validation score: each epoch's model replaces the last
                if refit:
                    state.best_epoch = epoch
                if validate:
                    # Rank 0's numbers decide for everyone, so best/early-stopping choices can never diverge.
                    row.update(fabric.broadcast(_validate(fabric, model, val_images, val_labels), src=0))
                    if not math.isfinite(row["val_loss"]):  # the same on every rank: rank 0's numbers
                        _stop_if_diverged(fabric, log, run_dir, state, epoch, torch.tensor([0.0, 0.0, 1.0]),
                                          steps_per_epoch - 1, torch.tensor(row["val_loss"]), lr)  # fmt: skip
                    score = (row["val_balanced_accuracy"], -row["val_loss"])
                    improved = score > state.best_score
                    if improved:
                        state.best_score, state.best_epoch, state.epochs_without_improvement = score, epoch, 0
                    else:
                        state.epochs_without_improvement += 1
                    patience = config.train.early_stopping_patience
                    if patience and state.epochs_without_improvement >= patience:
                        state.stopped = "early_stopping"
                row["seconds"] = time.perf_counter() - epoch_started
                state.epoch = epoch
                state.history.append(row)

                # ------------------------------------------------ checkpoints, history, log
                if main:
                    card = _card(config, classes, data, epoch, row, {
                        "device": str(fabric.device), "processes": fabric.world_size, "threads": threads,
                        "precision": precision,
                    }, command)  # fmt: skip
                    if improved:
                        save_checkpoint(checkpoint_dir(run_dir, "best"), classifier, card)
                    save_checkpoint(
                        checkpoint_dir(run_dir, "last"), classifier, card, optimizer,
                        _trainer_json(state, config, data, schedule),
                    )
                    _write_history(run_dir, state.history)
                    log.info("epoch %s", _format_row(row) + ("  *best*" if improved else ""))
                fabric.barrier()
                bar.end_epoch(f"{row['val_balanced_accuracy']:.4f}" if validate else "-", row["train_loss"],
                              row["images_per_second"])  # fmt: skip
                if epoch_callback is not None and validate:
                    epoch_callback(epoch, dict(row))
                if state.stopped:
                    log.info("early stopping: no improvement in %d validated epochs", config.train.early_stopping_patience)

        seconds = time.perf_counter() - started
        if main and refit:
            log.info("done in %.1f s: refit on train + val for %d epochs", seconds, state.epoch)
        elif main:
            log.info(
                "done in %.1f s: best val balanced accuracy %.4f at epoch %d",
                seconds, state.best_score[0], state.best_epoch,
            )
        return TrainResult(
            run_dir=run_dir,
            best_val_balanced_accuracy=float("nan") if refit else state.best_score[0],
            best_epoch=state.best_epoch,
            history=state.history,
            seconds=seconds,
            stopped=state.stopped or "completed",
            is_main_process=main,
            model=classifier,
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM, which the CLI raises as one: the log says why it ends here
        log.warning("interrupted (Ctrl-C or SIGTERM) after epoch %d of %d", state.epoch, config.train.epochs)
        raise
    finally:
        close_log(log)
        if classifier is not None:
            release_training_graph(classifier)


# ====================================================================== the pieces of one step
def batches_augmented_together(device: torch.device, batch_size: int, image_size: int) -> int:
    """How many consecutive batches one augmentation call prepares: 1 on a CPU, more on a CUDA GPU.

    Why: on a GPU augmentation is bound by the host launching its few dozen small kernels, not by the
    pixels (an H200 took 3.4-5.5 ms for a batch of 64, and 18-19 ms for 1,024 images with one blur and one
    JPEG round trip for all: ``benchmarks/train_gpu.py``), and at batch 64 those launches cost more than
    the graphed training step. The call draws its choices from the distribution separate calls would
    (not the same random numbers): per image, and blur's sigma and JPEG's quality per batch (once for the
    call's 16 batches cross-validated 0.003 lower on an H200 in three seeds: docs/BENCHMARKS.md). On a
    CPU the arithmetic is the cost, whatever the call's size, and one batch a call keeps the random stream,
    and so the trained weights, as they always were there.
    """
    if device.type != "cuda":
        return 1
    return max(1, GPU_AUGMENT_PIXELS // (batch_size * image_size * image_size))


def _augmented_views(
    augment: BatchAugment,
    images: torch.Tensor,
    segmented: torch.Tensor | None,
    rows: torch.Tensor,
    generator: torch.Generator,
    config: RunConfig,
) -> list[torch.Tensor]:
    """The training images ``rows`` augmented: float NCHW, one view, or two with ``augment.consistency``.

    ``images`` and ``segmented`` are NHWC uint8 on the training device. With ``data.mix_segmented`` each
    image is first swapped for its Segmented (background-free) version with that probability.
    """
    batch = images[rows]
    if segmented is not None:
        use_segmented = torch.rand(len(rows), generator=generator) < config.data.mix_segmented
        batch = torch.where(use_segmented.to(batch.device).view(-1, 1, 1, 1), segmented[rows], batch)
    batch = batch.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels_last memory)
    size = config.train.batch_size  # the rows may be several batches: each draws its own per-batch choices
    if config.augment.consistency <= 0:
        return [augment(batch, generator, size)]
    geometric = augment.geometric(batch, generator)
    return [augment.colour(geometric, generator, size), augment.colour(geometric, generator, size)]


def _training_loss(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    views: list[torch.Tensor],
    labels: torch.Tensor,
    config: RunConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of a batch, given its augmented views (see :func:`_augmented_views`).

    With ``augment.consistency > 0`` the batch is seen in two colour views of one geometric view, and the
    Jensen-Shannon divergence between the two predictions is added (as in AugMix): the model is pushed to
    give the same answer whatever the stain.
    """
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    weight = config.augment.consistency
    if weight <= 0:
        logits = model(views[0].contiguous(memory_format=memory_format))
        return criterion(logits, labels), logits
    logits_both = model(torch.cat(views).contiguous(memory_format=memory_format))
    logits, logits_other = logits_both.chunk(2)
    loss = (criterion(logits, labels) + criterion(logits_other, labels)) / 2
    p, q = logits.float().softmax(dim=1), logits_other.float().softmax(dim=1)
    mixture = ((p + q) / 2).clamp_min(1e-7).log()
    js = (F.kl_div(mixture, p, reduction="batchmean") + F.kl_div(mixture, q, reduction="batchmean")) / 2
    return loss + weight * js, logits


def _record_step_graph(config: RunConfig, fabric, classifier: Classifier, log, batch: int) -> None:
    """On one CUDA GPU, replay the training forward and backward as CUDA graphs (``train.cuda_graph``).

    ``batch``: the images every step takes, the batch size or, when the training part is smaller, all of
    it (the one step of each epoch). Not with several processes (DDP's gradient hooks cannot be recorded)
    nor on the CPU (no graphs). A network that cannot be recorded trains without them, with a warning.
    """
    if not (config.train.cuda_graph and fabric.device.type == "cuda" and fabric.world_size == 1):
        return
    if any(getattr(module, "draws_on_the_host", False) for module in classifier.modules()):
        # A graph replays the branch its recording took: a module that decides on the host each step
        # (MixStyle's coin) would be frozen on or off for the whole run, silently.
        log.warning("training without CUDA graphs: the model draws random choices on the host (MixStyle)")
        return
    views = 2 if config.augment.consistency > 0 else 1
    size = config.augment.crop or config.data.image_size
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    shape = (views * batch, 3, size, size)
    try:
        graph_training_forward(classifier, shape, resolve_precision(config.train), memory_format)
    except (RuntimeError, AssertionError) as error:  # what recording raises for an unrecordable network
        log.warning("training without CUDA graphs: recording the model's step failed (%s)", error)
    else:
        log.info("training forward and backward recorded as CUDA graphs (train.cuda_graph)")


def _all_reduced(fabric: Fabric, value: torch.Tensor, op: str) -> float:
    """``value`` reduced over the processes (``op``: "sum" or "mean"), as a number."""
    # One tensor in gives one tensor out; Fabric's return type also covers the collections it accepts.
    return float(cast(torch.Tensor, fabric.all_reduce(value, reduce_op=op)))


def _sync_buffers(fabric, module: torch.nn.Module) -> None:
    """Copy rank 0's BatchNorm statistics to every rank (DDP averages gradients, not buffers)."""
    if fabric.world_size > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _non_finite(loss: torch.Tensor, grad_norm: torch.Tensor | None, scaled: bool = False) -> torch.Tensor:
    """``[loss, gradient norm, weights or validation]`` flags, 1.0 where NaN or infinite: a tensor, read later.

    Under a loss scaler (fp16) an infinite gradient norm is routine: the scaler skips that step and lowers
    its scale, so only the loss counts there.
    """
    loss_bad = (~torch.isfinite(loss.detach())).float()
    grad_bad = torch.zeros_like(loss_bad)
    if grad_norm is not None and not scaled:
        grad_bad = (~torch.isfinite(torch.as_tensor(grad_norm, device=loss_bad.device))).float()
    return torch.stack([loss_bad, grad_bad, torch.zeros_like(loss_bad)])


def _non_finite_weights(classifier: torch.nn.Module) -> torch.Tensor:
    """The flags of :func:`_non_finite` with the third set where a parameter or buffer is NaN or infinite."""
    tensors = [t for t in (*classifier.parameters(), *classifier.buffers()) if t.is_floating_point()]
    bad = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).any().float()
    return torch.stack([torch.zeros_like(bad), torch.zeros_like(bad), bad])


def _stop_if_diverged(
    fabric, log, run_dir: Path, state: LoopState, epoch: int, bad: torch.Tensor, batch_index: int,
    loss: torch.Tensor, lr: float,
) -> None:
    """Stop the run, on every rank together, if any flag of :func:`_non_finite` is set on any rank; the
    checkpoints stay as they are.

    The message says what went wrong (the loss, the gradient norm, the weights or the validation loss) and
    what to do. Not ``--resume``: a resumed run repeats the same steps exactly, and refuses a changed config.
    """
    bad = bad.to(fabric.device)
    if fabric.world_size > 1:
        bad = fabric.all_reduce(bad, reduce_op="sum")
    flags = [float(flag) > 0 for flag in bad.cpu()]
    if not any(flags):
        return
    kept = (
        f"the last good checkpoint (epoch {state.epoch}) is kept in {checkpoint_dir(run_dir, 'last')}"
        if state.epoch
        else "no checkpoint was written (it diverged in the first epoch)"
    )
    if flags[0]:
        what = f"the loss became {float(loss)} at epoch {epoch}, step {batch_index + 1}"
    elif flags[1]:
        what = f"the gradient norm became infinite or NaN at epoch {epoch}, step {batch_index + 1}"
    elif math.isfinite(float(loss)):
        what = f"the weights became infinite or NaN in epoch {epoch}"
    else:
        what = f"the validation loss became {float(loss)} after epoch {epoch}"
    message = (
        f"training diverged: {what} (learning rate {lr:.3g}); {kept}. Lower optimizer.lr, keep "
        "train.grad_clip on, or use train.precision=32-true, then start a new run."
    )
    log.error(message)
    raise TrainingDiverged(message)


@torch.no_grad()
def _validate(fabric, model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Loss, accuracy and balanced accuracy on the validation images (every rank computes the same numbers)."""
    model.eval()
    logits = []
    for start in range(0, len(images), EVAL_BATCH):
        batch = fabric.to_device(images[start : start + EVAL_BATCH]).permute(0, 3, 1, 2)
        logits.append(model(batch).float().cpu())
    all_logits = torch.cat(logits)
    targets = torch.from_numpy(labels).long()
    predictions = all_logits.argmax(dim=1).numpy()
    return {
        "val_loss": float(F.cross_entropy(all_logits, targets)),
        "val_accuracy": float((predictions == labels).mean()),
        "val_balanced_accuracy": float(balanced_accuracy(labels, predictions)),
    }


# ====================================================================== run directory and records
def prepare_training_data(config: RunConfig, progress: bool) -> TrainingData:
    """Index, split and cache the dataset named in ``config.data`` (the data stage's one-call API)."""
    from bloodcell.data.prepare import prepare_data

    if not config.data.root:
        raise UserError("no dataset given: pass --data DATA (or set data.root in the config)")
    return prepare_data(config.data, progress=progress)


def _without_passwords(command: str) -> str:
    """The command line with the password of any ``scheme://user:password@host`` URL masked (``tune
    --storage postgresql+psycopg://...`` trains its trials in-process: their cards would carry it)."""
    return re.sub(r"(\w[\w+.-]*://[^\s:/@]+:)[^\s@]+@", r"\1***@", command)


def check_every_class_trains(classes: list[str], train_labels: np.ndarray) -> None:
    """Refuse a classifier that could never predict a class (no training images of it) or has one class."""
    if len(classes) < 2:
        raise UserError(f"a classifier needs at least two classes; the dataset has {len(classes)}: {', '.join(classes)}")
    counts = np.bincount(train_labels, minlength=len(classes))
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise UserError(
            f"no training images of class {', '.join(empty)}: every class needs usable images in the training "
            "part (bloodcell index DATA shows the files found and those skipped)"
        )


def _prepare_run_dir(run_dir: Path, config: RunConfig, resume: bool, prepared: TrainingData | None) -> RunConfig:
    """Create (or, to resume, check) the run directory and write ``config.yaml``; returns the config to run."""
    if resume:
        remove_stale_temporaries(run_dir)
        return resumed_config(run_dir, config)
    if holds_a_run(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    refuse_foreign_folder(run_dir)
    # Nothing resumable (a first start, or --resume of one killed before its first epoch was complete): start
    # afresh, without what an unfinished epoch may have left.
    remove_unfinished_checkpoints(run_dir)
    remove_stale_temporaries(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # config.yaml first, as given (lr may still be "auto"): a start interrupted in the learning-rate finder
    # then leaves a run that --resume starts afresh, not a folder of finder files that a new start refuses.
    save_config(config, run_dir / "config.yaml")
    if config.optimizer.lr == "auto":
        config = _resolve_learning_rate(config, run_dir, prepared)
        save_config(config, run_dir / "config.yaml")
    return config


def _resolve_learning_rate(config: RunConfig, run_dir: Path, prepared: TrainingData | None) -> RunConfig:
    """Replace ``optimizer.lr: auto`` by the learning-rate finder's suggestion, so config.yaml is what ran.

    The range test's plot and table go to ``run_dir/lr-find``.
    """
    if config.optimizer.lr != "auto":
        return config
    from bloodcell.tune.lr_find import run_lr_find

    kwargs = {"prepared": prepared} if prepared is not None else {}
    threads = torch.get_num_threads()  # the finder sets its own; under DDP this rank's share must come back
    try:
        lr = float(run_lr_find(config, config.data.root, run_dir / "lr-find", **kwargs).suggested_lr)
    finally:
        torch.set_num_threads(threads)
    raw = config.model_dump(mode="json")
    raw["optimizer"]["lr"] = lr
    return config_from_dict(raw)


def resumed_config(run_dir: Path, config: RunConfig) -> RunConfig:
    """The config ``run_dir`` was started with (``data.root`` from ``config`` where it gives one), refusing a
    ``config`` that would change what the run computes: resumed so, the run would end as neither."""
    saved = load_config(str(run_dir / "config.yaml"))
    changed = _changed_keys(saved, config)
    if changed:
        raise UserError(
            f"cannot resume {run_dir} with a different config ({', '.join(changed)}); resume with the run's "
            "own config.yaml, or start a new run with --out"
        )
    root = config.data.root or saved.data.root
    return saved.model_copy(update={"data": saved.data.model_copy(update={"root": root})})


def _changed_keys(saved: RunConfig, given: RunConfig) -> list[str]:
    """Dotted config keys whose values differ (ignoring where and how the run executes)."""
    def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key != "kwargs":
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    a, b = flatten(saved.model_dump(mode="json")), flatten(given.model_dump(mode="json"))
    ignore = set(RUNTIME_KEYS) | ({"optimizer.lr"} if given.optimizer.lr == "auto" else set())
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k) != b.get(k))


def _recorded_runtime(last: Path) -> dict[str, Any]:
    """The ``runtime`` (device, processes, threads, precision) that a ``last`` checkpoint's card records."""
    from bloodcell.models.card import load_card

    return dict(load_card(last)[0].runtime) if (last / "card.json").is_file() else {}


def recorded_threads(run_dir: Path, requested: int) -> int:
    """The thread count the run in ``run_dir`` trained with (its ``last`` card), when ``requested`` is 0
    (automatic) and there is one; else ``requested``."""
    if requested:
        return requested
    return int(_recorded_runtime(checkpoint_dir(run_dir, "last")).get("threads", requested))


def _restore(
    run_dir: Path, classifier: torch.nn.Module, optimizer, data: TrainingData, schedule: dict[str, int]
) -> LoopState:
    """Load ``last``: model weights, optimiser state and loop state; check it was trained on the same data,
    and with the same steps an epoch (``schedule``: processes and steps per epoch)."""
    from safetensors.torch import load_file

    last = checkpoint_dir(run_dir, "last")
    trainer, tensors = load_trainer_state(last)
    saved_manifest = trainer.get("manifest_sha256")
    if saved_manifest and data.manifest_sha256 and saved_manifest != data.manifest_sha256:
        raise UserError(f"{run_dir} was trained on different data (manifest hash differs); start a new run")
    # Older checkpoints record no schedule; their card's runtime still names the number of processes.
    saved = trainer.get("schedule")
    if saved is None and (processes := _recorded_runtime(last).get("processes")):
        saved = {"world_size": int(processes)}
    if saved and any(saved[key] != schedule[key] for key in saved):  # the restored step count would sit
        raise UserError(  # elsewhere on the learning-rate curve
            f"{run_dir} was trained by {saved['world_size']} process(es) at {saved.get('steps_per_epoch', '?')} "
            f"steps an epoch; resumed by {schedule['world_size']} it would take {schedule['steps_per_epoch']}, and "
            f"the learning-rate schedule, which counts steps, would be broken. Launch the resume with "
            f"{saved['world_size']} process(es) in all (--devices, or torchrun --nproc-per-node x nodes), or start "
            "a new run"
        )
    classifier.load_state_dict(load_file(str(last / "model.safetensors"), device="cpu"))
    load_optimizer_state(optimizer, tensors, trainer["optimizer"])
    return LoopState.from_json(trainer["loop"])


def _trainer_json(state: LoopState, config: RunConfig, data: TrainingData, schedule: dict[str, int]) -> dict[str, Any]:
    """The JSON half of the resumable state (the optimiser's tensors go to ``trainer.safetensors``)."""
    return {
        "format": "bloodcell-trainer/1",
        "loop": state.to_json(),
        "manifest_sha256": data.manifest_sha256,
        "schedule": schedule,  # processes and steps an epoch: a resume must take the same steps
        # Random state is derived, not stored: epoch e reseeds torch from (seed, e, rank), so the seed and
        # the next epoch determine every random draw still to come.
        "rng": {"seed": config.train.seed, "next_epoch": state.epoch + 1, "scheme": "derive_seed(seed, epoch, rank)"},
    }


#: Between the command that started a run and the one that last resumed it, in a card's ``command``.
RESUMED_WITH = "; resumed with: "


def _command_line(last: Path | None) -> str:
    """This process's command line for the model card (passwords masked); for a resumed run, the command
    that started it first (from the ``last`` checkpoint's card), as the resume command says little alone."""
    import sys

    from bloodcell.models.card import load_card

    command = _without_passwords(" ".join(sys.argv))
    started = load_card(last)[0].command if last is not None and (last / "card.json").is_file() else None
    return f"{started.split(RESUMED_WITH)[0]}{RESUMED_WITH}{command}" if started else command


def _card(
    config: RunConfig, classes: list[str], data: TrainingData, epoch: int, row: dict[str, float],
    runtime: dict[str, Any], command: str,
) -> ModelCard:
    """The model card written beside each checkpoint's weights.

    ``runtime`` (device, processes, threads, precision) is recorded because floating-point sums depend on
    it: the same config and seed give bit-identical weights only with the same thread count, device and
    precision.
    """
    split = getattr(data, "split", None)
    counts = split["split"].value_counts().to_dict() if split is not None and "split" in split else {}
    return ModelCard(
        name=config.name,
        architecture=config.model.name,
        arch_kwargs=architecture_kwargs(config),
        classes=classes,
        input_size=int(data.images.shape[1]),
        normalize=config.normalize,
        config=config.model_dump(mode="json"),
        command=command,
        manifest_sha256=data.manifest_sha256,
        data_layout=getattr(getattr(data, "dataset", None), "layout", None),
        split={
            "protocol": config.data.protocol, "seed": config.data.split_seed, "counts": counts,
            "trained_on": config.data.train_on.split("+"),
        },
        metrics={k: row[k] for k in ("val_loss", "val_accuracy", "val_balanced_accuracy") if k in row},
        epoch=epoch,
        runtime=runtime,
    )


def _write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite ``history.csv`` atomically from the loop state (so it always matches ``last``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: _csv_value(row.get(key)) for key in HISTORY_COLUMNS})
    atomic_write_text(run_dir / "history.csv", buffer.getvalue())


def _csv_value(value: float | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _format_row(row: dict[str, float]) -> str:
    parts = [f"{int(row['epoch'])}"]
    parts += [f"{key}={row[key]:.4g}" for key in HISTORY_COLUMNS[1:] if key in row]
    return " ".join(parts)


def _format_last_val(state: LoopState) -> str:
    validated = [row for row in state.history if "val_balanced_accuracy" in row]
    return f"{validated[-1]['val_balanced_accuracy']:.4f}" if validated else "-"
