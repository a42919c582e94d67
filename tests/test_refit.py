"""A run that refits on train + val: holdout stage first, temperature carried over, resumable in either stage."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bloodcell.config import ConfigError, RunConfig, config_from_dict
from bloodcell.errors import UserError
from bloodcell.models.card import load_card
from bloodcell.train import loop as loop_module
from bloodcell.train import train_run
from bloodcell.train.checkpoint import checkpoint_dir
from conftest import child_env, make_aria_dataset
from synthetic_data import make_synthetic_data

REFIT = {
    "name": "tiny-refit",
    "data": {"image_size": 32, "train_on": "train+val"},
    "model": {"name": "bloodnet", "kwargs": {"width": 0.5}},
    "augment": {"hue": 0.02, "gamma": 0.1, "jpeg": 0.5},
    "train": {"epochs": 2, "batch_size": 16, "seed": 5, "num_threads": 1},
}


def refit_config(**train) -> RunConfig:
    raw = json.loads(json.dumps(REFIT))
    raw["train"].update(train)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_data(per_class=16, size=32)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_refit_trains_on_train_and_val_and_takes_the_holdout_temperature(tmp_path: Path, data) -> None:
    run = tmp_path / "run"
    result = train_run(refit_config(), run, prepared=data, progress=False)

    # Holdout stage: trained on train alone, validated every epoch, its own temperature fitted on val.
    assert result.holdout is not None and len(result.holdout.history) == 2
    assert all(row["val_balanced_accuracy"] for row in history(run / "holdout"))
    holdout_card, _ = load_card(run / "holdout" / "checkpoints" / "last")
    assert holdout_card.split["trained_on"] == ["train"] and holdout_card.temperature != 1.0

    # Refit: train + val, no validation, the last epoch is the model, the holdout's temperature in its card.
    rows = history(run)
    assert [row["val_balanced_accuracy"] for row in rows] == ["", ""]
    steps = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["loop"]["step"]
    n_train_val = len(data.indices("train")) + len(data.indices("val"))
    assert steps == 2 * (n_train_val // 16)
    best = load_card(run / "checkpoints" / "best")[0]
    assert best.split["trained_on"] == ["train", "val"] and best.epoch == 2
    assert best.temperature == pytest.approx(holdout_card.temperature)
    assert "holdout" in best.temperature_source
    assert best.runtime["threads"] == holdout_card.runtime["threads"]  # pinned: the sums depend on it
    assert all(torch.equal(a, b) for a, b in zip(weights(run / "checkpoints" / "best").values(),
                                                  weights(run / "checkpoints" / "last").values(), strict=True))


def test_evaluating_a_refit_keeps_its_card_temperature(tmp_path: Path) -> None:
    """Its validation images are training images now: refitting the temperature on them would be wrong."""
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.runner import evaluate_model

    dataset = make_aria_dataset(tmp_path / "aria", per_class=24, size=48)
    raw = json.loads(json.dumps(REFIT))
    raw["data"].update(root=str(dataset), block_size=4, embargo=1)
    raw["train"]["epochs"] = 1
    config = config_from_dict(raw)
    prepared = prepare_data(config.data, progress=False)
    run = tmp_path / "run"
    train_run(config, run, prepared=prepared, progress=False)
    card = load_card(run / "checkpoints" / "best")[0]
    metrics = evaluate_model(run, robustness=False, explain=False, progress=False, prepared=prepared, n_bootstrap=20)
    assert metrics["temperature"] == pytest.approx(card.temperature)
    assert "holdout" in metrics["temperature_source"]
    assert metrics["data"]["trained_on"] == ["train", "val"]
    assert load_card(run / "checkpoints" / "best")[0].metrics["test"]["n_images"] == len(prepared.indices("test"))
    # Each stage records the content of exactly the images it trained on, for evaluations on other data.
    sha = prepared.split["sha256"].to_numpy()
    train, val = prepared.indices("train"), prepared.indices("val")
    assert (run / "holdout" / "trained-on.sha256").read_text().split() == sorted(set(sha[train]))
    assert (run / "trained-on.sha256").read_text().split() == sorted(set(sha[np.concatenate([train, val])]))


def kill_after_history(target: Path, epoch: int):
    """A ``_write_history`` that dies once ``target``'s epoch ``epoch`` is on disk, checkpoints and history."""
    real = loop_module._write_history

    def write_then_die(run_dir: Path, rows: list) -> None:
        real(run_dir, rows)
        if Path(run_dir) == target and len(rows) == epoch:
            raise KeyboardInterrupt

    return loop_module, "_write_history", write_then_die


def kill_before_history(target: Path, epoch: int):
    """Dies after ``target``'s epoch ``epoch`` checkpoints are complete, before its history row is written."""
    real = loop_module._write_history

    def die_first(run_dir: Path, rows: list) -> None:
        if Path(run_dir) == target and len(rows) == epoch:
            raise KeyboardInterrupt
        real(run_dir, rows)

    return loop_module, "_write_history", die_first


def kill_in_swap(target: Path, which: str, call: int, between_renames: bool):
    """Dies in the ``call``-th swap of ``target``'s ``which`` checkpoint: before its renames (the staging
    folder complete, nothing renamed yet) or between them (only the previous one, renamed aside, survives)."""
    from bloodcell.train import checkpoint as checkpoint_module

    real, calls = checkpoint_module._swap_in, {"n": 0}

    def swap(staging: Path, directory: Path) -> None:
        if directory == checkpoint_dir(target, which):
            calls["n"] += 1
            if calls["n"] == call:
                if between_renames:
                    os.replace(directory, directory.with_name(f".{directory.name}.old"))
                raise KeyboardInterrupt
        real(staging, directory)

    return checkpoint_module, "_swap_in", swap


def logged_epochs(run_dir: Path) -> list[int]:
    """The epochs ``train.log`` says were trained, in order (the log is appended to by a resume)."""
    log = run_dir / "train.log"
    return [int(n) for n in re.findall(r" INFO epoch (\d+) ", log.read_text())] if log.is_file() else []


# Each kill, and the epochs (holdout's, refit's) the resume must train: only those the checkpoints lack.
# Retraining from scratch would end with the same models (same seed), so this is what tells a resume apart.
KILLS = {
    "holdout, after epoch 1": (lambda run: kill_after_history(run / "holdout", 1), [2], [1, 2]),
    "refit, after epoch 1": (lambda run: kill_after_history(run, 1), [], [2]),
    # No epoch's checkpoint was complete: the holdout starts afresh.
    "holdout, in its first checkpoint": (
        lambda run: kill_in_swap(run / "holdout", "best", 1, between_renames=False), [1, 2], [1, 2]),
    "refit, in its first checkpoint": (
        lambda run: kill_in_swap(run, "best", 1, between_renames=False), [], [1, 2]),
    # Only epoch 1's 'last', renamed aside, survives.
    "holdout, between the renames of epoch 2's last": (
        lambda run: kill_in_swap(run / "holdout", "last", 2, True), [2], [1, 2]),
    "refit, between the renames of epoch 2's last": (
        lambda run: kill_in_swap(run, "last", 2, between_renames=True), [], [2]),
    # Epoch 2's checkpoints are complete: the holdout has nothing left to train.
    "holdout, before its last history row": (lambda run: kill_before_history(run / "holdout", 2), [], [1, 2]),
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_an_interrupted_refit_resumes_to_the_same_model(tmp_path: Path, data, monkeypatch, kill: str) -> None:
    """Killed at any moment, in either stage, ``--resume`` ends with the uninterrupted run's models and history."""
    uninterrupted = tmp_path / "whole"
    train_run(refit_config(), uninterrupted, prepared=data, progress=False)

    run = tmp_path / "run"
    killer, holdout_epochs, refit_epochs = KILLS[kill]
    with monkeypatch.context() as patch:
        patch.setattr(*killer(run))
        with pytest.raises(KeyboardInterrupt):
            train_run(refit_config(), run, prepared=data, progress=False)
    before = {stage: len(logged_epochs(run / stage)) for stage in ("holdout", ".")}
    train_run(refit_config(), run, resume=True, prepared=data, progress=False)
    assert logged_epochs(run / "holdout")[before["holdout"] :] == holdout_epochs
    assert logged_epochs(run)[before["."] :] == refit_epochs

    for which in ("best", "last"):
        expected, got = weights(uninterrupted / "checkpoints" / which), weights(run / "checkpoints" / which)
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert load_card(run / "checkpoints" / "best")[0].temperature == pytest.approx(
        load_card(uninterrupted / "checkpoints" / "best")[0].temperature
    )
    for stage in (Path("holdout"), Path(".")):
        timing = {"seconds", "images_per_second"}
        expected_rows = [{k: v for k, v in r.items() if k not in timing} for r in history(uninterrupted / stage)]
        assert [{k: v for k, v in r.items() if k not in timing} for r in history(run / stage)] == expected_rows, stage


def test_a_refit_resumes_from_data_that_moved(tmp_path: Path, monkeypatch) -> None:
    """``--resume RUN --data NEW_PLACE``: both stages, and the holdout's temperature, read the data there."""
    dataset = make_aria_dataset(tmp_path / "aria", per_class=16, size=40, segmented=False)
    raw = json.loads(json.dumps(REFIT))
    raw["data"].update(root=str(dataset), block_size=4, embargo=1)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(*kill_after_history(run, 1))
        with pytest.raises(KeyboardInterrupt):
            train_run(config_from_dict(raw), run, progress=False)
    os.replace(dataset, tmp_path / "moved")
    raw["data"]["root"] = str(tmp_path / "moved")
    before = {stage: len(logged_epochs(run / stage)) for stage in ("holdout", ".")}
    result = train_run(config_from_dict(raw), run, resume=True, progress=False)
    assert len(result.history) == 2 and load_card(run / "checkpoints" / "best")[0].temperature != 1.0
    # The holdout was done and the refit had its epoch 1: the resume trained epoch 2 of the refit alone.
    assert logged_epochs(run / "holdout")[before["holdout"] :] == []
    assert logged_epochs(run)[before["."] :] == [2]


def test_a_refit_needs_a_fixed_schedule() -> None:
    with pytest.raises(ConfigError, match="early_stopping_patience must be 0"):
        refit_config(early_stopping_patience=3)


def test_a_refit_run_folder_is_not_overwritten(tmp_path: Path, data) -> None:
    train_run(refit_config(epochs=1), tmp_path / "run", prepared=data, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train_run(refit_config(epochs=1), tmp_path / "run", prepared=data, progress=False)


@contextlib.contextmanager
def _held_by_another_process(run: Path) -> Iterator[None]:
    """The run folder's training lock, held by a child process as a training would hold it."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom bloodcell.train.run import training_lock\n"
            "with training_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                              env=child_env())  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()  # the OS releases its lock, as for a killed training
        holder.wait()


def test_a_run_folder_being_trained_is_refused_to_a_second_training_or_resume(tmp_path: Path, data) -> None:
    """Two trainings into one folder mixed their stages' models, configs and temperature, or one deleted the
    other's checkpoint in the middle of its write: the second is refused at once, touching nothing."""
    run = tmp_path / "run"
    with _held_by_another_process(run):
        for resume in (False, True):
            with pytest.raises(UserError, match=f"{re.escape(str(run))} is being trained by another process"):
                train_run(refit_config(epochs=1), run, prepared=data, progress=False, resume=resume)
        assert not run.exists()
    assert train_run(refit_config(epochs=1), run, prepared=data, progress=False).holdout is not None  # released


def test_a_refused_resume_leaves_the_checkpoint_being_written_alone(tmp_path: Path, data, monkeypatch, capsys) -> None:
    """`train --resume RUN` looked at RUN's checkpoints before the lock refused it, and the look removed the
    staging folder of the checkpoint the running training was writing, which then crashed."""
    from bloodcell.cli import main

    run = tmp_path / "run"
    train_run(refit_config(epochs=1), run, prepared=data, progress=False)
    staging = run / "checkpoints" / ".last.tmp"  # the other process's checkpoint, half written
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(sys, "argv", ["bloodcell", "train", "--resume", str(run), "--no-report", "--no-progress"])
    with _held_by_another_process(run), pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2 and "is being trained by another process" in capsys.readouterr().err
    assert (staging / "model.safetensors").read_bytes() == b"half"


def test_a_resume_with_a_changed_config_is_refused_before_either_stage_trains(tmp_path: Path, data) -> None:
    """Resumed as a refit, a finished train-only run trained a whole holdout stage into RUN/holdout before
    the refit's own check refused it; the stray stage then gave the report false curves."""
    run = tmp_path / "run"
    only_train = refit_config(epochs=1).model_copy(update={"data": refit_config().data.model_copy(update={"train_on": "train"})})
    train_run(only_train, run, prepared=data, progress=False)
    with pytest.raises(UserError, match=r"cannot resume .* different config \(data.train_on\)"):
        train_run(refit_config(epochs=1), run, prepared=data, progress=False, resume=True)
    assert not (run / "holdout").exists()


def test_a_start_that_failed_before_an_epoch_does_not_block_the_corrected_one(tmp_path: Path, data) -> None:
    bad = refit_config(epochs=1).model_copy(update={"data": refit_config().data.model_copy(update={"root": str(tmp_path / "typo")})})
    with pytest.raises(UserError, match="not found"):
        train_run(bad, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.yaml").is_file()  # the failed start claimed the folder ...
    result = train_run(refit_config(epochs=1), tmp_path / "run", prepared=data, progress=False)  # ... not for good
    assert len(result.history) == 1 and len(result.holdout.history) == 1


def test_holdout_temperature_is_fitted_on_validation_images(tmp_path: Path, data) -> None:
    from bloodcell.evaluate.calibration import fit_temperature
    from bloodcell.evaluate.runner import predict_logits
    from bloodcell.models import load_model

    run = tmp_path / "run"
    train_run(refit_config(epochs=1), run, prepared=data, progress=False)
    model, _ = load_model(run / "holdout" / "checkpoints" / "last")
    val = np.asarray(data.indices("val"))
    expected = fit_temperature(predict_logits(model, data.images[val]), np.asarray(data.labels)[val])
    assert load_card(run / "checkpoints" / "best")[0].temperature == pytest.approx(expected)
