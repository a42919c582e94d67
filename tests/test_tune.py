"""Learning-rate finder and Optuna tuning on a tiny synthetic problem (32 px, a small bloodnet, 1-2 epochs)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.config import AugmentConfig, config_from_dict, load_config
from bloodcell.errors import UserError
from bloodcell.tune.lr_find import suggest_lr
from bloodcell.tune.search import SearchSpace, _check_space_fits_model, apply_params, open_study, tune
from conftest import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Small enough that one epoch takes well under a second on one core.
TINY = {
    "name": "tiny",
    "data": {"image_size": 32, "block_size": 6, "embargo": 1},
    "model": {"name": "bloodnet", "kwargs": {"width": 0.5, "depth": 0.5}},
    "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
}
#: Keep the search at 32 px so every trial is fast.
TINY_SPACE = SearchSpace(image_size=[32], width=[0.25, 0.5])


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ------------------------------------------------------------------------------------------- lr-find


def test_suggestion_rules_on_a_known_curve() -> None:
    lrs = np.geomspace(1e-5, 1.0, 101)
    x = np.log10(lrs)
    # Flat, then falling fastest at 1e-3, lowest at 1e-1, then blowing up.
    loss = 2 - np.tanh((x + 3) * 2) * 0.5 + np.where(x > -1, (x + 1) ** 2 * 20, 0)
    suggested, min_loss_lr, steepest_lr = suggest_lr(lrs, loss, "min_loss")
    assert min_loss_lr == pytest.approx(1e-1, rel=0.15)
    assert suggested == pytest.approx(min_loss_lr / 10)
    assert steepest_lr == pytest.approx(1e-3, rel=0.15)
    assert suggest_lr(lrs, loss, "steepest")[0] == steepest_lr
    # A loss that only rises: the honest suggestion is the bottom of the sweep, never outside it.
    assert suggest_lr(lrs, np.linspace(1, 5, 101), "min_loss")[0] == lrs[0]


def test_lr_find_suggests_a_rate_inside_the_sweep_and_plots(
    aria_dataset: Path, tiny_config_file: Path, tmp_path: Path
) -> None:
    import torch

    out = tmp_path / "lr"
    args = ["lr-find", "--data", str(aria_dataset), "--config", str(tiny_config_file), "--steps", "60",
            "--start-lr", "1e-5", "--end-lr", "10", "--out", str(out), "--json"]  # fmt: skip
    torch.set_num_threads(2)  # the config asks for 1: the finder must put 2 back
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    summary = json.loads(result.output.strip().splitlines()[-1])
    low, high = summary["swept"]
    assert low == pytest.approx(1e-5) and summary["steps"] >= 20
    assert low <= summary["suggested_lr"] <= high
    # The loss did fall on this learnable problem: its minimum is well inside the sweep, not at its start.
    assert summary["min_loss_lr"] > 100 * low
    assert summary["suggested_lr"] == pytest.approx(summary["min_loss_lr"] / 10)
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "lr_find.csv").read_text().splitlines()
    assert table[0] == "step,lr,loss,smoothed_loss" and len(table) == summary["steps"] + 1
    assert summary["loss_never_fell"] is False


def test_a_sweep_whose_loss_never_falls_says_to_widen_it(aria_dataset: Path, tiny_config_file: Path, tmp_path: Path) -> None:
    args = ["lr-find", "--data", str(aria_dataset), "--config", str(tiny_config_file), "--steps", "12",
            "--start-lr", "3", "--end-lr", "1000", "--out", str(tmp_path / "lr")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--set", "train.label_smoothing=0.05"])
    assert result.exit_code == 0, result.output
    assert "the loss never fell" in result.output and "--start-lr 0.03" in result.output
    # The floor of the sweep is no rate to train with: no train command, but the same sweep, widened downwards.
    assert "bloodcell train" not in result.output and "optimizer.lr=" not in result.output, result.output
    assert (f"sweep again: bloodcell lr-find --data {aria_dataset} --config {tiny_config_file} --set "
            "train.label_smoothing=0.05 --steps 12 --end-lr 1e+03 --method min-loss --out "
            f"{tmp_path / 'lr'} --start-lr 0.03") in result.output  # fmt: skip


def test_a_suggestion_below_the_sweep_is_said_to_be_its_floor() -> None:
    """The loss fell, but its minimum came in the first decade: the rule's rate (a tenth of it) is clipped."""
    from bloodcell.tune.lr_find import LRFindResult

    lrs = np.geomspace(1e-3, 1e-1, 50)
    smoothed = np.concatenate([np.linspace(2.0, 1.0, 10), np.linspace(1.0, 3.0, 40)])  # lowest at lrs[9]
    suggested, min_loss_lr, steepest_lr = suggest_lr(lrs, smoothed, "min_loss")
    assert suggested == lrs[0] and min_loss_lr / 10 < lrs[0]
    result = LRFindResult(lrs=list(lrs), losses=list(smoothed), smoothed=list(smoothed), suggested_lr=suggested,
                          min_loss_lr=min_loss_lr, steepest_lr=steepest_lr, method="min_loss", diverged=False,
                          start_lr=1e-3, end_lr=1e-1)  # fmt: skip
    assert result.clipped_to_the_floor and not result.loss_never_fell


def test_train_resolves_auto_lr_with_the_finder(aria_dataset: Path, tmp_path: Path) -> None:
    """Also: the finder and training, library calls, leave torch's thread count and random numbers as the
    caller had them."""
    import torch

    from bloodcell.train import fit

    config = config_from_dict({**TINY, "data": {**TINY["data"], "root": str(aria_dataset)},
                               "optimizer": {"lr": "auto"},
                               "train": {**TINY["train"], "epochs": 1, "num_threads": 2}})  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    result = fit(config, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == 1 and torch.equal(torch.rand(2), expected)
    ran = load_config(str(result.run_dir / "config.yaml"))
    assert isinstance(ran.optimizer.lr, float) and 1e-6 <= ran.optimizer.lr <= 1.0
    assert (result.run_dir / "lr-find" / "lr_find.png").is_file()


def test_resolving_auto_lr_gives_the_training_its_thread_count_back(tmp_path: Path, monkeypatch) -> None:
    """Under DDP each rank trains on its share of the cores; the finder, run by rank 0, must not keep them all."""
    import importlib

    import torch

    from bloodcell.train import loop as loop_module

    lr_find_module = importlib.import_module("bloodcell.tune.lr_find")  # the package exports a function of that name

    def finder_that_takes_every_core(*args, **kwargs):
        torch.set_num_threads(before + 1)
        return lr_find_module.LRFindResult(**{**dict.fromkeys(lr_find_module.LRFindResult.__dataclass_fields__), "suggested_lr": 0.01})

    before = torch.get_num_threads()
    monkeypatch.setattr(lr_find_module, "run_lr_find", finder_that_takes_every_core)
    config = config_from_dict({**TINY, "optimizer": {"lr": "auto"}})
    assert loop_module._resolve_learning_rate(config, tmp_path, None).optimizer.lr == pytest.approx(0.01)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------- search


def test_search_space_maps_onto_valid_configs() -> None:
    base = config_from_dict(TINY)
    strong = apply_params(base, {"augment_strength": 100.0, "width": 1.5, "lr": 1e-3, "image_size": 96})
    assert strong.augment.affine_scale < 1 and strong.augment.hue <= 0.5 and strong.augment.noise <= 0.2
    assert strong.augment.brightness == 1.0  # clipped at the field's maximum
    assert strong.model.kwargs == {"width": 1.5, "depth": 0.5} and strong.data.image_size == 96
    off = apply_params(base, {"augment_strength": 0.0})
    assert off.augment.affine_degrees == 0 and off.augment.brightness == 0 and off.augment.flip
    half = apply_params(base, {"augment_strength": 0.5})
    assert half.augment.affine_degrees == pytest.approx(AugmentConfig().affine_degrees / 2)
    clipping = config_from_dict({**TINY, "augment": {"stain_clip": 0.25}})  # a probability, scaled as blur's
    assert apply_params(clipping, {"augment_strength": 0.0}).augment.stain_clip == 0
    assert apply_params(clipping, {"augment_strength": 100.0}).augment.stain_clip == 1.0
    with pytest.raises(ValueError, match="low"):
        SearchSpace(lr=(1e-2, 1e-3))


def test_a_search_of_image_sizes_below_the_training_crop_is_refused_before_any_trial() -> None:
    base = config_from_dict({**TINY, "data": {"image_size": 64}, "augment": {"crop": 48}})
    with pytest.raises(UserError, match=r"image sizes \[32\] are smaller than augment.crop \(48\)"):
        _check_space_fits_model(base, SearchSpace(image_size=[32, 64], width=None))
    _check_space_fits_model(base, SearchSpace(image_size=[48, 64], width=None))


def test_data_parallel_trials_are_refused_before_the_study_is_opened(tmp_path: Path, monkeypatch) -> None:
    """Under DDP every rank would run tune and file its own trial under rank 0's training."""
    two_devices = config_from_dict({**TINY, "train": {**TINY.get("train", {}), "devices": 2}})
    with pytest.raises(UserError, match="one process"):
        tune(two_devices, tmp_path / "data", n_trials=1, out_dir=tmp_path / "a")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun or srun"):
        tune(config_from_dict(TINY), tmp_path / "data", n_trials=1, out_dir=tmp_path / "b")
    assert not (tmp_path / "a" / "study.db").exists() and not (tmp_path / "b" / "study.db").exists()


def test_an_override_that_the_search_replaces_is_named() -> None:
    from bloodcell.tune.search import overrides_the_search_replaces

    overrides = ["data.image_size=32", "augment.hue=0.1", "train.epochs=2", "optimizer.lr=0.01"]
    # augment.hue is the base that augment_strength scales, not replaced: no warning for it.
    assert overrides_the_search_replaces(overrides, SearchSpace()) == [
        ("data.image_size=32", "image_size"), ("optimizer.lr=0.01", "lr")
    ]
    assert overrides_the_search_replaces(overrides, SearchSpace(image_size=None, lr=None)) == []


def test_a_study_refuses_to_continue_with_a_different_search(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    base = config_from_dict(TINY)
    args = (optuna.pruners.NopPruner(), optuna.samplers.RandomSampler())
    open_study("s", storage, base, TINY_SPACE, None, *args)
    open_study("s", storage, base.model_copy(update={"data": base.data.model_copy(update={"root": "/elsewhere"})}),
               TINY_SPACE, None, *args)  # fmt: skip  # another machine's dataset path is fine
    for key, value in (("train.num_threads", 1), ("train.cuda_graph", not base.train.cuda_graph)):
        section, name = key.split(".")  # how a worker computes, not what: a GPU worker without CUDA graphs
        changed = getattr(base, section).model_copy(update={name: value})
        open_study("s", storage, base.model_copy(update={section: changed}), TINY_SPACE, None, *args)
    with pytest.raises(UserError, match="different base_config"):
        open_study("s", storage, base.model_copy(update={"train": base.train.model_copy(update={"epochs": 7})}),
                   TINY_SPACE, None, *args)  # fmt: skip
    with pytest.raises(UserError, match="different space"):
        open_study("s", storage, base, SearchSpace(), None, *args)


class PruneAfterFirstComplete(optuna.pruners.BasePruner):
    """As aggressive as pruning gets: once one trial has completed, every other trial stops at its 2nd epoch."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step >= 2 and bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_tune_prunes_writes_best_config_and_resumes_after_an_interrupt(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bloodcell.train

    base = config_from_dict(TINY)
    out = tmp_path / "tune"
    common = {
        "out_dir": out,
        "space": TINY_SPACE,
        "pruner": PruneAfterFirstComplete(),
        "seed": 0,
        "report": False,
    }

    first = tune(base, aria_dataset, 2, **common)
    assert (first.n_complete, first.n_pruned) == (1, 1)
    assert first.storage == f"sqlite:///{(out / 'study.db').resolve()}"

    # Ctrl-C in the middle of the next trial, after its first epoch's checkpoint.
    real_fit = bloodcell.train.fit

    def interrupted_fit(config, out_dir=None, *, epoch_callback=None, **kwargs):
        def stop(epoch, row):
            epoch_callback(epoch, row)  # epoch 1 is reported to Optuna, then Ctrl-C arrives
            raise KeyboardInterrupt

        return real_fit(config, out_dir, epoch_callback=stop, **kwargs)

    monkeypatch.setattr(bloodcell.train, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        tune(base, aria_dataset, 3, **common)
    monkeypatch.setattr(bloodcell.train, "fit", real_fit)

    # Rerunning with the same storage retries the interrupted trial, resuming its run at epoch 2.
    resumed = tune(base, aria_dataset, 3, **{**common, "report": True})
    study = optuna.load_study(study_name="tiny", storage=resumed.storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.PRUNED,
    ]
    interrupted, retry = trials[2], trials[3]
    assert retry.params == interrupted.params and retry.system_attrs["failed_trial"] == 2
    assert sorted(retry.intermediate_values) == [1, 2]  # epoch 1 inherited, epoch 2 trained after resuming
    history = (out / "trials" / "trial-0002" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert "resumed from" in (out / "trials" / "trial-0002" / "train.log").read_text()

    # Results: a best config that `train --config` loads, the trials table, the report with Optuna's plots.
    best = load_config(str(resumed.best_config_path))
    expected = apply_params(base, trials[0].params).model_dump(mode="json")
    expected.update(
        name="tiny-best",
        description=best.description,
        data={**expected["data"], "root": str(aria_dataset.resolve())},
    )
    assert best.model_dump(mode="json") == expected and resumed.best_trial == 0
    assert resumed.best_run_dir == (out / "trials" / "trial-0000").resolve()
    assert best.optimizer.lr == trials[0].params["lr"] and "trial 0" in best.description
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + 4
    report = (out / "report.md").read_text()
    assert "plots/history.png" in report, report
    # Trial 1 was pruned after 2 epochs; its value is whatever the tiny model scored (thread counts vary).
    assert re.search(r"^\| 1 \| pruned \| [0-9.]+ \| 2 \|", report, flags=re.M), report
    assert (out / "plots" / "history.png").is_file() and (out / "plots" / "intermediate.png").is_file()

    # The study is complete: another rerun trains nothing.
    again = tune(base, aria_dataset, 3, **common)
    assert len(optuna.load_study(study_name="tiny", storage=again.storage).get_trials()) == 4


def test_an_epoch_saved_but_not_reported_before_ctrl_c_is_reported_on_resuming(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch is reported to Optuna after its checkpoint is written: Ctrl-C between the two must not
    leave a hole in the trial's curve. The report is written on Ctrl-C too."""
    import bloodcell.train

    base, out = config_from_dict(TINY), tmp_path / "tune"
    common = {"out_dir": out, "space": TINY_SPACE, "pruner": "none", "seed": 0}
    real_fit = bloodcell.train.fit

    def interrupted_fit(config, out_dir=None, *, epoch_callback=None, **kwargs):
        def stop(epoch, row):
            raise KeyboardInterrupt  # epoch 1 is on disk, and Ctrl-C arrives before it is reported

        return real_fit(config, out_dir, epoch_callback=stop, **kwargs)

    monkeypatch.setattr(bloodcell.train, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        tune(base, aria_dataset, 1, **common)
    assert (out / "report.md").is_file()
    monkeypatch.setattr(bloodcell.train, "fit", real_fit)
    resumed = tune(base, aria_dataset, 1, **{**common, "report": False})
    retry = optuna.load_study(study_name="tiny", storage=resumed.storage).get_trials()[-1]
    assert retry.state == TrialState.COMPLETE and sorted(retry.intermediate_values) == [1, 2]
    assert "resumed from" in (out / "trials" / "trial-0000" / "train.log").read_text()
    # The best trial is number 1, but it trained in trial 0's folder: that is the folder named.
    assert resumed.best_trial == 1 and resumed.best_run_dir == (out / "trials" / "trial-0000").resolve()


#: Runs ``bloodcell`` with training held at a barrier until both workers are inside a trial, so that both
#: take part however fast the trials are; everything else is the real command.
WORKER = """
import os, sys, time
from pathlib import Path
import bloodcell.train

barrier, real_fit = Path(sys.argv[1]), bloodcell.train.fit

def fit_after_barrier(*args, **kwargs):
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return real_fit(*args, **kwargs)

bloodcell.train.fit = fit_after_barrier
sys.argv = ["bloodcell", *sys.argv[2:]]
from bloodcell.cli import main
main()
"""


def test_a_base_that_refits_is_tuned_on_train_alone_and_its_best_config_still_refits(
    aria_dataset: Path, tmp_path: Path
) -> None:
    """The default recipe refits on train + val; a trial is judged on val, so it must train without it."""
    base = config_from_dict({**TINY, "data": {**TINY["data"], "train_on": "train+val"}})
    result = tune(base, aria_dataset, 1, out_dir=tmp_path / "tune", space=TINY_SPACE, seed=0, report=False)
    assert result.n_complete == 1
    trial = yaml.safe_load((tmp_path / "tune" / "trials" / "trial-0000" / "config.yaml").read_text())
    assert trial["data"]["train_on"] == "train"
    assert load_config(str(result.best_config_path)).data.train_on == "train+val"


def test_two_workers_share_one_study(aria_dataset: Path, tiny_config_file: Path, tmp_path: Path) -> None:
    from bloodcell.data.prepare import prepare_data

    prepare_data(
        load_config(str(tiny_config_file)).data, aria_dataset, progress=False
    )  # warm the shared cache
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE.model_dump(mode="json")))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out = tmp_path / "tune"
    command = [sys.executable, "-c", WORKER, str(barrier), "tune", "--data", str(aria_dataset), "--trials", "4",
               "--config", str(tiny_config_file), "--space", str(space), "--pruner", "none", "--out", str(out),
               "--study", "shared", "--set", "train.epochs=1", "--json"]  # fmt: skip
    env = child_env()
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1])["study"] == "shared"

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{out.resolve() / 'study.db'}")
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Optuna's budget check runs between trials, so two workers can at most overshoot by one trial.
    assert 4 <= len(finished) <= 5 and all(t.state != TrialState.FAIL for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    assert len({Path(t.user_attrs["run_dir"]) for t in trials}) == len(trials)


def test_cv_objective_is_the_mean_over_kfold_folds(aria_dataset: Path, tmp_path: Path) -> None:
    base = config_from_dict({**TINY, "train": {**TINY["train"], "epochs": 1}})
    result = tune(
        base, aria_dataset, 1, out_dir=tmp_path / "cv", cv=2, space=TINY_SPACE, pruner="none", report=False
    )
    trial = optuna.load_study(study_name="tiny", storage=result.storage).get_trials()[0]
    folds = [trial.user_attrs[f"fold_{k}_val_balanced_accuracy"] for k in range(2)]
    assert trial.value == pytest.approx(sum(folds) / 2)
    assert sorted(trial.intermediate_values) == [1, 2]  # fold k's epoch e is step k * epochs + e
    for k in range(2):
        ran = load_config(str(tmp_path / "cv" / "trials" / "trial-0000" / f"fold-{k}" / "config.yaml"))
        assert (ran.data.protocol, ran.data.folds, ran.data.fold) == ("kfold", 2, k)
    assert (
        load_config(str(result.best_config_path)).data.protocol == "session"
    )  # the tuned config trains as usual


def test_the_cli_offers_the_pruners_the_search_knows() -> None:
    """--pruner is a fixed choice, so a typo fails at once, not after the study has started."""
    import typing

    from bloodcell.cli.tune import tune_command
    from bloodcell.tune.search import PrunerName

    assert typing.get_args(typing.get_type_hints(tune_command)["pruner"]) == typing.get_args(PrunerName)


def test_a_postgresql_url_without_its_driver_names_the_extra_and_the_scheme() -> None:
    """A plain postgresql:// URL needs psycopg2, which nothing installs; the [postgres] extra brings psycopg 3."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("psycopg2 is installed here: the plain URL would try to connect")
    args = (optuna.pruners.NopPruner(), optuna.samplers.RandomSampler())
    with pytest.raises(UserError, match=r"\.\[postgres\].*postgresql\+psycopg://"):
        open_study("s", "postgresql://u:p@127.0.0.1:1/db", config_from_dict(TINY), TINY_SPACE, None, *args)


def test_tune_with_a_missing_or_empty_dataset_is_one_line_and_leaves_no_study(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for data, words in (("nope", "dataset folder not found"), ("empty", "dataset folder is empty")):
        result = CliRunner().invoke(app, ["tune", "--data", data, "--trials", "2", "--out", "t"])
        assert isinstance(result.exception, UserError) and words in str(result.exception), result.output
        assert not (tmp_path / "t").exists()



def test_a_folder_of_one_class_is_refused_before_the_study_and_lr_find_refuses_it_too(tmp_path: Path, monkeypatch) -> None:
    """train refuses it; tune recorded a failed trial with Optuna's traceback, lr-find suggested a rate."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one" / "Benign").mkdir(parents=True)  # a known class name: a folder of some classes is data
    rng = np.random.default_rng(0)
    for k in range(60):  # distinct images (no duplicate group), so the split leaves a training part
        pixels = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(tmp_path / "one" / "Benign" / f"a-{k:03d}.png")
    result = CliRunner().invoke(app, ["tune", "--data", "one", "--trials", "1", "--out", "t"])
    assert isinstance(result.exception, UserError) and "at least two classes" in str(result.exception)
    assert not (tmp_path / "t").exists()
    assert CliRunner().invoke(app, ["tune", "--data", "one", "--trials", "1", "--timeout", "-5"]).exit_code == 2
    found = CliRunner().invoke(app, ["lr-find", "--data", "one", "--steps", "10", "--set", "data.image_size=32"])
    assert isinstance(found.exception, UserError) and "at least two classes" in str(found.exception)


def test_lr_find_checks_its_range_before_reading_the_data(tmp_path: Path) -> None:
    for start, end in (("1", "1e-6"), ("1e-6", "inf")):
        result = CliRunner().invoke(app, ["lr-find", "--data", str(tmp_path / "never-read"), "--start-lr", start,
                                          "--end-lr", end])  # fmt: skip
        assert isinstance(result.exception, UserError) and "0 < start lr < end lr" in str(result.exception)


def test_a_user_error_inside_a_trial_reaches_the_user_without_optuna_s_traceback(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import bloodcell.train

    def refuses(*args, **kwargs):
        raise UserError("no training images of class Pro-B (test)")

    monkeypatch.setattr(bloodcell.train, "fit", refuses)
    with caplog.at_level("WARNING", logger="optuna"), pytest.raises(UserError, match=r"Pro-B \(test\)"):
        tune(config_from_dict(TINY), aria_dataset, 1, out_dir=tmp_path / "t", space=TINY_SPACE, pruner="none", report=False)
    assert "Traceback" not in caplog.text and not any(record.exc_info for record in caplog.records)


# ------------------------------------------------------------------------------ budget, failures, retries


def test_one_tuning_folder_holds_one_study(aria_dataset: Path, tmp_path: Path) -> None:
    """Trial folders and result files are named by trial number: a second study there would collide."""
    base, out = config_from_dict(TINY), tmp_path / "tune"
    common = {"out_dir": out, "space": TINY_SPACE, "pruner": "none", "seed": 0, "report": False}
    tune(base, aria_dataset, 1, study_name="a", **common)
    with pytest.raises(UserError, match=r"holds the results of study 'a'; give study 'b' another --out"):
        tune(base, aria_dataset, 1, study_name="b", **common)
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")] == ["a"]


def test_a_failed_trial_is_replaced_and_failures_in_a_row_stop_the_worker_with_a_line(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import bloodcell.train
    from bloodcell.train import TrainingDiverged
    from bloodcell.tune.search import MAX_FAILURES_IN_A_ROW

    base = config_from_dict(TINY)
    real_fit, calls = bloodcell.train.fit, {"n": 0}

    def first_diverges(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TrainingDiverged("training diverged (test)")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(bloodcell.train, "fit", first_diverges)
    common = {"space": TINY_SPACE, "pruner": "none", "seed": 0, "report": False}
    result = tune(base, aria_dataset, 2, out_dir=tmp_path / "one", **common)
    assert (result.n_complete, result.n_failed) == (2, 1)  # the failure did not count towards the 2
    assert "TrainingDiverged: training diverged (test)" in (tmp_path / "one" / "trials.csv").read_text()

    def always_diverges(*args, **kwargs):
        raise TrainingDiverged("training diverged (test)")

    monkeypatch.setattr(bloodcell.train, "fit", always_diverges)
    result = tune(base, aria_dataset, 5, out_dir=tmp_path / "all", **common)
    assert (result.n_complete, result.n_failed) == (0, MAX_FAILURES_IN_A_ROW)
    assert f"0 of 5 finished trials: {MAX_FAILURES_IN_A_ROW} trials in a row failed" in capsys.readouterr().err


def test_a_trial_interrupted_again_and_again_is_queued_every_time(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job preempted more often than a dead worker's trial is retried must still keep its trial."""
    import bloodcell.train

    base = config_from_dict({**TINY, "train": {**TINY["train"], "epochs": 4}})
    common = {"out_dir": tmp_path / "tune", "space": TINY_SPACE, "pruner": "none", "seed": 0, "report": False}
    real_fit = bloodcell.train.fit

    def interrupted_fit(config, out_dir=None, *, epoch_callback=None, **kwargs):
        def stop(epoch, row):
            epoch_callback(epoch, row)
            raise KeyboardInterrupt  # after each attempt's first new epoch

        return real_fit(config, out_dir, epoch_callback=stop, **kwargs)

    monkeypatch.setattr(bloodcell.train, "fit", interrupted_fit)
    for _ in range(4):
        with pytest.raises(KeyboardInterrupt):
            tune(base, aria_dataset, 1, **common)
    monkeypatch.setattr(bloodcell.train, "fit", real_fit)
    result = tune(base, aria_dataset, 1, **common)
    trials = optuna.load_study(study_name="tiny", storage=result.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 4 + [TrialState.COMPLETE]
    assert all(t.params == trials[0].params for t in trials)  # the same trial, never new parameters
    history = (tmp_path / "tune" / "trials" / "trial-0000" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")
def test_a_dead_worker_s_trial_is_queued_again_before_the_budget_is_counted(tmp_path: Path) -> None:
    """A trial whose worker's heartbeat went silent must not count as running for ever: the worker that
    checks the budget fails it and queues it again (Optuna itself does so only when a trial starts)."""
    import time

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from bloodcell.tune.search import _trials_towards

    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))  # fmt: skip
    study = optuna.create_study(storage=storage, direction="maximize")
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    storage.record_heartbeat(dead._trial_id)  # its worker's last sign of life
    time.sleep(2.5)  # longer than the grace period: the worker is dead
    assert _trials_towards(study) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params  # queued again with its parameters


def test_a_search_space_file_that_is_not_yaml_or_out_of_range_is_named_before_any_trial(tmp_path: Path) -> None:
    from bloodcell.tune.search import load_space

    broken = tmp_path / "space.yaml"
    broken.write_text("lr: [0.001\n")
    with pytest.raises(UserError, match=f"search space {re.escape(str(broken))}"):
        load_space(broken)
    base = config_from_dict(TINY)
    with pytest.raises(UserError, match=r"search space \(--space\) label_smoothing: 1.5 gives an invalid config"):
        _check_space_fits_model(base, SearchSpace(label_smoothing=(0.5, 1.5)))
    with pytest.raises(UserError, match=r"augment_strength: -1"):
        _check_space_fits_model(base, SearchSpace(augment_strength=(-1.0, 1.0)))


def _study_of_finished_trials(curves: list[dict[int, float]], pruner: optuna.pruners.BasePruner) -> optuna.Study:
    from optuna.trial import create_trial

    study = optuna.create_study(direction="maximize", pruner=pruner)
    for values in curves:
        study.add_trial(create_trial(value=max(values.values()), intermediate_values=values, params={}, distributions={}))
    return study


def test_under_cv_the_median_pruner_waits_out_the_first_half_of_every_fold() -> None:
    from bloodcell.tune.search import FoldMedianPruner

    pruner = FoldMedianPruner(epochs=4, warmup=3)
    study = _study_of_finished_trials([{s: 0.9 for s in range(1, 13)}] * 3, pruner)
    trial = study.ask()
    judged = []
    for step in range(1, 13):  # 3 folds of 4 epochs, every one at chance
        trial.report(0.25, step)
        if trial.should_prune():
            judged.append(step)
    assert judged == [3, 4, 7, 8, 11, 12]


def test_under_cv_each_fold_is_judged_on_its_own_epochs() -> None:
    """An easy first fold must not shelter a trial at chance on the second (Optuna's MedianPruner takes the
    best over all the trial's steps), nor an unlucky first fold doom a trial that is fine on the second."""
    from bloodcell.tune.search import make_pruner

    epochs = 4
    finished = [{**{e: easy for e in range(1, 5)}, **{4 + e: hard for e in range(1, 5)}}
                for easy, hard in ((0.95, 0.70), (0.96, 0.75), (0.97, 0.80))]  # fmt: skip
    study = _study_of_finished_trials(finished, make_pruner("median", epochs, folds=2))
    trial = study.ask()
    pruned_at = None
    for step, value in enumerate([0.96] * 4 + [0.25] * 4, start=1):  # the median on fold 1, chance on fold 2
        trial.report(value, step)
        if trial.should_prune():
            pruned_at = step
            break
    assert pruned_at == 4 + 3  # fold 2's first epoch past its warm-up
    one_fold = _study_of_finished_trials([{e: v for e in range(1, 5)} for v in (0.8, 0.9, 0.95)], make_pruner("median", epochs))
    trial = one_fold.ask()
    for step, value in enumerate([0.2, 0.95, 0.5, 0.85], start=1):
        trial.report(value, step)
    assert not trial.should_prune()  # its best, 0.95, beats the median (0.9), as Optuna's rule has it
    diverged = one_fold.ask()
    diverged.report(float("nan"), 3)
    assert diverged.should_prune()  # only NaN so far: no score, pruned as Optuna does
    gap = one_fold.ask()
    gap.report(0.95, 3)
    gap.report(float("nan"), 4)
    assert not gap.should_prune()  # one NaN beside a good epoch: judged on the good one, as Optuna's nanmax


def test_a_fold_that_stops_early_reports_its_result_at_the_fold_s_last_step(tmp_path: Path, monkeypatch) -> None:
    """Hyperband judges a cut at the first step reported at or after it: without this, the end of an
    early-stopped fold was judged on the next fold's first epoch."""
    from types import SimpleNamespace

    import bloodcell.train
    from bloodcell.tune.search import _run_fold

    def stops_at_epoch_3(config, out_dir=None, *, epoch_callback=None, **kwargs):
        for epoch in (1, 2, 3):
            epoch_callback(epoch, {"val_balanced_accuracy": 0.5 + 0.1 * epoch})
        return SimpleNamespace(stopped="early_stopping", best_val_balanced_accuracy=0.8, history=[])

    monkeypatch.setattr(bloodcell.train, "fit", stops_at_epoch_3)
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    config = config_from_dict({**TINY, "train": {**TINY["train"], "epochs": 10}})
    assert _run_fold(trial, config, tmp_path / "fold-1", None, step_offset=10, is_retry=False) == 0.8
    assert study.get_trials()[0].intermediate_values == {11: 0.6, 12: 0.7, 13: 0.8, 20: 0.8}


@pytest.mark.parametrize(("epochs", "folds"), [(10, 1), (20, 1), (10, 5), (20, 5)])
def test_hyperband_cuts_past_the_warm_up_and_under_cv_at_the_ends_of_folds(epochs: int, folds: int) -> None:
    """Its first cut came at epoch 2 of 10, the one-cycle peak, and under --cv at the start of a fold."""
    from bloodcell.tune.search import make_pruner

    pruner = make_pruner("hyperband", epochs, folds)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.ask()  # brackets are laid out when the first trial asks
    cuts = {int(pruner._min_resource * pruner._reduction_factor**k)  # type: ignore[attr-defined]
            for k in range(8)} & set(range(1, epochs * folds))  # fmt: skip
    for cut in cuts:
        epoch = (cut - 1) % epochs + 1
        assert (epoch == epochs) if folds > 1 else (epoch > epochs // 2), (cut, epoch)


def test_the_default_study_database_stays_in_a_folder_whose_name_holds_url_characters(tmp_path: Path) -> None:
    from bloodcell.tune.search import default_storage, open_storage

    out = tmp_path / "tune?x %25y#z"
    out.mkdir()
    open_storage(default_storage(out))
    assert (out / "study.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_unknown_lr_find_method_names_the_methods_as_the_api_spells_them() -> None:
    from bloodcell.tune.lr_find import suggest_lr

    with pytest.raises(UserError, match="unknown lr-find method 'min-loss'; choose min_loss or steepest"):
        suggest_lr(np.geomspace(1e-5, 1, 20), np.linspace(2, 1, 20), "min-loss")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ what the user is shown


@pytest.fixture
def optuna_warnings() -> Iterator[list[logging.LogRecord]]:
    """Optuna's log records of WARNING and above, as its console handler would print them (Optuna's
    loggers do not propagate, so pytest's caplog never sees them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(handler)
    yield records
    logging.getLogger("optuna").removeHandler(handler)


def _finished_trial(number_of_epochs: int, lr: float, value: float, run_dir: Path | None = None) -> optuna.trial.FrozenTrial:
    from optuna.trial import create_trial

    return create_trial(value=value, params={"lr": lr},
                        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)},
                        intermediate_values={e: value for e in range(1, number_of_epochs + 1)},
                        user_attrs={"run_dir": str(run_dir)} if run_dir else {})  # fmt: skip


def test_a_report_of_too_few_trials_says_which_plots_it_could_not_draw(
    tmp_path: Path, optuna_warnings: list[logging.LogRecord]
) -> None:
    """Optuna draws empty axes (and logs a warning) for a study too small: the report must not link them."""
    from bloodcell.tune.report import write_report

    study = optuna.create_study(direction="maximize")
    write_report(study, tmp_path / "none")
    assert (tmp_path / "none" / "report.md").read_text().count("_Not drawn: ") == 3
    study.add_trial(_finished_trial(0, 0.01, 0.5))  # one complete trial that reported no epoch
    report = write_report(study, tmp_path / "one").read_text()
    assert "![Optimisation history](plots/history.png)" in report, report
    assert "_Not drawn: needs two complete trials; the study has 1_" in report
    assert "_Not drawn: no trial has reported an epoch yet_" in report
    assert not (tmp_path / "one" / "plots" / "importance.png").exists()
    study.add_trial(_finished_trial(2, 0.05, 0.7))
    report = write_report(study, tmp_path / "two").read_text()
    assert "_Not drawn" not in report and (tmp_path / "two" / "plots" / "importance.png").is_file(), report
    assert optuna_warnings == []  # Optuna's own complaints stay off the console


def test_the_report_names_the_run_folder_a_retried_trial_trained_in(tmp_path: Path) -> None:
    from bloodcell.tune.report import write_report

    out = tmp_path / "tune"
    study = optuna.create_study(direction="maximize")
    study.add_trial(_finished_trial(2, 0.01, 0.5, out / "trials" / "trial-0000"))
    study.add_trial(_finished_trial(2, 0.05, 0.9, out.resolve() / "trials" / "trial-0000"))  # retried trial 0
    study.add_trial(_finished_trial(2, 0.02, 0.6, Path("/elsewhere/trials/trial-0002")))  # another machine's
    report = write_report(study, out).read_text()
    assert "**Best: trial 1, validation balanced accuracy 0.9000** (`lr` = 0.05); its run folder is " \
           "`trials/trial-0000`." in report, report
    assert "| run folder |" in report and re.search(r"^\| 1 \| complete \| 0.9 \| 2 \| [^|]* \| trials/trial-0000 \|",
                                                      report, flags=re.M), report  # fmt: skip
    assert "| /elsewhere/trials/trial-0002 |" in report and "trial-0001" not in report


def test_an_interrupted_trial_leaves_no_optuna_traceback_or_plot_warning(
    aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optuna_warnings: list[logging.LogRecord]
) -> None:
    """Ctrl-C or SIGTERM: the CLI says "interrupted; run the same command again", and that is all."""
    import bloodcell.train
    from bloodcell.cli import Interrupted

    def interrupted(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(bloodcell.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(config_from_dict(TINY), aria_dataset, 1, out_dir=tmp_path / "t", space=TINY_SPACE, pruner="none")
    assert [record.getMessage() for record in optuna_warnings] == []
    assert (tmp_path / "t" / "report.md").read_text().count("_Not drawn: ") == 3


@pytest.mark.parametrize(("signal_number", "status", "word"), [("SIGINT", 130, "interrupted"),
                                                              ("SIGTERM", 143, "terminated")])
def test_an_interrupted_tune_says_so_in_one_line_with_the_signals_status(
    aria_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signal_number: str,
    status: int, word: str,
) -> None:  # fmt: skip
    """The command's line says how to continue; main() adds no second "interrupted" of its own."""
    import signal

    from bloodcell import cli
    from bloodcell.tune import search

    def interrupted(*args, **kwargs):
        cli._interrupt(getattr(signal, signal_number), None)  # as the signal handler main() installs does

    monkeypatch.setattr(search, "tune", interrupted)
    monkeypatch.setattr(sys, "argv", ["bloodcell", "tune", "--data", str(aria_dataset), "--trials", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == status
    assert capsys.readouterr().err == f"{word}; run the same command again to continue the study\n"


def test_a_storage_password_is_never_shown(aria_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: a start that fails on its storage leaves no empty --out folder behind."""
    from bloodcell.tune import search
    from bloodcell.tune.search import TuneResult, shown_storage

    assert shown_storage("postgresql+psycopg://u:secret@host:5432/db") == "postgresql+psycopg://u:***@host:5432/db"
    assert shown_storage("postgresql://u:secret@host:port/db") == "postgresql://u:***@host:port/db"  # no valid URL
    assert shown_storage("runs/my study.db") == "runs/my study.db"
    assert shown_storage("sqlite:////data/me@lab/study.db") == "sqlite:////data/me@lab/study.db"  # no user part
    # libpq reads a password from the query too; one may hold an unencoded "@" or "/" (with a port that is no
    # number, the URL cannot even be parsed).
    assert shown_storage("postgresql://u@h:1/db?sslmode=require&password=secret&x=1") == \
        "postgresql://u@h:1/db?sslmode=require&password=***&x=1"
    assert shown_storage("postgresql://optuna:p@ss@host/db") == "postgresql://optuna:***@host/db"
    assert shown_storage("postgresql://optuna:se/cret@host:abc/db") == "postgresql://optuna:***@host:abc/db"
    assert "secret" not in shown_storage("postgresql://u@h:1/db?password=se@cret")
    assert search._without_url("no password p%40ssword for u", "postgresql://u:p%40ssword@h/db") == \
        "no password *** for u"  # the password quoted alone, as the driver decoded it
    # a socket's URL has no host, and libpq's key passphrase is a password too
    assert shown_storage("postgresql:///optuna?host=/tmp/s&password=hunter22") == \
        "postgresql:///optuna?host=/tmp/s&password=***"
    assert shown_storage("postgresql://u@h/db?sslpassword=topsecret") == "postgresql://u@h/db?sslpassword=***"
    # a password that is also the user's or the database's name: the message keeps the URL's shape, and the
    # masked URL does not give the password away ("***ql+psycopg://" of "postgresql+psycopg://")
    same = "postgresql+psycopg://postgres:postgres@localhost:5999/postgres"
    assert search._without_url(f'failed for user "postgres" {same}', same) == \
        'failed for user "***" postgresql+psycopg://postgres:***@localhost:5999/postgres'
    url = "postgresql://u:secret@127.0.0.1:1/db"
    result = CliRunner().invoke(app, ["tune", "--data", str(aria_dataset), "--trials", "1", "--storage", url,
                                      "--out", str(tmp_path / "t")])  # fmt: skip
    assert isinstance(result.exception, UserError), result.output
    assert "secret" not in str(result.exception) and "u:***@127.0.0.1:1/db" in str(result.exception)
    assert not (tmp_path / "t").exists()
    for typed in ("postgresql://u@127.0.0.1:1/db?password=secret", "postgresql://optuna:se/cret@host:abc/db"):
        result = CliRunner().invoke(app, ["tune", "--data", str(aria_dataset), "--trials", "1", "--storage", typed,
                                          "--out", str(tmp_path / "t")])  # fmt: skip
        assert isinstance(result.exception, UserError) and "cret" not in str(result.exception), result.exception
    # Nor empty parent folders that --out needed, while one that was there before stays.
    (tmp_path / "there").mkdir()
    result = CliRunner().invoke(app, ["tune", "--data", str(aria_dataset), "--trials", "1", "--storage", url,
                                      "--out", str(tmp_path / "there" / "a" / "b" / "c")])  # fmt: skip
    assert isinstance(result.exception, UserError) and os.listdir(tmp_path / "there") == []

    run = tmp_path / "t" / "trials" / "trial-0000"
    finished = TuneResult(study_name="s", storage=url, out_dir=tmp_path / "t", n_complete=2, n_pruned=0, n_failed=1,
                          best_value=0.9, best_params={"lr": 0.01}, best_trial=1, best_run_dir=run,
                          best_config_path=tmp_path / "t" / "best.yaml", trials_path=tmp_path / "t" / "trials.csv",
                          report_path=tmp_path / "t" / "report.md")  # fmt: skip
    monkeypatch.setattr(search, "tune", lambda *args, **kwargs: finished)
    args = ["tune", "--data", str(aria_dataset), "--trials", "1", "--storage", url]
    summary = json.loads(CliRunner().invoke(app, [*args, "--json"]).output.strip().splitlines()[-1])
    assert summary["storage"] == "postgresql://u:***@127.0.0.1:1/db" and summary["best_run_dir"] == str(run)
    text = CliRunner().invoke(app, args).output
    assert "secret" not in text and f"best: trial 1, val balanced accuracy 0.9000 (lr=0.01); run folder {run}" in text


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("lr: 0.01\n", "key 'lr': Input should be a valid tuple (got 0.01); lr takes a [low, high] list, or null"),
        ("weight_decay: [1, 2, 3]\n", "weight_decay takes a [low, high] list"),
        ("image_size: 96\n", "key 'image_size': Input should be a valid list (got 96); image_size takes a list of values"),
        ("lrr: [0.001, 0.01]\n", "unknown key 'lrr' (did you mean 'lr'?); the keys are lr, weight_decay,"),
        ("- 0.01\n", "expected a mapping of some of lr, weight_decay"),
        ("lr: [0.1, 0.01]\n", "lr: low 0.1 is above high 0.01"),
        ("weight_decay: [0, 0.1]\n", "weight_decay is searched on a log scale; its low end must be > 0"),
        ("width: []\n", "width: give at least one value, or null to keep the config's"),
    ],
)
def test_a_bad_search_space_file_is_one_line_naming_the_key(tmp_path: Path, content: str, words: str) -> None:
    from bloodcell.tune.search import load_space

    path = tmp_path / "space.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as raised:
        load_space(path)
    message = str(raised.value)
    assert message.startswith(f"search space {path}: ") and words in message, message
    assert message.count("search space") == 1, message  # said once, by the line's prefix
    assert "pydantic" not in message and "\n" not in message and "validation error" not in message
