"""The training loop on tiny synthetic data: run directory, resume == uninterrupted, NaN stop, config errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bloodcell.config import ConfigError, RunConfig, config_from_dict, load_config, save_config
from bloodcell.data.augment import BatchAugment
from bloodcell.errors import UserError
from bloodcell.models import load_model
from bloodcell.train import TrainingDiverged, fit
from bloodcell.train.loop import HISTORY_COLUMNS
from synthetic_data import make_synthetic_data

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# Tiny but real: a narrow bloodnet on 32 px toy cells, a few steps an epoch.
TINY = {
    "name": "tiny",
    "data": {"image_size": 32},
    "model": {"name": "bloodnet", "kwargs": {"width": 0.5}},
    "augment": {"hue": 0.02, "gamma": 0.1, "stain": 0.05},
    "train": {"epochs": 3, "batch_size": 16, "seed": 3, "num_threads": 1},
}


def tiny_config(**sections) -> RunConfig:
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_data(per_class=16, size=32)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def history_without_timing(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in {"seconds", "images_per_second"}} for row in rows]


def test_training_on_crops_validates_and_saves_at_the_full_image_size(tmp_path: Path, data) -> None:
    result = fit(tiny_config(augment={"crop": 24}, train={"epochs": 1}), tmp_path / "run", prepared=data, progress=False)
    assert 0 <= result.history[-1]["val_balanced_accuracy"] <= 1
    model, card = load_model(tmp_path / "run" / "checkpoints" / "best")
    assert card.input_size == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_run_directory_holds_config_history_checkpoints_and_log(tmp_path: Path, data) -> None:
    config = tiny_config()
    result = fit(config, tmp_path / "run", prepared=data, progress=False)
    run = tmp_path / "run"

    assert result.run_dir == run and 1 <= result.best_epoch <= 3 and len(result.history) == 3
    assert load_config(str(run / "config.yaml")) == config
    with open(run / "history.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == HISTORY_COLUMNS
        rows = list(reader)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["val_balanced_accuracy"]) <= 1 and float(r["lr"]) > 0 for r in rows)

    for which in ("best", "last"):
        model, card = load_model(run / "checkpoints" / which)
        assert card.architecture == "bloodnet" and card.arch_kwargs["width"] == 0.5
        assert card.classes == list(data.classes) and card.input_size == 32
        assert card.manifest_sha256 == data.manifest_sha256 and card.config["name"] == "tiny"
        assert "val_balanced_accuracy" in card.metrics and card.versions["torch"]
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    _, best_card = load_model(run)
    assert best_card.epoch == result.best_epoch
    assert result.best_val_balanced_accuracy == pytest.approx(best_card.metrics["val_balanced_accuracy"])

    trainer = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())
    assert trainer["loop"]["epoch"] == 3 and trainer["loop"]["step"] == 3 * (len(data.indices("train")) // 16)
    assert (run / "checkpoints" / "last" / "trainer.safetensors").is_file()
    assert "epoch 3" in (run / "train.log").read_text()
    # Files get the ordinary mode a user's umask gives (not tempfile's private 0600), weights included.
    umask = os.umask(0)
    os.umask(umask)
    for path in (run / "checkpoints" / "best" / "model.safetensors", run / "history.csv"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".") or p.suffix in {".pt", ".pth", ".pkl", ".tmp"}]
    assert leftovers == [], "temporary or pickle files left in the run directory"


def test_training_learns_the_synthetic_shapes(tmp_path: Path) -> None:
    """A guard against a loop that runs but does not learn (wrong labels, broken augmentation ...)."""
    data = make_synthetic_data(per_class=48, size=32, seed=1)
    config = tiny_config(train={"epochs": 8, "batch_size": 16}, optimizer={"lr": 0.01})
    result = fit(config, tmp_path / "run", prepared=data, progress=False)
    assert result.best_val_balanced_accuracy >= 0.6  # chance is 0.25


def test_existing_run_is_not_overwritten(tmp_path: Path, data) -> None:
    fit(tiny_config(train={"epochs": 1}), tmp_path / "run", prepared=data, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        fit(tiny_config(train={"epochs": 1}), tmp_path / "run", prepared=data, progress=False)


def test_a_class_without_training_images_or_a_single_class_is_refused(tmp_path: Path, data) -> None:
    import dataclasses

    no_benign = data.split.copy()
    no_benign.loc[(data.labels == 0) & (no_benign["split"] == "train"), "split"] = "test"
    with pytest.raises(UserError, match="no training images of class Benign"):
        fit(tiny_config(train={"epochs": 1}), tmp_path / "a", prepared=dataclasses.replace(data, split=no_benign), progress=False)
    one_class = dataclasses.replace(data, classes=("Benign",), labels=np.zeros_like(data.labels))
    with pytest.raises(UserError, match="at least two classes"):
        fit(tiny_config(train={"epochs": 1}), tmp_path / "b", prepared=one_class, progress=False)


@pytest.mark.parametrize("together", [1, 2], ids=["one-batch-a-call", "two-batches-a-call"])
def test_consistency_loss_and_segmented_mixing_train(tmp_path: Path, together: int, monkeypatch) -> None:
    from bloodcell.train import loop

    monkeypatch.setattr(loop, "batches_augmented_together", lambda device, batch_size, image_size: together)
    data = make_synthetic_data(per_class=16, size=32, segmented=True)
    config = tiny_config(train={"epochs": 1}, augment={"consistency": 0.5}, data={"mix_segmented": 0.5})
    result = fit(config, tmp_path / "run", prepared=data, progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


@pytest.mark.parametrize("consistency", [0.0, 0.5], ids=["one-view", "two-views"])
def test_batches_augmented_together_are_each_step_s_own_images(
    tmp_path: Path, data, monkeypatch, consistency: float
) -> None:
    """On a GPU one augmentation call prepares several batches; each step must still get its own rows'
    images with their labels (in both views of the consistency loss), and a ragged last group its remainder."""
    from bloodcell.train import loop

    monkeypatch.setattr(loop, "batches_augmented_together", lambda device, batch_size, image_size: 3)
    calls: list[int] = []
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    augmented_views, training_loss = loop._augmented_views, loop._training_loss

    def counting_views(augment, images, segmented, rows, generator, config):
        calls.append(len(rows))
        return augmented_views(augment, images, segmented, rows, generator, config)

    def recording_loss(model, criterion, views, labels, config):
        steps.append((views[0].detach().clone(), labels.clone()))
        # With the consistency loss, both colour views are of the same images (no colour change here).
        assert all(torch.equal(view, views[0]) for view in views[1:])
        return training_loss(model, criterion, views, labels, config)

    monkeypatch.setattr(loop, "_augmented_views", counting_views)
    monkeypatch.setattr(loop, "_training_loss", recording_loss)
    # Flips and quarter turns only: each augmented image is a permutation of its source's pixels.
    geometric_only = {name: 0 for name in ("brightness", "contrast", "saturation", "hue", "gamma", "stain", "stain_clip",
                                           "blur", "noise", "jpeg")}  # fmt: skip
    fit(tiny_config(train={"epochs": 1, "batch_size": 6}, augment={**geometric_only, "consistency": consistency}),
        tmp_path / "run", prepared=data, progress=False)  # fmt: skip

    train_rows = data.indices("train")
    steps_per_epoch = len(train_rows) // 6
    assert steps_per_epoch % 3 != 0, "the test wants a ragged last group"
    assert calls == [18] * (steps_per_epoch // 3) + [6 * (steps_per_epoch % 3)]
    assert len(steps) == steps_per_epoch
    label_of = {np.sort(data.images[row], axis=None).tobytes(): int(data.labels[row]) for row in train_rows}
    seen = []
    for images, labels in steps:
        assert images.shape[0] == 6
        for image, label in zip(images, labels):
            pixels = np.sort(image.round().to(torch.uint8).numpy(), axis=None).tobytes()
            assert label_of[pixels] == int(label)
            seen.append(pixels)
    assert len(set(seen)) == len(seen)  # no image twice in an epoch


def test_the_augmentation_call_spans_batches_on_a_gpu_only() -> None:
    from bloodcell.train.loop import batches_augmented_together

    assert batches_augmented_together(torch.device("cpu"), 64, 160) == 1
    assert batches_augmented_together(torch.device("cuda"), 64, 160) == 16
    assert batches_augmented_together(torch.device("cuda"), 64, 224) == 8
    assert batches_augmented_together(torch.device("cuda"), 4096, 160) == 1


def test_segmented_mixing_without_segmented_images_is_a_user_error(tmp_path: Path, data) -> None:
    with pytest.raises(UserError, match="Segmented"):
        fit(tiny_config(data={"mix_segmented": 0.5}), tmp_path / "run", prepared=data, progress=False)


def test_auto_learning_rate_is_resolved_into_the_saved_config(tmp_path: Path, data) -> None:
    config = tiny_config(train={"epochs": 1}, optimizer={"lr": "auto"})
    fit(config, tmp_path / "run", prepared=data, progress=False)
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert isinstance(saved.optimizer.lr, float) and saved.optimizer.lr > 0
    assert (tmp_path / "run" / "lr-find" / "lr_find.png").is_file()


def test_a_start_interrupted_in_the_learning_rate_finder_resumes(tmp_path: Path, data, monkeypatch) -> None:
    """Ctrl-C while the finder writes its files: the folder holds the run's config, so --resume starts afresh."""
    import importlib

    lr_find = importlib.import_module("bloodcell.tune.lr_find")  # the module: the package re-exports a function
    real = lr_find.run_lr_find

    def interrupted(config, root, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "lr_find.csv").write_text("lr,loss\n")
        raise KeyboardInterrupt

    config = tiny_config(train={"epochs": 1}, optimizer={"lr": "auto"})
    monkeypatch.setattr(lr_find, "run_lr_find", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run", prepared=data, progress=False)
    monkeypatch.setattr(lr_find, "run_lr_find", real)
    fit(config, tmp_path / "run", prepared=data, progress=False, resume=True)
    assert isinstance(load_config(str(tmp_path / "run" / "config.yaml")).optimizer.lr, float)
    assert (tmp_path / "run" / "lr-find" / "lr_find.png").is_file()


class Interrupt(Exception):
    """Stands in for Ctrl-C (or an Optuna prune) raised from the epoch callback."""


def interrupted_then_resumed(config: RunConfig, run_dir: Path, data, after_epoch: int = 2):
    """Train until ``after_epoch``, stop as Ctrl-C would, check what ``last`` holds, then resume to the end."""

    def stop(epoch: int, row: dict) -> None:
        if epoch == after_epoch:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(config, run_dir, prepared=data, progress=False, epoch_callback=stop)
    assert json.loads((run_dir / "checkpoints/last/trainer.json").read_text())["loop"]["epoch"] == after_epoch
    trained: list[int] = []
    result = fit(config, run_dir, prepared=data, progress=False, resume=True,
                 epoch_callback=lambda epoch, row: trained.append(epoch))  # fmt: skip
    # Started from the checkpoint: a run trained again from scratch (same seed) would end with the same
    # weights too, but it would train every epoch.
    assert trained == list(range(after_epoch + 1, config.train.epochs + 1))
    assert f"at epoch {after_epoch}" in resumed_lines(run_dir)
    return result


def resumed_lines(run_dir: Path) -> str:
    """The ``resumed from <last> at epoch N`` lines of the run's log."""
    return "\n".join(line for line in (run_dir / "train.log").read_text().splitlines() if "resumed from" in line)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path, data) -> None:
    config = tiny_config(train={"epochs": 4})
    fit(config, tmp_path / "straight", prepared=data, progress=False)
    result = interrupted_then_resumed(config, tmp_path / "resumed", data)

    assert len(result.history) == 4
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{key} differs after resume"
    assert history_without_timing(tmp_path / "straight") == history_without_timing(tmp_path / "resumed")



def test_a_run_started_from_a_weights_file_resumes_without_it(tmp_path: Path, data) -> None:
    """The checkpoint replaces every weight: a resume must not need the initial file (moved, or on another
    machine) nor, for --pretrained, the internet."""
    first = tmp_path / "first"
    fit(tiny_config(train={"epochs": 1}), first, prepared=data, progress=False)
    start = tmp_path / "start.safetensors"
    shutil.copy(first / "checkpoints" / "last" / "model.safetensors", start)
    config = tiny_config(train={"epochs": 3}, model={"weights": str(start)})
    fit(config, tmp_path / "straight", prepared=data, progress=False)

    def stop(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(config, tmp_path / "resumed", prepared=data, progress=False, epoch_callback=stop)
    start.unlink()
    fit(config, tmp_path / "resumed", prepared=data, progress=False, resume=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_fused_optimizer_state_is_restored_in_its_parameters_layout() -> None:
    """Training on a GPU uses fused AdamW, which pairs weights and moments element by element in memory.

    The checkpoint stores the moments contiguous; a channels_last weight must get channels_last moments
    back, or the resumed run updates each weight with another's moments.
    """
    from bloodcell.config import OptimizerConfig
    from bloodcell.train.checkpoint import load_optimizer_state, optimizer_state_to_tensors
    from bloodcell.train.setup import build_optimizer

    def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            model(torch.ones(2, 3, 6, 6).to(memory_format=torch.channels_last)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    torch.manual_seed(0)
    straight = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(straight, OptimizerConfig(), 1e-2, fused=True)
    steps(straight, optimizer, 1)
    weights = {k: v.clone() for k, v in straight.state_dict().items()}
    tensors, meta = optimizer_state_to_tensors(optimizer)
    tensors = {k: v.clone() for k, v in tensors.items()}  # on the CPU they alias the live state
    steps(straight, optimizer, 2)

    resumed = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    resumed.load_state_dict(weights)
    resumed_optimizer = build_optimizer(resumed, OptimizerConfig(), 1e-2, fused=True)
    load_optimizer_state(resumed_optimizer, tensors, meta)
    assert resumed_optimizer.state[resumed.weight]["exp_avg"].stride() == resumed.weight.stride()
    steps(resumed, resumed_optimizer, 2)
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)

def test_a_resumed_optimizer_keeps_the_implementation_of_the_device_that_resumes() -> None:
    """A GPU checkpoint (fused AdamW) resumed on a CPU must step with the CPU's default AdamW, and back."""
    from bloodcell.config import OptimizerConfig
    from bloodcell.train.checkpoint import load_optimizer_state, optimizer_state_to_tensors
    from bloodcell.train.setup import build_optimizer

    for saved_fused, resumed_fused in ((True, False), (False, True)):
        model = torch.nn.Linear(4, 2)
        optimizer = build_optimizer(model, OptimizerConfig(), 1e-2, fused=saved_fused)
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        tensors, meta = optimizer_state_to_tensors(optimizer)
        resumed = build_optimizer(model, OptimizerConfig(), 1e-2, fused=resumed_fused)
        load_optimizer_state(resumed, {k: v.clone() for k, v in tensors.items()}, meta)
        assert all(bool(group["fused"]) == resumed_fused for group in resumed.param_groups)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path, data) -> None:
    """A real SIGKILL in a child process, then a kill in the middle of swapping in a checkpoint."""
    config = tiny_config(train={"epochs": 3})
    fit(config, tmp_path / "straight", prepared=data, progress=False)

    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from bloodcell.config import config_from_dict
        from bloodcell.train import fit
        from synthetic_data import make_synthetic_data

        def kill_after_one(epoch, row):
            os.kill(os.getpid(), signal.SIGKILL)

        config = config_from_dict({config.model_dump(mode="json")!r})
        fit(config, {str(tmp_path / "killed")!r}, prepared=make_synthetic_data(per_class=16, size=32),
            progress=False, epoch_callback=kill_after_one)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == -9, child.stderr
    # Simulate a kill between the two renames of the next checkpoint swap: only '.last.old' survives,
    # next to a half-written staging folder.
    checkpoints = tmp_path / "killed" / "checkpoints"
    os.replace(checkpoints / "last", checkpoints / ".last.old")
    (checkpoints / ".last.tmp").mkdir()
    (checkpoints / ".last.tmp" / "model.safetensors").write_bytes(b"half written")

    trained: list[int] = []
    fit(config, tmp_path / "killed", prepared=data, progress=False, resume=True,
        epoch_callback=lambda epoch, row: trained.append(epoch))  # fmt: skip
    assert trained == [2, 3]  # from epoch 1's checkpoint (recovered from '.last.old'), not from scratch
    assert "at epoch 1" in resumed_lines(tmp_path / "killed")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert history_without_timing(tmp_path / "straight") == history_without_timing(tmp_path / "killed")
    assert not (checkpoints / ".last.tmp").exists() and not (checkpoints / ".last.old").exists()


def test_a_resume_keeps_the_thread_count_it_trained_with(tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic threads are chosen from the idle cores; on resume that choice would follow the load of
    the moment, and another count changes the sums: the recorded count is used instead."""
    from bloodcell.train import loop

    asked: list[int] = []

    def set_threads(requested: int, local_processes: int) -> int:
        asked.append(requested)
        return requested or 1  # "the machine had one idle core" when the run started

    monkeypatch.setattr(loop, "set_threads", set_threads)
    interrupted_then_resumed(tiny_config(train={"num_threads": 0}), tmp_path / "run", data, after_epoch=1)
    assert asked == [0, 1]


def test_a_resume_by_another_number_of_processes_is_refused(tmp_path: Path, data) -> None:
    """Its steps an epoch would differ, and the restored step count would sit elsewhere on the schedule."""
    config = tiny_config(train={"epochs": 2})
    fit(config, tmp_path / "run", prepared=data, progress=False, epoch_callback=lambda epoch, row: None)
    trainer_file = tmp_path / "run" / "checkpoints" / "last" / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    assert trainer["schedule"]["world_size"] == 1 and trainer["schedule"]["steps_per_epoch"] > 0
    trainer["schedule"] = {"world_size": 2, "steps_per_epoch": trainer["schedule"]["steps_per_epoch"] // 2}
    trainer["loop"]["epoch"] = 1
    trainer_file.write_text(json.dumps(trainer))
    with pytest.raises(UserError, match=r"trained by 2 process\(es\).*Launch the resume with 2 process"):
        fit(config, tmp_path / "run", prepared=data, progress=False, resume=True)
    # A checkpoint from before the schedule was recorded: its card's runtime names the processes.
    del trainer["schedule"]
    trainer_file.write_text(json.dumps(trainer))
    card_file = trainer_file.parent / "card.json"
    card = json.loads(card_file.read_text())
    card["runtime"]["processes"] = 2
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"trained by 2 process\(es\) at \? steps"):
        fit(config, tmp_path / "run", prepared=data, progress=False, resume=True)


def test_resume_with_a_changed_config_is_refused_naming_the_key(tmp_path: Path, data) -> None:
    fit(tiny_config(train={"epochs": 1}), tmp_path / "run", prepared=data, progress=False)
    changed = tiny_config(train={"epochs": 1}, optimizer={"lr": 0.1})
    with pytest.raises(UserError, match="optimizer.lr"):
        fit(changed, tmp_path / "run", prepared=data, progress=False, resume=True)


def test_resume_without_a_run_says_so_and_one_killed_before_its_first_epoch_starts_afresh(tmp_path: Path, data) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        fit(tiny_config(), tmp_path / "empty", prepared=data, progress=False, resume=True)
    config = tiny_config(train={"epochs": 1})
    fit(config, tmp_path / "straight", prepared=data, progress=False)
    (tmp_path / "killed" / "checkpoints" / ".best.tmp").mkdir(parents=True)  # epoch 1 died while saving
    (tmp_path / "killed" / "config.yaml").write_text((tmp_path / "straight" / "config.yaml").read_text())
    fit(config, tmp_path / "killed", prepared=data, progress=False, resume=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not (tmp_path / "killed" / "checkpoints" / ".best.tmp").exists()


@pytest.mark.parametrize("last_step_only", [False, True], ids=["every-step-from-epoch-2", "epoch-2-last-step"])
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch, last_step_only: bool
) -> None:
    """A step's loss is checked one step late; the last step of an epoch, which has no next step, is checked
    after the loop, before the epoch's checkpoint: a NaN there must not be saved as epoch 2."""
    steps_per_epoch = len(data.indices("train")) // 16
    calls = {"n": 0}
    real_call = BatchAugment.__call__

    def poisoned(self, images, generator=None, batch_size=None):
        calls["n"] += 1
        out = real_call(self, images, generator, batch_size)
        bad = calls["n"] == 2 * steps_per_epoch if last_step_only else calls["n"] > steps_per_epoch
        return out * float("nan") if bad else out

    monkeypatch.setattr(BatchAugment, "__call__", poisoned)
    run = tmp_path / "run"
    step = steps_per_epoch if last_step_only else 1
    with pytest.raises(TrainingDiverged,
                       match=rf"loss became nan at epoch 2, step {step} .*last good checkpoint \(epoch 1\)"):
        fit(tiny_config(), run, prepared=data, progress=False)

    trainer = json.loads((run / "checkpoints/last/trainer.json").read_text())
    assert trainer["loop"]["epoch"] == 1
    weights = final_weights(run)
    assert all(torch.isfinite(t).all() for t in weights.values() if t.dtype.is_floating_point)
    assert len(history_without_timing(run)) == 1
    assert "diverged" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epoch=3", "train.epoch"),  # unknown key (typo)
        ("augment.colour=0.2", "augment.colour"),
        ("train.epochs=0", "train.epochs"),  # bad value
        ("optimizer.lr=fast", "optimizer.lr"),
        ("augment.hue=2", "augment.hue"),
        ("model.name=resnet-9000", "model.name"),
        ("augment.crop=200", "augment.crop"),  # larger than the default's 160 px images
        ("optimizer.lr=0", "optimizer.lr"),
        ("train.seed=-1", "train.seed"),
        ("data.split_seed=-1", "data.split_seed"),
        ("data.fold=5", "data.fold"),  # of the default 5 folds, 0..4
        ("model.kwargs.widht=2", "widht"),  # a misspelled network argument, found before any work
        ("model.kwargs.width=wide", "model.kwargs"),
        ("train.devices=0", "train.devices"),
        ("train.devices=-1", "train.devices"),
        ("optimizer.lr=.inf", "optimizer.lr"),  # passed, and diverged at the first step
        ("optimizer.lr=1e39", "optimizer.lr"),  # passed, and Adam overflowed with a traceback
        ("normalize.std=[0, 0.25, 0.25]", "normalize.std"),  # divided by zero: "diverged, lower the lr"
        ("normalize.mean=[.nan, 0.5, 0.5]", "normalize.mean"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("default", [override])


def test_a_mapping_for_a_section_updates_it_and_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """``--set augment={hue: 0.05}`` set blur, JPEG, noise and the stain clip to 0 without a word; a second
    ``train:`` section in a file silently dropped the first."""
    config = load_config("default", ["augment={hue: 0.05}"])
    default = load_config("default").augment
    assert config.augment.hue == 0.05 and config.augment.blur == default.blur > 0 and config.augment.jpeg == default.jpeg
    assert load_config("default", ["normalize={grayscale: true}"]).normalize.per_image is True
    assert load_config("default", ["model.kwargs={width: 1.5}"]).model.kwargs == {"width": 1.5}  # deeper: replaced
    path = tmp_path / "twice.yaml"
    path.write_text("train: {epochs: 30}\noptimizer: {lr: 0.001}\ntrain: {batch_size: 32}\n")
    with pytest.raises(ConfigError, match=r"found the key 'train' twice"):
        load_config(str(path))
    merged = tmp_path / "merged.yaml"  # a YAML merge key is not a key given twice
    merged.write_text("augment: {<<: {flip: false, hue: 0.01}, hue: 0.05}\n")
    assert (load_config(str(merged)).augment.flip, load_config(str(merged)).augment.hue) == (False, 0.05)
    nested = tmp_path / "nested.yaml"  # an anchored mapping with its own merge, met again through an alias
    nested.write_text("model: {kwargs: {}}\naugment: {<<: &m {<<: {flip: false, hue: 0.01}, hue: 0.02}, rot90: false}\n"
                      "train: {seed: 3}\nnormalize: {<<: {per_image: true}}\ndata: {root: null}\nschedule: {<<: {}}\n"
                      "optimizer: {<<: {lr: 0.001}}\n")  # fmt: skip
    assert load_config(str(nested)).augment.hue == 0.02
    from bloodcell.config import _load_yaml

    aliased = _load_yaml("d: &d {flip: false, hue: 0.01}\na: {<<: &m {<<: *d, hue: 0.02}, flip: true}\nx: *m\n")
    assert aliased["x"] == {"flip": False, "hue": 0.02}
    with pytest.raises(ConfigError, match="model.kwargs"):
        load_config("default", ["model.kwargs={[1]: 2}"])


def test_a_timm_network_s_misspelt_argument_is_refused_with_the_config() -> None:
    """It was a 22-frame TypeError once the data were prepared and the run folder made."""
    with pytest.raises(ConfigError, match=r"model\.kwargs \{'drop_rat': 0\.1\} do not fit timm/resnet18"):
        load_config("default", ["model.name=timm/resnet18", "model.kwargs={drop_rat: 0.1}"])
    assert load_config("default", ["model.name=timm/resnet18", "model.kwargs={drop_rate: 0.1}"]).model.kwargs == {"drop_rate": 0.1}


def test_a_misspelt_key_is_answered_with_the_near_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"):
        load_config("default", ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'trian' \(did you mean 'train'\?\)"):
        load_config("default", ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.zzz'") as raised:  # nothing near: no guess
        load_config("default", ["data.zzz=1"])
    assert "did you mean" not in str(raised.value)


def test_numbers_in_exponent_form_are_numbers_even_where_the_config_is_untyped(tmp_path: Path) -> None:
    """PyYAML reads YAML 1.1, where 1e-1 (no dot) is a string; model.kwargs has no type to convert it."""
    assert load_config("default", ["model.kwargs.dropout=1e-1"]).model.kwargs == {"dropout": 0.1}
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  kwargs: {dropout: 2e-1}\noptimizer:\n  lr: 5e-4\n")
    config = load_config(str(path))
    assert config.model.kwargs == {"dropout": 0.2} and config.optimizer.lr == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("override", "value"),
    [("train.seed=010", 10), ("data.split_seed=010", 10), ("train.epochs=012", 12), ("train.epochs=0o10", 8),
     ("train.epochs=0x10", 16), ("train.epochs=1e1", 10), ("train.epochs=1_000", 1000)],
)  # fmt: skip
def test_integers_are_read_by_yaml_1_2_rules(override: str, value: int) -> None:
    """YAML 1.1 read `010` as octal 8 (another split, without a word) and `1:30` as 90 in base 60."""
    key = override.split("=")[0].split(".")
    assert getattr(getattr(load_config("default", [override]), key[0]), key[1]) == value


@pytest.mark.parametrize("override", ["train.epochs=1:30", "train.epochs=true", "train.devices=yes",
                                      "data.split_seed=false", "augment.blur=true", "augment.jpeg_quality=[true, 95]"])  # fmt: skip
def test_a_boolean_or_a_base_60_number_is_refused_where_a_number_is_taken(override: str, tmp_path: Path) -> None:
    """pydantic reads True as 1: `train.epochs=true` trained one epoch."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("default", [override])
    section, field = key.split(".")
    path = tmp_path / "mine.yaml"
    path.write_text(f"{section}:\n  {field}: {override.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(path))


def test_a_key_that_takes_text_keeps_the_text_as_typed(tmp_path: Path) -> None:
    """`--set name=2024` was refused as not a string, `description=yes` as True, and numbered class folders
    (`[0, 1]`, `[01, 02]`) could not be named at all."""
    config = load_config("default", ["name=2024", "description=yes", "data.class_names=[0, 01, 2024-01-01, x]",
                                     "data.root=010"])  # fmt: skip
    assert (config.name, config.description, config.data.root) == ("2024", "yes", "010")
    assert config.data.class_names == ["0", "01", "2024-01-01", "x"]
    assert load_config("default", ["data={class_names: [01, 02]}"]).data.class_names == ["01", "02"]
    assert load_config("default", ["data.root=null"]).data.root is None  # null is still no value
    path = tmp_path / "mine.yaml"
    path.write_text("name: 1.10\ndescription: off\ndata: {<<: {class_names: [01, 02]}, root: 2024}\n")
    config = load_config(str(path))
    assert (config.name, config.description, config.data.root, config.data.class_names) == ("1.10", "off", "2024", ["01", "02"])
    save_config(config, tmp_path / "again.yaml")
    assert load_config(str(tmp_path / "again.yaml")) == config


@pytest.mark.parametrize("value", ["/lab\x7fdata", "/a\x85b", "/donn\udce9es", "/x \U0001f52c #y: z", "C:\\Users\\me"])
def test_an_override_sets_a_path_exactly_whatever_characters_it_holds(value: str) -> None:
    """DEL and C1 controls, which YAML refuses raw; a lone surrogate (an undecodable file name); a comment
    and a mapping in the name; Windows backslashes: each reaches the config as it was."""
    from bloodcell.config import apply_overrides, override

    assert apply_overrides({"data": {"root": None}}, [override("data.root", Path(value))])["data"]["root"] == value


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"train: [\n", "not valid YAML"), ("train: {epochs: 3}  # caf\xe9\n".encode("latin-1"), "not UTF-8"), (None, "is a folder")],
    ids=["broken-yaml", "latin-1", "folder"],
)
def test_an_unreadable_config_file_is_one_clear_error(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as raised:
        load_config(str(path))
    assert str(path) in str(raised.value)


def test_a_named_config_is_not_shadowed_by_a_folder_of_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from `runs/`, the README's `runs/default` folder must not hide the shipped `default` config."""
    (tmp_path / "default").mkdir()
    (tmp_path / "seed-replica").write_text("train: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("default").name == "default" and load_config("seed-replica").name == "seed-replica"
    assert load_config("./seed-replica").train.epochs == 1  # a path is still a path


@pytest.mark.parametrize("name", ["./default", "configs/default", "default.yaml"])
def test_a_config_path_that_is_missing_is_not_taken_for_the_shipped_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"config file not found: {re.escape(name)}$"):
        load_config(name)


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``bloodcell ARGS`` in this process through the real entry point; returns (exit code, out, err)."""
    from bloodcell.cli import main

    monkeypatch.setattr(sys, "argv", ["bloodcell", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_cli_refuses_a_missing_dataset_or_a_foreign_out_folder_before_any_work(tmp_path: Path, aria_dataset: Path,
                                                                             monkeypatch, capsys) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--data", "nope"], monkeypatch, capsys)
    assert code == 2 and "dataset folder not found: nope" in err and not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["train", "--data", "empty", "--out", "r"], monkeypatch, capsys)
    assert code == 2 and "dataset folder is empty" in err and not (tmp_path / "r").exists()
    # --out naming a folder of other files would scatter the run among them.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for stages in ([], ["--set", "data.train_on=train"]):  # with the refit's holdout stage, and without
        code, _, err = run_cli(["train", "--data", str(aria_dataset), "--out", "notes", *stages], monkeypatch, capsys)
        assert code == 2 and "not a run; give a new or empty folder" in err
        assert not (tmp_path / "notes" / "config.yaml").exists()


@pytest.mark.parametrize("out", ["aria", "aria/Original/myrun", "."], ids=["the-dataset", "inside-it", "around-it"])
def test_a_run_folder_inside_the_dataset_or_around_it_is_refused(tmp_path: Path, aria_dataset: Path, out: str,
                                                                 monkeypatch, capsys) -> None:  # fmt: skip
    """Its files (report images) became a class of the next run on the dataset."""
    monkeypatch.chdir(aria_dataset.parent)
    code, _, err = run_cli(["train", "--data", "aria", "--out", out], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "give a run folder outside it" in err
    assert not (aria_dataset / "Original" / "myrun").exists() and not (aria_dataset.parent / "config.yaml").exists()


@pytest.mark.parametrize("command", [["train"], ["lr-find"], ["tune", "--trials", "2"]])
def test_a_dataset_given_without_data_is_answered_with_the_option(command: list[str], tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:  # fmt: skip
    code, _, err = run_cli([*command, "mydata"], monkeypatch, capsys)
    assert code == 2 and "pass the dataset as --data mydata" in err
    code, out, _ = run_cli([*command[:1], "--help"], monkeypatch, capsys)
    assert code == 0 and "DATA]" not in out.split("\n", 3)[1]  # no positional argument in the usage line


def test_a_config_that_names_its_dataset_needs_no_data_option(tmp_path: Path, aria_dataset: Path, monkeypatch,
                                                               capsys) -> None:  # fmt: skip
    """data.root in a YAML config is the dataset, relative to where the command runs, recorded resolved."""
    monkeypatch.chdir(aria_dataset.parent)
    config = tmp_path / "mine.yaml"
    config.write_text(f"name: mine\ndata:\n  root: {aria_dataset.name}\n  image_size: 32\n"
                      "  block_size: 6\n  embargo: 1\n  train_on: train\nmodel:\n  kwargs: {width: 0.5}\n"
                      "train:\n  epochs: 1\n")  # fmt: skip
    code, out, err = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-report",
                              "--no-progress", "--json"], monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["root"]
    assert Path(recorded) == aria_dataset.resolve()
    config.write_text("name: rootless\n")
    code, _, err = run_cli(["train", "--config", str(config)], monkeypatch, capsys)
    assert code == 2 and "set data.root in the config" in err


def test_a_folder_of_hidden_files_or_a_failed_start_may_hold_a_new_run(tmp_path: Path) -> None:
    from bloodcell.train.checkpoint import refuse_foreign_folder

    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".DS_Store").write_bytes(b"")
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "config.yaml").write_text("name: default\n")  # what a failed start leaves
    (tmp_path / "failed" / "holdout").mkdir()
    for folder in ("fresh", "failed", "not-yet-made"):
        refuse_foreign_folder(tmp_path / folder)


def test_another_tool_s_folder_with_a_config_and_checkpoints_is_never_overwritten(tmp_path: Path, data) -> None:
    """A config.yaml that is no run config does not make a folder ours: training there replaced the file and
    deleted its checkpoints/ folder."""
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text("lr: 0.1\n")
    (other / "checkpoints" / "model_epoch50.pt").write_text("precious")
    with pytest.raises(UserError, match=r"not a run \(its config.yaml is no bloodcell run's\)"):
        fit(tiny_config(train={"epochs": 1}), other, prepared=data, progress=False)
    # A failed start of ours (config.yaml, no epoch) whose checkpoints/ holds what no run writes: refused too.
    (other / "config.yaml").write_text("name: default\n")
    with pytest.raises(UserError, match=r"checkpoints/ holds files that are not a run's \(model_epoch50.pt\)"):
        fit(tiny_config(train={"epochs": 1}), other, prepared=data, progress=False)
    assert (other / "checkpoints" / "model_epoch50.pt").read_text() == "precious"
    # Hidden files beside an unfinished epoch's checkpoints (Finder's, NFS's) do not make them someone else's.
    (other / "checkpoints" / "model_epoch50.pt").unlink()
    (other / "checkpoints" / ".DS_Store").write_text("")
    (other / "checkpoints" / "best").mkdir()
    fit(tiny_config(train={"epochs": 1}), other, prepared=data, progress=False)


def test_a_resume_removes_the_temporary_files_a_killed_run_left(tmp_path: Path, data) -> None:
    run = tmp_path / "run"
    fit(tiny_config(train={"epochs": 1}), run, prepared=data, progress=False)
    stale = [run / ".trained-on.sha256.1p_qfx_v.sha256", run / ".history.csv.abcd_123.csv"]
    kept = [run / ".notes.txt", run / ".gitkeep",  # not ours: hidden files of the user's stay, backups too
            run / ".config.yaml.original", run / ".history.csv.20240612", run / ".train.log.backup_1"]  # fmt: skip
    for path in stale + kept:
        path.write_text("x")
    fit(tiny_config(train={"epochs": 1}), run, prepared=data, progress=False, resume=True)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_a_run_killed_inside_a_checkpoint_swap_is_still_seen_as_complete(tmp_path: Path, data) -> None:
    """A kill between the swap's two renames leaves only ``.last.old``: resuming puts it back, and so must
    the check that tells a finished run ("already complete") from one to continue."""
    from bloodcell.train.checkpoint import completed_epochs, is_complete, saved_history

    run = tmp_path / "run"
    fit(tiny_config(train={"epochs": 1}), run, prepared=data, progress=False)
    (run / "checkpoints" / "last").rename(run / "checkpoints" / ".last.old")
    assert completed_epochs(run) == (1, None) and is_complete(run, 1) and len(saved_history(run)) == 1


def test_a_resumed_run_s_card_keeps_the_command_that_started_it(tmp_path: Path, data, monkeypatch) -> None:
    import sys

    from bloodcell.models.card import load_card

    def stop_at(last: int) -> Callable[[int, dict[str, float]], None]:
        def stop(epoch: int, row: dict[str, float]) -> None:
            if epoch == last:
                raise KeyboardInterrupt
        return stop

    run, config = tmp_path / "run", tiny_config(train={"epochs": 3})
    monkeypatch.setattr(sys, "argv", ["bloodcell", "train", "--set", "train.epochs=3"])
    with pytest.raises(KeyboardInterrupt):
        fit(config, run, prepared=data, progress=False, epoch_callback=stop_at(1))
    monkeypatch.setattr(sys, "argv", ["bloodcell", "train", "--resume", "run"])
    with pytest.raises(KeyboardInterrupt):
        fit(config, run, prepared=data, progress=False, resume=True, epoch_callback=stop_at(2))
    monkeypatch.setattr(sys, "argv", ["bloodcell", "train", "--resume", "run", "--no-report"])
    fit(config, run, prepared=data, progress=False, resume=True)  # twice resumed: the first command kept once
    assert load_card(run / "checkpoints" / "last")[0].command == (
        "bloodcell train --set train.epochs=3; resumed with: bloodcell train --resume run --no-report")


def test_the_card_records_the_layout_the_training_images_were_found_in(tmp_path: Path, aria_dataset: Path) -> None:
    """The report cites Aria et al.'s dataset by it, wherever the training folder is later."""
    from bloodcell.data.prepare import prepare_data
    from bloodcell.models.card import load_card

    config = tiny_config(data={"root": str(aria_dataset), "block_size": 6, "embargo": 1}, train={"epochs": 1})
    fit(config, tmp_path / "run", prepared=prepare_data(config.data, progress=False), progress=False)
    assert load_card(tmp_path / "run" / "checkpoints" / "last")[0].data_layout == "aria"


def test_cli_rejects_a_bad_key_with_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--set", "train.epoch=3"], monkeypatch, capsys)
    assert code == 2
    assert "train.epoch" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_card_records_the_command_without_url_passwords() -> None:
    from bloodcell.train.loop import _without_passwords

    command = "bloodcell tune --storage postgresql+psycopg://alice:s3cr3t@db:5432/optuna --trials 5"
    assert _without_passwords(command) == "bloodcell tune --storage postgresql+psycopg://alice:***@db:5432/optuna --trials 5"
    assert _without_passwords("bloodcell train --data /x --set optimizer.lr=1e-3") == "bloodcell train --data /x --set optimizer.lr=1e-3"


def test_shipped_configs_load() -> None:
    default, seed = load_config("default"), load_config("seed-replica")
    assert default.model.name == "bloodnet"
    assert seed.model.name == "seed-cnn" and seed.data.image_size == 150
    assert seed.optimizer.name == "adam" and seed.optimizer.lr == pytest.approx(1e-4)
    colour = ("brightness", "contrast", "saturation", "hue", "gamma", "stain", "blur", "noise", "jpeg")
    assert all(getattr(seed.augment, name) == 0 for name in colour), seed.augment  # Keras-style: no colour changes


@pytest.mark.parametrize("name", ["default", "seed-replica"])
def test_shipped_configs_train_one_epoch(tmp_path: Path, name: str) -> None:
    config = load_config(name, ["train.epochs=1", "train.batch_size=16", "data.image_size=48"])
    result = fit(config, tmp_path / "run", prepared=make_synthetic_data(per_class=8, size=48), progress=False)
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_log_names_the_data_folder_of_skipped_files_when_the_config_names_none(tmp_path: Path, data) -> None:
    """Data prepared with ``prepare_data(config.data, root=FOLDER)`` leaves ``data.root`` unset: the log
    names the data's own folder, not "files in None"."""
    import dataclasses

    import pandas as pd

    prepared = dataclasses.replace(data)
    prepared.root = tmp_path / "cells"  # what PreparedData carries beside its manifest
    prepared.manifest = pd.DataFrame({"path": ["notes.txt"], "rejected": [True], "reason": ["not an image file"]})
    fit(tiny_config(train={"epochs": 1}), tmp_path / "run", prepared=prepared, progress=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"files in {tmp_path / 'cells'} are skipped" in log and "None" not in log


def test_cli_trains_on_a_dataset_folder(tmp_path: Path, aria_dataset: Path, monkeypatch, capsys) -> None:
    """End to end through the data stage: index, split, cache, train, run directory; a corrupt file is
    skipped and named in the run's log. The folder's name holds what YAML would read as a comment (" #")
    and a mapping (": "): the path must reach the config whole."""
    import shutil

    dataset = tmp_path / "lab data #2: aria \U0001f52c\x7f"  # and DEL, which YAML refuses unescaped
    shutil.move(aria_dataset, dataset)
    (dataset / "Original" / "Pro" / "WBC-Malignant-Pro-999.jpg").write_bytes(b"\xff\xd8 not a whole JPEG")
    code, out, err = run_cli(
        ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), "--no-report", "--no-progress",
         "--json", "--set", "train.epochs=2", "--set", "data.image_size=32", "--set", "data.block_size=6",
         "--set", "data.embargo=1", "--set", "model.kwargs={width: 0.5}"],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    assert err.count("4 classes in ") == 1 and ": Benign, Early Pre-B, Pre-B, Pro-B\n" in err  # at the start
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and Path(summary["run_dir"]) == tmp_path / "run"
    assert (tmp_path / "run" / "checkpoints" / "best" / "card.json").is_file()
    assert "WBC-Malignant-Pro-999.jpg" in (tmp_path / "run" / "train.log").read_text()
    trained = (tmp_path / "run" / "trained-on.sha256").read_text().split()
    phashes = (tmp_path / "run" / "trained-on.phash").read_text().split()  # re-encoded copies are found by these
    assert len(trained) > 0 and 0 < len(phashes) <= len(trained) and all(len(h) == 16 for h in phashes)
    # Resuming a finished run trains nothing, and says so; the report it rebuilds evaluates the test part,
    # whose score the command prints.
    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--no-progress"], monkeypatch, capsys)
    assert code == 0 and f"{tmp_path / 'run'} is already complete (2 of 2 epochs): nothing is trained again" in err
    assert re.search(r"test part: balanced accuracy [01]\.\d{3} \(95 % CI [01]\.\d{3}-[01]\.\d{3}\), \d+ images", out), out
    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--no-report"], monkeypatch, capsys)
    assert code == 0 and "already complete" in err
    assert "stage 1 of 2" not in err + out and "stage 2 of 2" not in err + out  # no stage announced as training
    assert "2 epochs (trained before)" in out
    # A changed config is refused before the run is said to be complete (which would say it is resumed).
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--set", "data.image_size=48"], monkeypatch,
                           capsys)  # fmt: skip
    assert code == 2 and "(data.image_size)" in err and "already complete" not in err
    # Only the refit left to train: the holdout stage was trained before, by another process. Another thread
    # count is taken, and said to change the result.
    for entry in (tmp_path / "run").iterdir():  # as a kill just after the holdout stage leaves the run
        if entry.name not in ("config.yaml", "holdout"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    card = json.loads((tmp_path / "run" / "holdout" / "checkpoints" / "last" / "card.json").read_text())
    other = 2 if card["runtime"]["threads"] == 1 else 1
    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--no-report", "--no-progress", "--set",
                              f"train.num_threads={other}"], monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    assert re.search(r"holdout \(train only\): .*\(trained before\)", out) and "refit on train + val: 2 epochs (" in out
    assert "refit on train + val: 2 epochs (trained before)" not in out
    from bloodcell.machine import available_cores

    if available_cores() > 1:  # a count above the cores is taken as the cores: no change on one
        assert f"trained with {card['runtime']['threads']} thread(s); resumed with {other}" in err


@pytest.mark.parametrize(
    ("accelerator", "precision", "has_bf16", "expected"),
    [
        ("cpu", "auto", True, "bf16-mixed"),
        ("cpu", "auto", False, "32-true"),
        ("auto", "auto", True, "bf16-mixed"),
        ("cpu", "32-true", True, "32-true"),
    ],
)
def test_auto_precision_uses_bf16_only_on_a_cpu_that_computes_in_it(
    accelerator: str, precision: str, has_bf16: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bloodcell.train import setup

    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(setup, "cpu_computes_bf16", lambda: has_bf16)
    train = tiny_config(train={"accelerator": accelerator, "precision": precision}).train
    assert setup.resolve_precision(train) == expected


def test_auto_accelerator_is_cuda_or_the_cpu_never_mps_unasked(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Mac, Lightning's own "auto" would pick MPS, where --devices 2 fails and the learning-rate finder
    (on the CPU) would disagree with training: "auto" here is CUDA when present, else the CPU."""
    from bloodcell.train import setup
    from bloodcell.tune.lr_find import _device

    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(setup.torch.backends.mps, "is_available", lambda: True)
    config = tiny_config(train={"accelerator": "auto", "devices": 2})
    assert setup.resolve_accelerator(config.train) == "cpu" and _device(config).type == "cpu"
    fabric = setup.make_fabric(config.train)
    assert type(fabric.accelerator).__name__ == "CPUAccelerator" and fabric.world_size == 2
    assert setup.resolve_accelerator(tiny_config(train={"accelerator": "mps"}).train) == "mps"  # when asked
    # CUDA asked for where there is none: one line naming the setting, not Lightning's traceback. Lightning
    # asks the driver itself, so on a GPU machine its own check is the one to switch off.
    from lightning_fabric.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    with pytest.raises(UserError, match="train.accelerator=cuda.*not available"):
        setup.make_fabric(tiny_config(train={"accelerator": "cuda"}).train)


def test_the_progress_bar_reads_the_loss_a_few_times_a_second_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a GPU loss makes the host wait for the GPU: the bar must not do it every step."""
    from bloodcell.train import progress
    from bloodcell.train.progress import RunProgress

    now = {"s": 0.0}  # the bar's clock, moved by the test: 64 steps a second (exact in binary)
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now["s"]))

    class CountedLoss:
        reads = 0

        def __float__(self) -> float:
            CountedLoss.reads += 1
            return 0.5

    import io

    from rich.console import Console

    terminal = Console(file=io.StringIO(), force_terminal=True)
    with RunProgress(True, epochs=1, console=terminal) as bar:
        bar.start_epoch(1, steps=200, last_val="-")
        for step in range(200):
            now["s"] = step / 64
            bar.step(CountedLoss(), rate=100.0)
        bar.end_epoch("0.9000", loss=0.6160, rate=124.0)
    assert RunProgress.READ_EVERY == 0.25
    assert CountedLoss.reads == 13  # every 16th step, from the first: steps 0, 16, ..., 192
    assert "loss 0.6160" in terminal.file.getvalue()  # the epoch's own loss, not the last sampled step's


def test_without_a_terminal_every_epoch_is_one_plain_line() -> None:
    """Piped to a file, a bar is drawn once, for the last epoch: each epoch gets a line instead."""
    import io

    from rich.console import Console

    from bloodcell.train.progress import RunProgress

    piped = Console(file=io.StringIO(), force_terminal=False, width=60)
    with RunProgress(True, epochs=2, console=piped) as bar:
        for epoch, loss in ((1, 0.9), (2, 0.6160)):
            bar.start_epoch(epoch, steps=3, last_val="-")
            for _ in range(3):
                bar.step(float("nan"), rate=0.0)
            bar.end_epoch("0.9123", loss=loss, rate=124.4)
    assert piped.file.getvalue().splitlines() == [
        "epoch 1/2  loss 0.9000  val bal-acc 0.9123  124 img/s",
        "epoch 2/2  loss 0.6160  val bal-acc 0.9123  124 img/s",
    ]


def test_a_failed_cuda_graph_recording_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recording runs warm-up passes (which move BatchNorm statistics) and may then fail for a network
    that cannot be recorded; the classifier must come back unchanged and training go on without graphs."""
    import types

    from bloodcell.train import loop, setup

    classifier = setup.build_classifier(tiny_config(), 4)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}

    def fails_after_a_warm_up(module, sample_args):
        module(*sample_args)  # a training-mode pass: the BatchNorm running statistics move
        module.forward = lambda *args: None  # as make_graphed_callables patches it
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fails_after_a_warm_up)
    with pytest.raises(RuntimeError, match="capturing"):
        setup.graph_training_forward(classifier, (2, 3, 32, 32), "32-true", torch.channels_last)
    assert "forward" not in classifier.__dict__
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())

    messages: list[str] = []
    log = types.SimpleNamespace(
        warning=lambda message, *args: messages.append(message % args),
        info=lambda message, *args: messages.append(message % args),
    )
    fake_gpu = types.SimpleNamespace(device=torch.device("cuda"), world_size=1)
    loop._record_step_graph(tiny_config(), fake_gpu, classifier, log, batch=16)
    assert len(messages) == 1 and "training without CUDA graphs" in messages[0] and "capturing" in messages[0]
    assert classifier(torch.zeros(2, 3, 32, 32)).shape == (2, 4)  # its ordinary forward


def test_a_model_that_draws_on_the_host_is_never_recorded_as_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """MixStyle tosses its coin on the CPU each step; a graph would freeze the toss of its recording."""
    import types

    from bloodcell.train import loop, setup

    recorded: list[tuple] = []
    monkeypatch.setattr(loop, "graph_training_forward", lambda *args: recorded.append(args))
    messages: list[str] = []
    log = types.SimpleNamespace(
        warning=lambda message, *args: messages.append(message % args),
        info=lambda message, *args: messages.append(message % args),
    )
    fake_gpu = types.SimpleNamespace(device=torch.device("cuda"), world_size=1)
    mixing = tiny_config(model={"name": "bloodnet", "kwargs": {"width": 0.5, "mixstyle": 0.5}})
    loop._record_step_graph(mixing, fake_gpu, setup.build_classifier(mixing, 4), log, batch=16)
    assert recorded == [] and "MixStyle" in messages[0]
    loop._record_step_graph(tiny_config(), fake_gpu, setup.build_classifier(tiny_config(), 4), log, batch=16)
    assert len(recorded) == 1  # without MixStyle the step is recorded


def test_the_step_is_recorded_at_the_batch_each_step_takes(tmp_path: Path, data, monkeypatch) -> None:
    """Fewer training images than the batch size: one step an epoch, of all of them; a graph recorded at
    the configured batch size would refuse that batch on a GPU."""
    from bloodcell.train import loop

    recorded: list[int] = []
    monkeypatch.setattr(loop, "_record_step_graph", lambda config, fabric, classifier, log, batch: recorded.append(batch))
    n_train = len(data.indices("train"))
    fit(tiny_config(train={"epochs": 1, "batch_size": n_train + 10}), tmp_path / "big", prepared=data, progress=False)
    fit(tiny_config(train={"epochs": 1, "batch_size": 16}), tmp_path / "small", prepared=data, progress=False)
    assert recorded == [n_train, 16]


def test_devices_on_the_cpu_of_a_gpu_machine_are_not_said_to_lack_a_gpu(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bloodcell.cli.train import _say_where_devices_run
    from bloodcell.train import setup

    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: True)
    _say_where_devices_run(tiny_config(train={"devices": 2, "accelerator": "cpu"}))
    err = capsys.readouterr().err
    assert "on the CPU (train.accelerator=cpu): --devices 2 trains as 2 CPU process(es)" in err and "no GPU" not in err


def test_auto_precision_takes_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.is_bf16_supported() says yes on a V100 or a T4 unless told not to count emulation."""
    from bloodcell.train import setup

    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(setup.torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert setup.resolve_precision(tiny_config(train={"accelerator": "cuda"}).train) == "16-mixed"


@pytest.mark.filterwarnings("ignore:You passed `Fabric:UserWarning")  # Lightning's own words for the fallback
def test_train_log_names_the_precision_that_ran(tmp_path: Path, data) -> None:
    """16-mixed falls back to bf16 on a CPU: the log said 16-mixed while the card said what ran."""
    from bloodcell.models.card import load_card

    fit(tiny_config(train={"epochs": 1, "precision": "16-mixed"}), tmp_path / "run", prepared=data, progress=False)
    ran = load_card(tmp_path / "run" / "checkpoints" / "last")[0].runtime["precision"]
    assert f"precision {ran}," in (tmp_path / "run" / "train.log").read_text()


TORCHRUN_4 = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}


def test_an_interrupted_run_s_log_says_so(tmp_path: Path, data) -> None:
    """train.log records how a run ended: without this line it just stopped at an epoch."""

    def interrupt(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # what the CLI raises for Ctrl-C and SIGTERM

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(), tmp_path / "run", prepared=data, progress=False, epoch_callback=interrupt)
    last = (tmp_path / "run" / "train.log").read_text().splitlines()[-1]
    assert "interrupted (Ctrl-C or SIGTERM) after epoch 2 of 3" in last


def test_an_interrupted_report_says_the_model_is_complete_and_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import bloodcell.report
    from bloodcell.cli import Interrupted
    from bloodcell.cli.train import _build_report

    def interrupted(run_dir: Path, progress: bool) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(bloodcell.report, "build_report", interrupted)
    monkeypatch.setattr(Interrupted, "reported", False)
    with pytest.raises(KeyboardInterrupt):
        _build_report(tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "the model is complete" in err and f"build its report with: bloodcell report {tmp_path / 'run'}" in err
    assert Interrupted.reported  # the CLI adds no bare "interrupted" line of its own


def test_a_stage_announcement_is_one_line_without_a_terminal(capsys) -> None:
    """rich wraps at 80 columns where stderr is no terminal: the run folder's path was split in two."""
    from bloodcell.train.run import _announce

    message = "stage 2 of 2: refit on train + val -> " + "/very/long/path" * 8
    _announce(True, message)
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize(("env", "devices", "said"), [
    ({}, None, "continue with: bloodcell train --resume runs/r\n"),
    ({}, "2", "continue with: bloodcell train --resume runs/r --devices 2\n"),
    (TORCHRUN_4, None, "--resume runs/r (launched as this run was, in 4 processes)"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "bash"}, None, "--resume runs/r\n"),  # salloc's shell: one process
    ({**TORCHRUN_4, "RANK": "1"}, None, None),  # said by the first process only
])  # fmt: skip
def test_an_interrupted_run_says_how_to_resume_it_in_as_many_processes(
    monkeypatch: pytest.MonkeyPatch, capsys, env: dict[str, str], devices: str | None, said: str | None
) -> None:
    from bloodcell.cli.train import _say_how_to_resume

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME",
                 "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _say_how_to_resume(Path("runs/r"), tiny_config(), devices)
    err = capsys.readouterr().err
    assert (said in err) if said else err == ""


def test_the_data_stage_s_warnings_are_said_by_the_first_process_only(
    tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from bloodcell.train import run as run_module

    def preparing(config, progress):
        logging.getLogger("bloodcell.data.splits").warning("the embargo is capped")
        raise UserError("stop here")

    monkeypatch.setattr(run_module, "prepare_training_data", preparing)
    monkeypatch.setattr(run_module, "is_first_process", lambda: False)
    config = tiny_config(data={"train_on": "train+val"}, train={"epochs": 1})
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="stop here"):
        run_module.train_run(config, tmp_path / "run", progress=False)
    assert "embargo" not in caplog.text
    monkeypatch.setattr(run_module, "is_first_process", lambda: True)
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="stop here"):
        run_module.train_run(config, tmp_path / "run2", progress=False)
    assert "the embargo is capped" in caplog.text


def test_devices_without_a_gpu_say_they_are_cpu_processes(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`--devices 4` reads as four GPUs: on a machine without one it is four CPU processes, which is said."""
    import os

    from bloodcell.cli.train import _say_where_devices_run
    from bloodcell.train import setup

    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    _say_where_devices_run(tiny_config(train={"devices": 4}))
    assert "no GPU here: --devices 4 trains as 4 CPU process(es), more than this machine's 2 cores" in capsys.readouterr().err
    _say_where_devices_run(tiny_config(train={"devices": 1}))
    err = capsys.readouterr().err
    assert "1 CPU process(es)" in err and "more than" not in err
    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: True)
    _say_where_devices_run(tiny_config(train={"devices": 1}))
    assert capsys.readouterr().err == ""


def test_weights_that_turned_infinite_on_a_finite_loss_are_never_saved(tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gradient clipping (the seed replica's recipe) an infinite gradient on an epoch's last step
    leaves a finite loss and infinite weights: they must not be validated and saved as best and last."""
    from bloodcell.train import loop

    steps_per_epoch = len(data.indices("train")) // 16
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def blow_up(self, *args, **kwargs):
        calls["n"] += 1
        out = real_step(self, *args, **kwargs)
        if calls["n"] == 2 * steps_per_epoch:  # epoch 2's last step
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingDiverged, match=r"the weights became infinite or NaN in epoch 2 .*epoch 1\)"):
        fit(tiny_config(train={"grad_clip": 0.0}), run, prepared=data, progress=False)
    for name in ("best", "last"):
        weights = load_file(run / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.dtype.is_floating_point), name


def test_more_devices_than_slurm_started_tasks_is_said(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An sbatch script that runs bloodcell without srun has one task: --devices 2 trained on one device
    without a word."""
    from bloodcell.train.setup import launch_topology

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train.sbatch")
    with caplog.at_level("WARNING"):
        assert launch_topology(tiny_config(train={"devices": 2}).train) == (1, 1)
    assert "--devices 2 is not used: SLURM started 1 task(s)" in caplog.text and "srun --ntasks-per-node 2" in caplog.text
    caplog.clear()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # srun's tasks (without srun, 4 tasks are refused: test_distributed.py)
    with caplog.at_level("WARNING"):
        assert launch_topology(tiny_config().train) == (4, 1)  # srun's tasks, the default --devices: nothing to say
    assert "not used" not in caplog.text


def test_resume_refuses_a_config_or_another_out_folder_it_would_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Both were ignored without a word: the run continued in its own folder with its own config."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    code, _, err = run_cli(["train", "--resume", str(run), "--out", str(tmp_path / "other")], monkeypatch, capsys)
    assert code == 2 and "a resumed run continues in its own folder" in err
    code, _, err = run_cli(["train", "--resume", str(run), "--config", "seed-replica"], monkeypatch, capsys)
    assert code == 2 and "keeps the config.yaml it started with" in err


def test_evaluating_an_unfinished_run_says_its_model_is_still_in_training(tmp_path: Path, data, caplog) -> None:
    """A run stopped mid-training keeps a best checkpoint, which evaluate scored as the run's without a word."""
    from bloodcell.evaluate.runner import warn_if_unfinished

    config = tiny_config(train={"epochs": 3})

    def stop(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(config, tmp_path / "run", prepared=data, progress=False, epoch_callback=stop)
    assert (tmp_path / "run" / "checkpoints" / "best" / "card.json").is_file()
    with caplog.at_level("WARNING", logger="bloodcell"):
        warn_if_unfinished(tmp_path / "run", 3)
    assert "is an unfinished run (1 of 3 epochs trained)" in caplog.text
    assert f"bloodcell train --resume {tmp_path / 'run'}" in caplog.text
    caplog.clear()
    fit(config, tmp_path / "run", prepared=data, progress=False, resume=True)
    with caplog.at_level("WARNING", logger="bloodcell"):
        warn_if_unfinished(tmp_path / "run", 3)
    assert "unfinished" not in caplog.text
